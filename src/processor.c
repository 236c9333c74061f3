/*
 * processor.c -- the batch loop of a projection partition. See pup_processor.h and
 * docs/ordering.md for the gap rule.
 */
#include "pup_processor.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FIRST_EVENT_COL 4 /* pos, xmin, xmax, mine, then PUP_EVENT_COLUMNS */

/* A run of missing positions [lo, hi] seen below a visible one, and the xmax of the
 * snapshot that saw it: once a snapshot's xmin reaches that xmax, every transaction
 * that could fill the hole has ended. */
typedef struct gap {
    int active;
    long long lo, hi;
    uint64_t xmax;
    double since;
} gap;

struct pup_processor {
    const pup_store *store;
    pup_conn *conn;
    pup_projection_cfg cfg;
    char *name;
    pup_handler h;
    char *sql_read, *sql_checkpoint;
    char lock_key[PUP_NAME_MAX * 2 + 64];
    char owner[128];
    pup_params params;
    int setup_done, locked, listening;
    gap gap;
    long long recorded_wait; /* waiting_position last written to the checkpoint row */
    pup_processor_stats stats;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* "col IN ('a','b')" with escaped literals, or "true" for no scope. */
static char *scope_sql(PGconn *pg, const char *col, const char *const *vals, int n) {
    if (n == 0 || !vals) return strdup("true");
    size_t cap = strlen(col) + 16, len = 0;
    char *out = malloc(cap);
    if (!out) return NULL;
    len = (size_t)sprintf(out, "%s IN (", col);
    for (int i = 0; i < n; i++) {
        char *lit = PQescapeLiteral(pg, vals[i], strlen(vals[i]));
        if (!lit) {
            free(out);
            return NULL;
        }
        size_t need = len + strlen(lit) + 4;
        if (need > cap) {
            cap = need * 2;
            char *o = realloc(out, cap);
            if (!o) {
                PQfreemem(lit);
                free(out);
                return NULL;
            }
            out = o;
        }
        len += (size_t)sprintf(out + len, "%s%s", i ? "," : "", lit);
        PQfreemem(lit);
    }
    strcpy(out + len, ")");
    return out;
}

pup_processor *pup_processor_new(const pup_store *store, pup_conn *conn,
                                 const pup_projection_cfg *cfg, const pup_handler *h,
                                 pup_error *err) {
    if (!cfg->name || !*cfg->name) {
        pup_error_set(err, PUP_ERR_INVALID_PROJECTION, "projection has no name");
        return NULL;
    }
    if (cfg->total_partitions < 1 || cfg->partition_key < 0 ||
        cfg->partition_key >= cfg->total_partitions) {
        pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                      "projection %s: partition key %d is not in 0..%d (total partitions %d)",
                      cfg->name, cfg->partition_key, cfg->total_partitions - 1, cfg->total_partitions);
        return NULL;
    }
    pup_processor *p = calloc(1, sizeof *p);
    if (!p) {
        pup_error_set(err, PUP_ERR_DATABASE, "out of memory");
        return NULL;
    }
    p->store = store;
    p->conn = conn;
    p->cfg = *cfg;
    p->h = *h;
    p->name = strdup(cfg->name);
    p->cfg.name = p->name;
    p->cfg.aggregate_types = p->cfg.event_types = NULL; /* baked into the SQL below */
    if (p->cfg.batch_size < 1) p->cfg.batch_size = 100;
    if (p->cfg.poll_interval_ms < 1) p->cfg.poll_interval_ms = 1000;
    PGconn *pg = pup_conn_pg(conn);
    char *atypes = scope_sql(pg, "aggregate_type", cfg->aggregate_types, cfg->n_aggregate_types);
    char *etypes = scope_sql(pg, "event_type", cfg->event_types, cfg->n_event_types);
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    snprintf(p->owner, sizeof p->owner, "%s/%d", host, (int)getpid());
    snprintf(p->lock_key, sizeof p->lock_key, "pupsourcing/%s/%s/%d/%d", store->checkpoints,
             p->name, cfg->partition_key, cfg->total_partitions);
    if (atypes && etypes && p->name) {
        const char *C = store->q_checkpoints;
        /* Checkpoint, snapshot and the next events in one statement: the gap rule needs
         * the rows and the snapshot from the same statement. Events outside the scope
         * come without payload and metadata: only their positions matter. */
        if (asprintf(&p->sql_read,
                     "WITH cp AS (SELECT COALESCE((SELECT last_global_position FROM %s"
                     " WHERE projection_name = $1 AND total_partitions = $2 AND partition_key = $3), 0) AS pos),"
                     " snap AS (SELECT pg_current_snapshot() AS s)"
                     " SELECT cp.pos, pg_snapshot_xmin(snap.s)::text, pg_snapshot_xmax(snap.s)::text, e.*"
                     " FROM cp CROSS JOIN snap LEFT JOIN LATERAL ("
                     "SELECT (%s AND %s) AS mine, global_position, aggregate_type, aggregate_id,"
                     " aggregate_version, event_id::text, event_type, event_version,"
                     " CASE WHEN %s AND %s THEN payload END, CASE WHEN %s AND %s THEN metadata::text END,"
                     " causation_id, correlation_id, trace_id,"
                     " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
                     " FROM %s WHERE global_position > cp.pos ORDER BY global_position LIMIT $4) e ON true"
                     " ORDER BY e.global_position",
                     C, atypes, etypes, atypes, etypes, atypes, etypes, store->q_events) < 0)
            p->sql_read = NULL;
        /* Fenced by the position the batch started from: a second writer of this
         * checkpoint makes the batch fail instead of double-applying. */
        if (asprintf(&p->sql_checkpoint,
                     "INSERT INTO %s AS c (projection_name, total_partitions, partition_key,"
                     " last_global_position, waiting_position, waiting_since, owner, updated_at)"
                     " VALUES ($1, $2, $3, $4, $5, to_timestamp($6::float8), $7, now())"
                     " ON CONFLICT (projection_name, total_partitions, partition_key) DO UPDATE SET"
                     " last_global_position = EXCLUDED.last_global_position,"
                     " waiting_position = EXCLUDED.waiting_position, waiting_since = EXCLUDED.waiting_since,"
                     " owner = EXCLUDED.owner, updated_at = now()"
                     " WHERE c.last_global_position = $8 RETURNING 1",
                     C) < 0)
            p->sql_checkpoint = NULL;
    }
    free(atypes);
    free(etypes);
    if (!p->name || !p->sql_read || !p->sql_checkpoint) {
        pup_processor_free(p);
        pup_error_set(err, PUP_ERR_DATABASE, "out of memory");
        return NULL;
    }
    return p;
}

