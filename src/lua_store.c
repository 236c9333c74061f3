/*
 * lua_store.c -- the store object: append, read_events, read_aggregate_stream, migrate,
 * schema_sql; and persisted events as Lua tables. See pup_lua.h.
 */
#include "pup_lua.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <uuid/uuid.h>

/* A store owns its table names and SQL, and the scratch the append path reuses. */
typedef struct lstore {
    pup_store store;
    pup_append_buf buf;
    pup_event_in *events;
    int cap;
    int open;
    int users; /* processors that borrow the names and SQL: __close raises meanwhile */
} lstore;

static lstore *checkstore(lua_State *L) {
    lstore *s = luaL_checkudata(L, 1, PUP_STORE_MT);
    if (!s->open) luaL_argerror(L, 1, "store is closed");
    return s;
}

static const char *optname(lua_State *L, int idx, const char *field) {
    if (lua_isnoneornil(L, idx)) return NULL;
    lua_getfield(L, idx, field);
    const char *v = NULL;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "store option %s must be a string", field);
        v = lua_tostring(L, -1);
    }
    lua_pop(L, 1); /* the string stays alive: it is referenced by the options table */
    return v;
}

/* pup.store(opts?) */
static int l_store(lua_State *L) {
    if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TTABLE);
    const char *e = optname(L, 1, "events_table");
    const char *h = optname(L, 1, "aggregate_heads_table");
    const char *c = optname(L, 1, "checkpoints_table");
    lstore *s = lua_newuserdatauv(L, sizeof *s, 0);
    memset(s, 0, sizeof *s);
    luaL_setmetatable(L, PUP_STORE_MT);
    pup_error err;
    if (pup_store_init(&s->store, e, h, c, &err) < 0) {
        lua_pushstring(L, err.message);
        return lua_error(L); /* nothing allocated yet; a bad name is misuse */
    }
    s->open = 1;
    return 1;
}

/* __gc: nothing can be using a store that is collected. */
static int store_gc(lua_State *L) {
    lstore *s = luaL_checkudata(L, 1, PUP_STORE_MT);
    if (s->open) {
        pup_store_free(&s->store);
        pup_append_buf_free(&s->buf);
        free(s->events);
        s->events = NULL;
        s->open = 0;
    }
    return 0;
}

/* __close (`local store <close> = ...`): refused while a processor borrows the store. */
static int store_close(lua_State *L) {
    lstore *s = luaL_checkudata(L, 1, PUP_STORE_MT);
    if (s->users > 0)
        return luaL_error(L, "store is in use by %d processor(s): close them first", s->users);
    return store_gc(L);
}

void pup_lua_store_pin(lua_State *L, int idx) {
    ((lstore *)luaL_checkudata(L, idx, PUP_STORE_MT))->users++;
}

void pup_lua_store_unpin(lua_State *L, int idx) {
    lstore *s = luaL_checkudata(L, idx, PUP_STORE_MT);
    if (s->users > 0) s->users--;
}

static int store_tostring(lua_State *L) {
    lstore *s = luaL_checkudata(L, 1, PUP_STORE_MT);
    lua_pushfstring(L, "pupsourcing.store (%s)", s->open ? s->store.events : "closed");
    return 1;
}

/* ---- events as Lua tables ---- */

static void set_str(lua_State *L, const char *k, pup_str s) {
    if (!s.p) return; /* NULL ids and metadata are nil */
    lua_pushlstring(L, s.p, s.len);
    lua_setfield(L, -2, k);
}

void pup_lua_push_event(lua_State *L, const pup_event *ev) {
    lua_createtable(L, 0, 14);
    lua_pushinteger(L, ev->global_position);
    lua_setfield(L, -2, "global_position");
    set_str(L, "aggregate_type", ev->aggregate_type);
    set_str(L, "aggregate_id", ev->aggregate_id);
    lua_pushinteger(L, ev->aggregate_version);
    lua_setfield(L, -2, "aggregate_version");
    set_str(L, "event_id", ev->event_id);
    set_str(L, "event_type", ev->event_type);
    lua_pushinteger(L, ev->event_version);
    lua_setfield(L, -2, "event_version");
    set_str(L, "payload", ev->payload);
    set_str(L, "metadata", ev->metadata);
    set_str(L, "causation_id", ev->causation_id);
    set_str(L, "correlation_id", ev->correlation_id);
    set_str(L, "trace_id", ev->trace_id);
    set_str(L, "created_at", ev->created_at);
    luaL_setmetatable(L, PUP_EVENT_MT);
    /* Upcasters registered in this Lua state (pup.upcast, lua/pupsourcing/aggregate.lua):
     * the registry holds their function only while there are some. It upcasts in place;
     * what it raises propagates (inside a handler call's protected call). */
    if (lua_getfield(L, LUA_REGISTRYINDEX, "pupsourcing.upcast") == LUA_TFUNCTION) {
        lua_pushvalue(L, -2);
        lua_call(L, 1, 0);
    } else {
        lua_pop(L, 1);
    }
}

