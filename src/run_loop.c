/*
 * run_loop.c -- the loop around batches (pup_processor_run): take the partitions (or wait
 * as a standby), run a batch, then either run the next one at once (it moved), look
 * cheaply at the hole it stopped at, or sleep until a NOTIFY of the events table, the
 * poll interval or the next heartbeat. Transient failures are retried with capped
 * backoff, reconnecting in place; a stop fd ends the loop between batches.
 */
#include "processor_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

int pup_proc_listen(pup_processor *p, pup_error *err) {
    if (p->listening) return 0;
    char sql[PUP_NAME_MAX + 64];
    snprintf(sql, sizeof sql, "LISTEN \"%s\"", p->store->channel);
    if (pup_conn_command(p->conn, sql, err) < 0) return -1;
    p->listening = 1;
    return 0;
}

static void logf_(const pup_run_opts *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(const pup_run_opts *o, const char *fmt, ...) {
    char line[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (o->log) o->log(o->ud, line);
    else fprintf(stderr, "pupsourcing: %s\n", line);
}

static int stopped(const pup_run_opts *o) {
    if (o->stop_fd < 0) return 0;
    struct pollfd f = {.fd = o->stop_fd, .events = POLLIN};
    return poll(&f, 1, 0) > 0 && (f.revents & POLLIN);
}

/* Waits up to ms for a notification, the stop fd or the timeout. Returns 1 if stop. */
static int wait_for(pup_processor *p, const pup_run_opts *o, int ms) {
    PGconn *pg = pup_conn_pg(p->conn);
    /* A notification read during the last batch is already queued: no need to wait. */
    if (p->listening && pup_conn_ok(p->conn) && PQconsumeInput(pg)) {
        PGnotify *nt;
        int any = 0;
        while ((nt = PQnotifies(pg)) != NULL) {
            PQfreemem(nt);
            any = 1;
        }
        if (any) return stopped(o);
    }
    if (p->cfg.group) {
        int until_tick = (int)((p->next_tick - pup_proc_mono()) * 1000) + 1;
        if (until_tick < ms) ms = until_tick < 0 ? 0 : until_tick;
    }
    struct pollfd fds[2];
    int n = 0;
    if (o->stop_fd >= 0) fds[n++] = (struct pollfd){.fd = o->stop_fd, .events = POLLIN};
    int sock = p->listening && pup_conn_ok(p->conn) ? PQsocket(pg) : -1;
    if (sock >= 0) fds[n++] = (struct pollfd){.fd = sock, .events = POLLIN};
    int rc = poll(fds, (nfds_t)n, ms);
    if (rc < 0 && errno != EINTR) return 0;
    if (o->stop_fd >= 0 && (fds[0].revents & POLLIN)) return 1;
    if (sock >= 0) {
        PQconsumeInput(pg);
        PGnotify *nt;
        while ((nt = PQnotifies(pg)) != NULL) PQfreemem(nt);
    }
    return 0;
}

/* While waiting at a hole: 1 when a position in it has appeared or a snapshot's xmin
 * has passed its bound (every writer that could fill it has ended), so the window is
 * worth reading again; 0 when nothing changed. One small query instead of the window. */
static int hole_changed(pup_processor *p, pup_error *err) {
    pup_gap *g = pup_gaps_find(&p->gaps, p->wait_lo, p->wait_lo);
    if (!g || g->bound == PUP_GAP_PENDING) return 1;
    char lo[24], hi[24];
    snprintf(lo, sizeof lo, "%lld", g->lo);
    snprintf(hi, sizeof hi, "%lld", g->hi);
    PGresult *r = pup_proc_run(p, err, p->sql_hole, 2, lo, hi);
    if (!r) return pup_proc_context(p, err);
    int changed = PQgetvalue(r, 0, 0)[0] == 't' || pup_gap_dead(g, strtoull(PQgetvalue(r, 0, 1), NULL, 10));
    PQclear(r);
    return changed;
}

/* Stopped at a hole: its commit notifies, a rollback does not, so look again soon,
 * cheaply, until the hole may have changed (or a heartbeat is due). 1: stop. */
static int wait_at_hole(pup_processor *p, const pup_run_opts *o, pup_error *err) {
    int hole_ms = 2, changed = 0;
    while (!changed) {
        if (wait_for(p, o, hole_ms)) return 1;
        hole_ms = hole_ms * 2 > 50 ? 50 : hole_ms * 2;
        if (p->cfg.group && pup_proc_mono() >= p->next_tick) break;
        if ((changed = hole_changed(p, err)) < 0) return -1;
    }
    return 0;
}

/* Logs a change between standby and active, once. */
static void tell_standby(pup_processor *p, const pup_run_opts *o, int acquired, int *told) {
    if (!acquired && !*told) {
        if (p->cfg.group)
            logf_(o, "projection %s: group worker %s holds no partition yet", p->name, p->owner);
        else
            logf_(o, "projection %s partition %d/%d: standby (another processor holds it)",
                  p->name, p->cfg.partition_key, p->cfg.total_partitions);
    } else if (acquired && *told) {
        if (p->cfg.group)
            logf_(o, "projection %s: group worker %s took over %d partition(s)", p->name, p->owner, p->nheld);
        else
            logf_(o, "projection %s partition %d/%d: took over", p->name, p->cfg.partition_key,
                  p->cfg.total_partitions);
    }
    *told = !acquired;
}

/* After a failure: 0 to retry (after the backoff, reconnected if the connection is
 * gone), 1 to stop, -1 when the failure is not transient. */
static int retry_after(pup_processor *p, const pup_run_opts *o, pup_error *err, int *backoff_ms) {
    if (!pup_error_is_transient(err)) return -1;
    p->stats.retries++; /* before the log line, which publishes the stats */
    logf_(o, "%s; retrying in %d ms", err->message, *backoff_ms);
    if (wait_for(p, o, *backoff_ms)) return 1;
    *backoff_ms = *backoff_ms * 2 > 5000 ? 5000 : *backoff_ms * 2;
    if (!pup_conn_ok(p->conn)) { /* the next acquire sees the new session and starts over */
        pup_error e2;
        if (pup_conn_reset(p->conn, &e2) == 0) logf_(o, "projection %s: reconnected", p->name);
    }
    return 0;
}

/* Counts a committed batch that moved the checkpoint in the duration histogram. */
static void note_batch(pup_processor *p, double seconds) {
    static const double bounds[PUP_BATCH_BUCKETS] = PUP_BATCH_BUCKET_BOUNDS;
    int b = 0;
    while (b < PUP_BATCH_BUCKETS && seconds > bounds[b]) b++;
    p->stats.batch_buckets[b]++;
    p->stats.batch_us += (long long)(seconds * 1e6);
}

/* One turn: take partitions, run a batch, wait as it says. 1: stop; 0: go on; -1 with err. */
static int turn(pup_processor *p, const pup_run_opts *o, long long *target, int *told, int *backoff_ms,
                pup_error *err) {
    int acquired;
    if (pup_processor_acquire(p, &acquired, err) < 0) return -1;
    tell_standby(p, o, acquired, told);
    if (!acquired) return wait_for(p, o, p->cfg.group ? 200 : 1000);
    if (*target < 0 && o->once && (*target = pup_store_head(p->store, p->conn, err)) < 0) return -1;
    int handled, waiting;
    long long advanced;
    double t0 = pup_proc_mono();
    p->stats.batch_started_ms = (long long)(pup_proc_now() * 1000);
    if (o->progress) o->progress(o->ud, p); /* a batch that runs long shows as one */
    int rc = pup_processor_batch(p, &handled, &advanced, &waiting, err);
    p->stats.batch_started_ms = 0;
    if (rc < 0) return -1;
    if (advanced > 0) note_batch(p, pup_proc_mono() - t0);
    *backoff_ms = 100;
    if (o->progress) o->progress(o->ud, p);
    if (o->once && p->stats.position >= *target) return 1;
    if (waiting) return wait_at_hole(p, o, err);
    if (advanced > 0) return 0; /* more may be waiting */
    return wait_for(p, o, p->cfg.poll_interval_ms);
}

static int run_loop(pup_processor *p, const pup_run_opts *o, pup_error *err) {
    long long target = -1;
    int backoff_ms = 100, told_standby = 0;
    for (;;) {
        if (stopped(o)) return 0;
        int rc = turn(p, o, &target, &told_standby, &backoff_ms, err);
        if (rc == 0) continue;
        if (rc < 0 && err->code == PUP_ERR_HANDLER) p->stats.handler_errors++;
        if (rc < 0) rc = retry_after(p, o, err, &backoff_ms);
        if (rc != 0) return rc > 0 ? 0 : -1;
    }
}

int pup_processor_run(pup_processor *p, const pup_run_opts *o, pup_error *err) {
    int rc = run_loop(p, o, err);
    pup_processor_release(p); /* a group worker hands its partitions over at once */
    return rc;
}
