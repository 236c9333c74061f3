/*
 * test_processor_tx.c -- the batch transaction of the processor, driven from C so no Lua
 * guard is involved (issue 10):
 *   - a handler that ends the batch transaction (ROLLBACK, COMMIT, ROLLBACK + BEGIN, sent
 *     with pup_conn_send) fails its batch: the checkpoint does not move and no write of
 *     the statements after it survives;
 *   - the handler time limit (statement_timeout_ms) applies to handler statements only:
 *     a batch read or a checkpoint write stuck behind another session's lock for longer
 *     than the limit still succeeds; a handler in pg_sleep still fails with it.
 * Prints TAP; exits non-zero on any failure. Needs DATABASE_URL. Tables t_c_ptx_*.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pup_processor.h"
#include "tap.h"


/* What the test handler does besides recording the event's position. */
enum mode { PLAIN, ROLLBACK_AT, COMMIT_AT, ROLLBACK_BEGIN_AT, ROLLBACK_LAST, SLEEP };

typedef struct fixture {
    enum mode mode;
    long long at; /* the position where the handler misbehaves */
    long long last;
    int calls;
} fixture;

static int send_sql(pup_conn *c, const char *sql, const char *param, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, sql, err);
    if (!st) return -1;
    pup_params p;
    memset(&p, 0, sizeof p);
    int rc = -1;
    if (pup_params_reset(&p, param ? 1 : 0) == 0) {
        if (param) pup_params_text(&p, 0, param, strlen(param));
        rc = pup_conn_send(c, st, &p, err);
    }
    pup_params_free(&p);
    return rc;
}

static int handle(void *ud, pup_conn *c, const pup_event *ev, pup_error *err) {
    fixture *f = ud;
    f->calls++;
    char pos[24];
    snprintf(pos, sizeof pos, "%lld", ev->global_position);
    if (send_sql(c, "INSERT INTO t_c_ptx_rows (pos) VALUES ($1::bigint)", pos, err) < 0) return -1;
    int here = ev->global_position == f->at;
    switch (f->mode) {
    case ROLLBACK_AT:
        return here ? send_sql(c, "ROLLBACK", NULL, err) : 0;
    case COMMIT_AT:
        return here ? send_sql(c, "COMMIT", NULL, err) : 0;
    case ROLLBACK_BEGIN_AT:
        if (!here) return 0;
        if (send_sql(c, "ROLLBACK", NULL, err) < 0) return -1;
        return send_sql(c, "BEGIN", NULL, err);
    case ROLLBACK_LAST:
        return ev->global_position == f->last ? send_sql(c, "ROLLBACK", NULL, err) : 0;
    case SLEEP:
        return here ? send_sql(c, "SELECT pg_sleep(1)", NULL, err) : 0;
    case PLAIN:
        break;
    }
    return 0;
}

static long long one_int(pup_conn *c, const char *sql) {
    PGresult *r = PQexec(pup_conn_pg(c), sql);
    long long v = -1;
    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
        v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    else if (PQresultStatus(r) != PGRES_TUPLES_OK)
        printf("# %s: %s", sql, PQerrorMessage(pup_conn_pg(c)));
    PQclear(r);
    return v;
}

static int exec_ok(pup_conn *c, const char *sql) {
    PGresult *r = PQexec(pup_conn_pg(c), sql);
    int good = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
    if (!good) printf("# %s: %s", sql, PQerrorMessage(pup_conn_pg(c)));
    PQclear(r);
    return good;
}

static long long checkpoint(pup_conn *c) {
    long long v = one_int(c, "SELECT COALESCE(max(last_global_position), 0) FROM t_c_ptx_checkpoints"
                             " WHERE projection_name = 'ptx'");
    return v;
}

/* True once the locker session sits in its pg_sleep, its lock taken. */
static int sleeping(pup_conn *c, pup_conn *locker) {
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE pid = %d AND wait_event = 'PgSleep'",
             PQbackendPID(pup_conn_pg(locker)));
    return one_int(c, sql) == 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Appends n events to one new aggregate; returns the last position (or -1). */
static long long append(const pup_store *st, pup_conn *c, const char *id, int n) {
    pup_append_buf buf;
    memset(&buf, 0, sizeof buf);
    pup_event_in evs[16];
    memset(evs, 0, sizeof evs);
    for (int i = 0; i < n && i < 16; i++) {
        evs[i].event_type.p = "E";
        evs[i].event_type.len = 1;
        evs[i].event_version = 1;
        evs[i].payload.p = "{}";
        evs[i].payload.len = 2;
    }
    pup_append_result res;
    pup_error err;
    long long last = -1;
    if (pup_store_append(st, c, &buf, "T", 1, id, strlen(id), PUP_ANY, evs, n, &res, &err) == 0) {
        last = res.positions[res.n - 1];
        free(res.positions);
    } else
        printf("# append: %s\n", err.message);
    pup_append_buf_free(&buf);
    return last;
}

