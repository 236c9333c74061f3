/*
 * processor.c -- the batch loop of a projection partition. See pup_processor.h and
 * docs/ordering.md for the gap rule.
 */
#include "pup_processor.h"

#include <errno.h>
#include <stdint.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FIRST_EVENT_COL 3 /* xmin, head, mine, then PUP_EVENT_COLUMNS */
#define MAX_PARTITIONS 4096
#define TAG_GUARD (-2) /* pipeline tag of the statement that checks the batch transaction */

/* A run of missing positions [lo, hi] seen below a visible one, and a bound above the
 * transaction id of every writer that could fill it: an xid this processor drew after
 * the snapshot that saw the hole. Once a snapshot's xmin is above the bound, all those
 * writers have ended. (A snapshot's own xmax is not such a bound: PostgreSQL computes it
 * as the latest completed xid + 1, so a running writer's xid can be at or above it.) */
#define BOUND_PENDING UINT64_MAX
#define MAX_GAPS 64
typedef struct gap {
    long long lo, hi;
    uint64_t bound; /* BOUND_PENDING until the batch that noted it draws its xid */
} gap;

struct pup_processor {
    const pup_store *store;
    pup_conn *conn;
    pup_projection_cfg cfg;
    char *name;
    pup_handler h;
    char *sql_read, *sql_checkpoint, *sql_lease_checkpoint;
    /* Queued around the handlers of a batch: open marks the batch transaction (and sets
     * the handler time limit); guard fails unless that transaction is still the one open;
     * the time limit is then lifted for the checkpoint write. */
    char *sql_open;
    char *sql_hole; /* while waiting at a hole: has it filled, or have its writers ended? */
    const char *sql_guard, *sql_untimed;
    char owner[160]; /* this worker: host/pid/random */
    pup_params params;
    int setup_done, locked, listening;
    /* The partitions held, with their checkpoints (valid where held). */
    int total;
    unsigned char *held;
    long long *cp;
    int nheld;
    char *held_list; /* "{1,5,9}" for SQL */
    /* Group mode: next heartbeat, and the checkpoints of the partitioning before a
     * repartition, honoured until every new partition has passed them. */
    double next_tick, last_tick;
    int old_total;
    long long *old_cp, old_max;
    gap gaps[MAX_GAPS]; /* holes seen, oldest first; several are decided by one batch */
    int ngaps;
    long long wait_lo; /* the first undecided hole (0: none), and since when */
    double wait_since;
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

/* Sizes the per-partition arrays for total partitions, none held. */
static int set_total(pup_processor *p, int total) {
    unsigned char *held = calloc((size_t)total, 1);
    long long *cp = calloc((size_t)total, sizeof *cp);
    char *list = malloc((size_t)total * 6 + 3);
    if (!held || !cp || !list) {
        free(held);
        free(cp);
        free(list);
        return -1;
    }
    free(p->held);
    free(p->cp);
    free(p->held_list);
    p->held = held;
    p->cp = cp;
    p->held_list = list;
    strcpy(list, "{}");
    p->total = total;
    p->nheld = 0;
    return 0;
}

/* Marks partition k held with checkpoint pos, and rebuilds the SQL list. */
static void hold(pup_processor *p, int k, long long pos) {
    if (k < 0 || k >= p->total) return;
    if (!p->held[k]) p->nheld++;
    p->held[k] = 1;
    p->cp[k] = pos;
}

static void held_list_build(pup_processor *p) {
    size_t n = 0;
    p->held_list[n++] = '{';
    for (int k = 0; k < p->total; k++)
        if (p->held[k]) n += (size_t)sprintf(p->held_list + n, "%s%d", n > 1 ? "," : "", k);
    p->held_list[n++] = '}';
    p->held_list[n] = '\0';
}

static void drop_all(pup_processor *p) {
    memset(p->held, 0, (size_t)p->total);
    p->nheld = 0;
    held_list_build(p);
}

pup_processor *pup_processor_new(const pup_store *store, pup_conn *conn,
                                 const pup_projection_cfg *cfg, const pup_handler *h,
                                 pup_error *err) {
    if (!cfg->name || !*cfg->name) {
        pup_error_set(err, PUP_ERR_INVALID_PROJECTION, "projection has no name");
        return NULL;
    }
    if (cfg->total_partitions < 1 || cfg->total_partitions > MAX_PARTITIONS ||
        (!cfg->group && (cfg->partition_key < 0 || cfg->partition_key >= cfg->total_partitions))) {
        pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                      "projection %s: partition key %d is not in 0..%d (total partitions %d, at most %d)",
                      cfg->name, cfg->partition_key, cfg->total_partitions - 1, cfg->total_partitions,
                      MAX_PARTITIONS);
        return NULL;
    }
    pup_processor *p = calloc(1, sizeof *p);
    if (!p) {
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
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
    if (p->cfg.lease_ttl_ms < 1) p->cfg.lease_ttl_ms = 10000;
    if (p->cfg.group && p->cfg.statement_timeout_ms * 2 > p->cfg.lease_ttl_ms) {
        /* A batch always handles its first event; one slower than the lease cannot commit. */
        pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                      "projection %s: the handler timeout (%d ms) must be at most half the lease TTL (%d ms) in a group",
                      cfg->name, p->cfg.statement_timeout_ms, p->cfg.lease_ttl_ms);
        pup_processor_free(p);
        return NULL;
    }
    PGconn *pg = pup_conn_pg(conn);
    char *atypes = scope_sql(pg, "aggregate_type", cfg->aggregate_types, cfg->n_aggregate_types);
    char *etypes = scope_sql(pg, "event_type", cfg->event_types, cfg->n_event_types);
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(p->owner, sizeof p->owner, "%s/%d/%lx", host, (int)getpid(),
             (unsigned long)(ts.tv_nsec ^ (long)(uintptr_t)p) & 0xffffff);
    if (p->cfg.statement_timeout_ms > 0) {
        if (asprintf(&p->sql_open, "SELECT set_config('pupsourcing.batch', 'open', true),"
                     " set_config('statement_timeout', '%dms', true)", p->cfg.statement_timeout_ms) < 0)
            p->sql_open = NULL;
        p->sql_untimed = "SET LOCAL statement_timeout TO DEFAULT";
    } else
        p->sql_open = strdup("SELECT set_config('pupsourcing.batch', 'open', true)");
    if (asprintf(&p->sql_hole,
                 "SELECT EXISTS (SELECT 1 FROM %s WHERE global_position BETWEEN $1 AND $2),"
                 " pg_snapshot_xmin(pg_current_snapshot())::text", store->q_events) < 0)
        p->sql_hole = NULL;
    p->sql_guard = "SELECT 1 / coalesce((current_setting('pupsourcing.batch', true) = 'open')::int, 0)";
    if (atypes && etypes && p->name && set_total(p, cfg->total_partitions) == 0) {
        const char *C = store->q_checkpoints;
        /* The snapshot and the next events in one statement: the gap rule needs both
         * from one snapshot. Events outside the scope, or (by the hash the appender
         * stored) of partitions not held, come without payload: only their positions
         * matter. */
        const char *ours = "(aggregate_id_hash IS NULL OR $3::int <= 1"
                           " OR (aggregate_id_hash % $3::int)::int = ANY($4::int[]))";
        if (asprintf(&p->sql_read,
                     "SELECT pg_snapshot_xmin(snap.s)::text,"
                     " (SELECT COALESCE(max(global_position), 0) FROM %s)::text, e.*"
                     " FROM (SELECT pg_current_snapshot() AS s) snap LEFT JOIN LATERAL ("
                     "SELECT (%s AND %s) AS mine, "
                     PUP_EVENT_COLUMNS_WITH("CASE WHEN %s AND %s AND %s THEN payload END",
                                            "CASE WHEN %s AND %s THEN metadata::text END")
                     " FROM %s WHERE global_position > $1 ORDER BY global_position LIMIT $2) e ON true"
                     " ORDER BY e.global_position",
                     store->q_events, atypes, etypes, atypes, etypes, ours, atypes, etypes,
                     store->q_events) < 0)
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
        /* In a group, fenced by the lease: a worker that lost it commits nothing. */
        if (asprintf(&p->sql_lease_checkpoint,
                     "UPDATE %s SET last_global_position = GREATEST(last_global_position, $4),"
                     " waiting_position = $5, waiting_since = to_timestamp($6::float8), updated_at = now()"
                     " WHERE projection_name = $1 AND total_partitions = $2 AND partition_key = ANY($3::int[])"
                     " AND owner = $7 AND lease_expires_at > clock_timestamp() RETURNING partition_key",
                     C) < 0)
            p->sql_lease_checkpoint = NULL;
    }
    free(atypes);
    free(etypes);
    if (!p->name || !p->sql_read || !p->sql_checkpoint || !p->sql_lease_checkpoint || !p->sql_open || !p->sql_hole || !p->held) {
        pup_processor_free(p);
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
        return NULL;
    }
    return p;
}

