/*
 * read.c -- reading the log and one aggregate's stream. See pup_store.h.
 */
#include "pup_store.h"

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
    ev->created_at = column(r, row, first + 12);
}

PGresult *pup_store_read(const pup_store *s, pup_conn *c, long long after, long long limit,
                         pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, s->sql_read, err);
    if (!st) return NULL;
    pup_params p = {0};
    if (pup_params_reset(&p, 2) < 0) {
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
        return NULL;
    }
    pup_params_int(&p, 0, after);
    pup_params_int(&p, 1, limit);
    PGresult *r = pup_conn_exec(c, st, &p, 1, err);
    pup_params_free(&p);
    return r;
}

PGresult *pup_store_read_stream(const pup_store *s, pup_conn *c, pup_str type, pup_str id,
                                long long from, long long to, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, s->sql_stream, err);
    if (!st) return NULL;
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
    return r;
}

long long pup_store_head(const pup_store *s, pup_conn *c, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, s->sql_head, err);
    if (!st) return -1;
    PGresult *r = pup_conn_exec(c, st, NULL, 1, err);
    if (!r) return -1;
    long long head = pup_be_int(PQgetvalue(r, 0, 0), 8);
    PQclear(r);
    return head;
}
