/*
 * db.c -- connections, the per-connection statement cache, parameters, pipeline mode
 * and error classification. See pup_db.h.
 */
#include "pup_db.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BYTEAOID 17
#define STMT_CACHE_MAX 256    /* beyond this, statements are prepared unnamed each time */
#define PIPELINE_WINDOW 512   /* read results back before this many are queued */

struct pup_conn {
    PGconn *pg;
    pup_stmt *stmts;
    int nstmts, capstmts;
    pup_stmt unnamed; /* used when the cache is full */
    int pipeline;
    long tag;
    long *pending; /* tags of queued statements, oldest first */
    int npending, cappending, pending_head;
    int failed; /* first failure of the current transaction */
    long failed_tag;
    pup_error failure;
};

static const char *const code_names[] = {
    "ok", "optimistic_concurrency", "no_events", "invalid_event", "database",
    "connection", "not_migrated", "handler", "invalid_projection", "invalid_argument",
};

const char *pup_code_name(pup_code code) {
    if ((unsigned)code < sizeof code_names / sizeof code_names[0]) return code_names[code];
    return "unknown";
}

int pup_error_set(pup_error *err, pup_code code, const char *fmt, ...) {
    if (!err) return -1;
    va_list ap;
    err->code = code;
    err->sqlstate[0] = '\0';
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return -1;
}

void pup_error_prefix(pup_error *err, const char *fmt, ...) {
    char prefix[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof prefix) n = sizeof prefix - 1;
    size_t keep = strlen(err->message);
    if (keep + (size_t)n >= sizeof err->message) keep = sizeof err->message - 1 - (size_t)n;
    memmove(err->message + n, err->message, keep);
    memcpy(err->message, prefix, (size_t)n);
    err->message[n + keep] = '\0';
}

/* Copies s into dst without a trailing newline (libpq messages end in one). */
static void copy_trimmed(char *dst, size_t size, const char *s) {
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' ')) n--;
    if (n >= size) n = size - 1;
    memcpy(dst, s, n);
    dst[n] = '\0';
}

int pup_error_from_pg(pup_error *err, PGconn *pg, const PGresult *res) {
    if (!err) return -1;
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!msg || !*msg) msg = pg ? PQerrorMessage(pg) : "unknown database error";
    if (!msg || !*msg) msg = "unknown database error";
    copy_trimmed(err->message, sizeof err->message, msg);
    const char *detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
    if (detail) {
        size_t n = strlen(err->message);
        snprintf(err->message + n, sizeof err->message - n, " (%s)", detail);
    }
    snprintf(err->sqlstate, sizeof err->sqlstate, "%s", state ? state : "");
    /* libpq's own errors (a broken connection noticed mid-pipeline) have no SQLSTATE. */
    int client_side = res && (!state || !*state);
    if ((pg && PQstatus(pg) != CONNECTION_OK) || client_side || (state && strncmp(state, "08", 2) == 0) ||
        (state && (strcmp(state, "57P01") == 0 || strcmp(state, "57P02") == 0 ||
                   strcmp(state, "57P03") == 0)))
        err->code = PUP_ERR_CONNECTION;
    else if (state && strcmp(state, "42P01") == 0) {
        err->code = PUP_ERR_NOT_MIGRATED;
        size_t n = strlen(err->message);
        snprintf(err->message + n, sizeof err->message - n,
                 " (run `pupsourcing migrate` to create the tables)");
    } else
        err->code = PUP_ERR_DATABASE;
    return -1;
}

int pup_error_is_transient(const pup_error *err) {
    return err->code == PUP_ERR_CONNECTION || strcmp(err->sqlstate, "40001") == 0 ||
           strcmp(err->sqlstate, "40P01") == 0 || strcmp(err->sqlstate, "55P03") == 0;
}

/* ---- parameters ---- */

int pup_params_reset(pup_params *p, int n) {
    if (n > p->cap) {
        int cap = n < 8 ? 8 : n;
        const char **v = realloc(p->values, cap * sizeof *v);
        if (v) p->values = v;
        int *l = realloc(p->lengths, cap * sizeof *l);
        if (l) p->lengths = l;
        int *f = realloc(p->formats, cap * sizeof *f);
        if (f) p->formats = f;
        char(*s)[32] = realloc(p->scratch, cap * sizeof *s);
        if (s) p->scratch = s;
        if (!v || !l || !f || !s) return -1;
        p->cap = cap;
    }
    p->n = n;
    for (int i = 0; i < n; i++) pup_params_null(p, i);
    return 0;
}

