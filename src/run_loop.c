/*
 * run_loop.c -- the loop around batches (pup_processor_run): take the partitions (or wait
 * as a standby), run a batch, then either run the next one at once (it moved), look
 * cheaply at the hole it stopped at, look again soon at positions drawn above the head,
 * or sleep until a NOTIFY of the events table, the poll interval or the next heartbeat.
 * Transient failures are retried with capped backoff, reconnecting in place; a stop fd
 * ends the loop between batches.
 */
#include "processor_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int pup_proc_listen(pup_processor *p, pup_error *err) {
    if (p->listening) return 0;
    if (pup_conn_command(p->conn, p->store->sql_listen, err) < 0) return -1;
    p->listening = 1;
    return 0;
}

/* Logs rec (its event, level and extra fields set by the caller) with the processor's
 * fields and the printf-style text: to o->record, else (lifecycle records left out) to
 * o->log or stderr. The one log function of the loop. */
static void plog(pup_processor *p, const pup_run_opts *o, pup_log_rec *rec, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void plog(pup_processor *p, const pup_run_opts *o, pup_log_rec *rec, const char *fmt, ...) {
    char line[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    rec->msg = line;
    if (!rec->level) rec->level = "info";
    rec->projection = p->name;
    rec->group = p->cfg.group;
    rec->partition = p->cfg.partition_key;
    rec->total_partitions = p->cfg.group ? p->total : p->cfg.total_partitions;
    rec->worker = p->owner;
    rec->held = p->nheld;
    rec->position = p->stats.position;
    if (o->record) o->record(o->ud, rec);
    else if (rec->lifecycle) return;
    else if (o->log) o->log(o->ud, line);
    else fprintf(stderr, "pupsourcing: %s\n", line);
}

/* "projection X partition k/N" or "projection X (group worker W)", for log lines. */
static const char *who(const pup_processor *p, char *buf, size_t size) {
    if (p->cfg.group) snprintf(buf, size, "projection %s (group worker %s)", p->name, p->owner);
    else snprintf(buf, size, "projection %s partition %d/%d", p->name, p->cfg.partition_key, p->cfg.total_partitions);
    return buf;
}

/* A hole waited on longer than PUP_HOLE_LOG_SECONDS, logged once; and its passing. */
static void note_hole(pup_processor *p, const pup_run_opts *o, long long *told) {
    char w[400];
    if (p->wait_lo && *told != p->wait_lo && pup_proc_now() - p->wait_since >= PUP_HOLE_LOG_SECONDS) {
        pup_log_rec rec = {.level = "warning", .event = "hole", .lifecycle = 1, .hole = p->wait_lo,
                           .hole_since = p->wait_since};
        plog(p, o, &rec, "%s: waiting %.0f s on position %lld (a transaction that may still write it is open)",
             who(p, w, sizeof w), pup_proc_now() - p->wait_since, p->wait_lo);
        *told = p->wait_lo;
    } else if (*told && *told != p->wait_lo) {
        pup_log_rec rec = {.event = "hole_passed", .lifecycle = 1, .hole = *told};
        plog(p, o, &rec, "%s: passed position %lld", who(p, w, sizeof w), *told);
        *told = 0;
    }
}

static int stopped(const pup_run_opts *o) {
    if (o->stop_fd < 0) return 0;
    struct pollfd f = {.fd = o->stop_fd, .events = POLLIN};
    return poll(&f, 1, 0) > 0 && (f.revents & POLLIN);
}

/* Reads the notifications that arrived; 1 if there were any. Each is news: the look at
 * positions drawn above the head starts again (drawn_wait). */
static int take_notifications(pup_processor *p, PGconn *pg) {
    PGnotify *nt;
    int any = 0;
    PQconsumeInput(pg);
    while ((nt = PQnotifies(pg)) != NULL) {
        PQfreemem(nt);
        any = 1;
    }
    if (any) pup_drawn_look_restart(&p->drawn_look);
    return any;
}

/* Waits up to ms for a notification, the stop fd or the timeout. Returns 1 if stop. */
static int wait_for(pup_processor *p, const pup_run_opts *o, int ms) {
    PGconn *pg = pup_conn_pg(p->conn);
    /* A notification read during the last batch is already queued: no need to wait. */
    if (p->listening && pup_conn_ok(p->conn) && take_notifications(p, pg)) return stopped(o);
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
    if (sock >= 0) take_notifications(p, pg);
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
static int wait_at_hole(pup_processor *p, const pup_run_opts *o, long long *told, pup_error *err) {
    int hole_ms = 2, changed = 0;
    while (!changed) {
        note_hole(p, o, told);
        if (wait_for(p, o, hole_ms)) return 1;
        hole_ms = hole_ms * 2 > 50 ? 50 : hole_ms * 2;
        if (p->cfg.group && pup_proc_mono() >= p->next_tick) break;
        if ((changed = hole_changed(p, err)) < 0) return -1;
    }
    return 0;
}

/* The wait after a batch that found nothing new: soon while positions drawn above the head
 * may be appends whose wake-up came before their commit (pup_drawn_look_wait, pup_gap.h);
 * an append that skipped its wake-up and is slower than that to commit notifies after its
 * commit (append.c, WAKE_UP_SLOW_SECONDS). */
static int drawn_wait(pup_processor *p, int poll_ms) {
    long long in_flight = p->stats.drawn > p->stats.head ? p->stats.drawn : 0;
    double s = pup_drawn_look_wait(&p->drawn_look, in_flight, pup_proc_mono(), poll_ms / 1000.0);
    return (int)(s * 1000 + 0.5);
}

/* What the loop has logged, so each change is logged once. */
typedef struct told {
    int standby;      /* "standby" logged, not yet taken over */
    int held;         /* partitions held at the last look (-1: before the first) */
    int total;        /* a group's partition count at the last look */
    long long hole;   /* the hole logged as waited on (0: none) */
} told;

/* Logs a change between standby and active, once; and a group's layout and leases. */
static void tell_standby(pup_processor *p, const pup_run_opts *o, int acquired, told *t) {
    char w[400];
    if (p->cfg.group && t->total && t->total != p->total) {
        pup_log_rec rec = {.event = "layout", .lifecycle = 1};
        plog(p, o, &rec, "%s: the group now has %d partitions (was %d)", who(p, w, sizeof w), p->total, t->total);
    }
    t->total = p->total;
    if (!acquired && !t->standby) {
        pup_log_rec rec = {.event = t->held > 0 ? "lease_lost" : "standby"};
        if (p->cfg.group)
            plog(p, o, &rec, "projection %s: group worker %s holds no partition yet", p->name, p->owner);
        else
            plog(p, o, &rec, "projection %s partition %d/%d: standby (another processor holds it)",
                 p->name, p->cfg.partition_key, p->cfg.total_partitions);
    } else if (acquired && t->standby) {
        pup_log_rec rec = {.event = "lease_gained"};
        if (p->cfg.group)
            plog(p, o, &rec, "projection %s: group worker %s took over %d partition(s)", p->name, p->owner, p->nheld);
        else
            plog(p, o, &rec, "projection %s partition %d/%d: took over", p->name, p->cfg.partition_key,
                 p->cfg.total_partitions);
    } else if (acquired && t->held != p->nheld) { /* a first lease, or a group's share changed */
        pup_log_rec rec = {.event = p->nheld > t->held ? "lease_gained" : "lease_lost", .lifecycle = 1};
        if (p->cfg.group)
            plog(p, o, &rec, "%s: holds %d of %d partitions %s", who(p, w, sizeof w), p->nheld, p->total, p->held_list);
        else
            plog(p, o, &rec, "%s: holds the partition from position %lld", who(p, w, sizeof w), p->stats.position);
    }
    t->standby = !acquired;
    t->held = p->nheld;
}

/* After a failure: 0 to retry (after the backoff, reconnected if the connection is
 * gone), 1 to stop, -1 when the failure is not transient. */
static int retry_after(pup_processor *p, const pup_run_opts *o, pup_error *err, int *backoff_ms) {
    if (!pup_error_is_transient(err)) return -1;
    p->stats.retries++; /* before the log line, which publishes the stats */
    pup_log_rec rec = {.level = "warning", .event = "retry", .err = err, .retry_in_ms = *backoff_ms};
    plog(p, o, &rec, "%s; retrying in %d ms", err->message, *backoff_ms);
    if (wait_for(p, o, *backoff_ms)) return 1;
    *backoff_ms = *backoff_ms * 2 > 5000 ? 5000 : *backoff_ms * 2;
    if (!pup_conn_ok(p->conn)) { /* the next acquire sees the new session and starts over */
        pup_error e2;
        pup_log_rec rec = {.event = "reconnected"};
        if (pup_conn_reset(p->conn, &e2) == 0) plog(p, o, &rec, "projection %s: reconnected", p->name);
    }
    return 0;
}

/* Bytes of msg's first line, at most 300 (log lines; the tables keep the whole text). */
static int first_line(const char *msg) {
    size_t n = strcspn(msg, "\n");
    return n > 300 ? 300 : (int)n;
}

static const char *policy_name(const pup_processor *p) {
    return p->cfg.on_error == PUP_ON_ERROR_SKIP ? "skip" : p->cfg.on_error == PUP_ON_ERROR_RETRY ? "retry" : "stop";
}

/* A batch dead-lettered the poison event and moved past it. */
static void tell_dead_letter(pup_processor *p, const pup_run_opts *o) {
    const pup_poison *x = &p->poison;
    pup_log_rec rec = {.level = "warning", .event = "poison"};
    plog(p, o, &rec, "projection %s partition %d/%d: gave up on the event at global position %lld after %d attempt(s)"
          " (on_error = %s); dead-lettered in %s, moving on: %.*s", p->name, x->part, p->total, x->pos, x->attempts,
          policy_name(p), p->store->dead_letters, first_line(x->error), x->error);
}

/* Marks the partitions a handler failure stopped as failed, with the error (status
 * shows them); best effort: the failure itself is returned either way. */
static void record_failure(pup_processor *p, const pup_run_opts *o, const pup_error *err) {
    char total[16], keys[24], pos[24];
    snprintf(total, sizeof total, "%d", p->total);
    snprintf(keys, sizeof keys, "{%d}", p->poison.part);
    snprintf(pos, sizeof pos, "%lld", p->poison.pos);
    int event = p->poison.fresh;
    pup_error e;
    PGresult *r = pup_proc_run(p, &e, p->store->sql_failure_set, 5, p->name, total, event ? keys : p->held_list,
                               event ? pos : NULL, err->message);
    if (!r) {
        pup_log_rec rec = {.level = "warning", .event = "poison"};
        plog(p, o, &rec, "projection %s: could not record its failure in %s: %s", p->name, p->store->failures, e.message);
        return;
    }
    PQclear(r);
    p->poison.failure_clear = 0;
}

/* After a handler failure: 0 to go on (the projection's on_error retries or skips the
 * event: the next attempt is due after the backoff), -1 to stop, marked failed. */
static int handler_failed(pup_processor *p, const pup_run_opts *o, pup_error *err) {
    pup_poison *x = &p->poison;
    if (err->code != PUP_ERR_HANDLER) return -1;
    if (!x->fresh || p->cfg.on_error == PUP_ON_ERROR_STOP) {
        record_failure(p, o, err);
        return -1;
    }
    /* retry_backoff doubled per attempt, capped at 60 s (or at itself if longer) */
    double base = p->cfg.retry_backoff_ms > 0 ? p->cfg.retry_backoff_ms / 1000.0 : 1.0;
    double cap = base > 60 ? base : 60, delay = base;
    for (int i = 1; i < x->attempts && delay < cap; i++) delay *= 2;
    if (delay > cap) delay = cap;
    x->retry_at = pup_proc_mono() + delay;
    int max = p->cfg.on_error == PUP_ON_ERROR_RETRY && p->cfg.max_attempts > 0 ? p->cfg.max_attempts : 1;
    pup_log_rec rec = {.level = "warning", .event = "poison"};
    plog(p, o, &rec, "projection %s partition %d/%d: handler failed at global position %lld (attempt %d of %d,"
          " on_error = %s); trying it again in %.3g s: %.*s", p->name, x->part, p->total, x->pos, x->attempts, max,
          policy_name(p), delay, first_line(x->error), x->error);
    return 0;
}

/* One turn: take partitions, run a batch, wait as it says. 1: stop; 0: go on; -1 with err. */
static int turn(pup_processor *p, const pup_run_opts *o, long long *target, told *t, int *backoff_ms,
                pup_error *err) {
    int acquired;
    if (pup_processor_acquire(p, &acquired, err) < 0) return -1;
    tell_standby(p, o, acquired, t);
    if (!acquired) return wait_for(p, o, p->cfg.group ? 200 : 1000);
    double retry_in = p->poison.retry_at - pup_proc_mono(); /* a poison event's backoff (group: heartbeats go on) */
    if (p->poison.retry_at > 0 && retry_in > 0) return wait_for(p, o, (int)(retry_in * 1000) + 1);
    p->poison.retry_at = 0;
    if (*target < 0 && o->once && (*target = pup_store_head(p->store, p->conn, err)) < 0) return -1;
    int handled, waiting;
    long long advanced, dead = p->poison.dead_count;
    p->stats.batch_started_ms = (long long)(pup_proc_now() * 1000);
    if (o->progress) o->progress(o->ud, p); /* a batch that runs long shows as one */
    int rc = pup_proc_batch(p, 1, &handled, &advanced, &waiting, err);
    p->stats.batch_started_ms = 0;
    if (rc < 0 && advanced > 0) *backoff_ms = 100; /* batches committed before it failed: a new failure */
    if (rc < 0) return -1;
    if (p->poison.dead_count != dead) {
        p->stats.dead_letters = p->poison.dead_count;
        tell_dead_letter(p, o);
    }
    *backoff_ms = 100;
    if (o->progress) o->progress(o->ud, p);
    if (o->once && p->stats.position >= *target) return 1;
    note_hole(p, o, &t->hole);
    if (waiting) return wait_at_hole(p, o, &t->hole, err);
    if (advanced > 0) {
        pup_drawn_look_restart(&p->drawn_look); /* an append committed: look again above it */
        return 0;            /* more may be waiting */
    }
    return wait_for(p, o, drawn_wait(p, p->cfg.poll_interval_ms));
}

static int run_loop(pup_processor *p, const pup_run_opts *o, const char **reason, pup_error *err) {
    long long target = -1;
    int backoff_ms = 100;
    told t = {.held = -1};
    for (;;) {
        if (stopped(o)) {
            *reason = "stop requested";
            return 0;
        }
        int rc = turn(p, o, &target, &t, &backoff_ms, err);
        if (rc == 0) continue;
        if (rc > 0 && o->once && !stopped(o)) *reason = "caught up (once)";
        if (rc < 0) rc = retry_after(p, o, err, &backoff_ms);
        if (rc < 0) rc = handler_failed(p, o, err);
        if (rc != 0) return rc > 0 ? 0 : -1;
    }
}

int pup_processor_run(pup_processor *p, const pup_run_opts *o, pup_error *err) {
    char w[400];
    pup_log_rec start = {.event = "start", .lifecycle = 1};
    if (p->cfg.group)
        plog(p, o, &start, "%s: starting (group of %d partitions, batch size %d)", who(p, w, sizeof w),
             p->cfg.total_partitions, p->cfg.batch_size);
    else
        plog(p, o, &start, "%s: starting (batch size %d)", who(p, w, sizeof w), p->cfg.batch_size);
    const char *reason = "stop requested";
    long long handled = p->stats.handled;
    int rc = run_loop(p, o, &reason, err);
    pup_processor_release(p); /* a group worker hands its partitions over at once */
    pup_log_rec stop = {.level = rc < 0 ? "error" : "info", .event = "stop", .lifecycle = 1,
                        .err = rc < 0 ? err : NULL, .reason = rc < 0 ? "failed" : reason};
    plog(p, o, &stop, "%s: stopped at position %lld (%s; %lld event(s) handled)", who(p, w, sizeof w),
         p->stats.position, stop.reason, p->stats.handled - handled);
    return rc;
}
