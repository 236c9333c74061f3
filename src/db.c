/*
 * db.c -- connections, the per-connection statement cache, parameters, pipeline mode
 * and error classification. See pup_db.h.
 */
#include "pup_db.h"

#include <ctype.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define BYTEAOID 17
#define STMT_CACHE_MAX 256    /* beyond this, statements are prepared unnamed each time */
#define PIPELINE_WINDOW 512   /* read results back before this many are queued */

/* The wake-up owed by an append inside a transaction, sent as a transaction of its own
 * after the COMMIT: a transaction that notifies holds PostgreSQL's database-wide notify
 * lock through its commit's WAL flush, which would serialise the commits of concurrent
 * writers (no group commit). This one writes no WAL, so its commit does not wait for a
 * flush. (An append outside a transaction is its own, coalesced wake-up: schema.c.) */
#define NOTIFY_STMT "pup_notify"
#define NOTIFY_SQL "SELECT pg_notify($1, '')"

#define COPY_REFUSED "COPY is not supported on pupsourcing connections (use INSERT, e.g. " \
                     "INSERT ... SELECT FROM unnest($1::text[]))"
/* Our text for PostgreSQL's "cached plan must not change result type" (SQLSTATE 0A000,
 * raised by RevalidateCachedQuery): fixed, so the retry decision survives a trip through
 * a Lua error and a server whose lc_messages is not English. */
#define PLAN_CHANGED "cached plan must not change result type: a table changed under a " \
                     "prepared statement (prepared again on retry)"

struct pup_conn {
    PGconn *pg;
    pup_stmt *stmts;
    int nstmts, capstmts;
    pup_stmt unnamed; /* used when the cache is full */
    long tag;
    long *pending; /* tags of queued statements, oldest first */
    int npending, cappending, pending_head;
    int failed; /* first failure of the current transaction */
    long failed_tag;
    pup_error failure;
    int replan; /* a cached plan went stale: forget the statements once out of the transaction */
    unsigned long session; /* counts reconnects: session state (locks, LISTEN) is gone with each */
    /* Behind a connection pooler (the backend pid libpq was told is not the server's):
     * no named statements, as a transaction-mode pool hands each transaction to any
     * server connection. Cleared when pup_conn_require_session proves session pooling. */
    int pooled;
    int via_pooler; /* the pids differed: a pooler, whatever mode require_session proved */
    unsigned long probed; /* session + 1 once pup_conn_require_session passed */
    int notify_ready; /* NOTIFY_STMT is prepared in this session */
    char owed[128];   /* channel owed a NOTIFY once the open transaction commits ("": none) */
    /* pup_conn_send_kept: the tag of the queued statement whose rows are kept (while
     * keeping), and its result once read. */
    int keeping;
    long keep_tag;
    PGresult *kept;
    /* pup_conn_commit_behind: the tag of its COMMIT, and 1 while that result is unread,
     * 0 once it said COMMIT, -1 once it failed or was skipped. */
    long behind_tag;
    int behind;
    unsigned long sent; /* statements sent by send_stmt (pup_conn_sent) */
    /* pup_conn_send_now: the thread reading its result (while `reading`: the session is
     * its alone), and that result once read. */
    pthread_t reader;
    int reading;
    PGresult *sent_result;
};

/* Every error code with the stable name Lua sees in err.code: the one table of them. */
static const struct {
    pup_code code;
    const char *name;
} codes[] = {
    {PUP_OK, "ok"},
    {PUP_ERR_CONFLICT, "optimistic_concurrency"},
    {PUP_ERR_NO_EVENTS, "no_events"},
    {PUP_ERR_INVALID_EVENT, "invalid_event"},
    {PUP_ERR_DATABASE, "database"},
    {PUP_ERR_CONNECTION, "connection"},
    {PUP_ERR_NOT_MIGRATED, "not_migrated"},
    {PUP_ERR_HANDLER, "handler"},
    {PUP_ERR_INVALID_PROJECTION, "invalid_projection"},
    {PUP_ERR_INVALID_ARGUMENT, "invalid_argument"},
    {PUP_ERR_OUT_OF_MEMORY, "out_of_memory"},
    {PUP_ERR_LAYOUT_CONFLICT, "layout_conflict"},
    {PUP_ERR_DUPLICATE_EVENT, "duplicate_event"},
};
#define NCODES (sizeof codes / sizeof codes[0])

const char *pup_code_name(pup_code code) {
    for (size_t i = 0; i < NCODES; i++)
        if (codes[i].code == code) return codes[i].name;
    return "unknown";
}

int pup_code_from_name(const char *name, pup_code *code) {
    for (size_t i = 0; i < NCODES; i++)
        if (strcmp(codes[i].name, name) == 0) {
            *code = codes[i].code;
            return 0;
        }
    return -1;
}

