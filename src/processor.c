/*
 * processor.c -- the processor object: its configuration, the SQL texts it owns (the
 * batch read and the checkpoint writes; the lease protocol's are in lease.c), and the
 * partitions it holds with their checkpoints. The batch is in batch.c, the gap rule in
 * gap.c, taking partitions in lease.c, the loop in run_loop.c (processor_internal.h).
 */
#include "processor_internal.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

double pup_proc_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

double pup_proc_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The text[] literal of a scope, {"a","b"} (NULL with *out for none); -1 out of memory.
 * Bound as a parameter: nothing of the user's is pasted into SQL. */
static int scope_array(const char *const *vals, int n, char **out) {
    *out = NULL;
    if (n == 0 || !vals) return 0;
    size_t cap = 3;
    for (int i = 0; i < n; i++) cap += 2 * strlen(vals[i]) + 3;
    char *a = malloc(cap), *w = a;
    if (!a) return -1;
    *w++ = '{';
    for (int i = 0; i < n; i++) {
        if (i) *w++ = ',';
        *w++ = '"';
        for (const char *c = vals[i]; *c; c++) {
            if (*c == '"' || *c == '\\') *w++ = '\\';
            *w++ = *c;
        }
        *w++ = '"';
    }
    *w++ = '}';
    *w = '\0';
    *out = a;
    return 0;
}

int pup_proc_set_total(pup_processor *p, int total) {
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

void pup_proc_hold(pup_processor *p, int k, long long pos) {
    if (k < 0 || k >= p->total) return;
    if (!p->held[k]) p->nheld++;
    p->held[k] = 1;
    p->cp[k] = pos;
}

void pup_proc_held_done(pup_processor *p) {
    PQclear(p->ahead); /* read for the partitions held before */
    p->ahead = NULL;
    size_t n = 0;
    p->held_list[n++] = '{';
    for (int k = 0; k < p->total; k++)
        if (p->held[k]) n += (size_t)sprintf(p->held_list + n, "%s%d", n > 1 ? "," : "", k);
    p->held_list[n++] = '}';
    p->held_list[n] = '\0';
}

void pup_proc_drop_all(pup_processor *p) {
    memset(p->held, 0, (size_t)p->total);
    p->nheld = 0;
    pup_proc_held_done(p);
}

void pup_proc_forget_old(pup_processor *p) {
    free(p->old_cp);
    p->old_cp = NULL;
    p->old_total = 0;
}

/* Refuses a configuration the processor cannot run; 0 when it is sound. */
static int check_cfg(const pup_projection_cfg *cfg, pup_error *err) {
    if (!cfg->name || !*cfg->name)
        return pup_error_set(err, PUP_ERR_INVALID_PROJECTION, "projection has no name");
    if (cfg->total_partitions < 1 || cfg->total_partitions > PUP_MAX_PARTITIONS ||
        (!cfg->group && (cfg->partition_key < 0 || cfg->partition_key >= cfg->total_partitions)))
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                             "projection %s: partition key %d is not in 0..%d (total partitions %d, at most %d)",
                             cfg->name, cfg->partition_key, cfg->total_partitions - 1,
                             cfg->total_partitions, PUP_MAX_PARTITIONS);
    return 0;
}

/* This worker's name in leases and logs: host/pid/random. */
static void name_owner(pup_processor *p) {
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(p->owner, sizeof p->owner, "%s/%d/%lx", host, (int)getpid(),
             (unsigned long)(ts.tv_nsec ^ (long)(uintptr_t)p) & 0xffffff);
}

/* The generation lock, taken again (or first, after a read-ahead: batch.c) before the
 * handlers write: $1 is the lock's key. */
#define OPEN_LOCK "pg_advisory_xact_lock_shared(hashtextextended($1::text, 0))"
/* The window read's plan: a custom plan per read (PostgreSQL's choice for it: the generic
 * plan's estimate for `> $1 ... LIMIT $2` is higher) costs more than the read at batch 1000.
 * So a batch chained behind another (catch-up: batch.c, chain) plans its reads generically
 * (SQL_GENERIC, after its BEGIN) and puts the session's setting back before its handlers run
 * (in sql_open, RESTORE_PLANS). A batch of its own (a live read) is left as it was: there
 * the extra statement would cost more than the plan. */