/* A fresh processor "ptx" over the fixture; checkpoint rows and read model emptied. */
static pup_processor *fresh(const pup_store *st, pup_conn *pc, pup_conn *c, fixture *f, int timeout_ms) {
    exec_ok(c, "DELETE FROM t_c_ptx_checkpoints; DELETE FROM t_c_ptx_rows");
    pup_projection_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.name = "ptx";
    cfg.total_partitions = 1;
    cfg.batch_size = 100;
    cfg.statement_timeout_ms = timeout_ms;
    pup_handler h = {.ud = f, .handle = handle};
    pup_error err;
    pup_processor *p = pup_processor_new(st, pc, &cfg, &h, &err);
    int acquired = 0;
    if (!p || pup_processor_acquire(p, &acquired, &err) < 0 || !acquired) {
        printf("# processor: %s\n", err.message);
        pup_processor_free(p);
        return NULL;
    }
    return p;
}

/* One batch with a misbehaving handler: it must fail naming the transaction, leave the
 * checkpoint and keep none of the writes made after the handler's statement. */
static void ended_case(const pup_store *st, pup_conn *pc, pup_conn *c, enum mode mode, long long at,
                       long long last, const char *what, long long rows_max) {
    fixture f = {mode, at, last, 0};
    pup_processor *p = fresh(st, pc, c, &f, 0);
    int handled = 0, waiting = 0;
    long long advanced = 0;
    pup_error err;
    memset(&err, 0, sizeof err);
    int rc = p ? pup_processor_batch(p, &handled, &advanced, &waiting, &err) : 0;
    char line[256];
    snprintf(line, sizeof line, "%s: the batch fails as a handler error naming the transaction", what);
    tap_ok(p && rc < 0 && err.code == PUP_ERR_HANDLER && strstr(err.message, "ended or broke the batch transaction"),
       line, &err);
    snprintf(line, sizeof line, "%s: the checkpoint did not move", what);
    tap_ok(checkpoint(c) == 0, line, NULL);
    long long after = one_int(c, "SELECT count(*) FROM t_c_ptx_rows");
    snprintf(line, sizeof line, "%s: no write after the handler's statement survived (%lld rows, at most %lld)",
             what, after, rows_max);
    tap_ok(after >= 0 && after <= rows_max, line, NULL);
    snprintf(line, sizeof line, "%s: the connection is usable and outside any transaction", what);
    tap_ok(PQtransactionStatus(pup_conn_pg(pc)) == PQTRANS_IDLE && one_int(pc, "SELECT 1") == 1, line, NULL);
    pup_processor_free(p);
}

