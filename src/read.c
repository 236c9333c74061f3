/*
 * read.c -- reading the log and one aggregate's stream. See pup_store.h.
 */
#include "pup_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SAFE_FIRST_COL 3 /* xmin, drawn, mine, then PUP_EVENT_COLUMNS */
#define SAFE_FIRST_ROW 1 /* row 0 is the header: xmin, drawn */
#define PG_EPOCH_US 946684800000000LL /* 2000-01-01 UTC, PostgreSQL's epoch, in Unix microseconds */

int pup_store_error(pup_error *err) {
    if (err && err->code == PUP_ERR_DATABASE && strcmp(err->sqlstate, "42P01") == 0) {
        err->code = PUP_ERR_NOT_MIGRATED;
        size_t n = strlen(err->message);
        snprintf(err->message + n, sizeof err->message - n, " (run `pupsourcing migrate` to create the tables)");
    }
    return -1;
}

static pup_str column(const PGresult *r, int row, int col) {
    pup_str s = {NULL, 0};
    if (!PQgetisnull(r, row, col)) {
        s.p = PQgetvalue(r, row, col);
        s.len = (size_t)PQgetlength(r, row, col);
    }
    return s;
}

void pup_event_from_row(const PGresult *r, int row, int first, pup_event *ev) {
    ev->global_position = pup_be_int(PQgetvalue(r, row, first), 8);
    ev->aggregate_type = column(r, row, first + 1);
    ev->aggregate_id = column(r, row, first + 2);
    ev->aggregate_version = pup_be_int(PQgetvalue(r, row, first + 3), 8);
    ev->event_id = column(r, row, first + 4);
    ev->event_type = column(r, row, first + 5);
    ev->event_version = (int)pup_be_int(PQgetvalue(r, row, first + 6), 4);
    ev->payload = column(r, row, first + 7);
    ev->metadata = column(r, row, first + 8);
    ev->causation_id = column(r, row, first + 9);
    ev->correlation_id = column(r, row, first + 10);
    ev->trace_id = column(r, row, first + 11);
    /* binary timestamptz: microseconds since 2000-01-01 UTC */
    ev->created_at = PQgetisnull(r, row, first + 12) ? 0
                   : pup_be_int(PQgetvalue(r, row, first + 12), 8) + PG_EPOCH_US;
}

/* Writes the n-digit decimal v at out (zero-padded). */
static char *digits(char *out, long long v, int n) {
    for (int i = n - 1; i >= 0; i--, v /= 10) out[i] = (char)('0' + v % 10);
    return out + n;
}

/* By hand: snprintf was the largest cost of pushing an event to Lua. */
int pup_format_time(long long unix_us, char *buf, size_t size) {
    long long secs = unix_us / 1000000, us = unix_us % 1000000;
    if (us < 0) {
        us += 1000000;
        secs--;
    }
    time_t t = (time_t)secs;
    struct tm tm;
    if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 < 0 || tm.tm_year + 1900 > 9999)
        return snprintf(buf, size, "%s", unix_us < 0 ? "-infinity" : "infinity");
    char s[32], *o = s;
    o = digits(o, tm.tm_year + 1900, 4);
    *o++ = '-';
    o = digits(o, tm.tm_mon + 1, 2);
    *o++ = '-';
    o = digits(o, tm.tm_mday, 2);
    *o++ = 'T';
    o = digits(o, tm.tm_hour, 2);
    *o++ = ':';
    o = digits(o, tm.tm_min, 2);
    *o++ = ':';
    o = digits(o, tm.tm_sec, 2);
    *o++ = '.';
    o = digits(o, us, 6);
    *o++ = 'Z';
    size_t n = (size_t)(o - s);
    if (size) { /* as snprintf: truncated to fit, NUL-terminated */
        size_t k = n < size - 1 ? n : size - 1;
        memcpy(buf, s, k);
        buf[k] = '\0';
    }
    return (int)n;
}

PGresult *pup_store_read(const pup_store *s, pup_conn *c, long long after, long long limit,
                         pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, s->sql_read, err);
    if (!st) {
        pup_store_error(err);
        return NULL;
    }
    pup_params p = {0};
    if (pup_params_reset(&p, 2) < 0) {
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
        return NULL;
    }
    pup_params_int(&p, 0, after);
    pup_params_int(&p, 1, limit);
    PGresult *r = pup_conn_exec(c, st, &p, 1, err);
    pup_params_free(&p);
    if (!r) pup_store_error(err);
    return r;
}

int pup_store_listen(const pup_store *s, pup_conn *c, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, s->sql_listening, err);
    PGresult *r = st ? pup_conn_exec(c, st, NULL, 0, err) : NULL;
    if (!r) return pup_store_error(err);
    int listening = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    if (listening) return 1;
    return pup_conn_command(c, s->sql_listen, err) < 0 ? -1 : 0;
}