void pup_params_free(pup_params *p) {
    free(p->values);
    free(p->lengths);
    free(p->formats);
    free(p->scratch);
    memset(p, 0, sizeof *p);
}

void pup_params_null(pup_params *p, int i) {
    p->values[i] = NULL;
    p->lengths[i] = 0;
    p->formats[i] = 0;
}

void pup_params_text(pup_params *p, int i, const char *s, size_t len) {
    p->values[i] = s;
    p->lengths[i] = (int)len;
    p->formats[i] = 0;
}

void pup_params_binary(pup_params *p, int i, const char *s, size_t len) {
    p->values[i] = s;
    p->lengths[i] = (int)len;
    p->formats[i] = 1;
}

void pup_params_int(pup_params *p, int i, long long v) {
    int n = snprintf(p->scratch[i], sizeof p->scratch[i], "%lld", v);
    pup_params_text(p, i, p->scratch[i], (size_t)n);
}

void pup_params_double(pup_params *p, int i, double v) {
    int n = snprintf(p->scratch[i], sizeof p->scratch[i], "%.17g", v);
    pup_params_text(p, i, p->scratch[i], (size_t)n);
}

/* ---- connections ---- */

/* Redacts password=... and user:pass@ from a connection string for messages. */
static void redact_url(char *dst, size_t size, const char *url) {
    size_t j = 0;
    for (size_t i = 0; url[i] && j + 1 < size; i++) {
        dst[j++] = url[i];
        if (strncmp(url + i, "://", 3) == 0) {
            const char *at = strchr(url + i + 3, '@');
            const char *colon = strchr(url + i + 3, ':');
            const char *slash = strchr(url + i + 3, '/');
            if (at && colon && colon < at && (!slash || at < slash)) {
                size_t userlen = (size_t)(colon - (url + i + 3));
                for (size_t k = 0; k < 2 + userlen && j + 1 < size; k++) dst[j++] = url[i + 1 + k];
                for (const char *s = ":***"; *s && j + 1 < size; s++) dst[j++] = *s;
                i = (size_t)(at - url) - 1;
            }
        } else if (strncmp(url + i + 1, "password=", 9) == 0) {
            for (const char *s = "password=***"; *s && j + 1 < size; s++) dst[j++] = *s;
            i += 9;
            while (url[i + 1] && url[i + 1] != ' ' && url[i + 1] != '&') i++;
        }
    }
    dst[j] = '\0';
}

/* Replaces every occurrence of the URL's password (user:PASSWORD@ or password=PASSWORD)
 * in msg with ***. */
static void hide_password(char *msg, const char *url) {
    const char *p = NULL, *end = NULL;
    const char *scheme = strstr(url, "://");
    if (scheme) {
        const char *at = strchr(scheme + 3, '@');
        const char *colon = strchr(scheme + 3, ':');
        if (at && colon && colon < at) p = colon + 1, end = at;
    }
    if (!p && (p = strstr(url, "password=")) != NULL) {
        p += 9;
        end = p + strcspn(p, " &");
    }
    if (!p || end <= p) return;
    size_t n = (size_t)(end - p);
    char *hit;
    while ((hit = memmem(msg, strlen(msg), p, n)) != NULL) {
        memmove(hit + 3, hit + n, strlen(hit + n) + 1);
        memcpy(hit, "***", 3);
        if (n < 3) break; /* "***" could match again */
    }
}

/* Notices (e.g. WARNING: terminating connection) go to stderr as one line of ours. */
static void notice_line(void *arg, const char *message) {
    (void)arg;
    char line[1024];
    copy_trimmed(line, sizeof line, message);
    fprintf(stderr, "pupsourcing: postgres: %s\n", line);
}

pup_conn *pup_conn_open(const char *url, pup_error *err) {
    if (!url || !*url) url = getenv("DATABASE_URL");
    if (!url) url = "";
    pup_conn *c = calloc(1, sizeof *c);
    if (!c) {
        pup_error_set(err, PUP_ERR_CONNECTION, "out of memory");
        return NULL;
    }
    c->pg = PQconnectdb(url);
    if (!c->pg || PQstatus(c->pg) != CONNECTION_OK) {
        char shown[512], msg[1024];
        redact_url(shown, sizeof shown, *url ? url : "(libpq defaults)");
        copy_trimmed(msg, sizeof msg, c->pg ? PQerrorMessage(c->pg) : "out of memory");
        hide_password(msg, url); /* libpq quotes a malformed URI whole */
        pup_error_set(err, PUP_ERR_CONNECTION, "cannot connect to %s: %s", shown, msg);
        pup_conn_close(c);
        return NULL;
    }
    PQsetNoticeProcessor(c->pg, notice_line, NULL);
    /* Quiet NOTICEs (CREATE ... IF NOT EXISTS); hex bytea is what the decoders expect. */
    PGresult *r = PQexec(c->pg, "SET client_min_messages = warning; SET bytea_output = hex");
    PQclear(r);
    return c;
}

