/*
 * lease.c -- how a processor takes the partitions it may process.
 *
 * Static partition (K of N): a session advisory lock on the partition; the lock holder is
 * the one live processor of it, the others are standbys that retry.
 *
 * Worker group: partitions are leased through the checkpoint rows. Every heartbeat is one
 * transaction of named steps:
 *   1. group_row          the group's partition count (created with ours if new)
 *   2. adopt_total        a changed count: give up every lease and start over
 *   3. end_dead_sessions  terminate the sessions of workers whose heartbeat stopped
 *   4. list_live_workers  register this worker, forget dead ones, list the live ones
 *   5. settle_repartition after a repartition, wait until the old layout's workers are
 *                         gone, then honour its checkpoints event by event
 *   6. init_rows          every partition has a checkpoint row
 *   7. lease_fair_share   release what is no longer ours, lease partition k when we are
 *                         the (k mod n)-th live worker in worker id order
 *   8. drop_old_layout    the old layout's rows go once every partition passed them
 * A batch commits only under its leases (the lease-fenced checkpoint write, batch.c).
 * The statements are built once per processor and prepared through the statement cache.
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
    SQL(static_checkpoint,
        "SELECT last_global_position FROM %s WHERE projection_name = $1"
        " AND total_partitions = $2 AND partition_key = $3", p->store->q_checkpoints);
}

/* The statements of the heartbeat's steps, in order, and of leaving. */
static void group_sql(pup_processor *p) {
    const char *C = p->store->q_checkpoints, *W = p->store->q_workers, *G = p->store->q_groups;
    pup_lease_sql *s = &p->lease;
    SQL(group_row,
        "WITH ins AS (INSERT INTO %s (projection_name, total_partitions) VALUES ($1, $2)"
        " ON CONFLICT (projection_name) DO NOTHING RETURNING total_partitions, previous_total)"
        " SELECT total_partitions, previous_total FROM ins UNION ALL"
        " SELECT total_partitions, previous_total FROM %s WHERE projection_name = $1 LIMIT 1",
        G, G);
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
        "UPDATE %s SET previous_total = NULL WHERE projection_name = $1 AND previous_total = $2", G);
    SQL(init_rows,
        "INSERT INTO %s (projection_name, total_partitions, partition_key, last_global_position)"
        " SELECT $1, $2, k, $3 FROM generate_series(0, $2::int - 1) k ON CONFLICT DO NOTHING",
        C);
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
        " UPDATE %s SET previous_total = NULL WHERE projection_name = $1 AND (SELECT ok FROM done)"
        " RETURNING 1",
        C, C, G);
    SQL(unregister, "DELETE FROM %s WHERE projection_name = $1 AND worker_id = $2", W);
}
#undef SQL

int pup_proc_lease_sql_init(pup_processor *p) {
    static_sql(p);
    group_sql(p);
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

/* Static partition: the session advisory lock, then its checkpoint. */
static int acquire_lock(pup_processor *p, pup_error *err) {
    if (p->locked) return 0;
    char total[16], key[16];
    snprintf(total, sizeof total, "%d", p->cfg.total_partitions);
    snprintf(key, sizeof key, "%d", p->cfg.partition_key);
    PGresult *r = pup_proc_run(p, err, p->lease.static_lock, 4, p->store->checkpoints, p->name, key, total);
    if (!r) return -1;
    p->locked = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    if (!p->locked) return 0;
    r = pup_proc_run(p, err, p->lease.static_checkpoint, 3, p->name, total, key);
    if (!r) return -1;
    pup_proc_hold(p, p->cfg.partition_key, PQntuples(r) ? strtoll(PQgetvalue(r, 0, 0), NULL, 10) : 0);
    pup_proc_held_done(p);
    PQclear(r);
    return 0;
}

/* Step 1: the group's partition count (the table's, else ours) and the count before a
 * repartition (0: none). Returns 1 when another worker is creating the row right now. */
static int group_row(pup_processor *p, int *n_total, int *prev, pup_error *err) {
    char total[16];
    snprintf(total, sizeof total, "%d", p->cfg.total_partitions);
    PGresult *r = pup_proc_run(p, err, p->lease.group_row, 2, p->name, total);
    if (!r) return -1;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return 1;
    }
    *n_total = atoi(PQgetvalue(r, 0, 0));
    *prev = PQgetisnull(r, 0, 1) ? 0 : atoi(PQgetvalue(r, 0, 1));
    PQclear(r);
    if (*n_total < 1 || *n_total > PUP_MAX_PARTITIONS)
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "group partition count %d is out of range", *n_total);
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
    if ((rc = group_row(p, &n_total, &prev, err)) != 0) goto out;
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

int pup_processor_acquire(pup_processor *p, int *acquired, pup_error *err) {
    int rc = 0;
    if (pup_conn_require_session(p->conn, err) < 0) return pup_proc_context(p, err); /* not behind transaction pooling */
    if (p->session != pup_conn_session(p->conn)) { /* reconnected: lock, LISTEN, leases gone */
        p->session = pup_conn_session(p->conn);
        p->locked = p->listening = 0;
        pup_proc_drop_all(p);
        p->next_tick = 0;
    }
    if (!p->cfg.group) rc = acquire_lock(p, err);
    else if (pup_proc_mono() >= p->next_tick) {
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

void pup_processor_release(pup_processor *p) {
    if (!p->cfg.group || !pup_conn_ok(p->conn)) return;
    pup_error err;
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
    *previous = cur;
    if (cur != total) {
        if (!(st = pup_conn_prepare(c, s->sql_group_set, err))) goto out;
        if (pup_params_reset(&q, 3) < 0) goto oom;
        pup_params_text(&q, 0, projection, strlen(projection));
        pup_params_int(&q, 1, total);
        if (cur) pup_params_int(&q, 2, cur);
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
