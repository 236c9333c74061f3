/*
 * lua_store.c -- the store object: append, read_events, read_aggregate_stream, migrate,
 * schema_sql; and persisted events as Lua tables. See pup_lua.h.
 */
#include "pup_gap.h"
#include "pup_lua.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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
    static const char *const keys[] = {"events_table", "aggregate_heads_table", "checkpoints_table", NULL};
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        pup_lua_check_keys(L, 1, "pup.store", keys);
    }
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
    char at[40];
    lua_pushlstring(L, at, (size_t)pup_format_time(ev->created_at, at, sizeof at));
    lua_setfield(L, -2, "created_at");
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

/* The first key of the event table at -1 that is not one of event_fields (a misspelt
 * field would be dropped silently), or NULL. The text stays valid while the table does. */
static const char *unknown_field(lua_State *L) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        lua_pop(L, 1);
        int ok = 0;
        if (lua_type(L, -1) == LUA_TSTRING)
            for (int f = 0; f < NFIELDS && !ok; f++) ok = strcmp(lua_tostring(L, -1), event_fields[f].name) == 0;
        if (!ok) {
            const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(a key that is not a string)";
            lua_pop(L, 1);
            return k;
        }
    }
    return NULL;
}

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

/* The decoded JSON values at a and b are the same: same types (integer and float apart),
 * equal scalars, tables with the same keys and values and the same metatable (an empty
 * array is not an empty object). */
static int same_value(lua_State *L, int a, int b, int depth) {
    int t = lua_type(L, a);
    if (t != lua_type(L, b) || depth > 200 || !lua_checkstack(L, 4)) return 0;
    if (t == LUA_TNUMBER && lua_isinteger(L, a) != lua_isinteger(L, b)) return 0;
    if (t != LUA_TTABLE) return lua_rawequal(L, a, b);
    int ma = lua_getmetatable(L, a), mb = lua_getmetatable(L, b);
    int same = ma == mb && (!ma || lua_rawequal(L, -1, -2));
    lua_pop(L, ma + mb);
    lua_Integer na = 0, nb = 0;
    lua_pushnil(L);
    while (same && lua_next(L, a)) { /* key at -2, value at -1 */
        na++;
        lua_pushvalue(L, -2);
        lua_rawget(L, b);
        same = same_value(L, lua_gettop(L) - 1, lua_gettop(L), depth + 1);
        lua_pop(L, 2);
    }
    if (!same) {
        lua_pop(L, 1); /* the key lua_next left */
        return 0;
    }
    lua_pushnil(L);
    while (lua_next(L, b)) {
        nb++;
        lua_pop(L, 1);
    }
    return na == nb;
}

/* pup_append_buf.same_payload: both payloads decode as JSON to the same value, so a retry
 * whose table was encoded in another key order (another process) is still the same. */
static int same_json(void *ud, pup_str stored, pup_str given) {
    lua_State *L = ud;
    if (!lua_checkstack(L, 8)) return 0;
    int top = lua_gettop(L), ok = 1;
    for (int k = 0; k < 2 && ok; k++) {
        pup_str s = k ? given : stored;
        lua_getfield(L, LUA_REGISTRYINDEX, "pupsourcing.json_decode");
        lua_pushlstring(L, s.p, s.len);
        ok = lua_pcall(L, 1, 1, 0) == LUA_OK;
    }
    int same = ok && same_value(L, top + 1, top + 2, 0);
    lua_settop(L, top);
    return same;
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
        const char *unknown = unknown_field(L);
        if (unknown) {
            pup_error_set(&err, PUP_ERR_INVALID_EVENT, "event %d: unknown field %.80s", i + 1, unknown);
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
    /* Only our JSON decoder runs from here (on an existing event_id): the kept strings
     * stay alive and in place. */
    s->buf.same_payload = same_json;
    s->buf.same_ud = L;
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
    if (res.retried) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "retried");
    }
    return 1;
}

/* ---- reads ---- */

/* store:read_events_raw(db_or_tx, from_position, limit?): positions > from_position as
 * they are visible now, holes and all (see read_events). */
