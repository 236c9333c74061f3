/*
 * lua_db.c -- db and tx objects: exec/query with typed parameters and results,
 * transactions, error objects and the pcall helper. See pup_lua.h.
 */
#include "pup_lua.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define BOOLOID 16
#define BYTEAOID 17
#define INT8OID 20
#define INT2OID 21
#define INT4OID 23
#define OIDOID 26
#define FLOAT4OID 700
#define FLOAT8OID 701

/* A db owns its connection and the reusable parameter arrays. `gen` numbers the
 * transactions begun through it: only the tx of the latest one may use or end it, so a
 * stale tx object (and its __gc) cannot touch a later transaction. `pins` counts users
 * that need the connection to stay (db:transaction, tx:savepoint, a processor): close
 * raises meanwhile. `scopes` counts the savepoints running, which the transaction
 * cannot end under. `runs` counts the processors running a batch on the connection:
 * transaction control through the db is refused meanwhile, as it is on a tx. */
typedef struct ldb {
    pup_conn *conn;
    pup_params params;
    unsigned long long gen;
    int pins;
    int scopes;
    int runs;
} ldb;

enum { TX_OPEN, TX_DONE };

/* Who ends a tx's transaction: the tx itself (db:begin), db:transaction when fn returns,
 * the enclosing transaction (a nested db:transaction: a savepoint of it), or the
 * processor (the handler's tx). */
enum { TX_OWNED, TX_SCOPED, TX_NESTED, TX_MANAGED };

/* A tx borrows its db's connection (the db is its user value, so it stays alive). A
 * managed tx has no db: it borrows the processor's connection. */
typedef struct ltx {
    ldb *db;        /* the owning db (NULL for a managed tx) */
    pup_conn *conn; /* a managed tx's connection */
    pup_params *params;
    unsigned long long gen; /* the db's transaction this tx stands for */
    int state;
    int kind;
} ltx;

/* ---- errors ---- */

void pup_lua_new_error(lua_State *L, const pup_error *err) {
    lua_createtable(L, 0, 3);
    lua_pushstring(L, pup_code_name(err->code));
    lua_setfield(L, -2, "code");
    lua_pushstring(L, err->message);
    lua_setfield(L, -2, "message");
    if (err->sqlstate[0]) {
        lua_pushstring(L, err->sqlstate);
        lua_setfield(L, -2, "sqlstate");
    }
    luaL_setmetatable(L, PUP_ERROR_MT);
}

int pup_lua_push_error(lua_State *L, const pup_error *err) {
    lua_pushnil(L);
    pup_lua_new_error(L, err);
    return 2;
}

static int error_tostring(lua_State *L) {
    lua_getfield(L, 1, "code");
    lua_getfield(L, 1, "message");
    lua_getfield(L, 1, "sqlstate");
    if (lua_isstring(L, -1))
        lua_pushfstring(L, "%s: %s (SQLSTATE %s)", lua_tostring(L, -3), lua_tostring(L, -2),
                        lua_tostring(L, -1));
    else
        lua_pushfstring(L, "%s: %s", lua_tostring(L, -3), lua_tostring(L, -2));
    return 1;
}

/* ---- pcall helper ---- */

/* Message handler of pup_lua_pcall: returns {text = message and traceback, code =,
 * sqlstate =}, keeping the code and SQLSTATE of a raised error object (so a deadlock
 * raised through assert() is still retried). */
static int traceback(lua_State *L) {
    int t = lua_type(L, 1);
    if (t == LUA_TSTRING || t == LUA_TNUMBER)
        lua_pushvalue(L, 1);
    else if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) {
    } else if (t == LUA_TTABLE) {
        lua_getfield(L, LUA_REGISTRYINDEX, "pupsourcing.json_encode");
        lua_pushvalue(L, 1);
        if (lua_pcall(L, 1, 1, 0) == LUA_OK)
            lua_pushfstring(L, "(error object is a table: %s)", lua_tostring(L, -1));
        else
            lua_pushliteral(L, "(error object is a table)");
    } else
        lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    luaL_traceback(L, L, lua_tostring(L, -1), 1);
    lua_createtable(L, 0, 3);
    lua_insert(L, -2);
    lua_setfield(L, -2, "text");
    if (t == LUA_TTABLE && luaL_getmetafield(L, 1, "__name") != LUA_TNIL) {
        int ours = strcmp(lua_tostring(L, -1), PUP_ERROR_MT) == 0;
        lua_pop(L, 1);
        if (ours) {
            lua_getfield(L, 1, "code");
            lua_setfield(L, -2, "code");
            lua_getfield(L, 1, "sqlstate");
            lua_setfield(L, -2, "sqlstate");
        }
    }
    return 1;
}

