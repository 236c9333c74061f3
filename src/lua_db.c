/*
 * lua_db.c -- db and tx objects: exec/query with typed parameters and results,
 * transactions, error objects and the pcall helper. See pup_lua.h.
 */
#include "pup_lua.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BOOLOID 16
#define BYTEAOID 17
#define INT8OID 20
#define INT2OID 21
#define INT4OID 23
#define OIDOID 26
#define FLOAT4OID 700
#define FLOAT8OID 701

/* A db owns its connection and the reusable parameter arrays. */
typedef struct ldb {
    pup_conn *conn;
    pup_params params;
    int pins; /* running processors using the connection: close() raises */
} ldb;

enum { TX_OPEN, TX_DONE };

/* A tx borrows its db's connection (the db is its user value, so it stays alive). A
 * managed tx is the processor's: the batch commits, the handler may not. */
typedef struct ltx {
    ldb *db;        /* the owning db (NULL for a managed tx) */
    pup_conn *conn; /* a managed tx's connection */
    pup_params *params;
    int state;
    int managed;
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
        int ours = strcmp(lua_tostring(L, -1), "pupsourcing.error") == 0;
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

/* ---- JSON through lua-cjson ---- */

const char *pup_lua_json_encode(lua_State *L, int idx, size_t *len) {
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

/* A tx reaches its connection through its db, so db:close() cannot leave it dangling. */
static pup_conn *tx_conn(const ltx *t) {
    if (t->state != TX_OPEN) return NULL;
    return t->db ? t->db->conn : t->conn;
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
            s = pup_lua_json_encode(L, idx, &len);
            pup_params_text(p, i, s, len);
            break;
        default:
            luaL_argerror(L, idx, lua_pushfstring(L, "cannot bind a %s as a parameter", luaL_typename(L, idx)));
        }
    }
}

/* Shared body of exec and query on a db or tx: args are (self, sql, ...). A statement
 * without parameters goes through the simple protocol, so setup scripts may hold
 * several commands. */