void pup_processor_free(pup_processor *p) {
    if (!p) return;
    free(p->name);
    free(p->sql_read);
    free(p->sql_checkpoint);
    pup_params_free(&p->params);
    free(p);
}

const pup_projection_cfg *pup_processor_cfg(const pup_processor *p) { return &p->cfg; }

void pup_processor_stats_get(const pup_processor *p, pup_processor_stats *s) { *s = p->stats; }

/* Prefixes err's message with the projection and partition. */
static int with_context(pup_processor *p, pup_error *err) {
    pup_error_prefix(err, "projection %s partition %d/%d: ", p->name, p->cfg.partition_key,
                     p->cfg.total_partitions);
    return -1;
}

int pup_processor_acquire(pup_processor *p, int *acquired, pup_error *err) {
    *acquired = p->locked;
    if (p->locked) return 0;
    const pup_stmt *st = pup_conn_prepare(p->conn, "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", err);
    if (!st) return with_context(p, err);
    if (pup_params_reset(&p->params, 1) < 0) return pup_error_set(err, PUP_ERR_DATABASE, "out of memory");
    pup_params_text(&p->params, 0, p->lock_key, strlen(p->lock_key));
    PGresult *r = pup_conn_exec(p->conn, st, &p->params, 0, err);
    if (!r) return with_context(p, err);
    p->locked = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    *acquired = p->locked;
    p->stats.standby = !p->locked;
    if (p->locked && !p->listening) {
        char sql[PUP_NAME_MAX + 64];
        snprintf(sql, sizeof sql, "LISTEN \"%s\"", p->store->channel);
        if (pup_conn_command(p->conn, sql, err) < 0) return with_context(p, err);
        p->listening = 1;
    }
    return 0;
}