int pup_lua_pcall(lua_State *L, int nargs, int nresults, pup_error *err) {
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    int rc = lua_pcall(L, nargs, nresults, base);
    lua_remove(L, base);
    if (rc != LUA_OK) {
        if (lua_type(L, -1) == LUA_TTABLE) {
            lua_getfield(L, -1, "text");
            pup_error_set(err, PUP_ERR_HANDLER, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
            lua_getfield(L, -2, "sqlstate");
            if (err && lua_isstring(L, -1)) snprintf(err->sqlstate, sizeof err->sqlstate, "%s", lua_tostring(L, -1));
            lua_getfield(L, -3, "code");
            if (err && lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "connection") == 0)
                err->code = PUP_ERR_CONNECTION;
            lua_pop(L, 3);
        } else /* an error inside the handler itself (out of memory) */
            pup_error_set(err, PUP_ERR_HANDLER, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
        lua_pop(L, 1);
    }
    return rc;
}

/* ---- JSON through pup.json (lua_json.c) ---- */

/* JSON encode of the value at idx through pup.json (raises on failure); the text replaces
 * the value in its slot, which keeps it alive. */
static const char *json_encode(lua_State *L, int idx, size_t *len) {
    idx = lua_absindex(L, idx);
    lua_getfield(L, LUA_REGISTRYINDEX, "pupsourcing.json_encode");
    lua_pushvalue(L, idx);
    lua_call(L, 1, 1);
    lua_replace(L, idx); /* the string stays anchored in the argument slot */
    return lua_tolstring(L, idx, len);
}

/* ---- results ---- */

static int result_gc(lua_State *L) {
    pup_lua_result_clear((PGresult **)lua_touserdata(L, 1));
    return 0;
}

PGresult **pup_lua_result_box(lua_State *L) {
    PGresult **box = lua_newuserdatauv(L, sizeof *box, 0);
    *box = NULL;
    luaL_setmetatable(L, PUP_RESULT_MT);
    return box;
}

void pup_lua_result_clear(PGresult **box) {
    if (*box) PQclear(*box);
    *box = NULL;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return 0;
}

/* Decodes a text-format bytea ("\x..." hex) into a Lua string. */
static void push_bytea(lua_State *L, const char *s, size_t len) {
    luaL_Buffer b;
    if (len >= 2 && s[0] == '\\' && s[1] == 'x') {
        char *out = luaL_buffinitsize(L, &b, (len - 2) / 2);
        for (size_t i = 2; i + 1 < len; i += 2) *out++ = (char)(hexval(s[i]) << 4 | hexval(s[i + 1]));
        luaL_pushresultsize(&b, (len - 2) / 2);
    } else
        lua_pushlstring(L, s, len); /* escape format is not used: the connection sets hex */
}

static void push_value(lua_State *L, const PGresult *r, int row, int col) {
    if (PQgetisnull(r, row, col)) {
        lua_pushlightuserdata(L, NULL);
        return;
    }
    const char *v = PQgetvalue(r, row, col);
    size_t len = (size_t)PQgetlength(r, row, col);
    switch (PQftype(r, col)) {
    case INT2OID: case INT4OID: case INT8OID: case OIDOID:
        lua_pushinteger(L, (lua_Integer)strtoll(v, NULL, 10));
        break;
    case FLOAT4OID: case FLOAT8OID:
        if (strcmp(v, "NaN") == 0) lua_pushnumber(L, NAN);
        else if (strcmp(v, "Infinity") == 0) lua_pushnumber(L, HUGE_VAL);
        else if (strcmp(v, "-Infinity") == 0) lua_pushnumber(L, -HUGE_VAL);
        else lua_pushnumber(L, strtod(v, NULL));
        break;
    case BOOLOID:
        lua_pushboolean(L, v[0] == 't');
        break;
    case BYTEAOID:
        push_bytea(L, v, len);
        break;
    default:
        lua_pushlstring(L, v, len);
    }
}

/* Pushes the rows of r as an array of tables keyed by column name. */
static void push_rows(lua_State *L, const PGresult *r) {
    int nrows = PQntuples(r), ncols = PQnfields(r);
    lua_createtable(L, nrows, 0);
    for (int i = 0; i < nrows; i++) {
        lua_createtable(L, 0, ncols);
        for (int j = 0; j < ncols; j++) {
            push_value(L, r, i, j);
            lua_setfield(L, -2, PQfname(r, j));
        }
        lua_rawseti(L, -2, i + 1);
    }
}

/* ---- db / tx access ---- */

/* A tx reaches its connection through its db, so db:close() cannot leave it dangling;
 * a tx whose transaction is not the db's latest reaches nothing. */
static pup_conn *tx_conn(const ltx *t) {
    if (t->state != TX_OPEN) return NULL;
    if (!t->db) return t->conn;
    return t->gen == t->db->gen ? t->db->conn : NULL;
}

static ldb *todb(lua_State *L, int idx) { return luaL_testudata(L, idx, PUP_DB_MT); }
static ltx *totx(lua_State *L, int idx) { return luaL_testudata(L, idx, PUP_TX_MT); }

pup_conn *pup_lua_checkconn(lua_State *L, int idx) {
    ldb *d = todb(L, idx);
    if (d) {
        if (!d->conn) luaL_argerror(L, idx, "database connection is closed");
        return d->conn;
    }
    ltx *t = totx(L, idx);
    if (t) {
        pup_conn *c = tx_conn(t);
        if (!c) luaL_argerror(L, idx, "transaction is closed");
        return c;
    }
    luaL_typeerror(L, idx, "pupsourcing db or tx");
    return NULL;
}

/* The db behind a db or tx argument (NULL for a managed tx or another value). */
static ldb *db_behind(lua_State *L, int idx) {
    ldb *d = todb(L, idx);
    if (d) return d;
    ltx *t = totx(L, idx);
    return t ? t->db : NULL;
}

void pup_lua_db_pin(lua_State *L, int idx) {
    ldb *d = db_behind(L, idx);
    if (d) {
        d->pins++;
        d->runs++;
    }
}

void pup_lua_db_unpin(lua_State *L, int idx) {
    ldb *d = db_behind(L, idx);
    if (d && d->pins > 0) d->pins--;
    if (d && d->runs > 0) d->runs--;
}

/* True while a transaction is open on c (or, in pipeline mode, a batch runs). */
static int in_transaction(pup_conn *c) {
    PGTransactionStatusType st = PQtransactionStatus(pup_conn_pg(c));
    return st == PQTRANS_INTRANS || st == PQTRANS_INERROR || st == PQTRANS_ACTIVE;
}

pup_params *pup_lua_params(lua_State *L, int idx) {
    ldb *d = todb(L, idx);
    if (d) return &d->params;
    ltx *t = totx(L, idx);
    return t ? t->params : NULL;
}

/* Binds Lua values idx..idx+n-1 as the statement's parameters (see docs/lua-api.md). */
static void bind_params(lua_State *L, int first, int n, const pup_stmt *st, pup_params *p) {
    if (n != st->nparams)
        luaL_error(L, "query takes %d parameter(s), %d given", st->nparams, n);
    if (pup_params_reset(p, n) < 0) luaL_error(L, "out of memory");
    for (int i = 0; i < n; i++) {
        int idx = first + i;
        size_t len;
        const char *s;
        switch (lua_type(L, idx)) {
        case LUA_TNIL:
            break;
        case LUA_TLIGHTUSERDATA:
            if (lua_touserdata(L, idx) != NULL) luaL_argerror(L, idx, "unsupported parameter");
            break;
        case LUA_TBOOLEAN:
            pup_params_text(p, i, lua_toboolean(L, idx) ? "true" : "false", lua_toboolean(L, idx) ? 4 : 5);
            break;
        case LUA_TNUMBER:
            if (lua_isinteger(L, idx)) pup_params_int(p, i, (long long)lua_tointeger(L, idx));
            else {
                double d = lua_tonumber(L, idx);
                if (isnan(d)) pup_params_text(p, i, "NaN", 3);
                else if (isinf(d)) pup_params_text(p, i, d > 0 ? "Infinity" : "-Infinity", d > 0 ? 8 : 9);
                else pup_params_double(p, i, d);
            }
            break;
        case LUA_TSTRING:
            s = lua_tolstring(L, idx, &len);
            if (pup_stmt_param_is_bytea(st, i)) pup_params_binary(p, i, s, len);
            else if (memchr(s, '\0', len))
                luaL_error(L, "parameter $%d contains a NUL byte (only bytea parameters can)", i + 1);
            else pup_params_text(p, i, s, len);
            break;
        case LUA_TTABLE:
            s = json_encode(L, idx, &len);
            pup_params_text(p, i, s, len);
            break;
        default:
            luaL_argerror(L, idx, lua_pushfstring(L, "cannot bind a %s as a parameter", luaL_typename(L, idx)));
        }
    }
}

/* ---- transaction control on a tx ---- */

static int word_char(int ch) { return ch == '_' || ch == '$' || isalnum(ch) || ch >= 0x80; }

static int word_is(const char *w, size_t n, const char *kw) {
    return strlen(kw) == n && strncasecmp(w, kw, n) == 0;
}

/* Skips whitespace and comments (-- to the end of the line; slash-star, nested). */
static const char *skip_blank(const char *s) {
    for (;;) {
        while (isspace((unsigned char)*s)) s++;
        if (s[0] == '-' && s[1] == '-') {
            while (*s && *s != '\n') s++;
        } else if (s[0] == '/' && s[1] == '*') {
            int depth = 1;
            for (s += 2; *s && depth > 0; s++) {
                if (s[0] == '/' && s[1] == '*') depth++, s++;
                else if (s[0] == '*' && s[1] == '/') depth--, s++;
            }
        } else
            return s;
    }
}

/* Skips a quoted string or identifier starting at s (doubled quotes; backslash escapes
 * in E'' strings). */
static const char *skip_quoted(const char *s, int backslash) {
    char q = *s++;
    for (; *s; s++) {
        if (backslash && *s == '\\' && s[1]) s++;
        else if (*s == q && s[1] == q) s++;
        else if (*s == q) return s + 1;
    }
    return s;
}

/* Skips a dollar-quoted body ($tag$ ... $tag$); a $ that opens none ($1) alone. */
static const char *skip_dollar(const char *s) {
    const char *t = s + 1;
    if (isdigit((unsigned char)*t)) return t;
    while (*t != '$' && word_char((unsigned char)*t)) t++;
    if (*t != '$') return s + 1;
    size_t taglen = (size_t)(t - s) + 1;
    for (const char *p = t + 1; (p = strchr(p, '$')) != NULL; p++)
        if (strncmp(p, s, taglen) == 0) return p + taglen;
    return s + strlen(s);
}

/* The transaction control statement in sql ("ROLLBACK", "START TRANSACTION", ...) or
 * NULL: the first words of every statement, past comments and quoted text. The body of
 * a CREATE FUNCTION ... BEGIN ATOMIC ... END holds no statement starts. */
static const char *tx_control(const char *sql) {
    static const char *const words[] = {"BEGIN", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"};
    int start = 1, create = 0, depth = 0;
    for (const char *s = skip_blank(sql); *s; s = skip_blank(s)) {
        unsigned char ch = (unsigned char)*s;
        if (ch == ';') {
            if (depth == 0) start = 1, create = 0;
            s++;
            continue;
        }
        if (ch == '\'' || ch == '"' || ch == '$' || !word_char(ch) || isdigit(ch)) {
            s = ch == '\'' || ch == '"' ? skip_quoted(s, 0) : ch == '$' ? skip_dollar(s) : s + 1;
            start = 0;
            continue;
        }
        const char *w = s;
        while (word_char((unsigned char)*s)) s++;
        size_t n = (size_t)(s - w);
        if (n == 1 && (*w == 'e' || *w == 'E') && *s == '\'') {
            s = skip_quoted(s, 1);
            start = 0;
        } else if (start) {
            start = 0;
            for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
                if (word_is(w, n, words[i])) return words[i];
            if (word_is(w, n, "START") || word_is(w, n, "PREPARE")) {
                const char *t = skip_blank(s), *u = t;
                while (word_char((unsigned char)*u)) u++;
                if (word_is(t, (size_t)(u - t), "TRANSACTION"))
                    return toupper((unsigned char)*w) == 'S' ? "START TRANSACTION" : "PREPARE TRANSACTION";
            }
            create = word_is(w, n, "CREATE");
        } else if (create) {
            if (word_is(w, n, "BEGIN")) depth++;
            else if (depth > 0 && word_is(w, n, "CASE")) depth++;
            else if (depth > 0 && word_is(w, n, "END")) depth--;
        }
    }
    return NULL;
}

/* Shared body of exec and query on a db or tx: args are (self, sql, ...). A statement
 * without parameters goes through the simple protocol, so setup scripts may hold
 * several commands. */
static int run_sql(lua_State *L, int want_rows) {
    pup_conn *c = pup_lua_checkconn(L, 1);
    const char *sql = luaL_checkstring(L, 2);
    int n = lua_gettop(L) - 2;
    ltx *t = totx(L, 1);
    ldb *d = t ? NULL : todb(L, 1);
    /* Transaction control takes no parameters (and with parameters one statement only):
     * the scan is skipped for the handlers' usual parameterized writes. */
    const char *control = n == 0 && (t || (d && d->runs > 0)) ? tx_control(sql) : NULL;
    if (control && t)
        return luaL_error(L, "tx:%s: %s is not allowed on a tx: its transaction ends with tx:commit() or "
                          "tx:rollback(), when db:transaction's function returns, or with the processor's "
                          "batch; to undo part of it use tx:savepoint(fn)", want_rows ? "query" : "exec", control);
    if (control)
        return luaL_error(L, "db:%s: %s is not allowed while a processor runs a batch on this connection: the "
                          "batch's transaction ends with the batch; to undo part of it use tx:savepoint(fn)",
                          want_rows ? "query" : "exec", control);
    pup_error err;
    PGresult **box = pup_lua_result_box(L); /* at top; params stay below it */
    if (n == 0) {
        if (pup_conn_in_pipeline(c)) {
            /* Pipeline mode takes one statement a message: use the extended path. */
            const pup_stmt *st = pup_conn_prepare(c, sql, &err);
            if (!st) return pup_lua_push_error(L, &err);
            *box = pup_conn_exec(c, st, NULL, 0, &err);
        } else {
            *box = PQexec(pup_conn_pg(c), sql);
            pup_conn_settle_notify(c, *box); /* a COMMIT here sends an append's wake-up */
            ExecStatusType s = PQresultStatus(*box);
            if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
                pup_error_from_pg(&err, pup_conn_pg(c), *box);
                pup_conn_note_failure(c, &err);
                pup_lua_result_clear(box);
            }
        }
    } else {
        const pup_stmt *st = pup_conn_prepare(c, sql, &err);
        if (!st) return pup_lua_push_error(L, &err);
        bind_params(L, 3, n, st, pup_lua_params(L, 1));
        if (!want_rows && t && t->kind == TX_MANAGED && pup_conn_in_pipeline(c)) {
            /* Pipelined handler write: its error surfaces at the end of the batch. */
            if (pup_conn_send(c, st, pup_lua_params(L, 1), &err) < 0) return pup_lua_push_error(L, &err);
            lua_pushboolean(L, 1);
            return 1;
        }
        *box = pup_conn_exec(c, st, pup_lua_params(L, 1), 0, &err);
    }
    if (!*box) return pup_lua_push_error(L, &err);
    if (want_rows) push_rows(L, *box);
    else {
        const char *ct = PQcmdTuples(*box);
        lua_pushinteger(L, *ct ? (lua_Integer)strtoll(ct, NULL, 10) : 0);
    }
    pup_lua_result_clear(box);
    return 1;
}

static int l_exec(lua_State *L) { return run_sql(L, 0); }
static int l_query(lua_State *L) { return run_sql(L, 1); }

/* ---- db ---- */

static int l_connect(lua_State *L) {
    const char *url = luaL_optstring(L, 1, NULL);
    ldb *d = lua_newuserdatauv(L, sizeof *d, 0); /* closed until the connection exists */
    memset(d, 0, sizeof *d);
    luaL_setmetatable(L, PUP_DB_MT);
    pup_error err;
    d->conn = pup_conn_open(url, &err);
    if (!d->conn) return pup_lua_push_error(L, &err);
    return 1;
}

static ldb *checkdb(lua_State *L) {
    ldb *d = luaL_checkudata(L, 1, PUP_DB_MT);
    if (!d->conn) luaL_argerror(L, 1, "database connection is closed");
    return d;
}

static void db_free(ldb *d) {
    pup_conn_close(d->conn);
    d->conn = NULL;
    pup_params_free(&d->params);
}

/* db:close() and __close: refused while the connection is in use. */
static int db_close(lua_State *L) {
    ldb *d = luaL_checkudata(L, 1, PUP_DB_MT);
    if (d->pins > 0)
        return luaL_error(L, "db:close: the connection is in use (inside db:transaction, tx:savepoint or "
                          "a processor's batch): close it after that returns");
    db_free(d);
    return 0;
}

/* __gc: nothing can be using a db that is collected. */
static int db_gc(lua_State *L) {
    db_free(luaL_checkudata(L, 1, PUP_DB_MT));
    return 0;
}

static int db_tostring(lua_State *L) {
    ldb *d = luaL_checkudata(L, 1, PUP_DB_MT);
    lua_pushfstring(L, "pupsourcing.db (%s)", d->conn ? "open" : "closed");
    return 1;
}

/* Pushes a closed tx of the db at dbidx (0: managed); the caller opens it. */
static ltx *push_tx(lua_State *L, ldb *d, int dbidx, pup_conn *c, pup_params *params, int kind) {
    ltx *t = lua_newuserdatauv(L, sizeof *t, 1);
    memset(t, 0, sizeof *t);
    t->db = d;
    t->conn = d ? NULL : c;
    t->params = params;
    t->state = TX_DONE;
    t->kind = kind;
    luaL_setmetatable(L, PUP_TX_MT);
    if (dbidx) {
        lua_pushvalue(L, dbidx);
        lua_setiuservalue(L, -2, 1);
    }
    return t;
}

/* BEGINs a transaction on d for the tx t (pushed already). */
static int begin_tx(ldb *d, ltx *t, pup_error *err) {
    if (pup_conn_command(d->conn, "BEGIN", err) < 0) return -1;
    pup_conn_clear_failure(d->conn);
    t->gen = ++d->gen; /* every earlier tx of d is stale from now on */
    t->state = TX_OPEN;
    return 0;
}

static int db_begin(lua_State *L) {
    ldb *d = checkdb(L);
    if (in_transaction(d->conn))
        return luaL_error(L, "db:begin: a transaction is already open on this connection (nest one with "
                          "db:transaction(fn) or tx:savepoint(fn))");
    ltx *t = push_tx(L, d, 1, NULL, &d->params, TX_OWNED);
    pup_error err;
    if (begin_tx(d, t, &err) < 0) return pup_lua_push_error(L, &err);
    return 1;
}

void pup_lua_push_managed_tx(lua_State *L, pup_conn *conn, pup_params *params) {
    push_tx(L, NULL, 0, conn, params, TX_MANAGED)->state = TX_OPEN;
}

void pup_lua_tx_detach(lua_State *L, int idx) {
    ltx *t = luaL_checkudata(L, idx, PUP_TX_MT);
    t->state = TX_DONE;
    t->conn = NULL;
}

/* ---- savepoints ---- */

/* One name for all: savepoints nest strictly (each ends before its caller goes on), and
 * PostgreSQL's RELEASE and ROLLBACK TO address the innermost of a name. */
#define SAVEPOINT "pup_savepoint"

/* Runs a savepoint command, or queues it in pipeline mode. */
static int sp_command(pup_conn *c, const char *sql, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, sql, err);
    return st && pup_conn_send(c, st, NULL, err) == 0 ? 0 : -1;
}