/* event.data: decode the JSON payload on first use and keep it. */
static int event_index(lua_State *L) {
    if (lua_type(L, 2) != LUA_TSTRING || strcmp(lua_tostring(L, 2), "data") != 0) return 0;
    lua_getfield(L, LUA_REGISTRYINDEX, "pupsourcing.json_decode");
    lua_getfield(L, 1, "payload");
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        lua_getfield(L, 1, "global_position");
        return luaL_error(L, "event.data: the payload of the event at global position %s is not JSON (%s)",
                          lua_tostring(L, -1), lua_tostring(L, -2));
    }
    lua_pushvalue(L, -1);
    lua_setfield(L, 1, "data");
    return 1;
}

/* Pushes the events of a binary result (box at the top) as an array. */
static void push_events(lua_State *L, const PGresult *r) {
    int n = PQntuples(r);
    lua_createtable(L, n, 1);
    for (int i = 0; i < n; i++) {
        pup_event ev;
        pup_event_from_row(r, i, 0, &ev);
        pup_lua_push_event(L, &ev);
        lua_rawseti(L, -2, i + 1);
    }
}

/* ---- append ---- */

/* Reads expected-version value: table with integer `version` (exact/no_stream) or
 * without (any). */
static long long check_expected(lua_State *L, int idx) {
    int ok = lua_type(L, idx) == LUA_TTABLE && lua_getmetatable(L, idx);
    if (ok) {
        luaL_getmetatable(L, "pupsourcing.expected");
        ok = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
    }
    if (!ok) luaL_typeerror(L, idx, "expected version (pup.any(), pup.no_stream() or pup.exact(n))");
    /* Read it as it is now: a table changed after pup.exact() must not become "any". */
    lua_getfield(L, idx, "kind");
    lua_getfield(L, idx, "version");
    const char *kind = lua_tostring(L, -2);
    long long v = -2;
    if (kind && strcmp(kind, "any") == 0 && lua_isnil(L, -1)) v = PUP_ANY;
    else if (kind && strcmp(kind, "no_stream") == 0 && lua_isinteger(L, -1) && lua_tointeger(L, -1) == 0) v = 0;
    else if (kind && strcmp(kind, "exact") == 0 && lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 0)
        v = (long long)lua_tointeger(L, -1);
    lua_pop(L, 2);
    if (v == -2)
        luaL_argerror(L, idx, "expected version was changed after it was made: use pup.any(), pup.no_stream() or pup.exact(n)");
    return v;
}

/* The fields an event to append may have, in the order they are read and checked. */
enum { F_TYPE, F_ID, F_EVENT_TYPE, F_PAYLOAD, F_METADATA, F_EVENT_ID, F_CAUSATION,
       F_CORRELATION, F_TRACE, F_CREATED, F_VERSION, NFIELDS };
static const struct { const char *name; int required, json; } event_fields[NFIELDS] = {
    {"aggregate_type", 1, 0}, {"aggregate_id", 1, 0}, {"event_type", 1, 0}, {"payload", 1, 1},
    {"metadata", 0, 1}, {"event_id", 0, 0}, {"causation_id", 0, 0}, {"correlation_id", 0, 0},
    {"trace_id", 0, 0}, {"created_at", 0, 0}, {"event_version", 0, 0}};

/* Checks field f of the event at -2 whose value is at -1 and leaves the value to keep
 * (nil when absent; a table encoded to JSON). Returns why it is bad, or NULL. */