void pup_processor_free(pup_processor *p) {
    if (!p) return;
    free(p->name);
    free(p->sql_read);
    free(p->sql_checkpoint);
    free(p->sql_lease_checkpoint);
    free(p->sql_open);
    free(p->sql_hole);
    free(p->held);
    free(p->cp);
    free(p->held_list);
    free(p->old_cp);
    pup_params_free(&p->params);
    free(p);
}

const pup_projection_cfg *pup_processor_cfg(const pup_processor *p) { return &p->cfg; }

void pup_processor_stats_get(const pup_processor *p, pup_processor_stats *s) { *s = p->stats; }

/* Prefixes err's message with the projection and what it holds. */
static int with_context(pup_processor *p, pup_error *err) {
    if (p->cfg.group)
        pup_error_prefix(err, "projection %s (group worker %s): ", p->name, p->owner);
    else
        pup_error_prefix(err, "projection %s partition %d/%d: ", p->name, p->cfg.partition_key,
                         p->cfg.total_partitions);
    return -1;
}

/* Runs sql with text parameters (NULL = SQL NULL); returns the result or NULL. */
static PGresult *run(pup_processor *p, pup_error *err, const char *sql, int n, ...) {
    const pup_stmt *st = pup_conn_prepare(p->conn, sql, err);
    if (!st) return NULL;
    if (pup_params_reset(&p->params, n) < 0) {
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
        return NULL;
    }
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++) {
        const char *v = va_arg(ap, const char *);
        if (v) pup_params_text(&p->params, i, v, strlen(v));
    }
    va_end(ap);
    return pup_conn_exec(p->conn, st, &p->params, 0, err);
}