#define SQL_GENERIC                                                                              \
    "SELECT set_config('pupsourcing.plan_cache_mode', current_setting('plan_cache_mode'), true)," \
    " set_config('plan_cache_mode', 'force_generic_plan', true)"
#define RESTORE_PLANS                                                                            \
    "set_config('plan_cache_mode', COALESCE(NULLIF(current_setting('pupsourcing.plan_cache_mode', true), '')," \
    " current_setting('plan_cache_mode')), true)"

/* The statements around the handlers and the one that watches a hole. */
static int build_batch_sql(pup_processor *p) {
    if (p->cfg.statement_timeout_ms > 0) {
        if (asprintf(&p->sql_open, "SELECT set_config('pupsourcing.batch', 'open', true), " RESTORE_PLANS ","
                     " set_config('statement_timeout', '%dms', true), " OPEN_LOCK, p->cfg.statement_timeout_ms) < 0)
            p->sql_open = NULL;
        p->sql_untimed = "SET LOCAL statement_timeout TO DEFAULT";
    } else
        p->sql_open = strdup("SELECT set_config('pupsourcing.batch', 'open', true), " RESTORE_PLANS ", " OPEN_LOCK);
    if (asprintf(&p->sql_hole,
                 "SELECT EXISTS (SELECT 1 FROM %s WHERE global_position BETWEEN $1 AND $2),"
                 " pg_snapshot_xmin(pg_current_snapshot())::text", p->store->q_events) < 0)
        p->sql_hole = NULL;
    p->sql_guard = "SELECT 1 / coalesce((current_setting('pupsourcing.batch', true) = 'open')::int, 0)";
    p->sql_generic = SQL_GENERIC;
    return p->sql_open && p->sql_hole ? 0 : -1;
}

/* The snapshot and the next events in one statement: the gap rule needs both from one
 * snapshot. Row 0 is the header (the snapshot's xmin, the head, the generation), the
 * window's events follow in order (UNION ALL's branches run in turn: a header joined to
 * the window, and the sort that joining needs, cost a catch-up read 40%). Events outside
 * the scope, or (by the hash the appender stored) of partitions not held, come without
 * payload: only their positions matter. */
static char *read_sql(const pup_processor *p, const char *E, const char *G, const char *S, int locked) {
    /* The scopes are parameters $5 (and $6) after the window's four, then the generation
     * lock's key and the projection name. */
    char atypes[48] = "true", etypes[48] = "true";
    int next = 5;
    if (p->scope[0]) snprintf(atypes, sizeof atypes, "aggregate_type = ANY($%d::text[])", next++);
    if (p->scope[1]) snprintf(etypes, sizeof etypes, "event_type = ANY($%d::text[])", next++);
    const char *ours = "(aggregate_id_hash IS NULL OR $3::int <= 1"
                       " OR (aggregate_id_hash % $3::int)::int = ANY($4::int[]))";
    /* A batch shares the projection's generation lock from its first statement (the
     * header, before the window is read): a reset takes it alone, so it never runs beside
     * a batch's uncommitted writes, and the batch sees the generation (a reset while idle
     * is noticed at the next read). Not the read-ahead's own session (!locked): its
     * request could queue behind a reset's, which waits for the batch, which waits for
     * that read (a cycle through the client, that no deadlock check sees). There a reset
     * is noticed by the batch's fenced checkpoint instead (its handlers take the lock). */
    char lock[96];
    snprintf(lock, sizeof lock, locked ? "pg_advisory_xact_lock_shared(hashtextextended($%d::text, 0))" : "$%d::text",
             next);
    char *sql;
    if (asprintf(&sql,
                 "SELECT pg_snapshot_xmin(pg_current_snapshot())::text,"
                 " (SELECT COALESCE(max(global_position), 0) FROM %s)::text,"
                 " (SELECT generation FROM %s WHERE projection_name = $%d)::text,"
                 " " PUP_LAST_DRAWN "::text,"
                 " NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
                 " WHERE %s IS NOT NULL"
                 " UNION ALL (SELECT NULL, NULL, NULL, NULL, (%s AND %s) AS mine, "
                 PUP_EVENT_COLUMNS_WITH("CASE WHEN %s AND %s AND %s THEN payload END",
                                        "CASE WHEN %s AND %s THEN metadata::text END")
                 " FROM %s WHERE global_position > $1 ORDER BY global_position LIMIT $2)",
                 E, G, next + 1, S, S, lock, atypes, etypes, atypes, etypes, ours, atypes, etypes, E) < 0)
        sql = NULL;
    return sql;
}

