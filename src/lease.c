/*
 * lease.c -- how a processor takes the partitions it may process, and the projection's
 * one live layout.
 *
 * Layout: a projection runs as static partitions (K of N) or as a worker group; the
 * registry row (<checkpoints>_groups) holds the live one, the one before it while that
 * change settles, and the generation a reset starts. A processor of another layout takes
 * over only when no processor of the live one is alive (claim_layout), and then honours
 * the old layout's checkpoints event by event (settle_repartition) until every new
 * partition has passed them (drop_old_layout); otherwise it is refused (layout_conflict).
 *
 * Static partition (K of N): a session advisory lock on the partition; the lock holder is
 * the one live processor of it, the others are standbys that retry.
 *
 * Worker group: partitions are leased through the checkpoint rows. Every heartbeat is one
 * transaction of named steps:
 *   1. claim_layout       the registry row: the group's partition count (created with ours
 *                         if new; a static layout is taken over when none of it is live)
 *   2. adopt_total        a changed count: give up every lease and start over
 *   3. end_dead_sessions  terminate the sessions of workers whose heartbeat stopped
 *   4. list_live_workers  register this worker, forget dead ones, list the live ones
 *   5. settle_repartition after a layout change, wait until the old layout's workers are
 *                         gone, then honour its checkpoints event by event
 *   6. init_rows          every partition has a checkpoint row
 *   7. lease_fair_share   release what is no longer ours, lease partition k when we are
 *                         the (k mod n)-th live worker in worker id order
 *   8. drop_old_layout    the old layout's rows go once every partition passed them
 * A batch commits only under its leases and generation (the fenced checkpoint write,
 * batch.c). The statements are built once per processor and prepared through the
 * statement cache.
 */
#include "processor_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SQL(field, ...) if (asprintf(&s->field, __VA_ARGS__) < 0) s->field = NULL

/* The statements of a static partition and of the batch's lock timeout. */
static void static_sql(pup_processor *p) {
    pup_lease_sql *s = &p->lease;
    /* A batch stuck behind a lock (a dead worker's rows) gives up and retries after the
     * next heartbeat, instead of letting its own leases lapse. */
    SQL(lock_timeout, "SET lock_timeout = '%dms'", p->cfg.lease_ttl_ms / 2);
    /* The key hashes the whole name (a text built by the server, never truncated). */
    SQL(static_lock, "%s",
        "SELECT pg_try_advisory_lock(hashtextextended("
        "'pupsourcing/' || $1::text || '/' || $2::text || '/' || $3::text || '/' || $4::text, 0))");
    SQL(static_unlock, "%s",
        "SELECT pg_advisory_unlock(hashtextextended("
        "'pupsourcing/' || $1::text || '/' || $2::text || '/' || $3::text || '/' || $4::text, 0))");
    SQL(static_checkpoint,
        "SELECT last_global_position, generation FROM %s WHERE projection_name = $1"
        " AND total_partitions = $2 AND partition_key = $3", p->store->q_checkpoints);
}

/* Who is alive of a static layout ($1 projection, $2 total, $3 checkpoints table): the
 * sessions holding its partitions' advisory locks (the key of static_lock). NULL: none. */