static const char *check_field(lua_State *L, int f) {
    int t = lua_type(L, -1);
    if (t == LUA_TNIL || (t == LUA_TLIGHTUSERDATA && !lua_touserdata(L, -1))) {
        lua_pop(L, 1);
        lua_pushnil(L);
        return event_fields[f].required ? "is required" : NULL;
    }
    if (f == F_VERSION) {
        lua_Integer v = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : 0;
        return v < 1 || v > 2147483647 ? "must be a positive integer" : NULL;
    }
    size_t len;
    if (t == LUA_TTABLE && event_fields[f].json) {
        /* Data that JSON cannot hold (invalid UTF-8, NaN, a cycle) is a bad event, not misuse. */
        lua_getfield(L, LUA_REGISTRYINDEX, "pupsourcing.json_encode");
        lua_insert(L, -2);
        if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
            const char *msg = lua_tostring(L, -1);
            const char *plain = msg && strncmp(msg, "pup.json.encode: ", 17) == 0 ? msg + 17 : msg;
            return lua_pushfstring(L, "cannot be written as JSON: %s", plain ? plain : "?");
        }
    } else if (t != LUA_TSTRING) {
        return event_fields[f].json ? "must be a string or a table" : "must be a string";
    }
    const char *p = lua_tolstring(L, -1, &len);
    /* Only the payload is bytes; text columns cannot hold NUL. */
    if (f != F_PAYLOAD && memchr(p, '\0', len)) return "contains a NUL byte";
    if (f == F_EVENT_ID) {
        uuid_t u;
        char text[37];
        if (len != 36) return "is not a UUID";
        memcpy(text, p, 36);
        text[36] = '\0';
        if (uuid_parse(text, u) != 0) return "is not a UUID";
    }
    return NULL;
}

/* The string kept at slot i of the table at idx (NULL for nil). The table keeps it
 * alive, and a Lua string never moves. */
static pup_str kept(lua_State *L, int idx, lua_Integer i) {
    pup_str s = {NULL, 0};
    if (lua_rawgeti(L, idx, i) == LUA_TSTRING) s.p = lua_tolstring(L, -1, &s.len);
    lua_pop(L, 1);
    return s;
}

/* store:append(db_or_tx, expected, events). The events are read in two passes: the first
 * reads every field into a table that keeps the values alive (__index, __len and JSON
 * encoding may run Lua, which may collect garbage or even append again); the second,
 * after the last Lua code has run, points the C events at the kept strings. */