static int listen_once(pup_processor *p, pup_error *err) {
    if (p->listening) return 0;
    char sql[PUP_NAME_MAX + 64];
    snprintf(sql, sizeof sql, "LISTEN \"%s\"", p->store->channel);
    if (pup_conn_command(p->conn, sql, err) < 0) return -1;
    p->listening = 1;
    return 0;
}

/* Static partition: the session advisory lock, then its checkpoint. */
static int acquire_lock(pup_processor *p, pup_error *err) {
    if (p->locked) return 0;
    char total[16], key[16];
    snprintf(total, sizeof total, "%d", p->cfg.total_partitions);
    snprintf(key, sizeof key, "%d", p->cfg.partition_key);
    /* The key hashes the whole name (a text built by the server, never truncated). */
    PGresult *r = run(p, err,
                      "SELECT pg_try_advisory_lock(hashtextextended("
                      "'pupsourcing/' || $1::text || '/' || $2::text || '/' || $3::text || '/' || $4::text, 0))",
                      4, p->store->checkpoints, p->name, key, total);
    if (!r) return -1;
    p->locked = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    if (!p->locked) return 0;
    char sql[PUP_NAME_MAX + 200];
    snprintf(sql, sizeof sql,
             "SELECT last_global_position FROM %s WHERE projection_name = $1"
             " AND total_partitions = $2 AND partition_key = $3", p->store->q_checkpoints);
    r = run(p, err, sql, 3, p->name, total, key);
    if (!r) return -1;
    hold(p, p->cfg.partition_key, PQntuples(r) ? strtoll(PQgetvalue(r, 0, 0), NULL, 10) : 0);
    held_list_build(p);
    PQclear(r);
    return 0;
}

/* One heartbeat of a group worker, in its own transaction: register, find the live
 * workers, settle a repartition, release what is no longer ours and lease our fair share:
 * partition k belongs to the (k mod n)-th live worker in worker id order. */
