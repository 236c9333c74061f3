/*
 * append.c -- the append path: n events of one aggregate in one prepared statement.
 *
 * The events travel as nine binary arrays (text[] and bytea[]), so payload bytes go as
 * they are (NULs included) and no value is escaped or quoted on the way.
 */
#include "pup_partition.h"
#include "pup_store.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define TEXTOID 25
#define BYTEAOID 17
#define NARRAYS 9
/* An append that left its wake-up to another's and took longer than this from its send to
 * its commit's answer notifies once after it: readers look again at positions drawn above
 * the head for 1 s after they first see them (pup_drawn_look_wait, pup_gap.h), and its
 * position was drawn after it was sent, so a faster one has committed well within that
 * look. */
#define WAKE_UP_SLOW_SECONDS 0.25

void pup_append_buf_free(pup_append_buf *b) {
    free(b->data);
    pup_params_free(&b->params);
    memset(b, 0, sizeof *b);
}

static int buf_reserve(pup_append_buf *b, size_t more) {
    if (b->len + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

static void put32(pup_append_buf *b, unsigned v) {
    v = htonl(v);
    memcpy(b->data + b->len, &v, 4);
    b->len += 4;
}

/* Appends one binary one-dimensional array of n elements; field picks the element. */
static int put_array(pup_append_buf *b, const pup_event_in *ev, int n, size_t field,
                     unsigned elemtype) {
    size_t need = 20;
    for (int i = 0; i < n; i++) need += 4 + ((const pup_str *)((const char *)&ev[i] + field))->len;
    if (buf_reserve(b, need) < 0) return -1;
    int has_null = 0;
    for (int i = 0; i < n; i++) has_null |= ((const pup_str *)((const char *)&ev[i] + field))->p == NULL;
    put32(b, 1);
    put32(b, (unsigned)has_null);
    put32(b, elemtype);
    put32(b, (unsigned)n);
    put32(b, 1);
    for (int i = 0; i < n; i++) {
        const pup_str *s = (const pup_str *)((const char *)&ev[i] + field);
        if (!s->p) {
            put32(b, 0xffffffffu);
            continue;
        }
        put32(b, (unsigned)s->len);
        memcpy(b->data + b->len, s->p, s->len);
        b->len += s->len;
    }
    return 0;
}

/* event_version as a text[] array: its digits are formatted straight into the buffer. */
static int put_versions(pup_append_buf *b, const pup_event_in *ev, int n) {
    if (buf_reserve(b, 20 + (size_t)n * 16) < 0) return -1;
    put32(b, 1);
    put32(b, 0);
    put32(b, TEXTOID);
    put32(b, (unsigned)n);
    put32(b, 1);
    for (int i = 0; i < n; i++) {
        char digits[12];
        int len = snprintf(digits, sizeof digits, "%d", ev[i].event_version);
        put32(b, (unsigned)len);
        memcpy(b->data + b->len, digits, (size_t)len);
        b->len += (size_t)len;
    }
    return 0;
}

/* Builds the nine arrays into buf and binds them as parameters $4..$12. */
static int bind_arrays(pup_append_buf *buf, const pup_event_in *events, int n) {
    static const size_t fields[NARRAYS] = {
        offsetof(pup_event_in, event_id),       offsetof(pup_event_in, event_type),
        0 /* event_version: put_versions */,    offsetof(pup_event_in, payload),
        offsetof(pup_event_in, metadata),       offsetof(pup_event_in, causation_id),
        offsetof(pup_event_in, correlation_id), offsetof(pup_event_in, trace_id),
        offsetof(pup_event_in, created_at)};
    size_t start[NARRAYS + 1];
    buf->len = 0;
    for (int a = 0; a < NARRAYS; a++) {
        start[a] = buf->len;
        int rc = a == 2 ? put_versions(buf, events, n)
                        : put_array(buf, events, n, fields[a], a == 3 ? BYTEAOID : TEXTOID);
        if (rc < 0) return -1;
    }
    start[NARRAYS] = buf->len;
    for (int a = 0; a < NARRAYS; a++)
        pup_params_binary(&buf->params, 3 + a, buf->data + start[a], start[a + 1] - start[a]);
    return 0;
}

/* A UUID in its 8-4-4-4-12 form into out (lower case, NUL-terminated); -1 if it is not. */
static int canonical_uuid(const char *p, size_t len, char out[37]) {
    if (len != 36) return -1;
    for (int i = 0; i < 36; i++) {
        char ch = p[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (ch != '-') return -1;
        } else if (ch >= 'A' && ch <= 'F') {
            ch = (char)(ch - 'A' + 'a');
        } else if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) {
            return -1;
        }
        out[i] = ch;
    }
    out[36] = '\0';
    return 0;
}

static int cmp_id(const void *a, const void *b) {
    return strncasecmp(*(const char *const *)a, *(const char *const *)b, 36);
}

/* The first event_id given twice in one append (1-based event number), or 0. Sorts a copy:
 * only on the failure path. -1 out of memory. */
static int repeated_id(const pup_event_in *events, int n, const char **which) {
    const char **ids = malloc((size_t)n * sizeof *ids);
    if (!ids) return -1;
    int m = 0, found = 0;
    for (int i = 0; i < n; i++)
        if (events[i].event_id.p) ids[m++] = events[i].event_id.p;
    qsort(ids, (size_t)m, sizeof *ids, cmp_id);
    for (int i = 1; i < m && !found; i++)
        if (cmp_id(&ids[i - 1], &ids[i]) == 0) {
            *which = ids[i];
            found = 1;
        }
    free(ids);
    return found;
}

/* The stored event of row `row` is the same event as ev of aggregate type/id: the same
 * aggregate, event_type, event_version and payload bytes. */
static int same_event(const pup_append_buf *buf, const PGresult *r, int row, pup_str type, pup_str id,
                      const pup_event_in *ev) {
#define EQ(col, str) ((size_t)PQgetlength(r, row, col) == (str).len && memcmp(PQgetvalue(r, row, col), (str).p, (str).len) == 0)
    if (!EQ(2, type) || !EQ(3, id) || !EQ(5, ev->event_type) ||
        pup_be_int(PQgetvalue(r, row, 6), 4) != ev->event_version)
        return 0;
    if (EQ(7, ev->payload)) return 1;
#undef EQ
    pup_str stored = {PQgetvalue(r, row, 7), (size_t)PQgetlength(r, row, 7)};
    return buf->same_payload && buf->same_payload(buf->same_ud, stored, ev->payload);
}

/* An event_id of the append exists (nothing was written). A retry of the same append (a
 * timeout hid its success) gets the positions and versions it had; anything else is
 * duplicate_event naming the first event that differs. Runs only on this path. */
static int retried(const pup_store *s, pup_conn *c, const pup_append_buf *buf, pup_str type, pup_str id,
                   const pup_event_in *events, int n, pup_append_result *out, pup_error *err) {
    char *ids = malloc((size_t)n * 38 + 3), *w = ids;
    if (!ids) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    *w++ = '{';
    for (int i = 0; i < n; i++) {
        if (!events[i].event_id.p) continue; /* checked below */
        if (w > ids + 1) *w++ = ',';
        memcpy(w, events[i].event_id.p, events[i].event_id.len); /* a checked UUID: no quoting */
        w += events[i].event_id.len;
    }
    *w++ = '}';
    *w = '\0';
    const pup_stmt *st = pup_conn_prepare(c, s->sql_same_events, err);
    pup_params p = {0};
    PGresult *r = NULL;
    if (st && pup_params_reset(&p, 1) == 0) {
        pup_params_text(&p, 0, ids, strlen(ids));
        r = pup_conn_exec(c, st, &p, 1, err);
    } else if (st) {
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    }
    pup_params_free(&p);
    free(ids);
    if (!r) return pup_store_error(err);
    int rows = PQntuples(r), tl = (int)(type.len > 200 ? 200 : type.len), il = (int)(id.len > 200 ? 200 : id.len);
    long long *pos = malloc((size_t)n * sizeof *pos);
    if (!pos) {
        PQclear(r);
        return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    }
    long long lo = 0, hi = 0;
    for (int i = 0; i < n; i++) {
        const pup_str *eid = &events[i].event_id;
        int row = -1;
        for (int k = 0; eid->p && k < rows && row < 0; k++)
            if (eid->len == 36 && strncasecmp(PQgetvalue(r, k, 0), eid->p, 36) == 0) row = k;
        if (row < 0 || !same_event(buf, r, row, type, id, &events[i])) {
            const char *why = row >= 0 ? "exists as a different event (aggregate, event_type, event_version or payload)"
                                       : "is new while another event of this append exists: not a retry of one append";
            pup_error_set(err, PUP_ERR_DUPLICATE_EVENT, "append to %.*s/%.*s: event %d (event_id %.*s) %s", tl,
                          type.p, il, id.p, i + 1, eid->p ? (int)eid->len : 6, eid->p ? eid->p : "absent", why);
            free(pos);
            PQclear(r);
            return -1;
        }
        pos[i] = pup_be_int(PQgetvalue(r, row, 1), 8);
        long long v = pup_be_int(PQgetvalue(r, row, 4), 8);
        if (i == 0 || v < lo) lo = v;
        if (i == 0 || v > hi) hi = v;
    }
    PQclear(r);
    out->positions = pos;
    out->n = n;
    out->retried = 1;
    out->from_version = lo;
    out->to_version = hi;
    return 0;
}

int pup_store_append(const pup_store *s, pup_conn *c, pup_append_buf *buf,
                     const char *aggregate_type, size_t type_len, const char *aggregate_id,
                     size_t id_len, long long expected, const pup_event_in *events, int n,
                     pup_append_result *out, pup_error *err) {
    memset(out, 0, sizeof *out);
    if (n <= 0) return pup_error_set(err, PUP_ERR_NO_EVENTS, "append: no events given");
    if (pup_conn_check_utf8(c, err) < 0) return -1;
    /* uuid id columns (the Go library's tables): the statement casts the ids, and the
     * aggregate id is hashed in its canonical form, the text every reader gets back. */
    int uuids = pup_store_id_kind(s, c, err);
    if (uuids < 0) return -1;
    char canonical[37];
    if (uuids) {
        if (canonical_uuid(aggregate_id, id_len, canonical) < 0)
            return pup_error_set(err, PUP_ERR_INVALID_EVENT,
                                 "aggregate_id must be a UUID (8-4-4-4-12 hex digits): the aggregate_id "
                                 "column of %s is uuid", s->events);
        aggregate_id = canonical;
    }
    /* One event, the common case, binds plain parameters; more travel as arrays. */
    const pup_stmt *st = pup_conn_prepare(c, n == 1 ? (uuids ? s->sql_append_one_uuid : s->sql_append_one)
                                                    : (uuids ? s->sql_append_uuid : s->sql_append), err);
    if (!st) return pup_store_error(err);
    if (pup_params_reset(&buf->params, 5 + NARRAYS) < 0)
        return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    pup_params *p = &buf->params;
    pup_params_text(p, 0, aggregate_type, type_len);
    pup_params_text(p, 1, aggregate_id, id_len);
    if (expected != PUP_ANY) pup_params_int(p, 2, expected);
    pup_params_int(p, 3 + NARRAYS, pup_fnv1a32(aggregate_id, id_len));
    /* Outside a transaction the statement commits on its own and is its own wake-up
     * (coalesced: schema.c); inside one, the wake-up is owed to the commit. */
    PGconn *pg = pup_conn_pg(c);
    int own = PQtransactionStatus(pg) == PQTRANS_IDLE && !pup_conn_in_pipeline(c);
    pup_params_text(p, 4 + NARRAYS, own ? "t" : "f", 1);
    if (n == 1) {
        const pup_event_in *e = events;
        const pup_str *cols[NARRAYS] = {&e->event_id, &e->event_type, NULL, &e->payload, &e->metadata,
                                        &e->causation_id, &e->correlation_id, &e->trace_id, &e->created_at};
        for (int a = 0; a < NARRAYS; a++) {
            if (a == 2) pup_params_int(p, 3 + a, e->event_version);
            else if (!cols[a]->p) pup_params_null(p, 3 + a);
            else if (a == 3) pup_params_binary(p, 3 + a, cols[a]->p, cols[a]->len);
            else pup_params_text(p, 3 + a, cols[a]->p, cols[a]->len);
        }
    } else if (bind_arrays(buf, events, n) < 0)
        return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    PGresult *r = own ? pup_conn_exec(c, st, p, 1, err) : pup_conn_exec_notify(c, st, p, 1, s->channel, err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double took = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    if (r && own && took > WAKE_UP_SLOW_SECONDS && !PQgetisnull(r, 0, 1) && PQgetisnull(r, 0, 4)) {
        pup_error ignored; /* wrote, skipped its wake-up (column 4 NULL), and was slow */
        pup_conn_notify(c, s->channel, &ignored);
    }
    if (!r) {
        /* A concurrent writer took the same aggregate version first. Other unique keys
         * (a duplicate event_id) are the caller's mistake, not a race. */
        if (err && strcmp(err->sqlstate, "23505") == 0 &&
            (strcmp(err->constraint, s->version_key) == 0 || strcmp(err->constraint, s->heads_key) == 0))
            err->code = PUP_ERR_CONFLICT;
        /* An event_id a concurrent transaction inserted after our check (a retry racing
         * the append it retries): a lost race too; retried, it sees that append. */
        size_t cl = strlen(err ? err->constraint : "");
        const char *twice = NULL;
        if (err && strcmp(err->sqlstate, "23505") == 0 && cl > 13 &&
            strcmp(err->constraint + cl - 13, "_event_id_key") == 0) {
            int rep = repeated_id(events, n, &twice);
            if (rep < 0) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
            if (rep)
                return pup_error_set(err, PUP_ERR_INVALID_EVENT, "append: event_id %.36s is given twice", twice);
            err->code = PUP_ERR_CONFLICT;
        }
        /* Failed after its insert (at the commit, say), it may have held the wake-up's turn
         * while others skipped theirs. Lost races and bad input fail before that. */
        if (own && err && err->code != PUP_ERR_CONFLICT && strncmp(err->sqlstate, "22", 2) != 0 &&
            strcmp(err->sqlstate, "23505") != 0 && pup_conn_ok(c) && PQtransactionStatus(pg) == PQTRANS_IDLE) {
            pup_error ignored;
            pup_conn_notify(c, s->channel, &ignored);
        }
        return pup_store_error(err);
    }
    if (PQgetvalue(r, 0, 3)[0]) { /* an event_id exists: nothing was written */
        PQclear(r);
        pup_str type = {aggregate_type, type_len}, id = {aggregate_id, id_len};
        return retried(s, c, buf, type, id, events, n, out, err);
    }
    long long current = pup_be_int(PQgetvalue(r, 0, 0), 8);
    if (PQgetisnull(r, 0, 1)) {
        PQclear(r);
        int tl = (int)(type_len > 200 ? 200 : type_len), il = (int)(id_len > 200 ? 200 : id_len);
        if (expected == 0)
            return pup_error_set(err, PUP_ERR_CONFLICT,
                                 "%.*s/%.*s already has events (version %lld); expected no stream",
                                 tl, aggregate_type, il, aggregate_id, current);
        return pup_error_set(err, PUP_ERR_CONFLICT, "%.*s/%.*s is at version %lld, expected version %lld",
                             tl, aggregate_type, il, aggregate_id, current, expected);
    }
    out->positions = malloc(n * sizeof *out->positions);
    if (!out->positions) {
        PQclear(r);
        return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    }
    out->n = PQntuples(r);
    for (int i = 0; i < out->n && i < n; i++)
        out->positions[i] = pup_be_int(PQgetvalue(r, i, 1), 8);
    out->from_version = current + 1;
    out->to_version = current + out->n;
    PQclear(r);
    return 0;
}