int pup_error_set(pup_error *err, pup_code code, const char *fmt, ...) {
    if (!err) return -1;
    va_list ap;
    err->code = code;
    err->sqlstate[0] = '\0';
    err->constraint[0] = '\0';
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

static int is_copy_status(ExecStatusType st) {
    return st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH;
}

/* Ends the COPY a statement started (st is its result's status) and any that follow it
 * in the same query string: COPY IN is failed, COPY OUT drained, then the remaining
 * results are read, leaving the connection idle again. */
static void end_copy(PGconn *pg, ExecStatusType st) {
    while (is_copy_status(st)) {
        if (st != PGRES_COPY_OUT && PQputCopyEnd(pg, "COPY is not supported by pupsourcing") < 0) return;
        if (st != PGRES_COPY_IN) {
            char *buf;
            int n;
            while ((n = PQgetCopyData(pg, &buf, 0)) > 0) PQfreemem(buf);
            if (n == -2) return; /* broken connection */
        }
        st = PGRES_COMMAND_OK;
        PGresult *r;
        while (!is_copy_status(st) && (r = PQgetResult(pg)) != NULL) {
            st = PQresultStatus(r);
            PQclear(r);
        }
    }
}

/* True for the failure of a prepared statement whose table changed shape: SQLSTATE 0A000
 * from RevalidateCachedQuery (the function name is not translated, the message is). */
static int stale_plan(const PGresult *res) {
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *where = res ? PQresultErrorField(res, PG_DIAG_SOURCE_FUNCTION) : NULL;
    return state && where && strcmp(state, "0A000") == 0 && strcmp(where, "RevalidateCachedQuery") == 0;
}

int pup_error_from_pg(pup_error *err, PGconn *pg, const PGresult *res) {
    if (res && is_copy_status(PQresultStatus(res))) {
        if (pg) end_copy(pg, PQresultStatus(res));
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "%s", COPY_REFUSED);
    }
    if (!err) return -1;
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    const char *constraint = res ? PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME) : NULL;
    if (stale_plan(res)) msg = PLAN_CHANGED;
    if (!msg || !*msg) msg = pg ? PQerrorMessage(pg) : "unknown database error";
    if (!msg || !*msg) msg = "unknown database error";
    copy_trimmed(err->message, sizeof err->message, msg);
    const char *detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
    if (detail) {
        size_t n = strlen(err->message);
        snprintf(err->message + n, sizeof err->message - n, " (%s)", detail);
    }
    snprintf(err->sqlstate, sizeof err->sqlstate, "%s", state ? state : "");
    snprintf(err->constraint, sizeof err->constraint, "%s", constraint ? constraint : "");
    /* libpq's own errors (a broken connection noticed mid-pipeline) have no SQLSTATE. */
    int client_side = res && (!state || !*state);
    if ((pg && PQstatus(pg) != CONNECTION_OK) || client_side || (state && strncmp(state, "08", 2) == 0) ||
        (state && (strcmp(state, "57P01") == 0 || strcmp(state, "57P02") == 0 ||
                   strcmp(state, "57P03") == 0)))
        err->code = PUP_ERR_CONNECTION;
    else /* a missing table (42P01) is not_migrated only for the store's own statements:
          * pup_store_error() says so where they fail */
        err->code = PUP_ERR_DATABASE;
    return -1;
}

/* True for the error of a prepared statement whose table changed shape. */
static int plan_changed(const pup_error *err) {
    return strcmp(err->sqlstate, "0A000") == 0 && strstr(err->message, PLAN_CHANGED) != NULL;
}

int pup_error_is_transient(const pup_error *err) {
    return err->code == PUP_ERR_CONNECTION || strcmp(err->sqlstate, "40001") == 0 ||
           strcmp(err->sqlstate, "40P01") == 0 || strcmp(err->sqlstate, "55P03") == 0 ||
           plan_changed(err);
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

/* True when a URL has an '@' after its user:password@ part: libpq splits credentials at
 * the first '@' or '/', so an unencoded '@' or '/' in a password puts the rest of it in
 * the host, port or database name, which error messages show. */
static int url_misplaced_at(const char *url) {
    const char *rest = NULL;
    if (strncmp(url, "postgresql://", 13) == 0) rest = url + 13;
    else if (strncmp(url, "postgres://", 11) == 0) rest = url + 11;
    if (!rest) return 0;
    rest += strcspn(rest, "@/");
    if (*rest == '@') rest++;
    return strchr(rest, '@') != NULL;
}

/* "the connection string is malformed", with the part of libpq's reason before its first
 * quote: libpq quotes every piece of the string it echoes (which may be the password),
 * and what comes before is its own text. A translated reason (not plain ASCII) is left
 * out, as its quoting is unknown. */
static int malformed(pup_error *err, const char *why) {
    if (!why) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "cannot connect: out of memory");
    size_t n = strcspn(why, "\"'\n");
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)why[i] < 0x20 || (unsigned char)why[i] > 0x7e) n = 0;
    while (n > 0 && (why[n - 1] == ' ' || why[n - 1] == ':')) n--;
    if (n < 12 || n > 200)
        return pup_error_set(err, PUP_ERR_CONNECTION,
                             "cannot connect to the database: the connection string is malformed");
    return pup_error_set(err, PUP_ERR_CONNECTION,
                         "cannot connect to the database: the connection string is malformed (%.*s)",
                         (int)n, why);
}

/* Describes a connection's target from libpq's own fields, never from the given string. */
static void describe(char *out, size_t size, PGconn *pg) {
    const char *host = PQhost(pg), *port = PQport(pg), *db = PQdb(pg), *user = PQuser(pg);
    snprintf(out, size, "database \"%.63s\" on host %.200s port %.20s as user \"%.63s\"",
             db && *db ? db : "(default)", host && *host ? host : "(default)",
             port && *port ? port : "(default)", user && *user ? user : "(default)");
}

/* Notices (e.g. WARNING: terminating connection) go to stderr as one line of ours. */
static void notice_line(void *arg, const char *message) {
    (void)arg;
    char line[1024];
    copy_trimmed(line, sizeof line, message);
    fprintf(stderr, "pupsourcing: postgres: %s\n", line);
}

/* Sets what every session of ours expects. Quiet NOTICEs (CREATE ... IF NOT EXISTS); hex
 * bytea is what the decoders expect. In the same round trip, the server's pid: a pooler
 * gives the client a backend pid of its own, so a different one means a pooler. */
static void session_defaults(pup_conn *c) {
    PGresult *r = PQexec(c->pg, "SET client_min_messages = warning; SET bytea_output = hex;"
                                " SELECT pg_backend_pid()");
    c->pooled = c->via_pooler = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
                                atoi(PQgetvalue(r, 0, 0)) != PQbackendPID(c->pg);
    PQclear(r);
}