static int group_tick(pup_processor *p, pup_error *err) {
    const pup_store *S = p->store;
    char sql[1024], ttl[32], total[16], init[32];
    snprintf(ttl, sizeof ttl, "%d milliseconds", p->cfg.lease_ttl_ms);
    if (pup_conn_command(p->conn, "BEGIN; SET LOCAL lock_timeout = '2s'", err) < 0) return -1;
    PGresult *r = NULL;
    /* The group's partition count: the table's, else ours. */
    snprintf(total, sizeof total, "%d", p->cfg.total_partitions);
    snprintf(sql, sizeof sql,
             "WITH ins AS (INSERT INTO %s (projection_name, total_partitions) VALUES ($1, $2)"
             " ON CONFLICT (projection_name) DO NOTHING RETURNING total_partitions, previous_total)"
             " SELECT total_partitions, previous_total FROM ins UNION ALL"
             " SELECT total_partitions, previous_total FROM %s WHERE projection_name = $1 LIMIT 1",
             S->q_groups, S->q_groups);
    if (!(r = run(p, err, sql, 2, p->name, total))) goto fail;
    if (PQntuples(r) == 0) {
        /* Another worker is creating the group row right now: next heartbeat. */
        PQclear(r);
        drop_all(p);
        return pup_conn_commit(p->conn, err);
    }
    int n_total = atoi(PQgetvalue(r, 0, 0));
    int prev = PQgetisnull(r, 0, 1) ? 0 : atoi(PQgetvalue(r, 0, 1));
    PQclear(r);
    if (n_total < 1 || n_total > MAX_PARTITIONS) {
        pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "group partition count %d is out of range", n_total);
        goto fail;
    }
    if (n_total != p->total) {
        /* Repartitioned: give up every lease of the old count and start over. */
        snprintf(sql, sizeof sql,
                 "UPDATE %s SET owner = NULL, lease_expires_at = NULL WHERE projection_name = $1 AND owner = $2",
                 S->q_checkpoints);
        if (!(r = run(p, err, sql, 2, p->name, p->owner))) goto fail;
        PQclear(r);
        if (set_total(p, n_total) < 0) {
            pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
            goto fail;
        }
        free(p->old_cp);
        p->old_cp = NULL;
        p->old_total = 0;
    }
    snprintf(total, sizeof total, "%d", n_total);

    /* End the sessions of workers whose heartbeat stopped: a frozen or cut-off worker may
     * still hold row locks (of its last batch, or of a heartbeat it never committed) that
     * would stall the rest. Read without locking, so a frozen row never blocks us. */
    snprintf(sql, sizeof sql,
             "SELECT count(pg_terminate_backend(a.pid)) FROM %s w JOIN pg_stat_activity a"
             " ON a.pid = w.backend_pid AND a.backend_start = w.backend_start"
             " WHERE w.projection_name = $1 AND w.heartbeat_at < clock_timestamp() - $2::interval"
             " AND a.pid <> pg_backend_pid() AND a.usename = current_user",
             S->q_workers);
    if (!(r = run(p, err, sql, 2, p->name, ttl))) goto fail;
    PQclear(r);
    /* Heartbeat, forget dead workers, list the live ones. */
    snprintf(sql, sizeof sql,
             "INSERT INTO %s (projection_name, worker_id, backend_pid, backend_start)"
             " SELECT $1, $2, pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
             " ON CONFLICT (projection_name, worker_id) DO UPDATE SET heartbeat_at = clock_timestamp(),"
             " backend_pid = EXCLUDED.backend_pid, backend_start = EXCLUDED.backend_start",
             S->q_workers);
    if (!(r = run(p, err, sql, 2, p->name, p->owner))) goto fail;
    PQclear(r);
    snprintf(sql, sizeof sql,
             "DELETE FROM %s WHERE projection_name = $1 AND heartbeat_at < clock_timestamp() - $2::interval",
             S->q_workers);
    if (!(r = run(p, err, sql, 2, p->name, ttl))) goto fail;
    PQclear(r);
    snprintf(sql, sizeof sql,
             "SELECT worker_id FROM %s WHERE projection_name = $1 ORDER BY worker_id", S->q_workers);
    if (!(r = run(p, err, sql, 1, p->name))) goto fail;
    int nworkers = PQntuples(r), me = 0;
    for (int i = 0; i < nworkers; i++)
        if (strcmp(PQgetvalue(r, i, 0), p->owner) == 0) me = i;
    PQclear(r);
    if (nworkers < 1) nworkers = 1;

    /* A repartition settles first: the old partitioning's workers must be gone (their
     * rows locked, so an in-flight commit finishes first), then its checkpoints are
     * honoured event by event until every new partition has passed them. */
    long long start = 0;
    if (prev > 0) {
        snprintf(sql, sizeof sql,
                 "SELECT partition_key, last_global_position, owner IS NOT NULL AND lease_expires_at > clock_timestamp()"
                 " FROM %s WHERE projection_name = $1 AND total_partitions = $2 FOR UPDATE",
                 S->q_checkpoints);
        char prevs[16];
        snprintf(prevs, sizeof prevs, "%d", prev);
        if (!(r = run(p, err, sql, 2, p->name, prevs))) goto fail;
        int live = 0;
        for (int i = 0; i < PQntuples(r); i++) live |= PQgetvalue(r, i, 2)[0] == 't';
        if (live) {
            PQclear(r);
            drop_all(p);
            return pup_conn_commit(p->conn, err);
        }
        if (PQntuples(r) == 0) {
            /* The old checkpoints are gone (a reset): nothing to honour, settled. */
            PQclear(r);
            free(p->old_cp);
            p->old_cp = NULL;
            p->old_total = 0;
            snprintf(sql, sizeof sql,
                     "UPDATE %s SET previous_total = NULL WHERE projection_name = $1 AND previous_total = $2",
                     S->q_groups);
            if (!(r = run(p, err, sql, 2, p->name, prevs))) goto fail;
        } else if (!p->old_cp) {
            p->old_cp = calloc((size_t)prev, sizeof *p->old_cp);
            if (!p->old_cp) {
                PQclear(r);
                pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
                goto fail;
            }
            p->old_total = prev;
            p->old_max = 0;
            start = -1;
            for (int i = 0; i < PQntuples(r); i++) {
                int k = atoi(PQgetvalue(r, i, 0));
                long long pos = strtoll(PQgetvalue(r, i, 1), NULL, 10);
                if (k >= 0 && k < prev) p->old_cp[k] = pos;
                if (pos > p->old_max) p->old_max = pos;
                if (start < 0 || pos < start) start = pos;
            }
        } else {
            start = p->old_max;
            for (int k = 0; k < p->old_total; k++)
                if (p->old_cp[k] < start) start = p->old_cp[k];
        }
        PQclear(r);
    }
    /* Every partition has a row (new ones start where the old partitioning was sure). */
    snprintf(init, sizeof init, "%lld", start);
    snprintf(sql, sizeof sql,
             "INSERT INTO %s (projection_name, total_partitions, partition_key, last_global_position)"
             " SELECT $1, $2, k, $3 FROM generate_series(0, $2::int - 1) k ON CONFLICT DO NOTHING",
             S->q_checkpoints);
    if (!(r = run(p, err, sql, 3, p->name, total, init))) goto fail;
    PQclear(r);

    /* Our fair share, as an SQL array. */
    char *target = malloc((size_t)n_total * 6 + 3);
    if (!target) {
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
        goto fail;
    }
    size_t tn = 0;
    target[tn++] = '{';
    for (int k = me; k < n_total; k += nworkers) tn += (size_t)sprintf(target + tn, "%s%d", tn > 1 ? "," : "", k);
    target[tn++] = '}';
    target[tn] = '\0';
    snprintf(sql, sizeof sql,
             "UPDATE %s SET owner = NULL, lease_expires_at = NULL WHERE projection_name = $1"
             " AND total_partitions = $2 AND owner = $3 AND NOT (partition_key = ANY($4::int[]))",
             S->q_checkpoints);
    r = run(p, err, sql, 4, p->name, total, p->owner, target);
    if (r) {
        PQclear(r);
        snprintf(sql, sizeof sql,
                 "UPDATE %s SET owner = $3, lease_expires_at = clock_timestamp() + $5::interval"
                 " WHERE projection_name = $1 AND total_partitions = $2 AND partition_key = ANY($4::int[])"
                 " AND (owner IS NULL OR owner = $3 OR lease_expires_at < clock_timestamp())"
                 " RETURNING partition_key, last_global_position",
                 S->q_checkpoints);
        r = run(p, err, sql, 5, p->name, total, p->owner, target, ttl);
    }
    free(target);
    if (!r) goto fail;
    drop_all(p);
    for (int i = 0; i < PQntuples(r); i++)
        hold(p, atoi(PQgetvalue(r, i, 0)), strtoll(PQgetvalue(r, i, 1), NULL, 10));
    held_list_build(p);
    PQclear(r);

    /* Once every new partition has passed the old checkpoints, the old rows go. */
    if (p->old_cp) {
        snprintf(sql, sizeof sql,
                 "WITH done AS (SELECT min(last_global_position) >= $3 AS ok FROM %s"
                 " WHERE projection_name = $1 AND total_partitions = $2)"
                 " , del AS (DELETE FROM %s WHERE projection_name = $1 AND total_partitions <> $2"
                 " AND (SELECT ok FROM done) RETURNING 1)"
                 " UPDATE %s SET previous_total = NULL WHERE projection_name = $1 AND (SELECT ok FROM done)"
                 " RETURNING 1",
                 S->q_checkpoints, S->q_checkpoints, S->q_groups);
        char oldmax[32];
        snprintf(oldmax, sizeof oldmax, "%lld", p->old_max);
        if (!(r = run(p, err, sql, 3, p->name, total, oldmax))) goto fail;
        if (PQntuples(r) > 0) {
            free(p->old_cp);
            p->old_cp = NULL;
            p->old_total = 0;
        }
        PQclear(r);
    }
    return pup_conn_commit(p->conn, err);