/* Leaves a failed batch: pipeline closed, transaction rolled back. */
static void abort_batch(pup_processor *p) {
    pup_error ignored;
    long tag;
    if (pup_conn_in_pipeline(p->conn)) pup_conn_pipeline_end(p->conn, &ignored, &tag);
    if (pup_conn_ok(p->conn)) {
        PGresult *r = PQexec(pup_conn_pg(p->conn), "ROLLBACK");
        PQclear(r);
    }
    pup_conn_clear_failure(p->conn);
}

/* Names the event a handler failure belongs to. */
static int event_error(pup_processor *p, const PGresult *r, int row, pup_error *err) {
    pup_event ev;
    pup_event_from_row(r, row, FIRST_EVENT_COL, &ev);
    pup_error_prefix(err,
                     "projection %s partition %d/%d: handler failed at global position %lld "
                     "(event_type %.*s, event_id %.*s): ",
                     p->name, p->cfg.partition_key, p->cfg.total_partitions, ev.global_position,
                     (int)(ev.event_type.len > 200 ? 200 : ev.event_type.len), ev.event_type.p,
                     (int)ev.event_id.len, ev.event_id.p);
    if (err->code != PUP_ERR_CONNECTION) err->code = PUP_ERR_HANDLER;
    return -1;
}

static int run_setup(pup_processor *p, pup_error *err) {
    /* Setups of concurrent processors (partitions, projections sharing tables) run one
     * at a time: CREATE ... IF NOT EXISTS is not safe against itself. */
    if (pup_conn_command(p->conn, "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('pupsourcing.setup', 0))", err) < 0)
        return with_context(p, err);
    pup_conn_clear_failure(p->conn);
    if (p->h.setup(p->h.ud, p->conn, err) < 0 || pup_conn_failure(p->conn, NULL)) {
        const pup_error *f = pup_conn_failure(p->conn, NULL);
        if (f && err->code != PUP_ERR_HANDLER) *err = *f;
        abort_batch(p);
        pup_error_prefix(err, "setup failed: ");
        return with_context(p, err);
    }
    if (pup_conn_command(p->conn, "COMMIT", err) < 0) return with_context(p, err);
    p->setup_done = 1;
    return 0;
}

/* Writes the checkpoint row; fails when it moved under us. */
static int write_checkpoint(pup_processor *p, long long from, long long to, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(p->conn, p->sql_checkpoint, err);
    if (!st) return -1;
    pup_params *q = &p->params;
    if (pup_params_reset(q, 8) < 0) return pup_error_set(err, PUP_ERR_DATABASE, "out of memory");
    pup_params_text(q, 0, p->name, strlen(p->name));
    pup_params_int(q, 1, p->cfg.total_partitions);
    pup_params_int(q, 2, p->cfg.partition_key);
    pup_params_int(q, 3, to);
    if (p->gap.active) {
        pup_params_int(q, 4, p->gap.lo);
        pup_params_double(q, 5, p->gap.since);
    }
    pup_params_text(q, 6, p->owner, strlen(p->owner));
    pup_params_int(q, 7, from);
    PGresult *r = pup_conn_exec(p->conn, st, q, 0, err);
    if (!r) return -1;
    int n = PQntuples(r);
    PQclear(r);
    if (n == 0)
        return pup_error_set(err, PUP_ERR_DATABASE,
                             "checkpoint moved from %lld by another processor; batch rolled back", from);
    p->recorded_wait = p->gap.active ? p->gap.lo : 0;
    return 0;
}