static void stmt_free(pup_stmt *s) {
    free(s->sql);
    free(s->param_types);
    memset(s, 0, sizeof *s);
}

void pup_conn_close(pup_conn *c) {
    if (!c) return;
    if (c->pg) PQfinish(c->pg);
    for (int i = 0; i < c->nstmts; i++) stmt_free(&c->stmts[i]);
    stmt_free(&c->unnamed);
    free(c->stmts);
    free(c->pending);
    free(c);
}

PGconn *pup_conn_pg(pup_conn *c) { return c->pg; }

int pup_conn_reset(pup_conn *c, pup_error *err) {
    PQreset(c->pg);
    for (int i = 0; i < c->nstmts; i++) stmt_free(&c->stmts[i]);
    stmt_free(&c->unnamed);
    c->nstmts = 0; /* the server forgot them with the old session */
    c->pipeline = 0;
    c->npending = c->pending_head = 0;
    c->failed = 0;
    if (PQstatus(c->pg) != CONNECTION_OK) return pup_error_from_pg(err, c->pg, NULL);
    PGresult *r = PQexec(c->pg, "SET client_min_messages = warning; SET bytea_output = hex");
    PQclear(r);
    return 0;
}

int pup_conn_ok(pup_conn *c) { return c->pg && PQstatus(c->pg) == CONNECTION_OK; }

/* Remembers the first failure of the current transaction. */
static void note_failure(pup_conn *c, const pup_error *err, long tag) {
    if (c->failed) return;
    c->failed = 1;
    c->failed_tag = tag;
    c->failure = *err;
}

void pup_conn_clear_failure(pup_conn *c) { c->failed = 0; }

void pup_conn_note_failure(pup_conn *c, const pup_error *err) { note_failure(c, err, c->tag); }

const pup_error *pup_conn_failure(const pup_conn *c, long *tag) {
    if (!c->failed) return NULL;
    if (tag) *tag = c->failed_tag;
    return &c->failure;
}

/* ---- pipeline ---- */

int pup_conn_in_pipeline(const pup_conn *c) { return c->pipeline; }
void pup_conn_set_tag(pup_conn *c, long tag) { c->tag = tag; }

int pup_conn_pipeline_begin(pup_conn *c, pup_error *err) {
    if (c->pipeline) return 0;
    if (!PQenterPipelineMode(c->pg)) return pup_error_from_pg(err, c->pg, NULL);
    c->pipeline = 1;
    c->npending = c->pending_head = 0;
    return 0;
}

static int push_pending(pup_conn *c, pup_error *err) {
    if (c->pending_head + c->npending == c->cappending) {
        if (c->pending_head > 0) {
            memmove(c->pending, c->pending + c->pending_head, c->npending * sizeof *c->pending);
            c->pending_head = 0;
        } else {
            int cap = c->cappending ? c->cappending * 2 : 64;
            long *p = realloc(c->pending, cap * sizeof *p);
            if (!p) return pup_error_set(err, PUP_ERR_DATABASE, "out of memory");
            c->pending = p;
            c->cappending = cap;
        }
    }
    c->pending[c->pending_head + c->npending++] = c->tag;
    return 0;
}

/* Reads the results of every queued statement. The first error is remembered as the
 * transaction's failure (with its tag); later statements are then reported by the
 * server as aborted and carry no news. Returns -1 if the connection broke. */
static int read_pending(pup_conn *c, pup_error *err) {
    while (c->npending > 0) {
        long tag = c->pending[c->pending_head];
        PGresult *r;
        int got = 0;
        while ((r = PQgetResult(c->pg)) != NULL) {
            got = 1;
            ExecStatusType st = PQresultStatus(r);
            if (st == PGRES_FATAL_ERROR) {
                pup_error e;
                pup_error_from_pg(&e, c->pg, r);
                note_failure(c, &e, tag);
            }
            PQclear(r);
        }
        if (!got && !pup_conn_ok(c)) {
            pup_error_from_pg(err, c->pg, NULL);
            note_failure(c, err, tag);
            return -1;
        }
        c->pending_head++;
        c->npending--;
    }
    c->pending_head = 0;
    return 0;
}