static char *static_live_sql(void) {
    return strdup("SELECT string_agg(format('partition %s/%s (backend pid %s)', k, $2::int, l.pid), ', '"
                  " ORDER BY k) FROM generate_series(0, $2::int - 1) k JOIN pg_locks l"
                  " ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid <> pg_backend_pid()"
                  " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                  " AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended("
                  "'pupsourcing/' || $3::text || '/' || $1::text || '/' || k || '/' || $2::int, 0)");
}

/* Who is alive of a group ($1 projection): workers whose session is still open, and
 * holders of unexpired leases. NULL: none. */
static char *group_live_sql(const pup_store *st) {
    char *q = NULL;
    if (asprintf(&q,
                 "SELECT string_agg(DISTINCT 'group worker ' || w, ', ') FROM ("
                 "SELECT worker_id FROM %s x WHERE projection_name = $1 AND EXISTS (SELECT 1"
                 " FROM pg_stat_activity a WHERE a.pid = x.backend_pid AND a.backend_start = x.backend_start"
                 " AND a.pid <> pg_backend_pid())"
                 " UNION SELECT owner FROM %s WHERE projection_name = $1 AND owner IS NOT NULL"
                 " AND lease_expires_at > clock_timestamp()) AS live(w)",
                 st->q_workers, st->q_checkpoints) < 0)
        q = NULL;
    return q;
}

/* The statements of the layout registry. */
static void layout_sql(pup_processor *p) {
    const char *C = p->store->q_checkpoints, *G = p->store->q_groups;
    pup_lease_sql *s = &p->lease;
    SQL(layout_insert,
        "INSERT INTO %s (projection_name, total_partitions, mode) VALUES ($1, $2, $3)"
        " ON CONFLICT (projection_name) DO NOTHING RETURNING 1", G);
    /* A group's heartbeats share the row; a change of layout (and a reset) locks it. */
    SQL(layout_share,
        "SELECT mode, total_partitions, previous_total, generation FROM %s WHERE projection_name = $1 FOR SHARE", G);
    SQL(layout_update,
        "SELECT mode, total_partitions, previous_total, generation FROM %s WHERE projection_name = $1 FOR UPDATE", G);
    /* Checkpoints written before the registry existed: the layout written last. */
    SQL(layout_legacy,
        "SELECT total_partitions, CASE WHEN bool_or(lease_expires_at IS NOT NULL) THEN 'group' ELSE 'static' END"
        " FROM %s WHERE projection_name = $1 GROUP BY total_partitions ORDER BY max(updated_at) DESC LIMIT 1", C);
    SQL(layout_switch,
        "UPDATE %s SET mode = $3, total_partitions = $2, previous_mode = CASE WHEN previous_total"
        " IS NOT DISTINCT FROM $5::int THEN previous_mode ELSE $4 END, previous_total = $5::int,"
        " changed_at = now() WHERE projection_name = $1", G);
    /* An earlier change has settled when every partition of the live count ($2) has passed
     * every checkpoint of the previous one ($3): then the rows of the previous go. */
    SQL(layout_settled,
        "WITH done AS (SELECT (SELECT count(*) = $2::int AND min(last_global_position) >= COALESCE((SELECT"
        " max(last_global_position) FROM %s WHERE projection_name = $1 AND total_partitions = $3), 0)"
        " FROM %s WHERE projection_name = $1 AND total_partitions = $2) AS ok),"
        " del AS (DELETE FROM %s WHERE projection_name = $1 AND total_partitions <> $2"
        " AND (SELECT ok FROM done) RETURNING 1)"
        " SELECT ok, (SELECT count(*) FROM del) FROM done",
        C, C, C);
    s->static_live = static_live_sql();
    s->group_live = group_live_sql(p->store);
    SQL(generation, "SELECT generation FROM %s WHERE projection_name = $1", G);
}

/* The statements of the heartbeat's steps, in order, and of leaving. */
static void group_sql(pup_processor *p) {
    const char *C = p->store->q_checkpoints, *W = p->store->q_workers, *G = p->store->q_groups;
    pup_lease_sql *s = &p->lease;
    SQL(unlease_mine,
        "UPDATE %s SET owner = NULL, lease_expires_at = NULL WHERE projection_name = $1 AND owner = $2", C);
    SQL(end_dead,
        "SELECT count(pg_terminate_backend(a.pid)) FROM %s w JOIN pg_stat_activity a"
        " ON a.pid = w.backend_pid AND a.backend_start = w.backend_start"
        " WHERE w.projection_name = $1 AND w.heartbeat_at < clock_timestamp() - $2::interval"
        " AND a.pid <> pg_backend_pid() AND a.usename = current_user",
        W);
    SQL(register_me,
        "INSERT INTO %s (projection_name, worker_id, backend_pid, backend_start)"
        " SELECT $1, $2, pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        " ON CONFLICT (projection_name, worker_id) DO UPDATE SET heartbeat_at = clock_timestamp(),"
        " backend_pid = EXCLUDED.backend_pid, backend_start = EXCLUDED.backend_start",
        W);
    SQL(forget_dead,
        "DELETE FROM %s WHERE projection_name = $1 AND heartbeat_at < clock_timestamp() - $2::interval", W);
    SQL(live, "SELECT worker_id FROM %s WHERE projection_name = $1 ORDER BY worker_id", W);
    SQL(old_checkpoints,
        "SELECT partition_key, last_global_position, owner IS NOT NULL AND lease_expires_at > clock_timestamp()"
        " FROM %s WHERE projection_name = $1 AND total_partitions = $2 FOR UPDATE",
        C);
    SQL(settle_reset,
        "UPDATE %s SET previous_total = NULL, previous_mode = NULL WHERE projection_name = $1"
        " AND previous_total = $2", G);
    /* Rows of the registry's generation (a reset deletes every row and starts the next). */
    SQL(init_rows,
        "INSERT INTO %s (projection_name, total_partitions, partition_key, last_global_position, generation)"
        " SELECT $1, $2, k, $3, g.generation FROM generate_series(0, $2::int - 1) k, %s g"
        " WHERE g.projection_name = $1 ON CONFLICT DO NOTHING",
        C, G);
    SQL(release_others,
        "UPDATE %s SET owner = NULL, lease_expires_at = NULL WHERE projection_name = $1"
        " AND total_partitions = $2 AND owner = $3 AND NOT (partition_key = ANY($4::int[]))",
        C);
    SQL(lease,
        "UPDATE %s SET owner = $3, lease_expires_at = clock_timestamp() + $5::interval"
        " WHERE projection_name = $1 AND total_partitions = $2 AND partition_key = ANY($4::int[])"
        " AND (owner IS NULL OR owner = $3 OR lease_expires_at < clock_timestamp())"
        " RETURNING partition_key, last_global_position",
        C);
    SQL(drop_old,
        "WITH done AS (SELECT min(last_global_position) >= $3 AS ok FROM %s"
        " WHERE projection_name = $1 AND total_partitions = $2)"
        " , del AS (DELETE FROM %s WHERE projection_name = $1 AND total_partitions <> $2"
        " AND (SELECT ok FROM done) RETURNING 1)"
        " UPDATE %s SET previous_total = NULL, previous_mode = NULL WHERE projection_name = $1"
        " AND (SELECT ok FROM done) RETURNING 1",
        C, C, G);
    SQL(unregister, "DELETE FROM %s WHERE projection_name = $1 AND worker_id = $2", W);
}
#undef SQL

int pup_proc_lease_sql_init(pup_processor *p) {
    static_sql(p);
    group_sql(p);
    layout_sql(p);
    pup_lease_sql *s = &p->lease;
    char **f = &s->lock_timeout;
    for (size_t i = 0; i < sizeof *s / sizeof *f; i++)
        if (!f[i]) return -1;
    return 0;
}

void pup_proc_lease_sql_free(pup_processor *p) {
    char **f = &p->lease.lock_timeout;
    for (size_t i = 0; i < sizeof p->lease / sizeof *f; i++) free(f[i]);
}

/* Runs a statement whose result does not matter; -1 with err. */
static int run_void(pup_processor *p, pup_error *err, const char *sql, int n, const char *a,
                    const char *b, const char *c) {
    PGresult *r = pup_proc_run(p, err, sql, n, a, b, c);
    if (!r) return -1;
    PQclear(r);
    return 0;
}

/* Writes the registry row's layout: mode and total, and the layout before (prev_mode
 * and prev_total, NULL: none). */
static int switch_layout(pup_processor *p, const char *total, const char *mode, const char *prev_mode,
                         const char *prev_total, pup_error *err) {
    PGresult *r = pup_proc_run(p, err, p->lease.layout_switch, 5, p->name, total, mode, prev_mode, prev_total);
    if (!r) return -1;
    PQclear(r);
    return 0;
}

/* Names the live processors of layout (mode, total) into *live (NULL: none alive). */
static int live_of(pup_processor *p, const char *mode, int total, char **live, pup_error *err) {
    char t[16];
    snprintf(t, sizeof t, "%d", total);
    int group = strcmp(mode, "group") == 0;
    PGresult *r = group ? pup_proc_run(p, err, p->lease.group_live, 1, p->name)
                        : pup_proc_run(p, err, p->lease.static_live, 3, p->name, t, p->store->checkpoints);
    if (!r) return -1;
    *live = PQgetisnull(r, 0, 0) ? NULL : strdup(PQgetvalue(r, 0, 0));
    int oom = !PQgetisnull(r, 0, 0) && !*live;
    PQclear(r);
    return oom ? pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory") : 0;
}

/* The registry row, locked: mode, total, previous total (0: none) and generation. */
typedef struct layout {
    char mode[8];
    int total, prev;
    long long gen;
} layout;

/* Reads the registry row with sql (layout_share or layout_update) into *l. */
static int read_layout(pup_processor *p, const char *sql, layout *l, pup_error *err) {
    PGresult *r = pup_proc_run(p, err, sql, 1, p->name);
    if (!r) return -1;
    if (PQntuples(r) == 0) { /* deleted by hand between the insert and here */
        PQclear(r);
        return pup_error_set(err, PUP_ERR_CONNECTION, "projection %s: its layout row vanished; retrying", p->name);
    }
    snprintf(l->mode, sizeof l->mode, "%s", PQgetvalue(r, 0, 0));
    l->total = atoi(PQgetvalue(r, 0, 1));
    l->prev = PQgetisnull(r, 0, 2) ? 0 : atoi(PQgetvalue(r, 0, 2));
    l->gen = strtoll(PQgetvalue(r, 0, 3), NULL, 10);
    PQclear(r);
    if (l->total < 1 || l->total > PUP_MAX_PARTITIONS)
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "projection %s: partition count %d is out of range",
                             p->name, l->total);
    return 0;
}