int pup_processor_batch(pup_processor *p, int *handled, long long *advanced, int *waiting,
                        pup_error *err) {
    *handled = 0;
    *advanced = 0;
    *waiting = 0;
    if (!p->setup_done && p->h.setup && run_setup(p, err) < 0) return -1;
    p->setup_done = 1;
    const pup_stmt *st = pup_conn_prepare(p->conn, p->sql_read, err);
    if (!st) return with_context(p, err);
    if (pup_conn_command(p->conn, "BEGIN", err) < 0) return with_context(p, err);
    pup_conn_clear_failure(p->conn);
    pup_params *q = &p->params;
    if (pup_params_reset(q, 4) < 0) return pup_error_set(err, PUP_ERR_DATABASE, "out of memory");
    pup_params_text(q, 0, p->name, strlen(p->name));
    pup_params_int(q, 1, p->cfg.total_partitions);
    pup_params_int(q, 2, p->cfg.partition_key);
    /* Other partitions' events only advance the position: read enough rows that about
     * batch_size of them are this partition's, so N partitions commit as often as one. */
    long long window = (long long)p->cfg.batch_size * p->cfg.total_partitions;
    pup_params_int(q, 3, window > 100000 ? 100000 : window);
    PGresult *r = pup_conn_exec(p->conn, st, q, 1, err);
    if (!r) {
        abort_batch(p);
        return with_context(p, err);
    }
    long long from = pup_be_int(PQgetvalue(r, 0, 0), 8);
    uint64_t xmin = strtoull(PQgetvalue(r, 0, 1), NULL, 10);
    uint64_t xmax = strtoull(PQgetvalue(r, 0, 2), NULL, 10);
    int nrows = PQgetisnull(r, 0, FIRST_EVENT_COL) ? 0 : PQntuples(r);

    /* Walk the positions: contiguous ones are processed; a hole stops the batch unless
     * the snapshot proves it dead. */
    long long last = from;
    int nhandle = 0, rc = 0;
    if (pup_conn_pipeline_begin(p->conn, err) < 0) {
        PQclear(r);
        abort_batch(p);
        return with_context(p, err);
    }
    for (int i = 0; i < nrows; i++) {
        long long pos = pup_be_int(PQgetvalue(r, i, FIRST_EVENT_COL), 8);
        if (pos != last + 1) {
            if (!(p->gap.active && p->gap.lo <= last + 1 && p->gap.hi >= pos - 1)) {
                if (!p->gap.active || p->gap.lo != last + 1) p->gap.since = now_s();
                p->gap.active = 1;
                p->gap.lo = last + 1;
                p->gap.hi = pos - 1;
                p->gap.xmax = xmax;
            }
            if (xmin < p->gap.xmax) {
                *waiting = 1;
                break; /* a transaction that may fill the hole is still running */
            }
            p->gap.active = 0; /* dead hole: no running transaction can fill it */
        }
        last = pos;
        const char *mine = PQgetvalue(r, i, FIRST_EVENT_COL - 1);
        if (!PQgetisnull(r, i, FIRST_EVENT_COL - 1) && mine[0]) {
            pup_event ev;
            pup_event_from_row(r, i, FIRST_EVENT_COL, &ev);
            if (p->cfg.total_partitions > 1 &&
                pup_partition_of(ev.aggregate_id.p, ev.aggregate_id.len, p->cfg.total_partitions) !=
                    p->cfg.partition_key)
                continue;
            pup_conn_set_tag(p->conn, i);
            long tag;
            if (p->h.handle(p->h.ud, p->conn, &ev, err) < 0) {
                rc = event_error(p, r, i, err);
                break;
            }
            if (pup_conn_failure(p->conn, &tag)) {
                *err = *pup_conn_failure(p->conn, NULL);
                rc = event_error(p, r, (int)tag, err);
                break;
            }
            nhandle++;
        }
    }
    if (rc == 0) {
        long tag = -1;
        if (pup_conn_pipeline_end(p->conn, err, &tag) < 0) {
            rc = tag >= 0 && tag < nrows ? event_error(p, r, (int)tag, err) : with_context(p, err);
        }
    }
    if (rc == 0 && !*waiting && p->gap.active && p->gap.hi < last) p->gap.active = 0;
    if (rc == 0 && (last != from || (p->gap.active ? p->gap.lo : 0) != p->recorded_wait))
        rc = write_checkpoint(p, from, last, err) < 0 ? with_context(p, err) : 0;
    PQclear(r);
    if (rc == 0 && pup_conn_command(p->conn, "COMMIT", err) < 0) rc = with_context(p, err);
    if (rc < 0) {
        abort_batch(p);
        return -1;
    }
    *handled = nhandle;
    *advanced = last - from;
    p->stats.handled += nhandle;
    p->stats.position = last;
    if (last > p->stats.head) p->stats.head = last;
    p->stats.waiting_position = p->gap.active ? p->gap.lo : 0;
    return 0;
}