/* Consumes the result of a sync point (PGRES_PIPELINE_SYNC, possibly after NULLs). */
static void read_sync_point(pup_conn *c) {
    for (int guard = 0; guard < 4; guard++) {
        PGresult *r = PQgetResult(c->pg);
        if (!r) continue;
        int done = PQresultStatus(r) == PGRES_PIPELINE_SYNC;
        PQclear(r);
        if (done) break;
    }
}

/* Asks the server to flush what it has and reads back every queued result. */
static int drain(pup_conn *c, pup_error *err) {
    if (c->npending == 0) return 0;
    if (!PQsendFlushRequest(c->pg) || PQflush(c->pg) < 0) {
        pup_error_from_pg(err, c->pg, NULL);
        note_failure(c, err, c->tag);
        return -1;
    }
    return read_pending(c, err);
}

int pup_conn_send(pup_conn *c, const pup_stmt *st, const pup_params *p, pup_error *err) {
    if (!c->pipeline) {
        PGresult *r = pup_conn_exec(c, st, p, 0, err);
        if (!r) return -1;
        PQclear(r);
        return 0;
    }
    if (c->npending >= PIPELINE_WINDOW && drain(c, err) < 0) return -1;
    if (!PQsendQueryPrepared(c->pg, st->name, p ? p->n : 0, p ? p->values : NULL,
                             p ? p->lengths : NULL, p ? p->formats : NULL, 0)) {
        pup_error_from_pg(err, c->pg, NULL);
        note_failure(c, err, c->tag);
        return -1;
    }
    return push_pending(c, err);
}

int pup_conn_pipeline_sync(pup_conn *c, pup_error *err) {
    if (!c->pipeline) return 0;
    if (!PQpipelineSync(c->pg)) {
        pup_error_from_pg(err, c->pg, NULL);
        note_failure(c, err, c->tag);
        return -1;
    }
    if (read_pending(c, err) < 0) return -1;
    read_sync_point(c);
    return 0;
}

int pup_conn_pipeline_end(pup_conn *c, pup_error *err, long *failed_tag) {
    if (!c->pipeline) return 0;
    int rc = 0;
    if (!PQpipelineSync(c->pg)) {
        pup_error_from_pg(err, c->pg, NULL);
        note_failure(c, err, c->tag);
        rc = -1;
    } else if (read_pending(c, err) == 0)
        read_sync_point(c);
    else
        rc = -1;
    if (!PQexitPipelineMode(c->pg) && rc == 0) {
        pup_error_from_pg(err, c->pg, NULL);
        rc = -1;
    }
    c->pipeline = 0;
    c->npending = c->pending_head = 0;
    if (c->failed) {
        if (err) *err = c->failure;
        if (failed_tag) *failed_tag = c->failed_tag;
        return -1;
    }
    return rc;
}

/* ---- statements ---- */

static int prepare_into(pup_conn *c, pup_stmt *s, const char *name, const char *sql,
                        pup_error *err) {
    PGresult *r = PQprepare(c->pg, name, sql, 0, NULL);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        pup_error_from_pg(err, c->pg, r);
        PQclear(r);
        return -1;
    }
    PQclear(r);
    r = PQdescribePrepared(c->pg, name);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        pup_error_from_pg(err, c->pg, r);
        PQclear(r);
        return -1;
    }
    int n = PQnparams(r);
    Oid *types = n ? malloc(n * sizeof *types) : NULL;
    char *copy = strdup(sql);
    if ((n && !types) || !copy) {
        free(types);
        free(copy);
        PQclear(r);
        return pup_error_set(err, PUP_ERR_DATABASE, "out of memory");
    }
    for (int i = 0; i < n; i++) types[i] = PQparamtype(r, i);
    PQclear(r);
    stmt_free(s);
    snprintf(s->name, sizeof s->name, "%s", name);
    s->sql = copy;
    s->nparams = n;
    s->param_types = types;
    return 0;
}