static int store_append(lua_State *L) {
    checkstore(L);
    pup_lua_checkconn(L, 2);
    long long expected = check_expected(L, 3);
    luaL_checktype(L, 4, LUA_TTABLE);
    pup_error err;
    lua_Integer len = luaL_len(L, 4);
    if (len == 0) {
        pup_error_set(&err, PUP_ERR_NO_EVENTS, "append: the events list is empty");
        return pup_lua_push_error(L, &err);
    }
    if (len < 0 || len > INT_MAX / NFIELDS) return luaL_error(L, "append: too many events (%I)", len);
    int n = (int)len;
    lua_createtable(L, n * NFIELDS, 0);
    int keep = lua_gettop(L);
    for (int i = 0; i < n; i++) {
        if (lua_geti(L, 4, i + 1) != LUA_TTABLE) {
            pup_error_set(&err, PUP_ERR_INVALID_EVENT, "event %d: must be a table, got %s", i + 1,
                          luaL_typename(L, -1));
            return pup_lua_push_error(L, &err);
        }
        for (int f = 0; f < NFIELDS; f++) {
            lua_getfield(L, -1, event_fields[f].name);
            const char *why = check_field(L, f);
            if (why) {
                pup_error_set(&err, PUP_ERR_INVALID_EVENT, "event %d: %s %s", i + 1, event_fields[f].name, why);
                return pup_lua_push_error(L, &err);
            }
            lua_rawseti(L, keep, (lua_Integer)i * NFIELDS + f + 1);
        }
        lua_pop(L, 1);
        for (int f = F_TYPE; i > 0 && f <= F_ID; f++) {
            pup_str a = kept(L, keep, f + 1), b = kept(L, keep, (lua_Integer)i * NFIELDS + f + 1);
            if (a.len != b.len || memcmp(a.p, b.p, a.len) != 0) {
                pup_error_set(&err, PUP_ERR_INVALID_EVENT,
                              "event %d: %s differs from event 1 (one append writes one aggregate)",
                              i + 1, event_fields[f].name);
                return pup_lua_push_error(L, &err);
            }
        }
    }
    /* No Lua runs from here on: the store and connection are looked up again, as the
     * code above may have closed them. */
    lstore *s = checkstore(L);
    pup_conn *c = pup_lua_checkconn(L, 2);
    if (n > s->cap) {
        pup_event_in *e = realloc(s->events, n * sizeof *e);
        if (!e) return luaL_error(L, "out of memory");
        s->events = e;
        s->cap = n;
    }
    for (int i = 0; i < n; i++) {
        pup_event_in *ev = &s->events[i];
        lua_Integer base = (lua_Integer)i * NFIELDS + 1;
        ev->event_type = kept(L, keep, base + F_EVENT_TYPE);
        ev->payload = kept(L, keep, base + F_PAYLOAD);
        ev->metadata = kept(L, keep, base + F_METADATA);
        ev->event_id = kept(L, keep, base + F_EVENT_ID);
        ev->causation_id = kept(L, keep, base + F_CAUSATION);
        ev->correlation_id = kept(L, keep, base + F_CORRELATION);
        ev->trace_id = kept(L, keep, base + F_TRACE);
        ev->created_at = kept(L, keep, base + F_CREATED);
        lua_rawgeti(L, keep, base + F_VERSION);
        ev->event_version = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 1;
        lua_pop(L, 1);
    }
    pup_str atype = kept(L, keep, F_TYPE + 1), aid = kept(L, keep, F_ID + 1);
    pup_append_result res;
    if (pup_store_append(&s->store, c, &s->buf, atype.p, atype.len, aid.p, aid.len, expected,
                         s->events, n, &res, &err) < 0)
        return pup_lua_push_error(L, &err);
    lua_createtable(L, 0, 3);
    lua_createtable(L, res.n, 0);
    for (int i = 0; i < res.n; i++) {
        lua_pushinteger(L, res.positions[i]);
        lua_rawseti(L, -2, i + 1);
    }
    free(res.positions);
    lua_setfield(L, -2, "global_positions");
    lua_pushinteger(L, res.from_version);
    lua_setfield(L, -2, "from_version");
    lua_pushinteger(L, res.to_version);
    lua_setfield(L, -2, "to_version");
    return 1;
}

/* ---- reads ---- */

/* store:read_events(db_or_tx, from_position, limit?) */
static int store_read_events(lua_State *L) {
    lstore *s = checkstore(L);
    pup_conn *c = pup_lua_checkconn(L, 2);
    lua_Integer from = luaL_optinteger(L, 3, 0);
    lua_Integer limit = luaL_optinteger(L, 4, 1000);
    luaL_argcheck(L, limit > 0, 4, "limit must be positive");
    pup_error err;
    PGresult **box = pup_lua_result_box(L);
    *box = pup_store_read(&s->store, c, from, limit, &err);
    if (!*box) return pup_lua_push_error(L, &err);
    push_events(L, *box);
    pup_lua_result_clear(box);
    return 1;
}

/* store:read_aggregate_stream(db_or_tx, type, id, {from_version=, to_version=}?) */
static int store_read_stream(lua_State *L) {
    lstore *s = checkstore(L);
    pup_conn *c = pup_lua_checkconn(L, 2);
    pup_str type, id;
    type.p = luaL_checklstring(L, 3, &type.len);
    id.p = luaL_checklstring(L, 4, &id.len);
    lua_Integer from = 1, to = -1;
    if (!lua_isnoneornil(L, 5)) {
        luaL_checktype(L, 5, LUA_TTABLE);
        if (lua_getfield(L, 5, "from_version") != LUA_TNIL) {
            luaL_argcheck(L, lua_isinteger(L, -1), 5, "from_version must be an integer");
            from = lua_tointeger(L, -1);
        }
        if (lua_getfield(L, 5, "to_version") != LUA_TNIL) {
            luaL_argcheck(L, lua_isinteger(L, -1), 5, "to_version must be an integer");
            to = lua_tointeger(L, -1);
        }
        lua_pop(L, 2);
    }
    pup_error err;
    PGresult **box = pup_lua_result_box(L);
    *box = pup_store_read_stream(&s->store, c, type, id, from, to, &err);
    if (!*box) return pup_lua_push_error(L, &err);
    push_events(L, *box);
    int n = PQntuples(*box);
    lua_pushinteger(L, n ? pup_be_int(PQgetvalue(*box, n - 1, 3), 8) : 0);
    lua_setfield(L, -2, "version");
    pup_lua_result_clear(box);
    return 1;
}

