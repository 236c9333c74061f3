/*
 * test_store.c -- the C core on a real database: connect, store names, migrate, append
 * (expected versions, NUL bytes), read the log and a stream. Prints TAP; exits non-zero
 * on any failure. Needs DATABASE_URL. Uses its own tables (t_c_store_*).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pup_db.h"
#include "pup_store.h"
#include "tap.h"


static pup_str S(const char *s) {
    pup_str r = {s, s ? strlen(s) : 0};
    return r;
}

static pup_event_in event(const char *type, const char *payload, size_t payload_len) {
    pup_event_in e;
    memset(&e, 0, sizeof e);
    e.event_type = S(type);
    e.event_version = 1;
    e.payload.p = payload;
    e.payload.len = payload_len;
    return e;
}

int main(void) {
    pup_error err;
    memset(&err, 0, sizeof err);
    const char *url = getenv("DATABASE_URL");
    if (!url || !*url) {
        printf("1..0 # SKIP DATABASE_URL is not set\n");
        return 1; /* the suite always provides one: missing is a failure */
    }

    /* names */
    pup_store bad;
    tap_ok(pup_store_init(&bad, "bad name", NULL, NULL, &err) < 0 &&
           err.code == PUP_ERR_INVALID_ARGUMENT && strstr(err.message, "events_table"),
       "pup_store_init rejects an invalid name, naming the option", NULL);
    tap_ok(strcmp(pup_code_name(PUP_ERR_CONFLICT), "optimistic_concurrency") == 0 &&
           strcmp(pup_code_name(PUP_ERR_NOT_MIGRATED), "not_migrated") == 0 &&
           strcmp(pup_code_name(PUP_ERR_DATABASE), "database") == 0,
       "pup_code_name gives the Lua codes", NULL);

    /* connection errors never show the password */
    pup_conn *badc = pup_conn_open("postgresql://u:Secr3tPw@127.0.0.1:1/x?connect_timeout=5", &err);
    tap_ok(badc == NULL && err.code == PUP_ERR_CONNECTION && !strstr(err.message, "Secr3tPw"),
       "pup_conn_open on a refused port: connection error without the password", &err);
    pup_conn_close(badc);

    pup_conn *c = pup_conn_open(url, &err);
    tap_ok(c != NULL && pup_conn_ok(c), "pup_conn_open(DATABASE_URL)", &err);
    if (!c) {
        printf("1..%d\n", n_tests);
        return 1;
    }

    pup_store st;
    int rc = pup_store_init(&st, "t_c_store_events", "t_c_store_heads", "t_c_store_checkpoints", &err);
    tap_ok(rc == 0, "pup_store_init with custom names", &err);
    if (rc != 0) {
        printf("1..%d\n", n_tests);
        return 1;
    }

    /* a missing table is not_migrated */
    pup_conn_command(c, "DROP TABLE IF EXISTS t_c_store_events, t_c_store_heads, t_c_store_checkpoints CASCADE",
                     &err);
    PGresult *nr = pup_store_read(&st, c, 0, 10, &err);
    tap_ok(nr == NULL && err.code == PUP_ERR_NOT_MIGRATED, "reading unmigrated tables: not_migrated", &err);
    if (nr) PQclear(nr);

    tap_ok(pup_store_migrate(&st, c, &err) == 0, "pup_store_migrate", &err);
    tap_ok(pup_store_migrate(&st, c, &err) == 0, "pup_store_migrate is idempotent", &err);

    char *sql = pup_store_schema_sql(&st);
    tap_ok(sql && strstr(sql, "t_c_store_events") && strstr(sql, "t_c_store_heads"),
       "pup_store_schema_sql names the tables", NULL);
    free(sql);

    tap_ok(pup_store_head(&st, c, &err) == 0, "an empty log has head 0", &err);

    pup_append_buf buf;
    memset(&buf, 0, sizeof buf);
    pup_append_result res;
    static const char bytes[] = {'a', '\0', 'b', '\xff', '\0'};
    pup_event_in evs[3] = {event("Created", "{\"n\":1}", 7), event("Bytes", bytes, sizeof bytes),
                           event("Third", "", 0)};
    evs[0].metadata = S("{\"source\":\"c\"}");
    evs[0].causation_id = S("cause");
    const char *T = "User", *ID = "c-user-1";

    rc = pup_store_append(&st, c, &buf, T, strlen(T), ID, strlen(ID), 0, evs, 3, &res, &err);
    tap_ok(rc == 0 && res.n == 3 && res.from_version == 1 && res.to_version == 3,
       "append 3 events with no stream (expected 0)", &err);
    long long first_pos = rc == 0 && res.n > 0 ? res.positions[0] : -1;
    tap_ok(rc == 0 && res.n == 3 && res.positions[0] < res.positions[1] && res.positions[1] < res.positions[2],
       "positions ascend", NULL);
    free(res.positions);

    rc = pup_store_append(&st, c, &buf, T, strlen(T), ID, strlen(ID), 0, evs, 1, &res, &err);
    tap_ok(rc < 0 && err.code == PUP_ERR_CONFLICT, "no stream on an existing aggregate: conflict", &err);
    free(res.positions);
    rc = pup_store_append(&st, c, &buf, T, strlen(T), ID, strlen(ID), 2, evs, 1, &res, &err);
    tap_ok(rc < 0 && err.code == PUP_ERR_CONFLICT, "exact(2) at version 3: conflict", &err);
    free(res.positions);
    rc = pup_store_append(&st, c, &buf, T, strlen(T), ID, strlen(ID), 3, evs, 2, &res, &err);
    tap_ok(rc == 0 && res.from_version == 4 && res.to_version == 5, "exact(3) at version 3 appends 4..5", &err);
    free(res.positions);
    rc = pup_store_append(&st, c, &buf, T, strlen(T), ID, strlen(ID), PUP_ANY, evs, 1, &res, &err);
    tap_ok(rc == 0 && res.from_version == 6 && res.to_version == 6, "any appends 6", &err);
    free(res.positions);
    rc = pup_store_append(&st, c, &buf, T, strlen(T), ID, strlen(ID), PUP_ANY, evs, 0, &res, &err);
    tap_ok(rc < 0 && err.code == PUP_ERR_NO_EVENTS, "no events: no_events", &err);
    free(res.positions);

    tap_ok(pup_store_head(&st, c, &err) > 0, "head is the last position", &err);

    /* read the log */
    PGresult *r = pup_store_read(&st, c, 0, 100, &err);
    tap_ok(r != NULL && PQntuples(r) == 6, "pup_store_read returns the 6 events", &err);
    if (r && PQntuples(r) == 6) {
        pup_event ev;
        pup_event_from_row(r, 0, 0, &ev);
        tap_ok(ev.global_position == first_pos && ev.aggregate_version == 1 &&
               ev.event_type.len == 7 && memcmp(ev.event_type.p, "Created", 7) == 0 &&
               ev.payload.len == 7 && memcmp(ev.payload.p, "{\"n\":1}", 7) == 0 &&
               ev.metadata.p != NULL && strstr(ev.metadata.p, "source") &&
               ev.causation_id.len == 5 && ev.correlation_id.p == NULL && ev.event_version == 1,
           "first event's fields", NULL);
        long long now_us = (long long)time(NULL) * 1000000;
        tap_ok(ev.event_id.len == 36 && ev.created_at > now_us - 600000000LL && ev.created_at < now_us + 600000000LL,
           "event_id is a UUID; created_at is the server's clock, in Unix microseconds", NULL);
        char at[40];
        tap_ok(pup_format_time(0, at, sizeof at) == 27 && strcmp(at, "1970-01-01T00:00:00.000000Z") == 0 &&
               pup_format_time(-1, at, sizeof at) == 27 && strcmp(at, "1969-12-31T23:59:59.999999Z") == 0 &&
               pup_format_time(946684800123456LL, at, sizeof at) == 27 && strcmp(at, "2000-01-01T00:00:00.123456Z") == 0,
           "created_at is shown as ISO 8601 UTC with microseconds", NULL);
        pup_event_from_row(r, 1, 0, &ev);
        tap_ok(ev.payload.len == sizeof bytes && memcmp(ev.payload.p, bytes, sizeof bytes) == 0,
           "payload bytes with NULs round-trip", NULL);
        pup_event_from_row(r, 2, 0, &ev);
        tap_ok(ev.payload.len == 0 && ev.payload.p != NULL, "an empty payload stays empty (not NULL)", NULL);
        long long prev = 0;
        int ascending = 1;
        for (int i = 0; i < PQntuples(r); i++) {
            pup_event_from_row(r, i, 0, &ev);
            if (ev.global_position <= prev) ascending = 0;
            prev = ev.global_position;
        }
        tap_ok(ascending, "read is in ascending position order", NULL);
    }
    if (r) PQclear(r);

    r = pup_store_read(&st, c, first_pos, 2, &err);
    tap_ok(r != NULL && PQntuples(r) == 2, "read after a position with a limit", &err);
    if (r) {
        pup_event ev;
        pup_event_from_row(r, 0, 0, &ev);
        tap_ok(ev.global_position > first_pos && ev.aggregate_version == 2, "positions > from", NULL);
        PQclear(r);
    }

    /* one aggregate's stream */
    r = pup_store_read_stream(&st, c, S(T), S(ID), 2, 4, &err);
    tap_ok(r != NULL && PQntuples(r) == 3, "read_stream with versions 2..4", &err);
    if (r) {
        pup_event ev;
        pup_event_from_row(r, 0, 0, &ev);
        int v2 = ev.aggregate_version == 2;
        pup_event_from_row(r, PQntuples(r) - 1, 0, &ev);
        tap_ok(v2 && ev.aggregate_version == 4, "stream bounds are inclusive", NULL);
        PQclear(r);
    }
    r = pup_store_read_stream(&st, c, S(T), S(ID), 1, -1, &err);
    tap_ok(r != NULL && PQntuples(r) == 6, "read_stream without an upper bound", &err);
    if (r) PQclear(r);
    r = pup_store_read_stream(&st, c, S("Order"), S(ID), 1, -1, &err);
    tap_ok(r != NULL && PQntuples(r) == 0, "another type with the same id is another aggregate", &err);
    if (r) PQclear(r);

    /* a database error carries the SQLSTATE */
    tap_ok(pup_conn_command(c, "SELECT 1/0", &err) < 0 && err.code == PUP_ERR_DATABASE &&
           strcmp(err.sqlstate, "22012") == 0,
       "a failed command: database error with sqlstate", &err);
    tap_ok(pup_conn_ok(c), "the connection survives an error", NULL);

    pup_conn_command(c, "DROP TABLE IF EXISTS t_c_store_events, t_c_store_heads, t_c_store_checkpoints CASCADE",
                     &err);
    pup_append_buf_free(&buf);
    pup_store_free(&st);
    pup_conn_close(c);

    printf("1..%d\n", n_tests);
    if (n_failed) printf("# %d of %d failed\n", n_failed, n_tests);
    return n_failed ? 1 : 0;
}