/* A new registry row over checkpoints written before the registry existed: the layout
 * written last becomes the previous one, so its checkpoints are honoured. */
static int adopt_legacy(pup_processor *p, layout *l, pup_error *err) {
    PGresult *r = pup_proc_run(p, err, p->lease.layout_legacy, 1, p->name);
    if (!r) return -1;
    int rc = 0;
    if (PQntuples(r) && atoi(PQgetvalue(r, 0, 0)) != l->total) {
        char t[16];
        snprintf(t, sizeof t, "%d", l->total);
        rc = switch_layout(p, t, l->mode, PQgetvalue(r, 0, 1), PQgetvalue(r, 0, 0), err);
        l->prev = atoi(PQgetvalue(r, 0, 0));
    }
    PQclear(r);
    return rc;
}

/* Refuses a layout change while an earlier one still settles, unless its rows show it
 * has (then they go). */
static int earlier_change_settled(pup_processor *p, const layout *l, pup_error *err) {
    if (!l->prev || l->prev == l->total) return 0;
    char t[16], pt[16];
    snprintf(t, sizeof t, "%d", l->total);
    snprintf(pt, sizeof pt, "%d", l->prev);
    PGresult *r = pup_proc_run(p, err, p->lease.layout_settled, 3, p->name, t, pt);
    if (!r) return -1;
    int ok = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    if (ok) return 0;
    return pup_error_set(err, PUP_ERR_LAYOUT_CONFLICT,
                         "projection %s: its change from %d to %d partitions (%s) has not settled yet; run the %s"
                         " layout until `pupsourcing status` shows no previous layout, then change it",
                         p->name, l->prev, l->total, l->mode, l->mode);
}