/* The failure of the open transaction, if a statement failed: the one recorded (first)
 * or, outside pipeline mode, what libpq's transaction status shows. Only call with the
 * pipeline synced. */
static const pup_error *tx_failure(pup_conn *c, pup_error *buf) {
    if (pup_conn_in_pipeline(c)) return pup_conn_failure(c, NULL);
    if (PQtransactionStatus(pup_conn_pg(c)) != PQTRANS_INERROR) return NULL;
    const pup_error *f = pup_conn_failure(c, NULL);
    if (f) return f;
    pup_error_set(buf, PUP_ERR_DATABASE, "the transaction is aborted (a statement failed)");
    return buf;
}

/* Opens a savepoint. Pipelined statements sent before it are settled first: a failure
 * among them is not the savepoint's to undo, so it stays recorded and is returned. */
static int sp_open(pup_conn *c, pup_error *err) {
    if (pup_conn_pipeline_sync(c, err) < 0) return -1;
    pup_error buf;
    const pup_error *f = tx_failure(c, &buf);
    if (f) {
        *err = *f;
        pup_error_prefix(err, "savepoint: the transaction had failed before it: ");
        return -1;
    }
    pup_conn_clear_failure(c); /* nothing failed in this transaction: a stale record */
    return sp_command(c, "SAVEPOINT " SAVEPOINT, err);
}