static int store_read_events_raw(lua_State *L) {
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

/* ---- gap-safe reads: cursors ---- */

#define PUP_CURSOR_MT "pupsourcing.cursor"
#define READ_DEFAULT_LIMIT 1000
#define READ_SCOPED_WINDOW 1000 /* rows read at once when a scope may skip most of them */

/* A cursor: where a gap-safe reader is, for one events table. Immutable: each read
 * returns a new one, so reading again from an older cursor reads the same events. */
typedef struct lcursor {
    pup_cursor c;
    long long waiting; /* the first undecided hole the last read stopped at (0: none) */
    long long in_flight; /* pup_safe_read's in_flight of the last read (0: none) */
    char events[PUP_NAME_MAX];
} lcursor;

static lcursor *push_cursor(lua_State *L, const pup_cursor *from, const char *events) {
    lcursor *k = lua_newuserdatauv(L, sizeof *k, 0);
    k->c = *from;
    k->waiting = 0;
    k->in_flight = 0;
    snprintf(k->events, sizeof k->events, "%s", events);
    luaL_setmetatable(L, PUP_CURSOR_MT);
    return k;
}

/* cursor.position: read up to here; cursor.waiting: the hole it waits at (nil: none);
 * cursor.in_flight: the last position drawn, above what the read saw (nil: none). */
static int cursor_index(lua_State *L) {
    lcursor *k = luaL_checkudata(L, 1, PUP_CURSOR_MT);
    const char *f = luaL_checkstring(L, 2);
    if (strcmp(f, "position") == 0) lua_pushinteger(L, k->c.position);
    else if (strcmp(f, "waiting") == 0 && k->waiting) lua_pushinteger(L, k->waiting);
    else if (strcmp(f, "in_flight") == 0 && k->in_flight) lua_pushinteger(L, k->in_flight);
    else if (strcmp(f, "events_table") == 0) lua_pushstring(L, k->events);
    else lua_pushnil(L);
    return 1;
}

static int cursor_newindex(lua_State *L) {
    return luaL_error(L, "a cursor is read-only: read_events returns a new one (resume from a position with an integer)");
}

static int cursor_tostring(lua_State *L) {
    lcursor *k = luaL_checkudata(L, 1, PUP_CURSOR_MT);
    if (k->waiting)
        lua_pushfstring(L, "pupsourcing.cursor (%s after %I, waiting at %I)", k->events, (lua_Integer)k->c.position,
                        (lua_Integer)k->waiting);
    else
        lua_pushfstring(L, "pupsourcing.cursor (%s after %I)", k->events, (lua_Integer)k->c.position);
    return 1;
}

/* Option k of the options at idx: nil, or a non-empty list of non-empty strings without
 * NUL, pushed as a text[] literal (nil pushed when absent). Raises otherwise. */
static const char *push_scope(lua_State *L, int idx, const char *k) {
    if (lua_isnoneornil(L, idx) || lua_getfield(L, idx, k) == LUA_TNIL) {
        if (!lua_isnoneornil(L, idx)) lua_pop(L, 1);
        lua_pushnil(L);
        return NULL;
    }
    int list = lua_gettop(L);
    lua_Integer n = lua_type(L, list) == LUA_TTABLE ? luaL_len(L, list) : 0;
    if (n < 1) luaL_error(L, "read_events: %s must be a non-empty list of strings", k);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addchar(&b, '{');
    for (lua_Integer i = 1; i <= n; i++) {
        size_t len;
        lua_geti(L, list, i);
        const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
        if (!v || len == 0 || memchr(v, '\0', len))
            luaL_error(L, "read_events: %s[%I] must be a non-empty string without NUL", k, i);
        lua_pop(L, 1); /* v stays alive: the list holds it */
        luaL_addstring(&b, i > 1 ? ",\"" : "\"");
        for (size_t j = 0; j < len; j++) {
            if (v[j] == '"' || v[j] == '\\') luaL_addchar(&b, '\\');
            luaL_addchar(&b, v[j]);
        }
        luaL_addchar(&b, '"');
    }
    luaL_addchar(&b, '}');
    luaL_pushresult(&b);
    lua_remove(L, list);
    return lua_tostring(L, -1);
}

/* core._cursor_at(cursor, position): the cursor moved back to a position it passed in its
 * last read (pup.subscribe stopping inside a batch): its holes all lie above. */
static int l_cursor_at(lua_State *L) {
    lcursor *k = luaL_checkudata(L, 1, PUP_CURSOR_MT);
    lua_Integer pos = luaL_checkinteger(L, 2);
    luaL_argcheck(L, pos >= 0 && pos <= k->c.position, 2, "position must be at or below the cursor's");
    push_cursor(L, &k->c, k->events)->c.position = pos;
    return 1;
}

/* store:read_events(db_or_tx, cursor_or_position, {limit=, aggregate_types=, event_types=}?)
 * --> events, cursor | nil, err. Never returns an event above a hole that a running
 * transaction may still fill (the processor's rule, docs/ordering.md); an empty array
 * means nothing more can be read now (cursor.waiting says when a hole holds it). */
static int store_read_events(lua_State *L) {
    static const char *const known[] = {"limit", "aggregate_types", "event_types", NULL};
    lstore *s = checkstore(L);
    pup_lua_checkconn(L, 2);
    pup_cursor start = {0};
    if (lua_isinteger(L, 3)) {
        start.position = lua_tointeger(L, 3);
        luaL_argcheck(L, start.position >= 0, 3, "a position must be >= 0");
    } else {
        const lcursor *k = luaL_testudata(L, 3, PUP_CURSOR_MT);
        if (!k) return luaL_typeerror(L, 3, "cursor or position (integer >= 0)");
        if (strcmp(k->events, s->store.events) != 0)
            return luaL_argerror(L, 3, lua_pushfstring(L, "the cursor reads events table %s, this store %s",
                                                       k->events, s->store.events));
        start = k->c;
    }
    if (!lua_isnoneornil(L, 4)) {
        if (!lua_istable(L, 4))
            return luaL_argerror(L, 4, "options must be a table {limit=, aggregate_types=, event_types=}");
        pup_lua_check_keys(L, 4, "read_events", known);
    }
    long long limit = pup_lua_opt_int(L, 4, "read_events", "limit", READ_DEFAULT_LIMIT, 1, PUP_LUA_MAX_BATCH);
    const char *scope[2] = {push_scope(L, 4, "aggregate_types"), push_scope(L, 4, "event_types")};
    lcursor *next = push_cursor(L, &start, s->store.events);
    int cur_idx = lua_gettop(L);
    lua_createtable(L, (int)(limit < 64 ? limit : 64), 0);
    int out = lua_gettop(L);
    PGresult **box = pup_lua_result_box(L);
    long long got = 0;
    pup_error err;
    for (;;) {
        /* Looked up again each window: pushing events may run Lua (upcasters). */
        pup_conn *c = pup_lua_checkconn(L, 2);
        s = checkstore(L);
        long long window = limit - got;
        if ((scope[0] || scope[1]) && window < READ_SCOPED_WINDOW) window = READ_SCOPED_WINDOW;
        pup_safe_read rd;
        if (pup_store_read_safe(&s->store, c, &next->c, scope, window, limit - got, &rd, &err) < 0)
            return pup_lua_push_error(L, &err);
        *box = rd.r;
        for (int i = 0; i < rd.passed; i++) {
            pup_event ev;
            if (!pup_safe_event(&rd, i, &ev)) continue;
            pup_lua_push_event(L, &ev);
            lua_rawseti(L, out, (lua_Integer)++got);
        }
        pup_lua_result_clear(box);
        next->waiting = rd.waiting;
        next->in_flight = rd.in_flight;
        if (!rd.more || got >= limit) break;
    }
    lua_pushvalue(L, out);
    lua_pushvalue(L, cur_idx);
    return 2;
}

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* core._drawn_look() --> the look at positions drawn above the head that processors
 * take between reads (pup_drawn_look_wait, pup_gap.h), for pup.subscribe:
 * look:wait(cursor.in_flight, poll) --> seconds to wait; look:restart() on news. */
#define PUP_DRAWN_LOOK_MT "pupsourcing.drawn_look"

static int l_drawn_look(lua_State *L) {
    pup_drawn_look *l = lua_newuserdatauv(L, sizeof *l, 0);
    memset(l, 0, sizeof *l);
    luaL_setmetatable(L, PUP_DRAWN_LOOK_MT);
    return 1;
}

static int drawn_look_wait(lua_State *L) {
    pup_drawn_look *l = luaL_checkudata(L, 1, PUP_DRAWN_LOOK_MT);
    lua_Integer in_flight = luaL_optinteger(L, 2, 0);
    lua_Number poll = luaL_checknumber(L, 3);
    luaL_argcheck(L, poll >= 0, 3, "poll must be a number of seconds from 0");
    lua_pushnumber(L, pup_drawn_look_wait(l, in_flight, mono_now(), poll));
    return 1;
}

static int drawn_look_restart(lua_State *L) {
    pup_drawn_look_restart(luaL_checkudata(L, 1, PUP_DRAWN_LOOK_MT));
    return 0;
}

/* store:wait(db, seconds) --> true when an append's notification arrived, false when the
 * time passed | nil, err. A wake-up only: read again either way. The db listens on the
 * store's channel from its first call on; a call that finds it not listening (the first,
 * after a reconnect or an UNLISTEN) starts and returns true at once: an append may have
 * committed between the caller's last read and the LISTEN, and its NOTIFY went unheard.
 * Other notifications on db are consumed. */
static int store_wait(lua_State *L) {
    lstore *s = checkstore(L);
    luaL_checkudata(L, 2, PUP_DB_MT);
    pup_conn *c = pup_lua_checkconn(L, 2);
    lua_Number secs = luaL_checknumber(L, 3);
    luaL_argcheck(L, secs >= 0 && secs <= PUP_LUA_MAX_SECONDS, 3, "seconds must be from 0 to 3600");
    PGconn *pg = pup_conn_pg(c);
    if (PQtransactionStatus(pg) != PQTRANS_IDLE)
        return luaL_error(L, "store:wait: the db is inside a transaction (notifications arrive between transactions)");
    pup_error err;
    /* Asked each call (a round trip, paid only once the reader has caught up): the caller
     * may have UNLISTENed, or the session may be new. */
    int listening = pup_store_listen(&s->store, c, &err);
    if (listening < 0) return pup_lua_push_error(L, &err);
    int got = !listening;
    double deadline = mono_now() + secs;
    for (;;) {
        if (!PQconsumeInput(pg)) {
            pup_error_from_pg(&err, pg, NULL);
            return pup_lua_push_error(L, &err);
        }
        PGnotify *nt;
        while ((nt = PQnotifies(pg)) != NULL) {
            got |= strcmp(nt->relname, s->store.channel) == 0;
            PQfreemem(nt);
        }
        double left = deadline - mono_now();
        if (got || left <= 0) break;
        struct pollfd f = {.fd = PQsocket(pg), .events = POLLIN};
        if (poll(&f, 1, (int)(left * 1000) + 1) < 0 && errno != EINTR) break;
    }
    lua_pushboolean(L, got);
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
        static const char *const keys[] = {"from_version", "to_version", NULL};
        luaL_checktype(L, 5, LUA_TTABLE);
        pup_lua_check_keys(L, 5, "read_aggregate_stream", keys);
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

/* store:migrate(db, {upgrade = true}?): upgrade converts the Go library's tables in
 * place (docs/go.md); without it they are refused (nil, err not_migrated). */
static int store_migrate(lua_State *L) {
    lstore *s = checkstore(L);
    pup_conn *c = pup_lua_checkconn(L, 2);
    int upgrade = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_pushnil(L);
        while (lua_next(L, 3)) {
            if (lua_type(L, -2) != LUA_TSTRING || strcmp(lua_tostring(L, -2), "upgrade") != 0)
                return luaL_error(L, "migrate: unknown option %s (known: upgrade)", luaL_tolstring(L, -2, NULL));
            luaL_argexpected(L, lua_isboolean(L, -1), 3, "boolean upgrade");
            upgrade = lua_toboolean(L, -1);
            lua_pop(L, 1);
        }
    }
    pup_error err;
    if (pup_store_migrate_ex(&s->store, c, upgrade, &err) < 0) return pup_lua_push_error(L, &err);
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
    lua_pushstring(L, S->sql_position_default);
    lua_setfield(L, -2, "position_default");
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
        {"read_events_raw", store_read_events_raw}, {"wait", store_wait},
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

    luaL_newmetatable(L, PUP_CURSOR_MT);
    lua_pushcfunction(L, cursor_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, cursor_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushcfunction(L, cursor_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);

    luaL_newmetatable(L, PUP_EVENT_MT);
    lua_pushcfunction(L, event_index);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    luaL_newmetatable(L, "pupsourcing.expected");
    lua_pop(L, 1);

    static const luaL_Reg look_methods[] = {{"wait", drawn_look_wait}, {"restart", drawn_look_restart}, {NULL, NULL}};
    pup_lua_class(L, PUP_DRAWN_LOOK_MT, look_methods, NULL, NULL);
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
    lua_pushcfunction(L, l_cursor_at);
    lua_setfield(L, -2, "_cursor_at");
    lua_pushcfunction(L, l_drawn_look);
    lua_setfield(L, -2, "_drawn_look");
}