/* Step 1 (and a static processor's first step): the projection's live layout from the
 * registry row, created with ours when new. Another layout is taken over when none of its
 * processors is alive (the old checkpoints are honoured: settle_repartition), else refused
 * with layout_conflict naming them. A group adopts the group's own count. *total is the
 * count to run, *prev the one before while a change settles (0: none). A new generation
 * (a reset) forgets the previous layout's checkpoints held in memory. */
static int claim_layout(pup_processor *p, int *total, int *prev, pup_error *err) {
    const char *mode = p->cfg.group ? "group" : "static";
    char ours[16];
    snprintf(ours, sizeof ours, "%d", p->cfg.total_partitions);
    PGresult *r = pup_proc_run(p, err, p->lease.layout_insert, 3, p->name, ours, mode);
    if (!r) return -1;
    int created = PQntuples(r) > 0;
    PQclear(r);
    layout l;
    if (read_layout(p, p->cfg.group ? p->lease.layout_share : p->lease.layout_update, &l, err) < 0) return -1;
    if (created && adopt_legacy(p, &l, err) < 0) return -1;
    int same_mode = strcmp(l.mode, mode) == 0;
    if (!same_mode || (!p->cfg.group && l.total != p->cfg.total_partitions)) {
        /* A group's heartbeat shares the row: take it alone to change it. */
        if (p->cfg.group && read_layout(p, p->lease.layout_update, &l, err) < 0) return -1;
        char *live = NULL;
        if (live_of(p, l.mode, l.total, &live, err) < 0) return -1;
        if (live) {
            pup_error_set(err, PUP_ERR_LAYOUT_CONFLICT,
                          "projection %s: cannot run as %s %d: its live layout is %s %d, run by %s;"
                          " stop them first, or run the same layout",
                          p->name, mode, p->cfg.total_partitions, l.mode, l.total, live);
            free(live);
            return -1;
        }
        int to = p->cfg.total_partitions;
        if (to != l.total) {
            if (earlier_change_settled(p, &l, err) < 0) return -1;
            l.prev = l.total;
        }
        char pt[16];
        snprintf(pt, sizeof pt, "%d", l.prev);
        if (switch_layout(p, ours, mode, l.prev ? l.mode : NULL, l.prev ? pt : NULL, err) < 0)
            return -1;
        l.total = to;
    }
    if (p->gen && l.gen != p->gen) pup_proc_forget_old(p); /* reset: nothing old to honour */
    p->gen = l.gen;
    *total = l.total;
    *prev = l.prev;
    return 0;
}