/* Ends the savepoint sp_open made. Released when ok and no statement inside failed:
 * returns 1. Else rolled back to, and the failure from inside (in *err, *stmt_failed
 * set) is forgotten, since it was undone: returns 0. Returns -1 with err set when the
 * rollback failed too (the failure stays recorded: the transaction fails). */
static int sp_close(pup_conn *c, int ok, pup_error *err, int *stmt_failed) {
    pup_error buf;
    const pup_error *f;
    *stmt_failed = 0;
    if (ok) {
        int sent = sp_command(c, "RELEASE SAVEPOINT " SAVEPOINT, err) == 0;
        if (pup_conn_pipeline_sync(c, err) < 0) return -1;
        if (sent && !tx_failure(c, &buf)) return 1;
    } else if (pup_conn_pipeline_sync(c, err) < 0)
        return -1;
    if ((f = tx_failure(c, &buf)) != NULL) {
        *err = *f;
        *stmt_failed = 1;
    }
    pup_conn_clear_failure(c);
    pup_error e2;
    if (sp_command(c, "ROLLBACK TO SAVEPOINT " SAVEPOINT, &e2) < 0 ||
        sp_command(c, "RELEASE SAVEPOINT " SAVEPOINT, &e2) < 0 || pup_conn_pipeline_sync(c, &e2) < 0 ||
        (f = tx_failure(c, &buf)) != NULL) {
        *err = f ? *f : e2;
        return -1;
    }
    return 0;
}