static int build_read_sql(pup_processor *p) {
    p->sql_read = read_sql(p, p->store->q_events, p->store->q_groups, p->store->q_sequence, 1);
    return p->sql_read ? 0 : -1;
}

/* The read-ahead's session (batch.c, read_ahead) reads the events, groups table and
 * sequence named schema.table as this connection resolves them now (a search_path set on
 * it included). Not behind a pooler (one more server connection from a pool that may
 * have none), and, asked again with every turn's BEGIN (sql_begin_check, batch.c:
 * begin_batch), not where what a session may see depends on more than its login: a role
 * set on this connection (SET ROLE), or row-level security on those tables (its policies
 * may read this session's settings). */
void pup_proc_resolve_reader(pup_processor *p) {
    if (p->sql_read_reader || p->reader_off) return;
    p->reader_off = 1; /* one try: on failure the read-ahead stays on p->conn */
    if (pup_conn_via_pooler(p->conn)) return;
    pup_error e;
    static const char resolve[] =
        "SELECT (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(x))"
        " FROM unnest(ARRAY[$1, $2, $3]) WITH ORDINALITY AS t(x, i) ORDER BY i";
    PGresult *r = pup_proc_run(p, &e, resolve, 3, p->store->q_events, p->store->q_groups, p->store->q_sequence);
    int ok = r && PQntuples(r) == 3 && !PQgetisnull(r, 0, 0) && !PQgetisnull(r, 1, 0) && !PQgetisnull(r, 2, 0);
    p->sql_read_reader = ok ? read_sql(p, PQgetvalue(r, 0, 0), PQgetvalue(r, 1, 0), PQgetvalue(r, 2, 0), 0) : NULL;
    if (p->sql_read_reader &&
        asprintf(&p->sql_begin_check, "BEGIN; SELECT current_user = session_user AND NOT EXISTS (SELECT 1 FROM"
                 " pg_class WHERE oid IN (to_regclass('%s'), to_regclass('%s'), to_regclass('%s')) AND relrowsecurity)",
                 PQgetvalue(r, 0, 0), PQgetvalue(r, 1, 0), PQgetvalue(r, 2, 0)) < 0)
        p->sql_begin_check = NULL;
    PQclear(r);
    p->reader_off = p->sql_read_reader == NULL || p->sql_begin_check == NULL;
}

/* Its session, opened when first needed, with its window reads planned generically (its
 * own statements only) and a short lock timeout: its read waits for a lock only behind an
 * ACCESS EXCLUSIVE request (DDL on the events table), which may wait for the batch, which
 * waits for that read. Timed out, the batch reads for itself (the session is opened again). */
int pup_proc_open_reader(pup_processor *p) {
    if (p->reader) return 0;
    if (p->reader_off || !p->sql_read_reader) return -1;
    pup_error e;
    p->reader = pup_conn_open_alike(p->conn, &e);
    if (!p->reader ||
        pup_conn_command(p->reader, "SET plan_cache_mode = force_generic_plan; SET lock_timeout = '100ms'", &e) < 0) {
        pup_conn_close(p->reader);
        p->reader = NULL;
        p->reader_off = 1;
        return -1;
    }
    return 0;
}

void pup_proc_close_reader(pup_processor *p) {
    pup_conn_close(p->reader);
    p->reader = NULL;
}

void pup_proc_drop_reader(pup_processor *p, const pup_error *err) {
    /* a lost session (a server restart) or a lock timeout: opened again; else not */
    p->reader_off = pup_conn_ok(p->reader) && !(err && strcmp(err->sqlstate, "55P03") == 0);
    pup_proc_close_reader(p);
}

/* The checkpoint writes of a batch. The rows exist (the acquire made them); a reset
 * deletes them, so a write of an older generation matches nothing. */