pup_conn *pup_conn_open(const char *url, pup_error *err) {
    if (!url || !*url) url = getenv("DATABASE_URL");
    if (!url) url = "";
    /* Parsed here, so a malformed string is reported without libpq's echo of it, and
     * connected from the parsed options plus client_encoding: the aggregate_id_hash an
     * appender stores must be over the same bytes a processor reads back. */
    char *why = NULL;
    PQconninfoOption *opts = PQconninfoParse(url, &why);
    if (!opts) {
        malformed(err, why);
        PQfreemem(why);
        return NULL;
    }
    if (url_misplaced_at(url)) {
        PQconninfoFree(opts);
        pup_error_set(err, PUP_ERR_CONNECTION,
                      "cannot connect to the database: the connection URL is malformed (an '@' after the "
                      "user:password@ part; write '@' and '/' in a password as %%40 and %%2F)");
        return NULL;
    }
    size_t n = 0;
    for (PQconninfoOption *o = opts; o->keyword; o++) n++;
    const char **keys = calloc(n + 2, sizeof *keys), **vals = calloc(n + 2, sizeof *vals);
    pup_conn *c = calloc(1, sizeof *c);
    if (!keys || !vals || !c) {
        free(keys);
        free(vals);
        free(c);
        PQconninfoFree(opts);
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "cannot connect: out of memory");
        return NULL;
    }
    size_t k = 0;
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (o->val && strcmp(o->keyword, "client_encoding") != 0) {
            keys[k] = o->keyword;
            vals[k++] = o->val;
        }
    keys[k] = "client_encoding";
    vals[k] = "UTF8";
    c->pg = PQconnectdbParams(keys, vals, 0);
    free(keys);
    free(vals);
    PQconninfoFree(opts);
    if (!c->pg) {
        free(c);
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "cannot connect: out of memory");
        return NULL;
    }
    if (PQstatus(c->pg) != CONNECTION_OK) {
        /* libpq's reason names the host, port and server's answer, never the password
         * (the string was parsed, and checked for a split password, above). */
        char target[512], msg[1024];
        describe(target, sizeof target, c->pg);
        copy_trimmed(msg, sizeof msg, PQerrorMessage(c->pg));
        for (char *q = msg; *q; q++) /* one line: libpq indents its hints on a new line */
            if (*q == '\n' || *q == '\t') *q = ' ';
        pup_error_set(err, PUP_ERR_CONNECTION, "cannot connect to %s: %s", target, msg);
        pup_conn_close(c);
        return NULL;
    }
    PQsetNoticeProcessor(c->pg, notice_line, NULL);
    session_defaults(c);
    return c;
}

static void stmt_free(pup_stmt *s) {
    free(s->sql);
    free(s->param_types);
    memset(s, 0, sizeof *s);
}

/* Forgets a kept result and any statement whose rows were to be kept. */
static void drop_kept(pup_conn *c) {
    c->keeping = 0;
    PQclear(c->kept);
    c->kept = NULL;
}

static void join_reader(pup_conn *c);

void pup_conn_close(pup_conn *c) {
    if (!c) return;
    join_reader(c);
    PQclear(c->sent_result);
    if (c->pg) PQfinish(c->pg);
    for (int i = 0; i < c->nstmts; i++) stmt_free(&c->stmts[i]);
    stmt_free(&c->unnamed);
    free(c->stmts);
    free(c->pending);
    PQclear(c->kept);
    free(c);
}

PGconn *pup_conn_pg(pup_conn *c) { return c->pg; }

int pup_conn_check_utf8(pup_conn *c, pup_error *err) {
    const char *enc = PQparameterStatus(c->pg, "client_encoding");
    if (!enc || strcmp(enc, "UTF8") == 0) return 0;
    return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                         "client_encoding is %s: pupsourcing stores and hashes aggregate ids as UTF-8;"
                         " do not change client_encoding on its connections", enc);
}

int pup_conn_reset(pup_conn *c, pup_error *err) {
    PQreset(c->pg);
    c->session++;
    for (int i = 0; i < c->nstmts; i++) stmt_free(&c->stmts[i]);
    stmt_free(&c->unnamed);
    c->nstmts = 0; /* the server forgot them with the old session */
    c->npending = c->pending_head = 0;
    drop_kept(c);
    c->failed = 0;
    c->replan = 0;
    c->notify_ready = 0;
    c->owed[0] = '\0'; /* what the lost transaction committed is unknown: listeners poll */
    if (PQstatus(c->pg) != CONNECTION_OK) return pup_error_from_pg(err, c->pg, NULL);
    session_defaults(c);
    return 0;
}

int pup_conn_pooled(const pup_conn *c) { return c->pooled; }
int pup_conn_via_pooler(const pup_conn *c) { return c->via_pooler; }

/* A second connection with this one's options (libpq's, never printed) to the server it
 * is connected to (of a list of hosts, the one it chose); NULL if it fails. */
static PGconn *connect_alike(pup_conn *c) {
    PQconninfoOption *opts = PQconninfo(c->pg);
    if (!opts) return NULL;
    size_t n = 0;
    for (PQconninfoOption *o = opts; o->keyword; o++) n++;
    const char **keys = calloc(n + 3, sizeof *keys), **vals = calloc(n + 3, sizeof *vals);
    PGconn *pg = NULL;
    if (keys && vals) {
        const char *host = PQhost(c->pg), *addr = PQhostaddr(c->pg), *port = PQport(c->pg);
        size_t k = 0;
        for (PQconninfoOption *o = opts; o->keyword; o++)
            if (o->val && strcmp(o->keyword, "host") != 0 && strcmp(o->keyword, "hostaddr") != 0 &&
                strcmp(o->keyword, "port") != 0) {
                keys[k] = o->keyword;
                vals[k++] = o->val;
            }
        if (host && *host) keys[k] = "host", vals[k++] = host;
        if (addr && *addr) keys[k] = "hostaddr", vals[k++] = addr;
        if (port && *port) keys[k] = "port", vals[k++] = port;
        pg = PQconnectdbParams(keys, vals, 0);
    }
    free(keys);
    free(vals);
    PQconninfoFree(opts);
    return pg;
}