fail:
    pup_conn_rollback(p->conn);
    drop_all(p);
    return -1;
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int pup_processor_acquire(pup_processor *p, int *acquired, pup_error *err) {
    int rc = 0;
    if (!p->cfg.group) rc = acquire_lock(p, err);
    else if (mono_s() >= p->next_tick) {
        if (!p->listening) {
            /* A batch stuck behind a lock (a dead worker's rows) gives up and retries
             * after the next heartbeat, instead of letting its own leases lapse. */
            char sql[64];
            snprintf(sql, sizeof sql, "SET lock_timeout = '%dms'", p->cfg.lease_ttl_ms / 2);
            rc = pup_conn_command(p->conn, sql, err);
        }
        double t0 = mono_s();
        if (rc == 0) rc = group_tick(p, err);
        if (rc == 0) p->last_tick = t0; /* the leases run until at least t0 + ttl */
        p->next_tick = mono_s() + p->cfg.lease_ttl_ms / 1000.0 / 5;
        if (rc < 0 && strcmp(err->sqlstate, "55P03") == 0) rc = 0; /* lock timeout: next tick */
    }
    if (rc == 0 && p->nheld > 0) rc = listen_once(p, err);
    *acquired = p->nheld > 0;
    p->stats.standby = !*acquired;
    p->stats.held = p->nheld;
    return rc < 0 ? with_context(p, err) : 0;
}

void pup_processor_release(pup_processor *p) {
    if (!p->cfg.group || !pup_conn_ok(p->conn)) return;
    char sql[512];
    pup_error err;
    snprintf(sql, sizeof sql,
             "UPDATE %s SET owner = NULL, lease_expires_at = NULL WHERE projection_name = $1 AND owner = $2",
             p->store->q_checkpoints);
    PGresult *r = run(p, &err, sql, 2, p->name, p->owner);
    if (r) PQclear(r);
    snprintf(sql, sizeof sql, "DELETE FROM %s WHERE projection_name = $1 AND worker_id = $2",
             p->store->q_workers);
    r = run(p, &err, sql, 2, p->name, p->owner);
    if (r) PQclear(r);
    drop_all(p);
}