int main(void) {
    const char *url = getenv("DATABASE_URL");
    if (!url || !*url) {
        printf("1..0 # SKIP DATABASE_URL is not set\n");
        return 1;
    }
    pup_error err;
    memset(&err, 0, sizeof err);
    pup_conn *c = pup_conn_open(url, &err), *pc = pup_conn_open(url, &err), *locker = pup_conn_open(url, &err);
    tap_ok(c && pc && locker, "three connections", &err);
    if (!c || !pc || !locker) return 1;
    exec_ok(c, "DROP TABLE IF EXISTS t_c_ptx_events, t_c_ptx_heads, t_c_ptx_checkpoints,"
               " t_c_ptx_checkpoints_workers, t_c_ptx_checkpoints_groups, t_c_ptx_rows CASCADE");
    exec_ok(c, "CREATE TABLE t_c_ptx_rows (pos bigint NOT NULL)");
    pup_store st;
    tap_ok(pup_store_init(&st, "t_c_ptx_events", "t_c_ptx_heads", "t_c_ptx_checkpoints", &err) == 0 &&
           pup_store_migrate(&st, c, &err) == 0,
       "store migrated", &err);
    long long head = append(&st, c, "a-1", 10);
    tap_ok(head == 10, "10 events appended (positions 1..10)", NULL);

    /* Sanity: a well-behaved handler commits everything. */
    {
        fixture f = {PLAIN, 0, 10, 0};
        pup_processor *p = fresh(&st, pc, c, &f, 0);
        int handled = 0, waiting = 0;
        long long advanced = 0;
        int rc = p ? pup_processor_batch(p, &handled, &advanced, &waiting, &err) : -1;
        tap_ok(rc == 0 && handled == 10 && checkpoint(c) == 10 && one_int(c, "SELECT count(*) FROM t_c_ptx_rows") == 10,
           "a plain handler: 10 handled, 10 rows, checkpoint 10", &err);
        pup_processor_free(p);
    }

    /* ROLLBACK at event 5: rows 1..5 are rolled back by it, 6..10 would run in an
     * implicit transaction committed at the pipeline's Sync. */
    ended_case(&st, pc, c, ROLLBACK_AT, 5, 10, "ROLLBACK at event 5 of 10", 0);
    ended_case(&st, pc, c, ROLLBACK_BEGIN_AT, 5, 10, "ROLLBACK then BEGIN at event 5 of 10", 0);
    ended_case(&st, pc, c, ROLLBACK_LAST, 0, 10, "ROLLBACK after the last event", 0);
    /* COMMIT commits rows 1..5 by itself (what the Lua guard refuses up front); the rows
     * after it must not be. */
    ended_case(&st, pc, c, COMMIT_AT, 5, 10, "COMMIT at event 5 of 10", 5);

    /* The time limit: 300 ms for handler statements only. */
    {
        fixture f = {PLAIN, 0, 10, 0};
        pup_processor *p = fresh(&st, pc, c, &f, 300);
        int handled = 0, waiting = 0;
        long long advanced = 0;
        /* The batch read waits 1 s behind an exclusive lock on the events table. */
        tap_ok(PQsendQuery(pup_conn_pg(locker), "BEGIN; LOCK TABLE t_c_ptx_events IN ACCESS EXCLUSIVE MODE;"
                                            " SELECT pg_sleep(1); COMMIT") == 1,
           "another session locks the events table for 1 s", NULL);
        double t0 = now_s();
        while (!sleeping(c, locker) && now_s() - t0 < 5) {
        }
        t0 = now_s();
        int rc = p ? pup_processor_batch(p, &handled, &advanced, &waiting, &err) : -1;
        double dt = now_s() - t0;
        char line[200];
        snprintf(line, sizeof line, "a batch read stuck %.2f s behind a lock is not cut by the 300 ms handler limit", dt);
        tap_ok(rc == 0 && handled == 10 && checkpoint(c) == 10 && dt > 0.5, line, &err);
        PGresult *r;
        while ((r = PQgetResult(pup_conn_pg(locker))) != NULL) PQclear(r);

        /* The checkpoint write waits 1 s behind a lock on the checkpoint row. */
        head = append(&st, c, "a-2", 3);
        tap_ok(PQsendQuery(pup_conn_pg(locker), "BEGIN; SELECT 1 FROM t_c_ptx_checkpoints WHERE projection_name = 'ptx'"
                                            " FOR UPDATE; SELECT pg_sleep(1); COMMIT") == 1,
           "another session locks the checkpoint row for 1 s", NULL);
        t0 = now_s();
        while (!sleeping(c, locker) && now_s() - t0 < 5) {
        }
        t0 = now_s();
        rc = pup_processor_batch(p, &handled, &advanced, &waiting, &err);
        dt = now_s() - t0;
        snprintf(line, sizeof line, "a checkpoint write stuck %.2f s behind a row lock is not cut by the handler limit", dt);
        tap_ok(rc == 0 && handled == 3 && checkpoint(c) == head && dt > 0.5, line, &err);
        while ((r = PQgetResult(pup_conn_pg(locker))) != NULL) PQclear(r);
        pup_processor_free(p);

        /* A handler statement over the limit still fails, named as such. */
        fixture fs = {SLEEP, head, head, 0};
        p = fresh(&st, pc, c, &fs, 300);
        rc = p ? pup_processor_batch(p, &handled, &advanced, &waiting, &err) : 0;
        tap_ok(rc < 0 && err.code == PUP_ERR_HANDLER && strstr(err.message, "handler exceeded its time limit of 300 ms") &&
               checkpoint(c) == 0,
           "a handler in pg_sleep(1) fails with the 300 ms time limit, nothing committed", &err);
        /* The limit does not outlive the batch: the session runs statements untimed. */
        tap_ok(one_int(pc, "SELECT count(*) FROM (SELECT pg_sleep(0.4)) s") == 1,
           "after the batch, the processor's session has no time limit left", NULL);
        pup_processor_free(p);
    }

    pup_conn_close(locker);
    pup_conn_close(pc);
    pup_conn_close(c);
    pup_store_free(&st);
    return tap_done();
}