/* Step 2: repartitioned: give up every lease of the old count and start over. */
static int adopt_total(pup_processor *p, int n_total, pup_error *err) {
    if (n_total == p->total) return 0;
    if (run_void(p, err, p->lease.unlease_mine, 2, p->name, p->owner, NULL) < 0) return -1;
    if (pup_proc_set_total(p, n_total) < 0) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    pup_proc_forget_old(p);
    return 0;
}

/* Step 3: end the sessions of workers whose heartbeat stopped: a frozen or cut-off worker
 * may still hold row locks (of its last batch, or of a heartbeat it never committed) that
 * would stall the rest. Read without locking, so a frozen row never blocks us. */
static int end_dead_sessions(pup_processor *p, const char *ttl, pup_error *err) {
    return run_void(p, err, p->lease.end_dead, 2, p->name, ttl, NULL);
}

/* Step 4: heartbeat, forget dead workers, list the live ones: *me is our rank among
 * the *nworkers live workers. */
static int list_live_workers(pup_processor *p, const char *ttl, int *me, int *nworkers, pup_error *err) {
    if (run_void(p, err, p->lease.register_me, 2, p->name, p->owner, NULL) < 0 ||
        run_void(p, err, p->lease.forget_dead, 2, p->name, ttl, NULL) < 0)
        return -1;
    PGresult *r = pup_proc_run(p, err, p->lease.live, 1, p->name);
    if (!r) return -1;
    *nworkers = PQntuples(r);
    *me = 0;
    for (int i = 0; i < *nworkers; i++)
        if (strcmp(PQgetvalue(r, i, 0), p->owner) == 0) *me = i;
    PQclear(r);
    if (*nworkers < 1) *nworkers = 1;
    return 0;
}

/* Keeps the old layout's checkpoints (rows of old_checkpoints) to honour; *start is the
 * lowest of them, where new partitions start. */
static int take_old_checkpoints(pup_processor *p, PGresult *r, int prev, long long *start) {
    p->old_cp = calloc((size_t)prev, sizeof *p->old_cp);
    if (!p->old_cp) return -1;
    p->old_total = prev;
    p->old_max = 0;
    *start = -1;
    for (int i = 0; i < PQntuples(r); i++) {
        int k = atoi(PQgetvalue(r, i, 0));
        long long pos = strtoll(PQgetvalue(r, i, 1), NULL, 10);
        if (k >= 0 && k < prev) p->old_cp[k] = pos;
        if (pos > p->old_max) p->old_max = pos;
        if (*start < 0 || pos < *start) *start = pos;
    }
    return 0;
}

/* Step 5: a repartition settles first: the old layout's workers must be gone (their rows
 * locked, so an in-flight commit finishes first), then its checkpoints are honoured event
 * by event until every new partition has passed them. Returns 1 while an old worker
 * lives; *start is where new partitions begin. */
static int settle_repartition(pup_processor *p, int prev, long long *start, pup_error *err) {
    *start = 0;
    if (prev <= 0) return 0;
    char prevs[16];
    snprintf(prevs, sizeof prevs, "%d", prev);
    PGresult *r = pup_proc_run(p, err, p->lease.old_checkpoints, 2, p->name, prevs);
    if (!r) return -1;
    int live = 0, rc = 0;
    for (int i = 0; i < PQntuples(r); i++) live |= PQgetvalue(r, i, 2)[0] == 't';
    if (live) rc = 1;
    else if (PQntuples(r) == 0) {
        /* The old checkpoints are gone (a reset): nothing to honour, settled. */
        pup_proc_forget_old(p);
        rc = run_void(p, err, p->lease.settle_reset, 2, p->name, prevs, NULL);
    } else if (!p->old_cp) {
        if (take_old_checkpoints(p, r, prev, start) < 0)
            rc = pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    } else {
        *start = p->old_max;
        for (int k = 0; k < p->old_total; k++)
            if (p->old_cp[k] < *start) *start = p->old_cp[k];
    }
    PQclear(r);
    return rc;
}

/* Step 6: every partition has a row (new ones start where the old layout was sure). */
static int init_rows(pup_processor *p, const char *total, long long start, pup_error *err) {
    char init[32];
    snprintf(init, sizeof init, "%lld", start);
    return run_void(p, err, p->lease.init_rows, 3, p->name, total, init);
}

/* Step 7: release what is not our fair share, lease the rest of it, and hold what the
 * lease returned. */