/* ---- the loop ---- */

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


int pup_processor_run(pup_processor *p, const pup_run_opts *o, pup_error *err) {
    long long target = -1;
    int backoff_ms = 100, told_standby = 0, hole_ms = 5;
    for (;;) {
        if (stopped(o)) return 0;
        int acquired;
        if (pup_processor_acquire(p, &acquired, err) < 0) goto failed;
        if (!acquired) {
            if (!told_standby)
                logf_(o, "projection %s partition %d/%d: standby (another processor holds it)",
                      p->name, p->cfg.partition_key, p->cfg.total_partitions);
            told_standby = 1;
            if (wait_for(p, o, 1000)) return 0;
            continue;
        }
        if (told_standby)
            logf_(o, "projection %s partition %d/%d: took over", p->name, p->cfg.partition_key,
                  p->cfg.total_partitions);
        told_standby = 0;
        if (target < 0 && o->once) {
            target = pup_store_head(p->store, p->conn, err);
            if (target < 0) goto failed;
        }
        int handled, waiting;
        long long advanced;
        if (pup_processor_batch(p, &handled, &advanced, &waiting, err) < 0) goto failed;
        backoff_ms = 100;
        if (o->progress) o->progress(o->ud, p);
        if (o->once && p->stats.position >= target) return 0;
        if (advanced >= (long long)p->cfg.batch_size * p->cfg.total_partitions ||
            advanced >= 100000) {
            hole_ms = 5;
            continue; /* more is waiting */
        }
        if (waiting) {
            /* In flight below a visible position: its commit notifies; a rollback does
             * not, so look again soon. */
            if (wait_for(p, o, hole_ms)) return 0;
            hole_ms = hole_ms * 2 > 250 ? 250 : hole_ms * 2;
            continue;
        }
        hole_ms = 5;
        if (advanced > 0) continue;
        if (wait_for(p, o, p->cfg.poll_interval_ms)) return 0;
        continue;
    failed:
        if (!pup_error_is_transient(err)) return -1;
        logf_(o, "%s; retrying in %d ms", err->message, backoff_ms);
        if (wait_for(p, o, backoff_ms)) return 0;
        backoff_ms = backoff_ms * 2 > 5000 ? 5000 : backoff_ms * 2;
        if (!pup_conn_ok(p->conn)) {
            pup_error e2;
            p->locked = p->listening = 0;
            if (pup_conn_reset(p->conn, &e2) < 0) continue;
            logf_(o, "projection %s partition %d/%d: reconnected", p->name, p->cfg.partition_key,
                  p->cfg.total_partitions);
        }
    }
}