/* Names the event a handler failure belongs to. */
static int event_error(pup_processor *p, const PGresult *r, int row, pup_error *err) {
    pup_event ev;
    pup_event_from_row(r, row, FIRST_EVENT_COL, &ev);
    if (strcmp(err->sqlstate, "57014") == 0 && p->cfg.statement_timeout_ms > 0)
        pup_error_prefix(err, "handler exceeded its time limit of %d ms: ", p->cfg.statement_timeout_ms);
    int part = pup_partition_of(ev.aggregate_id.p, ev.aggregate_id.len, p->total);
    pup_error_prefix(err,
                     "projection %s partition %d/%d: handler failed at global position %lld "
                     "(event_type %.*s, event_id %.*s): ",
                     p->name, part, p->total, ev.global_position,
                     (int)(ev.event_type.len > 200 ? 200 : ev.event_type.len), ev.event_type.p,
                     (int)ev.event_id.len, ev.event_id.p);
    /* Deadlocks, serialization failures and lost connections are retried; the rest
     * stops the projection. */
    if (!pup_error_is_transient(err)) err->code = PUP_ERR_HANDLER;
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
        pup_conn_rollback(p->conn);
        pup_error_prefix(err, "setup failed: ");
        return with_context(p, err);
    }
    if (pup_conn_commit(p->conn, err) < 0) return with_context(p, err);
    p->setup_done = 1;
    return 0;
}

/* Writes the checkpoint(s) of a batch that moved from `from` to `to`; fails when a row
 * moved under us (static) or a lease was lost (group). */
static int write_checkpoint(pup_processor *p, long long from, long long to, pup_error *err) {
    pup_params *q = &p->params;
    int group = p->cfg.group;
    const pup_stmt *st = pup_conn_prepare(p->conn, group ? p->sql_lease_checkpoint : p->sql_checkpoint, err);
    if (!st) return -1;
    if (pup_params_reset(q, group ? 7 : 8) < 0) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    pup_params_text(q, 0, p->name, strlen(p->name));
    pup_params_int(q, 1, p->total);
    if (group) pup_params_text(q, 2, p->held_list, strlen(p->held_list));
    else pup_params_int(q, 2, p->cfg.partition_key);
    pup_params_int(q, 3, to);
    if (p->wait_lo) {
        pup_params_int(q, 4, p->wait_lo);
        pup_params_double(q, 5, p->wait_since);
    }
    pup_params_text(q, 6, p->owner, strlen(p->owner));
    if (!group) pup_params_int(q, 7, from);
    PGresult *r = pup_conn_exec(p->conn, st, q, 0, err);
    if (!r) return -1;
    int n = PQntuples(r);
    PQclear(r);
    if (!group && n == 0)
        return pup_error_set(err, PUP_ERR_DATABASE,
                             "checkpoint moved from %lld by another processor; batch rolled back", from);
    if (group && n != p->nheld) {
        /* Retried like a lost connection: the next heartbeat sorts out what we hold. */
        pup_error_set(err, PUP_ERR_CONNECTION, "lost the lease on %d partition(s); batch rolled back",
                      p->nheld - n);
        p->next_tick = 0;
        return -1;
    }
    p->recorded_wait = p->wait_lo;
    return 0;
}

/* The noted hole that contains [lo, hi], if any. */
static gap *find_gap(pup_processor *p, long long lo, long long hi) {
    for (int k = 0; k < p->ngaps; k++)
        if (p->gaps[k].lo <= lo && p->gaps[k].hi >= hi) return &p->gaps[k];
    return NULL;
}

static void note_gap(pup_processor *p, long long lo, long long hi) {
    if (p->ngaps == MAX_GAPS) return; /* noted when the earlier ones are gone */
    p->gaps[p->ngaps++] = (gap){lo, hi, BOUND_PENDING};
}

/* Drops holes below `passed`, and (pending_only) those still without a bound. */
static void forget_gaps(pup_processor *p, long long passed, int pending_only) {
    int n = 0;
    for (int k = 0; k < p->ngaps; k++) {
        gap *g = &p->gaps[k];
        int drop = pending_only ? g->bound == BOUND_PENDING : g->hi <= passed;
        if (!drop) p->gaps[n++] = *g;
    }
    p->ngaps = n;
}

static int has_pending_gap(const pup_processor *p) {
    for (int k = 0; k < p->ngaps; k++)
        if (p->gaps[k].bound == BOUND_PENDING) return 1;
    return 0;
}

/* Queues a statement prepared before the batch began (preparing inside the pipeline
 * would sync it) behind the handlers' statements. */
static int queue(pup_processor *p, const char *sql, long tag, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(p->conn, sql, err);
    if (!st) return -1;
    pup_conn_set_tag(p->conn, tag);
    return pup_conn_send(p->conn, st, NULL, err);
}

/* A handler ended the batch transaction (ROLLBACK, COMMIT, BEGIN after either): the
 * writes of earlier events are gone or were committed apart from the checkpoint. */
static int ended_error(pup_processor *p, pup_error *err) {
    pup_error_set(err, PUP_ERR_HANDLER,
                  "a handler ended or broke the batch transaction (did it send ROLLBACK, COMMIT or BEGIN?);"
                  " batch rolled back, checkpoint not moved");
    return with_context(p, err);
}