pup_conn *pup_conn_open_alike(pup_conn *c, pup_error *err) {
    pup_conn *o = calloc(1, sizeof *o);
    if (!o) {
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "cannot connect: out of memory");
        return NULL;
    }
    o->pg = connect_alike(c);
    if (!o->pg || PQstatus(o->pg) != CONNECTION_OK) {
        char target[512];
        describe(target, sizeof target, o->pg ? o->pg : c->pg);
        pup_error_set(err, PUP_ERR_CONNECTION, "cannot open a second connection to %s", target);
        pup_conn_close(o);
        return NULL;
    }
    PQsetNoticeProcessor(o->pg, notice_line, NULL);
    session_defaults(o);
    return o;
}

int pup_conn_require_session(pup_conn *c, pup_error *err) {
    if (!c->pooled || c->probed == c->session + 1) return 0;
    /* A setting of this session, then a second client of the same pool: in transaction
     * (or statement) pooling it is handed the server connection this one just released
     * (PgBouncer reuses the last released one first) and sees the setting. */
    char marker[64], sql[160];
    snprintf(marker, sizeof marker, "%d-%ld-%lx", PQbackendPID(c->pg), (long)getpid(), (unsigned long)random());
    snprintf(sql, sizeof sql, "SELECT set_config('pupsourcing.session_probe', '%s', false)", marker);
    if (pup_conn_command(c, sql, err) < 0) return -1;
    PGconn *other = connect_alike(c);
    int shared = 0;
    /* A full session pool makes the second client wait for a server connection: after
     * 5 s that is taken as session pooling (transaction pooling had one free). */
    if (other && PQstatus(other) == CONNECTION_OK &&
        PQsendQuery(other, "SELECT current_setting('pupsourcing.session_probe', true)")) {
        struct pollfd f = {.fd = PQsocket(other), .events = POLLIN};
        while (PQconsumeInput(other) && PQisBusy(other) && poll(&f, 1, 5000) > 0) {
        }
        PGresult *r;
        while (!PQisBusy(other) && (r = PQgetResult(other)) != NULL) {
            shared |= PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
                      strcmp(PQgetvalue(r, 0, 0), marker) == 0;
            PQclear(r);
        }
    }
    PQfinish(other);
    pup_conn_command(c, "SELECT set_config('pupsourcing.session_probe', '', false)", NULL);
    if (shared) {
        char target[512];
        describe(target, sizeof target, c->pg);
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                             "%s goes through a connection pooler in transaction pooling mode: session "
                             "state (advisory locks, LISTEN, prepared statements) does not survive a transaction "
                             "there, and a processor holds its partition by them; connect processors directly to PostgreSQL or through a "
                             "pool in session mode (e.g. PgBouncer pool_mode=session); appenders may stay on "
                             "transaction pooling", target);
    }
    /* Session pooling: the session is ours, named statements are safe. Those described
     * so far have no name on the server: prepared again, named, when next used. */
    c->pooled = 0;
    c->probed = c->session + 1;
    for (int i = 0; i < c->nstmts; i++) stmt_free(&c->stmts[i]);
    stmt_free(&c->unnamed);
    c->nstmts = 0;
    return 0;
}

int pup_conn_ok(pup_conn *c) { return c->pg && PQstatus(c->pg) == CONNECTION_OK; }

unsigned long pup_conn_session(const pup_conn *c) { return c->session; }

/* Remembers the first failure of the current transaction. */
static void note_failure(pup_conn *c, const pup_error *err, long tag) {
    if (plan_changed(err)) c->replan = 1;
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

/* libpq's pipeline state is the only one: no flag of ours can disagree with it. */
int pup_conn_in_pipeline(const pup_conn *c) { return PQpipelineStatus(c->pg) != PQ_PIPELINE_OFF; }
void pup_conn_set_tag(pup_conn *c, long tag) { c->tag = tag; }

int pup_conn_pipeline_begin(pup_conn *c, pup_error *err) {
    if (pup_conn_in_pipeline(c)) return 0;
    if (!PQenterPipelineMode(c->pg)) return pup_error_from_pg(err, c->pg, NULL);
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
            if (!p) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
            c->pending = p;
            c->cappending = cap;
        }
    }
    c->pending[c->pending_head + c->npending++] = c->tag;
    return 0;
}

/* Reads the results of the queued statements: every one, or up to the kept one's
 * (UPTO_KEPT), or up to the first tagged `tag` (UPTO_TAG). The first error is remembered
 * as the transaction's failure (with its tag); later statements are then reported by the
 * server as aborted and carry no news. Returns -1 if the connection broke. */
enum { UPTO_ALL, UPTO_KEPT, UPTO_TAG };
static int read_results(pup_conn *c, int upto, long upto_tag, pup_error *err) {
    while (c->npending > 0) {
        long tag = c->pending[c->pending_head];
        PGresult *r;
        int got = 0;
        int keep = c->keeping && tag == c->keep_tag;
        while ((r = PQgetResult(c->pg)) != NULL) {
            got = 1;
            ExecStatusType st = PQresultStatus(r);
            if (st == PGRES_FATAL_ERROR) {
                pup_error e;
                pup_error_from_pg(&e, c->pg, r);
                note_failure(c, &e, tag);
            }
            if (c->behind == 1 && tag == c->behind_tag)
                c->behind = st == PGRES_COMMAND_OK && strcmp(PQcmdStatus(r), "COMMIT") == 0 ? 0 : -1;
            if (keep && st == PGRES_TUPLES_OK && !c->kept) c->kept = r;
            else PQclear(r);
        }
        if (keep) c->keeping = 0;
        if (!got && !pup_conn_ok(c)) {
            pup_error_from_pg(err, c->pg, NULL);
            note_failure(c, err, tag);
            return -1;
        }
        c->pending_head++;
        c->npending--;
        if ((upto == UPTO_KEPT && keep) || (upto == UPTO_TAG && tag == upto_tag)) return 0;
    }
    c->pending_head = 0;
    return 0;
}