static int lease_fair_share(pup_processor *p, const char *total, const char *ttl, int me,
                            int nworkers, pup_error *err) {
    char *target = malloc((size_t)p->total * 6 + 3);
    if (!target) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    size_t tn = 0;
    target[tn++] = '{';
    for (int k = me; k < p->total; k += nworkers) tn += (size_t)sprintf(target + tn, "%s%d", tn > 1 ? "," : "", k);
    target[tn++] = '}';
    target[tn] = '\0';
    PGresult *r = pup_proc_run(p, err, p->lease.release_others, 4, p->name, total, p->owner, target);
    if (r) {
        PQclear(r);
        r = pup_proc_run(p, err, p->lease.lease, 5, p->name, total, p->owner, target, ttl);
    }
    free(target);
    if (!r) return -1;
    pup_proc_drop_all(p);
    for (int i = 0; i < PQntuples(r); i++)
        pup_proc_hold(p, atoi(PQgetvalue(r, i, 0)), strtoll(PQgetvalue(r, i, 1), NULL, 10));
    pup_proc_held_done(p);
    PQclear(r);
    return 0;
}

/* Step 8: once every new partition has passed the old checkpoints, the old rows go. */
static int drop_old_layout(pup_processor *p, const char *total, pup_error *err) {
    if (!p->old_cp) return 0;
    char oldmax[32];
    snprintf(oldmax, sizeof oldmax, "%lld", p->old_max);
    PGresult *r = pup_proc_run(p, err, p->lease.drop_old, 3, p->name, total, oldmax);
    if (!r) return -1;
    if (PQntuples(r) > 0) pup_proc_forget_old(p);
    PQclear(r);
    return 0;
}

/* One heartbeat of a group worker, in its own transaction (the steps above). Holding
 * nothing is not a failure: the worker is a standby until a later heartbeat. */
static int group_tick(pup_processor *p, pup_error *err) {
    char ttl[32], total[16];
    snprintf(ttl, sizeof ttl, "%d milliseconds", p->cfg.lease_ttl_ms);
    if (pup_conn_command(p->conn, "BEGIN; SET LOCAL lock_timeout = '2s'", err) < 0) return -1;
    int n_total = 0, prev = 0, me = 0, nworkers = 1, rc;
    long long start = 0;
    if ((rc = claim_layout(p, &n_total, &prev, err)) != 0) goto out;
    if ((rc = adopt_total(p, n_total, err)) < 0) goto out;
    snprintf(total, sizeof total, "%d", n_total);
    if ((rc = end_dead_sessions(p, ttl, err)) < 0 || (rc = list_live_workers(p, ttl, &me, &nworkers, err)) < 0 ||
        (rc = settle_repartition(p, prev, &start, err)) != 0 || (rc = init_rows(p, total, start, err)) < 0 ||
        (rc = lease_fair_share(p, total, ttl, me, nworkers, err)) < 0 || (rc = drop_old_layout(p, total, err)) < 0)
        goto out;
    return pup_conn_commit(p->conn, err);
out:
    pup_proc_drop_all(p);
    if (rc > 0) return pup_conn_commit(p->conn, err); /* nothing to hold yet */
    pup_conn_rollback(p->conn);
    return -1;
}

/* Static partition: the session advisory lock, then in one transaction the layout
 * (claim_layout, settling a change like a group does), every partition's row, and ours.
 * Refused (layout_conflict): the lock is given back, so nothing of ours looks alive. */
static int acquire_lock(pup_processor *p, pup_error *err) {
    if (p->locked && !p->reload) return 0;
    char total[16], key[16];
    snprintf(total, sizeof total, "%d", p->cfg.total_partitions);
    snprintf(key, sizeof key, "%d", p->cfg.partition_key);
    PGresult *r;
    if (!p->locked) {
        r = pup_proc_run(p, err, p->lease.static_lock, 4, p->store->checkpoints, p->name, key, total);
        if (!r) return -1;
        p->locked = PQgetvalue(r, 0, 0)[0] == 't';
        PQclear(r);
        if (!p->locked) return 0;
    }
    pup_proc_drop_all(p);
    int n_total, prev, rc;
    long long start = 0;
    if (pup_conn_command(p->conn, "BEGIN", err) < 0) return -1;
    if ((rc = claim_layout(p, &n_total, &prev, err)) != 0 || (rc = settle_repartition(p, prev, &start, err)) != 0 ||
        (rc = init_rows(p, total, start, err)) != 0)
        goto out;
    if (!(r = pup_proc_run(p, err, p->lease.static_checkpoint, 3, p->name, total, key))) {
        rc = -1;
        goto out;
    }
    long long pos = PQntuples(r) ? strtoll(PQgetvalue(r, 0, 0), NULL, 10) : 0;
    if (PQntuples(r)) p->gen = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
    PQclear(r);
    if ((rc = pup_conn_commit(p->conn, err)) < 0) goto out;
    p->reload = 0;
    pup_proc_hold(p, p->cfg.partition_key, pos);
    pup_proc_held_done(p);
    return 0;
out:
    pup_conn_rollback(p->conn);
    if (rc > 0) { /* an old group worker still holds a lease: wait as a standby */
        p->reload = 1;
        return 0;
    }
    if (err->code == PUP_ERR_LAYOUT_CONFLICT && pup_conn_ok(p->conn)) {
        pup_error e2;
        if ((r = pup_proc_run(p, &e2, p->lease.static_unlock, 4, p->store->checkpoints, p->name, key, total)))
            PQclear(r);
        p->locked = 0;
    }
    return -1;
}