static int build_checkpoint_sql(pup_processor *p) {
    const char *C = p->store->q_checkpoints;
    /* Fenced by the position the batch started from and the generation: a second writer
     * of this checkpoint, or a reset, makes the batch fail instead of double-applying. */
    if (asprintf(&p->sql_checkpoint,
                 "UPDATE %s SET last_global_position = $4, waiting_position = $5,"
                 " waiting_since = to_timestamp($6::float8), owner = $7, updated_at = now()"
                 " WHERE projection_name = $1 AND total_partitions = $2 AND partition_key = $3"
                 " AND last_global_position = $8 AND generation = $9 RETURNING 1",
                 C) < 0)
        p->sql_checkpoint = NULL;
    /* The same write for a batch whose COMMIT is queued behind it unread (batch.c, chain):
     * fenced, it raises division_by_zero, so the COMMIT behind it cannot commit. */
    if (!p->sql_checkpoint ||
        asprintf(&p->sql_checkpoint_fenced, "WITH moved AS (%s) SELECT 1 / count(*)::int FROM moved", p->sql_checkpoint) < 0)
        p->sql_checkpoint_fenced = NULL;
    /* In a group, fenced by the lease: a worker that lost it commits nothing. */
    if (asprintf(&p->sql_lease_checkpoint,
                 "UPDATE %s SET last_global_position = GREATEST(last_global_position, $4),"
                 " waiting_position = $5, waiting_since = to_timestamp($6::float8), updated_at = now()"
                 " WHERE projection_name = $1 AND total_partitions = $2 AND partition_key = ANY($3::int[])"
                 " AND owner = $7 AND lease_expires_at > clock_timestamp() AND generation = $8"
                 " RETURNING partition_key",
                 C) < 0)
        p->sql_lease_checkpoint = NULL;
    if (asprintf(&p->gen_key, "pupsourcing.generation/%s/%s", p->store->checkpoints, p->name) < 0)
        p->gen_key = NULL;
    return p->sql_checkpoint && p->sql_checkpoint_fenced && p->sql_lease_checkpoint && p->gen_key ? 0 : -1;
}

pup_processor *pup_processor_new(const pup_store *store, pup_conn *conn,
                                 const pup_projection_cfg *cfg, const pup_handler *h,
                                 pup_error *err) {
    if (check_cfg(cfg, err) < 0) return NULL;
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
    p->cfg.aggregate_types = p->cfg.event_types = NULL; /* kept as p->scope */
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
    name_owner(p);
    int ok = p->name && scope_array(cfg->aggregate_types, cfg->n_aggregate_types, &p->scope[0]) == 0 &&
             scope_array(cfg->event_types, cfg->n_event_types, &p->scope[1]) == 0 &&
             build_batch_sql(p) == 0 && build_read_sql(p) == 0 && build_checkpoint_sql(p) == 0 &&
             pup_proc_lease_sql_init(p) == 0 && pup_proc_set_total(p, cfg->total_partitions) == 0;
    if (!ok) {
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
    free(p->sql_checkpoint_fenced);
    free(p->sql_lease_checkpoint);
    free(p->gen_key);
    free(p->sql_open);
    free(p->sql_hole);
    free(p->scope[0]);
    free(p->scope[1]);
    pup_proc_lease_sql_free(p);
    free(p->held);
    free(p->cp);
    free(p->held_list);
    free(p->old_cp);
    pup_params_free(&p->params);
    free(p->evs);
    PQclear(p->ahead);
    pup_conn_close(p->reader);
    free(p->sql_read_reader);
    free(p->sql_begin_check);
    free(p);
}

const pup_projection_cfg *pup_processor_cfg(const pup_processor *p) { return &p->cfg; }

void pup_processor_stats_get(const pup_processor *p, pup_processor_stats *s) {
    *s = p->stats;
    s->reader_session = p->reader != NULL;
}

int pup_proc_context(pup_processor *p, pup_error *err) {
    if (p->cfg.group)
        pup_error_prefix(err, "projection %s (group worker %s): ", p->name, p->owner);
    else
        pup_error_prefix(err, "projection %s partition %d/%d: ", p->name, p->cfg.partition_key,
                         p->cfg.total_partitions);
    return -1;
}

PGresult *pup_proc_run(pup_processor *p, pup_error *err, const char *sql, int n, ...) {
    const pup_stmt *st = pup_conn_prepare(p->conn, sql, err);
    if (!st) {
        pup_store_error(err);
        return NULL;
    }
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
    PGresult *r = pup_conn_exec(p->conn, st, &p->params, 0, err);
    if (!r) pup_store_error(err); /* the processor's own statements touch only the store's tables */
    return r;
}