static int read_pending(pup_conn *c, pup_error *err) { return read_results(c, UPTO_ALL, 0, err); }

int pup_conn_read_upto(pup_conn *c, long tag, pup_error *err) {
    for (int i = 0; i < c->npending; i++)
        if (c->pending[c->pending_head + i] == tag) return read_results(c, UPTO_TAG, tag, err);
    return 0;
}

/* Syncs the pipeline and reads everything up to the sync point: the queued statements'
 * results (failures noted with their tags), then whatever else is there. Stays in
 * pipeline mode. Returns -1 with err set when the connection broke. */
static int sync_pipeline(pup_conn *c, pup_error *err) {
    if (!PQpipelineSync(c->pg)) {
        pup_error_from_pg(err, c->pg, NULL);
        note_failure(c, err, c->tag);
        return -1;
    }
    if (read_pending(c, err) < 0) return -1;
    /* Up to the sync point; two NULLs in a row mean nothing is left to read. */
    int nulls = 0;
    while (nulls < 2 && pup_conn_ok(c)) {
        PGresult *r = PQgetResult(c->pg);
        if (!r) {
            nulls++;
            continue;
        }
        nulls = 0;
        ExecStatusType st = PQresultStatus(r);
        PQclear(r);
        if (st == PGRES_PIPELINE_SYNC) break;
    }
    c->npending = c->pending_head = 0;
    return 0;
}

/* Syncs, reads everything and leaves pipeline mode: the one way out of it, for pipeline
 * end, prepare and rollback. Returns -1 with err set when the connection broke or libpq
 * stayed in pipeline mode. */
static int settle_pipeline(pup_conn *c, pup_error *err) {
    pup_error local;
    if (!err) err = &local;
    if (sync_pipeline(c, err) < 0) return -1;
    if (!PQexitPipelineMode(c->pg)) {
        pup_error_from_pg(err, c->pg, NULL);
        note_failure(c, err, c->tag);
        return -1;
    }
    return 0;
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

/* Queues st: by name, or behind a pooler as its text with the described types. */
static int send_stmt(pup_conn *c, const pup_stmt *st, const pup_params *p, int binary_result) {
    c->sent++;
    if (c->pooled)
        return PQsendQueryParams(c->pg, st->sql, p ? p->n : 0, st->param_types, p ? p->values : NULL,
                                 p ? p->lengths : NULL, p ? p->formats : NULL, binary_result);
    return PQsendQueryPrepared(c->pg, st->name, p ? p->n : 0, p ? p->values : NULL, p ? p->lengths : NULL,
                               p ? p->formats : NULL, binary_result);
}

/* Runs st outside pipeline mode, as send_stmt sends it. */
static PGresult *exec_stmt(pup_conn *c, const pup_stmt *st, const pup_params *p, int binary_result) {
    if (c->pooled)
        return PQexecParams(c->pg, st->sql, p ? p->n : 0, st->param_types, p ? p->values : NULL,
                            p ? p->lengths : NULL, p ? p->formats : NULL, binary_result);
    return PQexecPrepared(c->pg, st->name, p ? p->n : 0, p ? p->values : NULL, p ? p->lengths : NULL,
                          p ? p->formats : NULL, binary_result);
}

/* A libpq failure to queue or send, noted against the current tag; returns -1. */
static int send_failed(pup_conn *c, pup_error *err) {
    pup_error_from_pg(err, c->pg, NULL);
    note_failure(c, err, c->tag);
    return -1;
}

/* Queues st in pipeline mode behind the pending statements. */
static int queue_stmt(pup_conn *c, const pup_stmt *st, const pup_params *p, int binary_result, pup_error *err) {
    /* Nothing more after a failure: behind a COMMIT that failed (pup_conn_commit_behind)
     * the session left the transaction, and a statement queued after a Sync (a prepare, a
     * savepoint) would run, and commit at the next Sync, in a transaction of its own. */
    if (c->failed && err) *err = c->failure;
    if (c->failed) return -1;
    if (c->npending >= PIPELINE_WINDOW && drain(c, err) < 0) return -1;
    if (!send_stmt(c, st, p, binary_result)) return send_failed(c, err);
    return push_pending(c, err);
}

int pup_conn_send(pup_conn *c, const pup_stmt *st, const pup_params *p, pup_error *err) {
    if (!pup_conn_in_pipeline(c)) {
        PGresult *r = pup_conn_exec(c, st, p, 0, err);
        if (!r) return -1;
        PQclear(r);
        return 0;
    }
    return queue_stmt(c, st, p, 0, err);
}

int pup_conn_send_kept(pup_conn *c, const pup_stmt *st, const pup_params *p, pup_error *err) {
    if (!pup_conn_in_pipeline(c) || c->keeping || c->kept)
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "pup_conn_send_kept: not in pipeline mode, or one kept already");
    if (queue_stmt(c, st, p, 1, err) < 0) return -1;
    c->keeping = 1;
    c->keep_tag = c->tag;
    /* Sent now, not with the queue's next flush: the server works on it meanwhile, and
     * sends its rows as soon as it has them (pup_conn_read_kept need not wait for the
     * statements queued after it). */
    return !PQsendFlushRequest(c->pg) || PQflush(c->pg) < 0 ? send_failed(c, err) : 0;
}