/* Static: once this partition has passed the previous layout's checkpoints, try (at most
 * once a second) whether every partition has: then the old rows go. */
static int static_settle(pup_processor *p, int now, pup_error *err) {
    if (p->cfg.group || !p->old_cp || !p->nheld || p->cp[p->cfg.partition_key] < p->old_max) return 0;
    if (!now && pup_proc_mono() < p->next_tick) return 0;
    p->next_tick = pup_proc_mono() + 1;
    char total[16];
    snprintf(total, sizeof total, "%d", p->total);
    return drop_old_layout(p, total, err);
}

int pup_processor_acquire(pup_processor *p, int *acquired, pup_error *err) {
    int rc = 0;
    if (pup_conn_require_session(p->conn, err) < 0) return pup_proc_context(p, err); /* not behind transaction pooling */
    if (p->session != pup_conn_session(p->conn)) { /* reconnected: lock, LISTEN, leases gone */
        p->session = pup_conn_session(p->conn);
        p->locked = p->listening = 0;
        pup_proc_drop_all(p);
        p->next_tick = 0;
    }
    if (!p->cfg.group) {
        rc = acquire_lock(p, err);
        if (rc == 0) rc = static_settle(p, 0, err);
    } else if (pup_proc_mono() >= p->next_tick) {
        if (!p->listening) rc = pup_conn_command(p->conn, p->lease.lock_timeout, err);
        double t0 = pup_proc_mono();
        if (rc == 0) rc = group_tick(p, err);
        if (rc == 0) p->last_tick = t0; /* the leases run until at least t0 + ttl */
        p->next_tick = pup_proc_mono() + p->cfg.lease_ttl_ms / 1000.0 / 5;
        if (rc < 0 && strcmp(err->sqlstate, "55P03") == 0) rc = 0; /* lock timeout: next tick */
    }
    if (rc == 0 && p->nheld > 0) rc = pup_proc_listen(p, err);
    *acquired = p->nheld > 0;
    p->stats.standby = !*acquired;
    p->stats.held = p->nheld;
    return rc < 0 ? pup_proc_context(p, err) : 0;
}

int pup_proc_reset_seen(pup_processor *p, long long gen, pup_error *err) {
    /* Retried like a serialization failure: the next acquire reads the new rows. */
    pup_error_set(err, PUP_ERR_DATABASE, "projection %s was reset: starting over in generation %lld", p->name, gen);
    strcpy(err->sqlstate, "40001");
    pup_proc_forget_old(p);
    pup_proc_drop_all(p);
    p->reload = 1;
    p->next_tick = 0;
    return -1;
}

int pup_proc_fenced(pup_processor *p, long long from, int n, pup_error *err) {
    pup_error e2;
    PGresult *r = pup_proc_run(p, &e2, p->lease.generation, 1, p->name);
    long long gen = r && PQntuples(r) ? strtoll(PQgetvalue(r, 0, 0), NULL, 10) : p->gen;
    if (r) PQclear(r);
    if (gen != p->gen) return pup_proc_reset_seen(p, gen, err);
    if (!p->cfg.group)
        return pup_error_set(err, PUP_ERR_DATABASE,
                             "checkpoint moved from %lld by another processor; batch rolled back", from);
    /* Retried like a lost connection: the next heartbeat sorts out what we hold. */
    pup_error_set(err, PUP_ERR_CONNECTION, "lost the lease on %d partition(s); batch rolled back", p->nheld - n);
    p->next_tick = 0;
    return -1;
}