const pup_stmt *pup_conn_prepare(pup_conn *c, const char *sql, pup_error *err) {
    for (int i = 0; i < c->nstmts; i++)
        if (strcmp(c->stmts[i].sql, sql) == 0) return &c->stmts[i];
    /* Preparing needs a round trip of its own: settle the pipeline first. */
    int was_pipeline = c->pipeline;
    if (was_pipeline) {
        if (PQpipelineSync(c->pg) != 1 || read_pending(c, err) < 0) return NULL;
        read_sync_point(c);
        PQexitPipelineMode(c->pg);
        c->pipeline = 0;
    }
    const pup_stmt *out = NULL;
    if (c->nstmts < STMT_CACHE_MAX) {
        if (c->nstmts == c->capstmts) {
            int cap = c->capstmts ? c->capstmts * 2 : 16;
            pup_stmt *s = realloc(c->stmts, cap * sizeof *s);
            if (!s) {
                pup_error_set(err, PUP_ERR_DATABASE, "out of memory");
                goto done;
            }
            c->stmts = s;
            c->capstmts = cap;
        }
        pup_stmt *s = &c->stmts[c->nstmts];
        memset(s, 0, sizeof *s);
        char name[24];
        snprintf(name, sizeof name, "pup_%d", c->nstmts);
        if (prepare_into(c, s, name, sql, err) == 0) {
            c->nstmts++;
            out = s;
        }
    } else if (prepare_into(c, &c->unnamed, "", sql, err) == 0)
        out = &c->unnamed;
done:
    if (was_pipeline) {
        pup_error e2;
        if (pup_conn_pipeline_begin(c, &e2) < 0 && out) {
            if (err) *err = e2;
            out = NULL;
        }
    }
    if (!out && err) note_failure(c, err, c->tag);
    return out;
}

PGresult *pup_conn_exec(pup_conn *c, const pup_stmt *st, const pup_params *p,
                        int binary_result, pup_error *err) {
    PGresult *r;
    if (c->pipeline) {
        /* Earlier queued statements first: an error there is the one to report. */
        if (drain(c, err) < 0) return NULL;
        if (c->failed) {
            if (err) *err = c->failure;
            return NULL;
        }
        if (!PQsendQueryPrepared(c->pg, st->name, p ? p->n : 0, p ? p->values : NULL,
                                 p ? p->lengths : NULL, p ? p->formats : NULL, binary_result) ||
            !PQsendFlushRequest(c->pg) || PQflush(c->pg) < 0) {
            pup_error_from_pg(err, c->pg, NULL);
            note_failure(c, err, c->tag);
            return NULL;
        }
        r = PQgetResult(c->pg);
        PGresult *extra;
        while ((extra = PQgetResult(c->pg)) != NULL) PQclear(extra);
    } else {
        r = PQexecPrepared(c->pg, st->name, p ? p->n : 0, p ? p->values : NULL,
                           p ? p->lengths : NULL, p ? p->formats : NULL, binary_result);
    }
    ExecStatusType s = PQresultStatus(r);
    if (s == PGRES_TUPLES_OK || s == PGRES_COMMAND_OK) return r;
    pup_error local;
    if (!err) err = &local;
    pup_error_from_pg(err, c->pg, r);
    PQclear(r);
    note_failure(c, err, c->tag);
    return NULL;
}

int pup_conn_command(pup_conn *c, const char *sql, pup_error *err) {
    PGresult *r = PQexec(c->pg, sql);
    if (PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK) {
        PQclear(r);
        return 0;
    }
    pup_error_from_pg(err, c->pg, r);
    PQclear(r);
    return -1;
}

void pup_conn_rollback(pup_conn *c) {
    if (c->pipeline) {
        pup_error ignored;
        long tag;
        pup_conn_pipeline_end(c, &ignored, &tag);
    }
    if (pup_conn_ok(c)) {
        PGresult *r = PQexec(c->pg, "ROLLBACK");
        PQclear(r);
    }
    c->failed = 0;
}

int pup_conn_commit(pup_conn *c, pup_error *err) {
    PGresult *r = PQexec(c->pg, "COMMIT");
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        pup_error_from_pg(err, c->pg, r);
        PQclear(r);
        return -1;
    }
    /* An aborted transaction answers COMMIT with ROLLBACK: that is a failure too. */
    int rolled_back = strcmp(PQcmdStatus(r), "ROLLBACK") == 0;
    PQclear(r);
    if (!rolled_back) return 0;
    if (c->failed && err) *err = c->failure;
    else pup_error_set(err, PUP_ERR_DATABASE, "the transaction was aborted");
    if (err) pup_error_prefix(err, "COMMIT rolled back: ");
    return -1;
}

int pup_stmt_param_is_bytea(const pup_stmt *st, int i) {
    return i < st->nparams && st->param_types[i] == BYTEAOID;
}