int pup_conn_read_kept(pup_conn *c, pup_error *err) {
    if (!c->keeping) return 0;
    return read_results(c, UPTO_KEPT, 0, err);
}

PGresult *pup_conn_take_kept(pup_conn *c) {
    PGresult *r = c->kept;
    c->kept = NULL;
    return r;
}

int pup_conn_commit_behind(pup_conn *c, const pup_stmt *st, const pup_params *p, const long tags[3],
                           pup_error *err) {
    if (c->pooled || c->owed[0]) return 1;
    if (pup_conn_pipeline_begin(c, err) < 0) return -1;
    c->behind = 1;
    c->behind_tag = tags[1];
    static const char *const commands[] = {"COMMIT", "BEGIN"};
    c->tag = tags[0];
    if (queue_stmt(c, st, p, 0, err) < 0) return -1;
    for (int i = 0; i < 2; i++) {
        c->tag = tags[i + 1];
        if (c->npending >= PIPELINE_WINDOW && drain(c, err) < 0) return -1;
        if (!PQsendQueryParams(c->pg, commands[i], 0, NULL, NULL, NULL, NULL, 0)) return send_failed(c, err);
        if (push_pending(c, err) < 0) return -1;
    }
    /* The server sends the COMMIT's result once it ran (pup_conn_read_upto), not when the
     * statements queued after it are done. */
    return !PQsendFlushRequest(c->pg) || PQflush(c->pg) < 0 ? send_failed(c, err) : 0;
}

int pup_conn_behind_committed(const pup_conn *c) { return c->behind == 0; }

unsigned long pup_conn_sent(const pup_conn *c) { return c->sent; }

int pup_conn_pipeline_sync(pup_conn *c, pup_error *err) {
    if (!pup_conn_in_pipeline(c)) return 0;
    return sync_pipeline(c, err);
}

int pup_conn_pipeline_end(pup_conn *c, pup_error *err, long *failed_tag) {
    if (!pup_conn_in_pipeline(c)) return 0;
    int rc = settle_pipeline(c, err);
    if (c->failed) {
        if (err) *err = c->failure;
        if (failed_tag) *failed_tag = c->failed_tag;
        return -1;
    }
    return rc;
}

/* ---- statements ---- */

/* Behind a pooler: Parse and Describe of the unnamed statement under one Sync, so both
 * reach the same server connection. The Describe's result, or the first failure. */
static PGresult *describe_unnamed(pup_conn *c, const char *sql) {
    if (!PQenterPipelineMode(c->pg)) return NULL;
    PGresult *out = NULL, *r;
    if (PQsendPrepare(c->pg, "", sql, 0, NULL) && PQsendDescribePrepared(c->pg, "") && PQpipelineSync(c->pg)) {
        for (int i = 0; i < 2 && (r = PQgetResult(c->pg)) != NULL; i++) { /* prepare, describe */
            if (!out && (i == 1 || PQresultStatus(r) != PGRES_COMMAND_OK)) out = r;
            else PQclear(r);
            PQclear(PQgetResult(c->pg)); /* the NULL that ends each one's results */
        }
        while ((r = PQgetResult(c->pg)) != NULL) { /* up to the sync */
            int sync = PQresultStatus(r) == PGRES_PIPELINE_SYNC;
            PQclear(r);
            if (sync) break;
        }
    }
    PQexitPipelineMode(c->pg);
    return out;
}

static int prepare_into(pup_conn *c, pup_stmt *s, const char *name, const char *sql,
                        pup_error *err) {
    PGresult *r;
    if (c->pooled) {
        name = "";
        r = describe_unnamed(c, sql);
    } else {
        r = PQprepare(c->pg, name, sql, 0, NULL);
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            pup_error_from_pg(err, c->pg, r);
            PQclear(r);
            return -1;
        }
        PQclear(r);
        r = PQdescribePrepared(c->pg, name);
    }
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
        return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
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

/* True when sql's first word, after blanks and comments, is COPY. */
static int is_copy(const char *s) {
    for (;;) {
        while (isspace((unsigned char)*s)) s++;
        if (s[0] == '-' && s[1] == '-') {
            s += strcspn(s, "\n");
        } else if (s[0] == '/' && s[1] == '*') {
            int depth = 1; /* PostgreSQL's block comments nest */
            for (s += 2; *s && depth > 0; s++) {
                if (s[0] == '/' && s[1] == '*') depth++, s++;
                else if (s[0] == '*' && s[1] == '/') depth--, s++;
            }
        } else
            break;
    }
    unsigned char next = (unsigned char)s[4];
    return strncasecmp(s, "copy", 4) == 0 && !(isalnum(next) || next == '_' || next == '$' || next >= 0x80);
}

/* Forgets every cached statement, on the server too (after a plan went stale). Only
 * outside a transaction: an aborted one refuses DEALLOCATE. */
static void forget_statements(pup_conn *c) {
    if (!c->pooled) PQclear(PQexec(c->pg, "DEALLOCATE ALL"));
    for (int i = 0; i < c->nstmts; i++) stmt_free(&c->stmts[i]);
    stmt_free(&c->unnamed);
    c->nstmts = 0;
    c->replan = 0;
    c->notify_ready = 0;
}