void pup_processor_release(pup_processor *p) {
    if (!pup_conn_ok(p->conn) || PQtransactionStatus(pup_conn_pg(p->conn)) != PQTRANS_IDLE) return;
    pup_error err;
    if (!p->cfg.group) {
        static_settle(p, 1, &err); /* the last partition of a `run --once` to pass drops the old rows */
        return;
    }
    run_void(p, &err, p->lease.unlease_mine, 2, p->name, p->owner, NULL);
    run_void(p, &err, p->lease.unregister, 2, p->name, p->owner, NULL);
    pup_proc_drop_all(p);
}

int pup_group_repartition(const pup_store *s, pup_conn *c, const char *projection, int total,
                          int *previous, pup_error *err) {
    *previous = 0;
    if (total < 1 || total > PUP_MAX_PARTITIONS)
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "partition count %d is not in 1..%d", total,
                             PUP_MAX_PARTITIONS);
    if (PQtransactionStatus(pup_conn_pg(c)) != PQTRANS_IDLE)
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "repartition runs in its own transaction: the connection is in one");
    pup_params q = {0};
    const pup_stmt *st;
    PGresult *r = NULL;
    int rc = -1;
    if (pup_conn_command(c, "BEGIN", err) < 0) return -1;
    if (!(st = pup_conn_prepare(c, s->sql_group_get, err))) goto out;
    if (pup_params_reset(&q, 1) < 0) goto oom;
    pup_params_text(&q, 0, projection, strlen(projection));
    if (!(r = pup_conn_exec(c, st, &q, 0, err))) goto out;
    int cur = PQntuples(r) ? atoi(PQgetvalue(r, 0, 0)) : 0;
    if (PQntuples(r) && !PQgetisnull(r, 0, 1)) {
        pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                      "projection %s is still settling a repartition from %s to %d partitions;"
                      " try again when `pupsourcing status` shows no previous count",
                      projection, PQgetvalue(r, 0, 1), cur);
        goto out;
    }
    int was_static = PQntuples(r) && strcmp(PQgetvalue(r, 0, 2), "static") == 0;
    if (!PQntuples(r)) { /* no registry row: checkpoints from before it are the layout */
        char *sql = NULL;
        if (asprintf(&sql, "SELECT total_partitions, bool_or(lease_expires_at IS NOT NULL) FROM %s"
                     " WHERE projection_name = $1 GROUP BY 1 ORDER BY max(updated_at) DESC LIMIT 1",
                     s->q_checkpoints) < 0)
            goto oom;
        st = pup_conn_prepare(c, sql, err);
        free(sql);
        if (!st) goto out;
        PQclear(r);
        if (!(r = pup_conn_exec(c, st, &q, 0, err))) goto out;
        if (PQntuples(r)) {
            cur = atoi(PQgetvalue(r, 0, 0));
            was_static = PQgetvalue(r, 0, 1)[0] != 't';
        }
    }
    *previous = cur;
    /* A static layout becomes a group when none of its processors is alive. */
    if (was_static) {
        char *sql = static_live_sql(), t[16];
        if (!sql) goto oom;
        snprintf(t, sizeof t, "%d", cur);
        st = pup_conn_prepare(c, sql, err);
        free(sql);
        if (!st) goto out;
        if (pup_params_reset(&q, 3) < 0) goto oom;
        pup_params_text(&q, 0, projection, strlen(projection));
        pup_params_text(&q, 1, t, strlen(t));
        pup_params_text(&q, 2, s->checkpoints, strlen(s->checkpoints));
        PQclear(r);
        if (!(r = pup_conn_exec(c, st, &q, 0, err))) goto out;
        if (!PQgetisnull(r, 0, 0)) {
            pup_error_set(err, PUP_ERR_LAYOUT_CONFLICT,
                          "projection %s: cannot make it a group of %d: its live layout is static %d, run by %s;"
                          " stop them first", projection, total, cur, PQgetvalue(r, 0, 0));
            goto out;
        }
    }
    if (cur != total || was_static) {
        if (!(st = pup_conn_prepare(c, s->sql_group_set, err))) goto out;
        if (pup_params_reset(&q, 4) < 0) goto oom;
        pup_params_text(&q, 0, projection, strlen(projection));
        pup_params_int(&q, 1, total);
        if (cur && cur != total) {
            pup_params_int(&q, 2, cur);
            pup_params_text(&q, 3, was_static ? "static" : "group", was_static ? 6 : 5);
        }
        PQclear(r);
        if (!(r = pup_conn_exec(c, st, &q, 0, err))) goto out;
    }
    rc = pup_conn_commit(c, err);
    goto out;
oom:
    pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
out:
    if (r) PQclear(r);
    if (rc < 0) pup_conn_rollback(c);
    pup_params_free(&q);
    return rc;
}