PGresult *pup_store_read_stream(const pup_store *s, pup_conn *c, pup_str type, pup_str id,
                                long long from, long long to, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, s->sql_stream, err);
    if (!st) {
        pup_store_error(err);
        return NULL;
    }
    pup_params p = {0};
    if (pup_params_reset(&p, 4) < 0) {
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
        return NULL;
    }
    pup_params_text(&p, 0, type.p, type.len);
    pup_params_text(&p, 1, id.p, id.len);
    pup_params_int(&p, 2, from);
    pup_params_int(&p, 3, to);
    PGresult *r = pup_conn_exec(c, st, &p, 1, err);
    pup_params_free(&p);
    if (!r) pup_store_error(err);
    return r;
}

long long pup_store_head(const pup_store *s, pup_conn *c, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, s->sql_head, err);
    if (!st) return pup_store_error(err);
    PGresult *r = pup_conn_exec(c, st, NULL, 1, err);
    if (!r) return pup_store_error(err);
    long long head = pup_be_int(PQgetvalue(r, 0, 0), 8);
    PQclear(r);
    return head;
}

/* The bound of the holes a read noted: an xid drawn after its snapshot, so above every
 * writer that could fill them. A transaction that already has an xid would give its own,
 * older one: then none (0), and the holes are noted again by a later read. */
static int draw_bound(pup_conn *c, uint64_t *bound, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(
        c, "SELECT CASE WHEN pg_current_xact_id_if_assigned() IS NULL THEN pg_current_xact_id()::text END", err);
    PGresult *r = st ? pup_conn_exec(c, st, NULL, 0, err) : NULL;
    if (!r) return -1;
    *bound = PQgetisnull(r, 0, 0) ? 0 : strtoull(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    return 0;
}

int pup_window_header_ok(const PGresult *r, int first_event_col, pup_error *err) {
    if (PQntuples(r) >= 1 && !PQgetisnull(r, 0, 0) && PQgetisnull(r, 0, first_event_col)) return 1;
    pup_error_set(err, PUP_ERR_DATABASE, "the window read came without its header row");
    return 0;
}

int pup_store_read_safe(const pup_store *s, pup_conn *c, pup_cursor *cur, const char *const scope[2],
                        long long window, long long limit, pup_safe_read *out, pup_error *err) {
    memset(out, 0, sizeof *out);
    const pup_stmt *st = pup_conn_prepare(c, s->sql_read_safe, err);
    if (!st) return pup_store_error(err);
    pup_params p = {0};
    if (pup_params_reset(&p, 4) < 0) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    pup_params_int(&p, 0, cur->position);
    pup_params_int(&p, 1, window);
    for (int k = 0; k < 2; k++)
        if (scope[k]) pup_params_text(&p, 2 + k, scope[k], strlen(scope[k]));
    PGresult *r = pup_conn_exec(c, st, &p, 1, err);
    pup_params_free(&p);
    if (!r) return pup_store_error(err);
    if (!pup_window_header_ok(r, SAFE_FIRST_COL, err)) {
        PQclear(r);
        return -1;
    }
    /* The walk of batch.c over a copy of the cursor: the caller's moves only on success. */
    pup_cursor next = *cur;
    uint64_t xmin = strtoull(PQgetvalue(r, 0, 0), NULL, 10);
    int nrows = PQntuples(r) - SAFE_FIRST_ROW;
    long long seen = cur->position, wait_lo = 0;
    for (int i = 0; i < nrows && out->found < limit; i++) {
        long long pos = pup_be_int(PQgetvalue(r, SAFE_FIRST_ROW + i, SAFE_FIRST_COL), 8);
        wait_lo = pup_gaps_step(&next.gaps, seen, pos, xmin, wait_lo);
        seen = pos;
        if (wait_lo) continue; /* noted, so one bound decides every hole of the window */
        next.position = pos;
        out->passed = i + 1;
        if (PQgetvalue(r, SAFE_FIRST_ROW + i, SAFE_FIRST_COL - 1)[0]) out->found++;
    }
    pup_gaps_forget(&next.gaps, next.position, 0);
    uint64_t bound = 0;
    if (pup_gaps_pending(&next.gaps) && draw_bound(c, &bound, err) < 0) {
        PQclear(r);
        return -1;
    }
    if (bound) pup_gaps_set_bound(&next.gaps, bound);
    else pup_gaps_forget(&next.gaps, 0, 1);
    out->r = r;
    out->waiting = wait_lo;
    out->more = !wait_lo && nrows == window && out->passed == nrows;
    /* The window read whole: positions drawn above its last row are not visible yet. */
    long long top = nrows ? pup_be_int(PQgetvalue(r, SAFE_FIRST_ROW + nrows - 1, SAFE_FIRST_COL), 8) : cur->position;
    long long drawn = pup_be_int(PQgetvalue(r, 0, 1), 8);
    if (nrows < window && drawn > top) out->in_flight = drawn;
    *cur = next;
    return 0;
}

int pup_safe_event(const pup_safe_read *rd, int i, pup_event *ev) {
    if (i >= rd->passed || !PQgetvalue(rd->r, SAFE_FIRST_ROW + i, SAFE_FIRST_COL - 1)[0]) return 0;
    pup_event_from_row(rd->r, SAFE_FIRST_ROW + i, SAFE_FIRST_COL, ev);
    return 1;
}