/* ---- transactions as functions: db:transaction(fn), tx:savepoint(fn) ---- */

/* What a scope runs: a transaction, a nested db:transaction (a savepoint with a tx of its
 * own) or tx:savepoint (on the caller's tx). */
enum { SCOPE_TRANSACTION, SCOPE_NESTED, SCOPE_SAVEPOINT };

/* Message handler of fn: a traceback for a message; an error value intact (as
 * debug.traceback does). */
static int scope_msgh(lua_State *L) {
    if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER)
        luaL_traceback(L, L, lua_tostring(L, 1), 1);
    else
        lua_settop(L, 1);
    return 1;
}

static int is_error_object(lua_State *L, int idx) {
    if (!lua_getmetatable(L, idx)) return 0;
    luaL_getmetatable(L, PUP_ERROR_MT);
    int ours = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return ours;
}

/* Returns nil and the error value at 5 (fn's own, or an error object of code "error"
 * for anything else it raised). */
static int scope_error(lua_State *L, int raised) {
    lua_settop(L, 5);
    if (raised && !is_error_object(L, 5)) {
        const char *msg = luaL_tolstring(L, 5, NULL);
        lua_createtable(L, 0, 2);
        lua_pushliteral(L, "error");
        lua_setfield(L, -2, "code");
        lua_pushstring(L, msg);
        lua_setfield(L, -2, "message");
        luaL_setmetatable(L, PUP_ERROR_MT);
    }
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
}