const pup_stmt *pup_conn_prepare(pup_conn *c, const char *sql, pup_error *err) {
    join_reader(c);
    if (c->replan && PQtransactionStatus(c->pg) == PQTRANS_IDLE) forget_statements(c);
    for (int i = 0; i < c->nstmts; i++)
        if (strcmp(c->stmts[i].sql, sql) == 0) return &c->stmts[i];
    if (is_copy(sql)) {
        pup_error ignored; /* a failure of a statement queued before comes first */
        if (pup_conn_in_pipeline(c)) drain(c, &ignored);
        pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "%s", COPY_REFUSED);
        if (err) note_failure(c, err, c->tag);
        return NULL;
    }
    /* Preparing needs a round trip of its own: settle the pipeline first. */
    int was_pipeline = pup_conn_in_pipeline(c);
    if (was_pipeline && settle_pipeline(c, err) < 0) return NULL;
    const pup_stmt *out = NULL;
    if (c->nstmts < STMT_CACHE_MAX) {
        if (c->nstmts == c->capstmts) {
            int cap = c->capstmts ? c->capstmts * 2 : 16;
            pup_stmt *s = realloc(c->stmts, cap * sizeof *s);
            if (!s) {
                pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
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

/* r when it succeeded; else NULL with err (the connection's failure noted), r cleared. */
static PGresult *result_or_failure(pup_conn *c, PGresult *r, pup_error *err) {
    ExecStatusType s = PQresultStatus(r);
    if (r && (s == PGRES_TUPLES_OK || s == PGRES_COMMAND_OK)) return r;
    pup_error local;
    if (!err) err = &local;
    pup_error_from_pg(err, c->pg, r);
    PQclear(r);
    note_failure(c, err, c->tag);
    return NULL;
}

PGresult *pup_conn_exec(pup_conn *c, const pup_stmt *st, const pup_params *p,
                        int binary_result, pup_error *err) {
    PGresult *r;
    if (pup_conn_in_pipeline(c)) {
        /* Earlier queued statements first: an error there is the one to report. */
        if (drain(c, err) < 0) return NULL;
        if (c->failed) {
            if (err) *err = c->failure;
            return NULL;
        }
        if (!send_stmt(c, st, p, binary_result) ||
            !PQsendFlushRequest(c->pg) || PQflush(c->pg) < 0) {
            pup_error_from_pg(err, c->pg, NULL);
            note_failure(c, err, c->tag);
            return NULL;
        }
        r = PQgetResult(c->pg);
        PGresult *extra;
        while ((extra = PQgetResult(c->pg)) != NULL) PQclear(extra);
    } else {
        r = exec_stmt(c, st, p, binary_result);
        /* Outside a transaction the failed statement had no effect: prepare it again
         * (forgetting the others, which may be stale too) and run it once more. */
        if (stale_plan(r) && PQtransactionStatus(c->pg) == PQTRANS_IDLE) {
            char *sql = strdup(st->sql);
            c->replan = 1;
            const pup_stmt *fresh = sql ? pup_conn_prepare(c, sql, NULL) : NULL;
            free(sql);
            if (fresh) {
                PQclear(r);
                r = exec_stmt(c, fresh, p, binary_result);
            }
        }
    }
    return result_or_failure(c, r, err);
}

int pup_conn_command(pup_conn *c, const char *sql, pup_error *err) {
    PGresult *r = PQexec(c->pg, sql);
    pup_conn_settle_notify(c, r);
    if (PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK) {
        PQclear(r);
        return 0;
    }
    pup_error_from_pg(err, c->pg, r);
    PQclear(r);
    return -1;
}

/* The thread of pup_conn_send_now: reads the result at once, so the server never waits
 * for the caller to send it (it would hold its locks meanwhile; docs/reliability.md). */
static void *read_sent(void *arg) {
    pup_conn *c = arg;
    PGresult *r = PQgetResult(c->pg), *extra;
    while ((extra = PQgetResult(c->pg)) != NULL) PQclear(extra);
    c->sent_result = r;
    return NULL;
}

/* Waits for the reading thread, if any: the session is the caller's again. */
static void join_reader(pup_conn *c) {
    if (!c->reading) return;
    pthread_join(c->reader, NULL);
    c->reading = 0;
}

int pup_conn_send_now(pup_conn *c, const pup_stmt *st, const pup_params *p, pup_error *err) {
    join_reader(c);
    PQclear(c->sent_result); /* one not taken */
    c->sent_result = NULL;
    if (PQtransactionStatus(c->pg) != PQTRANS_IDLE || pup_conn_in_pipeline(c))
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "pup_conn_send_now: the connection is not idle");
    if (!send_stmt(c, st, p, 1)) return send_failed(c, err);
    /* the stop signals stay with the threads that wait for them */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    c->reading = pthread_create(&c->reader, NULL, read_sent, c) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!c->reading) { /* no thread: the caller must not wait for this session */
        read_sent(c);
        return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "pup_conn_send_now: cannot start its reading thread");
    }
    return 0;
}

PGresult *pup_conn_take_sent(pup_conn *c, pup_error *err) {
    join_reader(c);
    PGresult *r = c->sent_result;
    c->sent_result = NULL;
    return result_or_failure(c, r, err);
}

void pup_conn_rollback(pup_conn *c) {
    pup_error ignored;
    c->owed[0] = '\0';
    if (pup_conn_in_pipeline(c) && settle_pipeline(c, &ignored) < 0 && pup_conn_ok(c))
        pup_conn_reset(c, &ignored); /* stuck in pipeline mode: a new session ends it all */
    if (pup_conn_ok(c) && PQtransactionStatus(c->pg) != PQTRANS_IDLE) {
        PGresult *r = PQexec(c->pg, "ROLLBACK");
        PQclear(r);
    }
    c->failed = 0;
    drop_kept(c); /* it belonged to what was rolled back */
}

/* ---- wake-ups after the commit ---- */

/* Prepares NOTIFY_STMT once a session (outside pipeline mode). */
static int prepare_notify(pup_conn *c) {
    if (c->notify_ready) return 0;
    PGresult *r = PQprepare(c->pg, NOTIFY_STMT, NOTIFY_SQL, 1, NULL);
    c->notify_ready = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    return c->notify_ready ? 0 : -1;
}