static int store_head(lua_State *L) {
    lstore *s = checkstore(L);
    pup_conn *c = pup_lua_checkconn(L, 2);
    pup_error err;
    long long h = pup_store_head(&s->store, c, &err);
    if (h < 0) return pup_lua_push_error(L, &err);
    lua_pushinteger(L, h);
    return 1;
}

static int store_migrate(lua_State *L) {
    lstore *s = checkstore(L);
    pup_conn *c = pup_lua_checkconn(L, 2);
    pup_error err;
    if (pup_store_migrate(&s->store, c, &err) < 0) return pup_lua_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int store_schema_sql(lua_State *L) {
    lstore *s = checkstore(L);
    char *sql = pup_store_schema_sql(&s->store);
    if (!sql) return luaL_error(L, "out of memory");
    lua_pushstring(L, sql); /* a memory error here would leak sql; pushstring copies first */
    free(sql);
    return 1;
}

/* store:names() -> every name the store derives (tables raw and quoted, the worker
 * group's tables, the position sequence, the NOTIFY channel) and, under `sql`, the
 * operator's statements (status, reset, group_workers): the one home of both. */
static int store_names(lua_State *L) {
    lstore *s = checkstore(L);
    const pup_store *S = &s->store;
    const char *const fields[][2] = {
        {"events_table", S->events}, {"aggregate_heads_table", S->heads},
        {"checkpoints_table", S->checkpoints}, {"workers_table", S->workers},
        {"groups_table", S->groups}, {"events_quoted", S->q_events},
        {"aggregate_heads_quoted", S->q_heads}, {"checkpoints_quoted", S->q_checkpoints},
        {"workers_quoted", S->q_workers}, {"groups_quoted", S->q_groups},
        {"sequence_quoted", S->q_sequence}, {"channel", S->channel},
        {"dead_letters_table", S->dead_letters}, {"dead_letters_quoted", S->q_dead_letters},
        {"failures_table", S->failures}, {"failures_quoted", S->q_failures}};
    lua_createtable(L, 0, (int)(sizeof fields / sizeof fields[0]) + 1);
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        lua_pushstring(L, fields[i][1]);
        lua_setfield(L, -2, fields[i][0]);
    }
    lua_createtable(L, 0, 4);
    lua_pushstring(L, S->sql_status);
    lua_setfield(L, -2, "status");
    lua_pushstring(L, S->sql_reset);
    lua_setfield(L, -2, "reset");
    lua_pushstring(L, S->sql_group_workers);
    lua_setfield(L, -2, "group_workers");
    lua_pushstring(L, PUP_SQL_PREPARED_XACTS);
    lua_setfield(L, -2, "prepared_xacts");
    lua_setfield(L, -2, "sql");
    return 1;
}

/* ---- snapshots (store:load and store:handle: lua/pupsourcing/aggregate.lua) ---- */

static int check_snapshot_version(lua_State *L, int idx) {
    lua_Integer v = luaL_checkinteger(L, idx);
    luaL_argcheck(L, v >= 0 && v <= INT_MAX, idx, "snapshot_version must be 0..2147483647");
    return (int)v;
}

/* store:read_snapshot_stream(db_or_tx, type, id, snapshot_version) -> events (.version),
 * state (the snapshot's bytes, nil when none of that snapshot_version), its version (0) */
static int store_read_snapshot_stream(lua_State *L) {
    lstore *s = checkstore(L);
    pup_conn *c = pup_lua_checkconn(L, 2);
    pup_str type, id;
    type.p = luaL_checklstring(L, 3, &type.len);
    id.p = luaL_checklstring(L, 4, &id.len);
    int sv = check_snapshot_version(L, 5);
    pup_error err;
    PGresult **box = pup_lua_result_box(L);
    *box = pup_snapshot_read(&s->store, c, type, id, sv, &err);
    if (!*box) return pup_lua_push_error(L, &err);
    int n = PQntuples(*box);
    int first = n > 0 && pup_be_int(PQgetvalue(*box, 0, 0), 8) == 0; /* row 0 is the snapshot */
    long long snap = first ? pup_be_int(PQgetvalue(*box, 0, 3), 8) : 0;
    lua_createtable(L, n - first, 1);
    for (int i = first; i < n; i++) {
        pup_event ev;
        pup_event_from_row(*box, i, 0, &ev);
        pup_lua_push_event(L, &ev);
        lua_rawseti(L, -2, i - first + 1);
    }
    lua_pushinteger(L, n > first ? pup_be_int(PQgetvalue(*box, n - 1, 3), 8) : snap);
    lua_setfield(L, -2, "version");
    if (first) lua_pushlstring(L, PQgetvalue(*box, 0, 7), (size_t)PQgetlength(*box, 0, 7));
    else lua_pushnil(L);
    lua_pushinteger(L, snap);
    pup_lua_result_clear(box);
    return 3;
}