int pup_processor_batch(pup_processor *p, int *handled, long long *advanced, int *waiting,
                        pup_error *err) {
    *handled = 0;
    *advanced = 0;
    *waiting = 0;
    if (p->nheld == 0) return 0;
    if (pup_conn_check_utf8(p->conn, err) < 0) return with_context(p, err);
    if (!p->setup_done && p->h.setup && run_setup(p, err) < 0) return -1;
    p->setup_done = 1;
    /* Prepared outside the pipeline (a cache lookup once warm); the read last, as later
     * prepares may move the cache. */
    if (!pup_conn_prepare(p->conn, p->sql_open, err) || !pup_conn_prepare(p->conn, p->sql_guard, err) ||
        (p->sql_untimed && !pup_conn_prepare(p->conn, p->sql_untimed, err)))
        return with_context(p, err);
    const pup_stmt *st = pup_conn_prepare(p->conn, p->sql_read, err);
    if (!st) return with_context(p, err);
    long long from = -1;
    for (int k = 0; k < p->total; k++)
        if (p->held[k] && (from < 0 || p->cp[k] < from)) from = p->cp[k];
    /* The handler time limit is set after the read and lifted before the checkpoint. */
    if (pup_conn_command(p->conn, "BEGIN", err) < 0) return with_context(p, err);
    pup_conn_clear_failure(p->conn);
    /* A group worker's batch stops in time to commit under its leases: after a third of
     * the TTL, or half of it since the last heartbeat. */
    double deadline = 0;
    if (p->cfg.group) {
        double ttl = p->cfg.lease_ttl_ms / 1000.0;
        deadline = mono_s() + ttl / 3;
        if (p->last_tick + ttl / 2 < deadline) deadline = p->last_tick + ttl / 2;
    }
    pup_params *q = &p->params;
    if (pup_params_reset(q, 4) < 0) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    pup_params_int(q, 0, from);
    pup_params_int(q, 2, p->total);
    pup_params_text(q, 3, p->held_list, strlen(p->held_list));
    /* Other partitions' events only advance the position: read enough rows that about
     * batch_size of them are ours, so N partitions commit as often as one. */
    long long window = (long long)p->cfg.batch_size * p->total / (p->nheld ? p->nheld : 1);
    pup_params_int(q, 1, window > 100000 ? 100000 : window);
    PGresult *r = pup_conn_exec(p->conn, st, q, 1, err);
    if (!r) {
        pup_conn_rollback(p->conn);
        return with_context(p, err);
    }
    uint64_t xmin = strtoull(PQgetvalue(r, 0, 0), NULL, 10);
    p->stats.head = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
    int nrows = PQgetisnull(r, 0, FIRST_EVENT_COL) ? 0 : PQntuples(r);

    /* Walk the positions: contiguous ones are processed; a hole stops the batch unless
     * the snapshot proves it dead. */
    long long last = from;
    int nhandle = 0, rc = 0, opened = 0;
    if (pup_conn_pipeline_begin(p->conn, err) < 0) {
        PQclear(r);
        pup_conn_rollback(p->conn);
        return with_context(p, err);
    }
    long long seen = from, wait_lo = 0;
    for (int i = 0; i < nrows; i++) {
        if (deadline > 0 && nhandle > 0 && mono_s() > deadline) break; /* commit what is done */
        long long pos = pup_be_int(PQgetvalue(r, i, FIRST_EVENT_COL), 8);
        if (pos != seen + 1) {
            /* A hole: dead once a snapshot's xmin is above its bound, else wait. Holes
             * beyond the first undecided one are only noted, so the next batch can step
             * over all that died at once. */
            gap *g = find_gap(p, seen + 1, pos - 1);
            if (!g) note_gap(p, seen + 1, pos - 1);
            if (!wait_lo && (!g || xmin <= g->bound)) {
                wait_lo = seen + 1;
                *waiting = 1;
            }
        }
        seen = pos;
        if (wait_lo) continue; /* a transaction that may fill the hole may still be running */
        last = pos;
        if (PQgetisnull(r, i, FIRST_EVENT_COL - 1) || !PQgetvalue(r, i, FIRST_EVENT_COL - 1)[0])
            continue; /* out of scope */
        pup_event ev;
        pup_event_from_row(r, i, FIRST_EVENT_COL, &ev);
        int part = pup_partition_of(ev.aggregate_id.p, ev.aggregate_id.len, p->total);
        if (!p->held[part] || pos <= p->cp[part]) continue; /* not ours, or done before */
        if (p->old_cp && pos <= p->old_max &&
            pos <= p->old_cp[pup_partition_of(ev.aggregate_id.p, ev.aggregate_id.len, p->old_total)])
            continue; /* handled under the previous partitioning */
        if (!opened && queue(p, p->sql_open, i, err) < 0) {
            rc = with_context(p, err);
            break;
        }
        opened = 1;
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
    /* Queued before the Sync: after a handler's ROLLBACK or COMMIT, the statements that
     * follow form an implicit transaction that this failure rolls back at the Sync. */
    if (rc == 0 && opened &&
        (queue(p, p->sql_guard, TAG_GUARD, err) < 0 || (p->sql_untimed && queue(p, p->sql_untimed, TAG_GUARD, err) < 0)))
        rc = with_context(p, err);
    if (rc == 0) {
        long tag = -1;
        if (pup_conn_pipeline_end(p->conn, err, &tag) < 0)
            rc = tag == TAG_GUARD ? ended_error(p, err)
                 : tag >= 0 && tag < nrows ? event_error(p, r, (int)tag, err) : with_context(p, err);
        else if (PQtransactionStatus(pup_conn_pg(p->conn)) != PQTRANS_INTRANS)
            rc = ended_error(p, err);
    }
    if (wait_lo != p->wait_lo) p->wait_since = now_s();
    p->wait_lo = wait_lo;
    forget_gaps(p, last, 0);
    if (rc == 0 && has_pending_gap(p)) {
        /* Drawn after the snapshot that saw the holes, so above every xid that could
         * fill them; decided by a later batch's snapshot. */
        PGresult *xr = run(p, err, "SELECT pg_current_xact_id()::text", 0);
        if (!xr) rc = with_context(p, err);
        else {
            uint64_t bound = strtoull(PQgetvalue(xr, 0, 0), NULL, 10);
            for (int k = 0; k < p->ngaps; k++)
                if (p->gaps[k].bound == BOUND_PENDING) p->gaps[k].bound = bound;
            PQclear(xr);
        }
    }
    if (rc == 0 && (last != from || p->wait_lo != p->recorded_wait))
        rc = write_checkpoint(p, from, last, err) < 0 ? with_context(p, err) : 0;
    PQclear(r);
    if (rc == 0 && pup_conn_commit(p->conn, err) < 0) rc = with_context(p, err);
    if (rc < 0) {
        pup_conn_rollback(p->conn);
        forget_gaps(p, 0, 1); /* holes noted by this batch are noted again next time */
        return -1;
    }
    for (int k = 0; k < p->total; k++)
        if (p->held[k] && p->cp[k] < last) p->cp[k] = last;
    *handled = nhandle;
    *advanced = last - from;
    p->stats.handled += nhandle;
    p->stats.position = last;
    p->stats.waiting_position = p->wait_lo;
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
    if (p->cfg.group) {
        int until_tick = (int)((p->next_tick - mono_s()) * 1000) + 1;
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
    gap *g = find_gap(p, p->wait_lo, p->wait_lo);
    if (!g || g->bound == BOUND_PENDING) return 1;
    char lo[24], hi[24];
    snprintf(lo, sizeof lo, "%lld", g->lo);
    snprintf(hi, sizeof hi, "%lld", g->hi);
    PGresult *r = run(p, err, p->sql_hole, 2, lo, hi);
    if (!r) return with_context(p, err);
    int changed = PQgetvalue(r, 0, 0)[0] == 't' || strtoull(PQgetvalue(r, 0, 1), NULL, 10) > g->bound;
    PQclear(r);
    return changed;
}

static int run_loop(pup_processor *p, const pup_run_opts *o, pup_error *err) {
    long long target = -1;
    int backoff_ms = 100, told_standby = 0;
    for (;;) {
        if (stopped(o)) return 0;
        int acquired;
        if (pup_processor_acquire(p, &acquired, err) < 0) goto failed;
        if (!acquired) {
            if (!told_standby && p->cfg.group)
                logf_(o, "projection %s: group worker %s holds no partition yet", p->name, p->owner);
            else if (!told_standby)
                logf_(o, "projection %s partition %d/%d: standby (another processor holds it)",
                      p->name, p->cfg.partition_key, p->cfg.total_partitions);
            told_standby = 1;
            if (wait_for(p, o, p->cfg.group ? 200 : 1000)) return 0;
            continue;
        }
        if (told_standby && p->cfg.group)
            logf_(o, "projection %s: group worker %s took over %d partition(s)", p->name, p->owner, p->nheld);
        else if (told_standby)
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
        if (waiting) {
            /* In flight below a visible position: its commit notifies; a rollback does
             * not, so look again soon, cheaply, until the hole may have changed (or a
             * heartbeat is due). */
            int hole_ms = 2, changed = 0;
            while (!changed) {
                if (wait_for(p, o, hole_ms)) return 0;
                hole_ms = hole_ms * 2 > 50 ? 50 : hole_ms * 2;
                if (p->cfg.group && mono_s() >= p->next_tick) break;
                if ((changed = hole_changed(p, err)) < 0) goto failed;
            }
            continue;
        }
        if (advanced > 0) continue; /* more may be waiting */
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
            drop_all(p);
            p->next_tick = 0;
            if (pup_conn_reset(p->conn, &e2) < 0) continue;
            logf_(o, "projection %s: reconnected", p->name);
        }
    }
}

int pup_processor_run(pup_processor *p, const pup_run_opts *o, pup_error *err) {
    int rc = run_loop(p, o, err);
    pup_processor_release(p); /* a group worker hands its partitions over at once */
    return rc;
}