/* Reads one sync group's results in pipeline mode, up to its Sync; returns the first
 * (the caller clears it), NULL if there was none or the Sync never came (a broken
 * connection). An implicit transaction commits at its Sync, so a statement's result
 * without it is no success: the commit (and a synchronous standby's acknowledgement of
 * it) may not have happened. */
static PGresult *read_group(pup_conn *c) {
    PGresult *first = NULL, *r;
    int nulls = 0, synced = 0;
    while (nulls < 2) {
        if (!(r = PQgetResult(c->pg))) {
            if (!pup_conn_ok(c)) nulls++; /* a broken connection gives no Sync */
            nulls++;
            continue;
        }
        nulls = 0;
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_PIPELINE_SYNC) {
            PQclear(r);
            synced = 1;
            break;
        }
        if (!first) first = r;
        else PQclear(r);
    }
    if (!synced) {
        PQclear(first);
        return NULL;
    }
    return first;
}

/* Sends COMMIT and then NOTIFY_STMT on channel, each in a sync group of its own, so the
 * notification is a transaction of its own that starts after the commit: one round trip.
 * Outside pipeline mode with NOTIFY_STMT prepared. Returns COMMIT's result (NULL if the
 * connection broke); the notification's outcome is not waited for beyond reading it: a
 * lost one costs listeners a poll interval, nothing else. */
static PGresult *commit_then_notify(pup_conn *c, const char *channel) {
    if (!PQenterPipelineMode(c->pg)) return NULL;
    const char *v[1] = {channel};
    int sent = PQsendQueryParams(c->pg, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) && PQpipelineSync(c->pg);
    int notified = sent && PQsendQueryPrepared(c->pg, NOTIFY_STMT, 1, v, NULL, NULL, 0) && PQpipelineSync(c->pg);
    PGresult *r = sent ? read_group(c) : NULL;
    if (notified) {
        PGresult *n = read_group(c);
        if (PQresultStatus(n) != PGRES_TUPLES_OK) c->notify_ready = 0; /* e.g. a DEALLOCATE ALL: prepared again next time */
        PQclear(n);
    }
    if (!PQexitPipelineMode(c->pg)) {
        pup_error ignored;
        if (settle_pipeline(c, &ignored) < 0 && pup_conn_ok(c)) pup_conn_reset(c, &ignored);
    }
    return r;
}

int pup_conn_notify(pup_conn *c, const char *channel, pup_error *err) {
    pup_params q = {0};
    const pup_stmt *nst = pup_params_reset(&q, 1) == 0 ? pup_conn_prepare(c, NOTIFY_SQL, err) : NULL;
    PGresult *n = NULL;
    if (nst) {
        pup_params_text(&q, 0, channel, strlen(channel));
        n = pup_conn_exec(c, nst, &q, 0, err);
    }
    pup_params_free(&q);
    PQclear(n);
    return n ? 0 : -1;
}

PGresult *pup_conn_exec_notify(pup_conn *c, const pup_stmt *st, const pup_params *p, int binary_result,
                               const char *channel, pup_error *err) {
    PGresult *r = pup_conn_exec(c, st, p, binary_result, err);
    if (!r || strcmp(c->owed, channel) == 0) return r;
    if (!c->owed[0] && strlen(channel) < sizeof c->owed) {
        strcpy(c->owed, channel); /* pup_conn_commit sends it */
        return r;
    }
    /* Owed to another channel already (two stores' tables in one transaction): this one
     * notifies inside the transaction, which PostgreSQL delivers at its commit. */
    if (pup_conn_notify(c, channel, err) == 0) return r;
    PQclear(r);
    return NULL;
}

int pup_conn_commit(pup_conn *c, pup_error *err) {
    /* An append in this transaction owes its listeners a wake-up, sent behind the COMMIT. */
    int owed = c->owed[0] && PQtransactionStatus(c->pg) == PQTRANS_INTRANS && !pup_conn_in_pipeline(c);
    /* (behind a transaction pool, NOTIFY_STMT may be on another server connection) */
    int notify = owed && !c->pooled && prepare_notify(c) == 0;
    char channel[sizeof c->owed];
    memcpy(channel, c->owed, sizeof channel);
    PGresult *r = notify ? commit_then_notify(c, c->owed) : PQexec(c->pg, "COMMIT");
    c->owed[0] = '\0';
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        pup_error_from_pg(err, c->pg, r);
        PQclear(r);
        return -1;
    }
    /* An aborted transaction answers COMMIT with ROLLBACK: that is a failure too. */
    int rolled_back = strcmp(PQcmdStatus(r), "ROLLBACK") == 0;
    PQclear(r);
    if (!rolled_back && owed && !notify) {
        pup_error ignored; /* a lost wake-up costs listeners a poll interval */
        pup_conn_notify(c, channel, &ignored);
    }
    if (!rolled_back) return 0;
    if (c->failed && err) *err = c->failure;
    else pup_error_set(err, PUP_ERR_DATABASE, "the transaction was aborted");
    if (err) pup_error_prefix(err, "COMMIT rolled back: ");
    return -1;
}

void pup_conn_settle_notify(pup_conn *c, PGresult *r) {
    if (!c->owed[0] || PQtransactionStatus(c->pg) != PQTRANS_IDLE) return;
    char channel[sizeof c->owed];
    memcpy(channel, c->owed, sizeof channel);
    c->owed[0] = '\0';
    pup_error ignored; /* a lost wake-up costs listeners a poll interval */
    if (r && strcmp(PQcmdStatus(r), "COMMIT") == 0) pup_conn_notify(c, channel, &ignored);
}

int pup_stmt_param_is_bytea(const pup_stmt *st, int i) {
    return i < st->nparams && st->param_types[i] == BYTEAOID;
}