static int run_sql(lua_State *L, int want_rows) {
    pup_conn *c = pup_lua_checkconn(L, 1);
    const char *sql = luaL_checkstring(L, 2);
    int n = lua_gettop(L) - 2;
    ltx *t = totx(L, 1);
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
            ExecStatusType s = PQresultStatus(*box);
            if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
                pup_error_from_pg(&err, pup_conn_pg(c), *box);
                pup_lua_result_clear(box);
            }
        }
    } else {
        const pup_stmt *st = pup_conn_prepare(c, sql, &err);
        if (!st) return pup_lua_push_error(L, &err);
        bind_params(L, 3, n, st, pup_lua_params(L, 1));
        if (!want_rows && t && t->managed && pup_conn_in_pipeline(c)) {
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

static int db_close(lua_State *L) {
    ldb *d = luaL_checkudata(L, 1, PUP_DB_MT);
    if (d->pins) luaL_error(L, "database connection is in use by a running processor");
    pup_conn_close(d->conn);
    d->conn = NULL;
    pup_params_free(&d->params);
    return 0;
}

static int db_tostring(lua_State *L) {
    ldb *d = luaL_checkudata(L, 1, PUP_DB_MT);
    lua_pushfstring(L, "pupsourcing.db (%s)", d->conn ? "open" : "closed");
    return 1;
}

static void push_tx(lua_State *L, ldb *d, int dbidx, pup_conn *c, pup_params *params,
                    int managed) {
    ltx *t = lua_newuserdatauv(L, sizeof *t, 1);
    t->db = d;
    t->conn = d ? NULL : c;
    t->params = params;
    t->state = TX_OPEN;
    t->managed = managed;
    luaL_setmetatable(L, PUP_TX_MT);
    if (dbidx) {
        lua_pushvalue(L, dbidx);
        lua_setiuservalue(L, -2, 1);
    }
}

static int db_begin(lua_State *L) {
    ldb *d = checkdb(L);
    pup_error err;
    if (pup_conn_command(d->conn, "BEGIN", &err) < 0) return pup_lua_push_error(L, &err);
    pup_conn_clear_failure(d->conn);
    push_tx(L, d, 1, NULL, &d->params, 0);
    return 1;
}

/* The db behind a db or (unmanaged) tx argument, or NULL. */
static ldb *owner_db(lua_State *L, int idx) {
    ldb *d = todb(L, idx);
    if (!d) {
        ltx *t = totx(L, idx);
        if (t) d = t->db;
    }
    return d;
}

void pup_lua_db_pin(lua_State *L, int idx) {
    ldb *d = owner_db(L, idx);
    if (d) d->pins++;
}

void pup_lua_db_unpin(lua_State *L, int idx) {
    ldb *d = owner_db(L, idx);
    if (d) d->pins--;
}

void pup_lua_push_managed_tx(lua_State *L, pup_conn *conn, pup_params *params) {
    push_tx(L, NULL, 0, conn, params, 1);
}

void pup_lua_tx_detach(lua_State *L, int idx) {
    ltx *t = luaL_checkudata(L, idx, PUP_TX_MT);
    t->state = TX_DONE;
    t->conn = NULL;
}

/* ---- tx ---- */

static ltx *checktx(lua_State *L, pup_conn **c) {
    ltx *t = luaL_checkudata(L, 1, PUP_TX_MT);
    *c = tx_conn(t);
    if (!*c) luaL_argerror(L, 1, "transaction is closed");
    return t;
}

/* Ends the transaction; returns true, or nil, err (the statement that failed first
 * when a commit turned into a rollback). */
static int tx_finish(lua_State *L, int commit) {
    pup_conn *c;
    ltx *t = checktx(L, &c);
    if (t->managed) luaL_error(L, "the processor commits this transaction; a handler cannot %s it", commit ? "commit" : "roll back");
    pup_error err;
    t->state = TX_DONE;
    if (commit) {
        if (pup_conn_commit(c, &err) < 0) return pup_lua_push_error(L, &err);
    } else if (pup_conn_command(c, "ROLLBACK", &err) < 0)
        return pup_lua_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int tx_commit(lua_State *L) { return tx_finish(L, 1); }
static int tx_rollback(lua_State *L) { return tx_finish(L, 0); }

/* __close/__gc: an open, unmanaged transaction rolls back. */
static int tx_close(lua_State *L) {
    ltx *t = luaL_checkudata(L, 1, PUP_TX_MT);
    pup_conn *c = tx_conn(t);
    if (c && !t->managed) pup_conn_rollback(c);
    t->state = TX_DONE;
    return 0;
}

static int tx_tostring(lua_State *L) {
    ltx *t = luaL_checkudata(L, 1, PUP_TX_MT);
    lua_pushfstring(L, "pupsourcing.tx (%s)", t->state == TX_OPEN ? "open" : "closed");
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
        {"exec", l_exec}, {"query", l_query}, {"begin", db_begin}, {"close", db_close}, {NULL, NULL}};
    static const luaL_Reg tx_methods[] = {
        {"exec", l_exec}, {"query", l_query}, {"commit", tx_commit}, {"rollback", tx_rollback}, {NULL, NULL}};

    pup_lua_class(L, PUP_DB_MT, db_methods, db_close, db_tostring);
    lua_setfield(L, -2, "_db_methods"); /* the Lua part adds db:transaction */
    pup_lua_class(L, PUP_TX_MT, tx_methods, tx_close, tx_tostring);
    lua_pop(L, 1);

    luaL_newmetatable(L, PUP_ERROR_MT);
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "pupsourcing.error");
    lua_setfield(L, -2, "__name");
    lua_pop(L, 1);

    pup_lua_class(L, PUP_RESULT_MT, NULL, result_gc, NULL);
    lua_pop(L, 1);

    lua_pushcfunction(L, l_connect);
    lua_setfield(L, -2, "connect");
    lua_pushlightuserdata(L, NULL); /* same value as cjson.null */
    lua_setfield(L, -2, "null");
}