/* store:write_snapshot(db_or_tx, type, id, version, snapshot_version, state) -> true
 * (written) | false (a newer snapshot kept) | nil, err */
static int store_write_snapshot(lua_State *L) {
    lstore *s = checkstore(L);
    pup_conn *c = pup_lua_checkconn(L, 2);
    pup_str type, id, state;
    type.p = luaL_checklstring(L, 3, &type.len);
    id.p = luaL_checklstring(L, 4, &id.len);
    lua_Integer version = luaL_checkinteger(L, 5);
    luaL_argcheck(L, version >= 1, 5, "version must be positive");
    int sv = check_snapshot_version(L, 6);
    state.p = luaL_checklstring(L, 7, &state.len);
    pup_error err;
    int rc = pup_snapshot_write(&s->store, c, type, id, version, sv, state, &err);
    if (rc < 0) return pup_lua_push_error(L, &err);
    lua_pushboolean(L, rc);
    return 1;
}

const pup_store *pup_lua_checkstore(lua_State *L, int idx) {
    lstore *s = luaL_checkudata(L, idx, PUP_STORE_MT);
    if (!s->open) luaL_argerror(L, idx, "store is closed");
    return &s->store;
}

/* pup.any(), pup.no_stream(), pup.exact(n): tagged tables append recognizes. */
static int push_expected(lua_State *L, const char *kind, lua_Integer v) {
    lua_createtable(L, 0, 2);
    lua_pushstring(L, kind);
    lua_setfield(L, -2, "kind");
    if (v >= 0) {
        lua_pushinteger(L, v);
        lua_setfield(L, -2, "version");
    }
    luaL_setmetatable(L, "pupsourcing.expected");
    return 1;
}

static int l_any(lua_State *L) { return push_expected(L, "any", -1); }
static int l_no_stream(lua_State *L) { return push_expected(L, "no_stream", 0); }
static int l_exact(lua_State *L) {
    lua_Integer v = luaL_checkinteger(L, 1);
    luaL_argcheck(L, v >= 0, 1, "version must be >= 0");
    return push_expected(L, "exact", v);
}

static int l_uuid(lua_State *L) {
    uuid_t u;
    char text[37];
    uuid_generate_random(u);
    uuid_unparse_lower(u, text);
    lua_pushlstring(L, text, 36);
    return 1;
}

void pup_lua_open_store(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"append", store_append}, {"read_events", store_read_events},
        {"read_aggregate_stream", store_read_stream}, {"head", store_head},
        {"migrate", store_migrate}, {"schema_sql", store_schema_sql},
        {"names", store_names}, {"read_snapshot_stream", store_read_snapshot_stream},
        {"write_snapshot", store_write_snapshot}, {NULL, NULL}};
    pup_lua_class(L, PUP_STORE_MT, methods, store_gc, store_tostring);
    lua_pop(L, 1);
    luaL_getmetatable(L, PUP_STORE_MT);
    lua_pushcfunction(L, store_close);
    lua_setfield(L, -2, "__close");
    lua_pop(L, 1);

    luaL_newmetatable(L, PUP_EVENT_MT);
    lua_pushcfunction(L, event_index);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    luaL_newmetatable(L, "pupsourcing.expected");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_any);
    lua_setfield(L, -2, "any");
    lua_pushcfunction(L, l_no_stream);
    lua_setfield(L, -2, "no_stream");
    lua_pushcfunction(L, l_exact);
    lua_setfield(L, -2, "exact");

    lua_pushcfunction(L, l_store);
    lua_setfield(L, -2, "store");
    lua_pushcfunction(L, l_uuid);
    lua_setfield(L, -2, "uuid");
}