/* After fn (at 2) ran with the tx at 3: its results or error value from 5 on. Ends the
 * transaction or savepoint and returns fn's results (true when none) or nil, err. */
static int scope_done(lua_State *L, int status, lua_KContext kind) {
    ltx *t = lua_touserdata(L, 3);
    if (t->db) {
        t->db->pins--;
        if (kind != SCOPE_TRANSACTION) t->db->scopes--;
    }
    int raised = status != LUA_OK && status != LUA_YIELD;
    int nres = lua_gettop(L) - 4, ok = !raised;
    if (ok && nres >= 2 && lua_isnil(L, 5)) { /* fn returned nil, err */
        ok = 0;
        lua_remove(L, 5);
    }
    pup_conn *c = tx_conn(t);
    if (kind != SCOPE_SAVEPOINT) t->state = TX_DONE; /* the scope's own tx */
    pup_error err;
    if (!c || (kind == SCOPE_TRANSACTION && ok && !in_transaction(c))) {
        pup_error_set(&err, PUP_ERR_DATABASE,
                      "%s: the transaction was ended inside fn by a statement sent another way: "
                      "what it committed is unknown", kind == SCOPE_TRANSACTION ? "db:transaction" : "savepoint");
        return pup_lua_push_error(L, &err);
    }
    if (kind == SCOPE_TRANSACTION) {
        if (!ok && !in_transaction(c)) return scope_error(L, raised); /* nothing left to roll back */
        if (!ok) {
            pup_conn_rollback(c);
            return scope_error(L, raised);
        }
        if (pup_conn_commit(c, &err) < 0) return pup_lua_push_error(L, &err);
    } else {
        int stmt_failed, r = sp_close(c, ok, &err, &stmt_failed);
        if (r < 0 || (r == 0 && stmt_failed)) return pup_lua_push_error(L, &err);
        if (r == 0) return scope_error(L, raised);
    }
    if (nres == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return nres;
}

/* Calls fn (at 2) with the tx at 3 in one protected call (yieldable), with the db in
 * use meanwhile. */
static int scope_run(lua_State *L, int kind) {
    ltx *t = lua_touserdata(L, 3);
    lua_settop(L, 3);
    if (t->db) {
        t->db->pins++;
        if (kind != SCOPE_TRANSACTION) t->db->scopes++;
    }
    lua_pushcfunction(L, scope_msgh);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    return scope_done(L, lua_pcallk(L, 1, LUA_MULTRET, 4, kind, scope_done), kind);
}

/* db:transaction(fn): fn(tx) in a transaction that commits when fn returns and rolls
 * back when it raises or returns nil, err. Inside an open transaction, fn runs in a
 * savepoint of it instead (rolled back to on failure; the enclosing one goes on). */
static int db_transaction(lua_State *L) {
    ldb *d = checkdb(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    pup_error err;
    if (in_transaction(d->conn)) {
        ltx *t = push_tx(L, d, 1, NULL, &d->params, TX_NESTED);
        if (sp_open(d->conn, &err) < 0) return pup_lua_push_error(L, &err);
        t->gen = d->gen;
        t->state = TX_OPEN;
        return scope_run(L, SCOPE_NESTED);
    }
    ltx *t = push_tx(L, d, 1, NULL, &d->params, TX_SCOPED);
    if (begin_tx(d, t, &err) < 0) return pup_lua_push_error(L, &err);
    return scope_run(L, SCOPE_TRANSACTION);
}

/* ---- tx ---- */

static ltx *checktx(lua_State *L, pup_conn **c) {
    ltx *t = luaL_checkudata(L, 1, PUP_TX_MT);
    *c = tx_conn(t);
    if (!*c) luaL_argerror(L, 1, "transaction is closed");
    return t;
}

/* tx:savepoint(fn): fn(tx) in a savepoint; see db_transaction and docs/lua-api.md. */
static int tx_savepoint(lua_State *L) {
    pup_conn *c;
    checktx(L, &c);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    lua_pushvalue(L, 1);
    pup_error err;
    if (sp_open(c, &err) < 0) return pup_lua_push_error(L, &err);
    return scope_run(L, SCOPE_SAVEPOINT);
}

/* Ends a db:begin transaction; returns true, or nil, err (the statement that failed
 * first when a commit turned into a rollback). */
static int tx_finish(lua_State *L, int commit) {
    pup_conn *c;
    ltx *t = checktx(L, &c);
    const char *what = commit ? "commit" : "roll back";
    if (t->kind == TX_MANAGED)
        return luaL_error(L, "the processor commits this transaction; a handler cannot %s it", what);
    if (t->kind != TX_OWNED)
        return luaL_error(L, "%s ends when its function returns (return nil, err or raise to roll it back); "
                          "fn cannot %s it", t->kind == TX_SCOPED ? "db:transaction" : "a nested db:transaction", what);
    if (t->db->scopes > 0)
        return luaL_error(L, "cannot %s the transaction while a savepoint of it runs (tx:savepoint or a nested "
                          "db:transaction)", what);
    pup_error err;
    t->state = TX_DONE;
    if (!in_transaction(c)) {
        if (!commit) {
            lua_pushboolean(L, 1);
            return 1;
        }
        pup_error_set(&err, PUP_ERR_DATABASE, "tx:commit: the transaction was already ended by a statement sent "
                      "another way (e.g. db:exec(\"COMMIT\"))");
        return pup_lua_push_error(L, &err);
    }
    if (commit) {
        if (pup_conn_commit(c, &err) < 0) return pup_lua_push_error(L, &err);
    } else if (pup_conn_command(c, "ROLLBACK", &err) < 0)
        return pup_lua_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int tx_commit(lua_State *L) { return tx_finish(L, 1); }
static int tx_rollback(lua_State *L) { return tx_finish(L, 0); }

/* __close/__gc: the open transaction of a db:begin tx rolls back; the other kinds are
 * ended by their owner. */
static int tx_close(lua_State *L) {
    ltx *t = luaL_checkudata(L, 1, PUP_TX_MT);
    pup_conn *c = tx_conn(t);
    if (!c || t->kind != TX_OWNED) return 0;
    if (t->db->scopes > 0)
        return luaL_error(L, "cannot close the transaction while a savepoint of it runs");
    t->state = TX_DONE;
    pup_conn_rollback(c);
    return 0;
}

static int tx_tostring(lua_State *L) {
    ltx *t = luaL_checkudata(L, 1, PUP_TX_MT);
    lua_pushfstring(L, "pupsourcing.tx (%s)", tx_conn(t) ? "open" : "closed");
    return 1;
}

void pup_lua_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   lua_CFunction close, lua_CFunction tostring) {
    luaL_newmetatable(L, name);
    lua_newtable(L);
    if (methods) luaL_setfuncs(L, methods, 0);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "__index");
    if (close) {
        lua_pushcfunction(L, close);
        lua_setfield(L, -3, "__gc");
        lua_pushcfunction(L, close);
        lua_setfield(L, -3, "__close");
    }
    if (tostring) {
        lua_pushcfunction(L, tostring);
        lua_setfield(L, -3, "__tostring");
    }
    lua_remove(L, -2);
}

void pup_lua_open_db(lua_State *L) {
    static const luaL_Reg db_methods[] = {
        {"exec", l_exec}, {"query", l_query}, {"begin", db_begin}, {"transaction", db_transaction},
        {"close", db_close}, {NULL, NULL}};
    static const luaL_Reg tx_methods[] = {
        {"exec", l_exec}, {"query", l_query}, {"savepoint", tx_savepoint}, {"commit", tx_commit},
        {"rollback", tx_rollback}, {NULL, NULL}};

    pup_lua_class(L, PUP_DB_MT, db_methods, db_close, db_tostring);
    lua_pop(L, 1);
    luaL_getmetatable(L, PUP_DB_MT);
    lua_pushcfunction(L, db_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    pup_lua_class(L, PUP_TX_MT, tx_methods, tx_close, tx_tostring);
    lua_pop(L, 1);

    luaL_newmetatable(L, PUP_ERROR_MT);
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, PUP_ERROR_MT);
    lua_setfield(L, -2, "__name");
    lua_setfield(L, -2, "error_mt"); /* pup.error_mt: the metatable of every error object */

    pup_lua_class(L, PUP_RESULT_MT, NULL, result_gc, NULL);
    lua_pop(L, 1);

    lua_pushcfunction(L, l_connect);
    lua_setfield(L, -2, "connect");
    lua_pushlightuserdata(L, NULL); /* same value as cjson.null */
    lua_setfield(L, -2, "null");
}
