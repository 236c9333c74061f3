/*
 * lua_json.c -- pup.json: JSON that keeps what the events hold. Parsing and generating
 * are YAJL's (Debian libyajl); this file maps values between YAJL and Lua:
 *
 *   - integers stay integers both ways (64-bit); a JSON number without fraction or
 *     exponent decodes to a Lua integer, one beyond 64 bits to the nearest float;
 *   - floats are written as the shortest text that reads back as the same double, always
 *     with a fraction or an exponent (100.0, not 100), so they decode as floats again;
 *   - decoded arrays carry pup.json.array_mt, so an empty array encodes as [] again; a
 *     table is an array when its keys are exactly 1..n (or it has that metatable);
 *   - JSON null is pup.null (the lightuserdata NULL that lua-cjson also uses).
 *
 * Strings must be valid UTF-8 both ways; NaN, infinities, nesting deeper than 127
 * levels (cycles) and keys that are neither strings nor integers raise, naming what was
 * wrong.
 */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_gen.h>
#include <yajl/yajl_parse.h>

#include "pup_lua.h"

/* YAJL's generator nests at most 127 deep; decoding takes the same limit, so whatever
 * decodes also encodes. */
#define JSON_MAX_DEPTH 127
#define ARRAY_MT "pupsourcing.json.array"

/* ---- decoding: YAJL's callbacks build the value on the Lua stack ---- */

typedef struct decoder {
    lua_State *L;
    int depth;
    /* Per open container: the next array index, or 0 for an object (its key is on the
     * stack above it while the value is parsed). */
    lua_Integer next[JSON_MAX_DEPTH + 1];
    const char *error; /* set by a callback that stopped the parse */
} decoder;

/* Stores the value at the top into the enclosing container, if any. */
static int store_value(decoder *d) {
    lua_State *L = d->L;
    if (d->depth == 0) { /* the document itself: stays on the stack, above text and codec */
        if (lua_gettop(L) == 3) return 1;
        d->error = "more than one JSON value"; /* the parser takes a stream; stop at once */
        return 0;
    }
    if (d->next[d->depth] > 0) lua_rawseti(L, -2, d->next[d->depth]++);
    else lua_rawset(L, -3); /* object: key at -2, table at -3 */
    return 1;
}

static int on_null(void *ctx) {
    decoder *d = ctx;
    lua_pushlightuserdata(d->L, NULL);
    return store_value(d);
}

static int on_boolean(void *ctx, int b) {
    decoder *d = ctx;
    lua_pushboolean(d->L, b);
    return store_value(d);
}

/* Numbers arrive as their text: integers stay integers when they fit in 64 bits. */
static int on_number(void *ctx, const char *s, size_t len) {
    decoder *d = ctx;
    char buf[64];
    char *copy = len < sizeof buf ? buf : malloc(len + 1);
    if (!copy) {
        d->error = "out of memory";
        return 0;
    }
    memcpy(copy, s, len);
    copy[len] = '\0';
    int integral = strcspn(copy, ".eE") == len && strcmp(copy, "-0") != 0;
    if (integral) {
        errno = 0;
        long long v = strtoll(copy, NULL, 10);
        if (errno == 0) lua_pushinteger(d->L, (lua_Integer)v);
        else integral = 0;
    }
    if (!integral) lua_pushnumber(d->L, (lua_Number)strtod(copy, NULL));
    if (copy != buf) free(copy);
    return store_value(d);
}

static int on_string(void *ctx, const unsigned char *s, size_t len) {
    decoder *d = ctx;
    lua_pushlstring(d->L, (const char *)s, len);
    return store_value(d);
}

static int open_container(decoder *d, int array) {
    if (d->depth == JSON_MAX_DEPTH) {
        d->error = "nested deeper than 127 levels";
        return 0;
    }
    if (!lua_checkstack(d->L, 4)) {
        d->error = "nested too deep for the Lua stack";
        return 0;
    }
    lua_newtable(d->L);
    if (array) luaL_setmetatable(d->L, ARRAY_MT);
    d->next[++d->depth] = array ? 1 : 0;
    return 1;
}

static int close_container(decoder *d) {
    d->depth--;
    return store_value(d);
}

static int on_start_map(void *ctx) { return open_container(ctx, 0); }
static int on_start_array(void *ctx) { return open_container(ctx, 1); }
static int on_end(void *ctx) { return close_container(ctx); }

static int on_map_key(void *ctx, const unsigned char *s, size_t len) {
    decoder *d = ctx;
    lua_pushlstring(d->L, (const char *)s, len);
    return 1;
}

static const yajl_callbacks decode_callbacks = {
    on_null, on_boolean, NULL, NULL, on_number, on_string,
    on_start_map, on_map_key, on_end, on_start_array, on_end,
};

/* One parser and one generator per Lua state, kept in the registry: allocating them
 * per call would double the cost of decoding a small payload. The parser accepts a
 * stream of values, so it returns to its start state after each document. The codec
 * is marked to be closed while in use: an error (even out of memory inside a callback)
 * closes it, which discards a parser left mid-document; a call made while it is in use
 * (a finalizer that decodes) gets a codec of its own. */
typedef struct codec {
    yajl_handle h;
    yajl_gen g;
    int busy;
    decoder d;
} codec;

#define CODEC_MT "pupsourcing.json.codec"

static void codec_discard(codec *c) {
    if (c->h) yajl_free(c->h);
    if (c->g) yajl_gen_free(c->g);
    c->h = NULL;
    c->g = NULL;
}

static int codec_gc(lua_State *L) {
    codec_discard(luaL_checkudata(L, 1, CODEC_MT));
    return 0;
}

/* __close: after an error, the parser or generator may be mid-document. */
static int codec_close(lua_State *L) {
    codec *c = luaL_checkudata(L, 1, CODEC_MT);
    if (!lua_isnil(L, 2)) codec_discard(c);
    c->busy = 0;
    return 0;
}

/* Pushes the state's codec (or a fresh one when it is in use), marked busy and to be
 * closed; the caller returns through it. */
static codec *codec_push(lua_State *L) {
    lua_getfield(L, LUA_REGISTRYINDEX, CODEC_MT ".shared");
    codec *c = lua_touserdata(L, -1);
    if (!c || c->busy) {
        lua_pop(L, 1);
        c = lua_newuserdatauv(L, sizeof *c, 0);
        memset(c, 0, sizeof *c);
        luaL_setmetatable(L, CODEC_MT);
    }
    c->busy = 1;
    lua_toclose(L, -1);
    return c;
}

/* pup.json.decode(text) -> value; raises on invalid JSON with YAJL's description. */
static int json_decode(lua_State *L) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    lua_settop(L, 1);
    codec *c = codec_push(L);
    decoder *d = &c->d;
    d->L = L;
    d->depth = 0;
    d->error = NULL;
    if (!c->h) {
        c->h = yajl_alloc(&decode_callbacks, NULL, d);
        if (!c->h) return luaL_error(L, "pup.json.decode: out of memory");
        yajl_config(c->h, yajl_allow_multiple_values, 1);
    }
    yajl_status st = yajl_parse(c->h, (const unsigned char *)text, len);
    if (st == yajl_status_ok) st = yajl_complete_parse(c->h);
    if (st != yajl_status_ok) {
        char msg[300];
        if (d->error) {
            snprintf(msg, sizeof msg, "%s", d->error);
        } else {
            unsigned char *e = yajl_get_error(c->h, 0, NULL, 0);
            const char *what = e ? (const char *)e : "invalid JSON";
            snprintf(msg, sizeof msg, "%.*s at byte %zu", (int)strcspn(what, "\n"), what,
                     yajl_get_bytes_consumed(c->h));
            if (e) yajl_free_error(c->h, e);
        }
        codec_discard(c); /* the parser's state is of no further use */
        return luaL_error(L, "pup.json.decode: %s", msg);
    }
    if (lua_gettop(L) != 3) { /* a reused parser takes an empty text as the end of its stream */
        codec_discard(c);
        return luaL_error(L, "pup.json.decode: no JSON value");
    }
    return 1;
}

/* ---- encoding ---- */

typedef struct encoder {
    lua_State *L;
    yajl_gen g;
    char msg[200]; /* set when a value cannot be encoded */
} encoder;

static int encode_value(encoder *e, int idx);

static int gen_failed(encoder *e, yajl_gen_status st, const char *what) {
    if (st == yajl_gen_status_ok) return 0;
    if (st == yajl_max_depth_exceeded)
        snprintf(e->msg, sizeof e->msg, "nested deeper than %d levels (a table that contains itself?)",
                 JSON_MAX_DEPTH);
    else
        snprintf(e->msg, sizeof e->msg, "%s: %s", what,
                 st == yajl_gen_invalid_string ? "not valid UTF-8" : "cannot be written here");
    return -1;
}

/* The shortest %.Ng text that reads back as v, with a fraction or exponent kept. */
static size_t format_double(char *buf, size_t cap, double v) {
    int n = 0;
    /* A normal double whose shortest text has 15 digits or fewer prints as exactly that
     * at %.15g (trailing zeros dropped); subnormals have fewer digits to spare. */
    for (int prec = fabs(v) < DBL_MIN ? 1 : 15; prec <= 17; prec++) {
        n = snprintf(buf, cap, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    if (strcspn(buf, ".eE") == (size_t)n && (size_t)n + 2 < cap) {
        memcpy(buf + n, ".0", 3);
        n += 2;
    }
    return (size_t)n;
}

static int encode_number(encoder *e, int idx) {
    lua_State *L = e->L;
    if (lua_isinteger(L, idx)) return gen_failed(e, yajl_gen_integer(e->g, lua_tointeger(L, idx)), "number");
    double v = lua_tonumber(L, idx);
    if (!isfinite(v)) {
        snprintf(e->msg, sizeof e->msg, "cannot encode %s (JSON has no such number)",
                 isnan(v) ? "NaN" : "an infinity");
        return -1;
    }
    char buf[40];
    size_t n = format_double(buf, sizeof buf, v);
    return gen_failed(e, yajl_gen_number(e->g, buf, n), "number");
}

/* n when the table's keys are exactly 1..n (n >= 1), else 0; -1 for a key JSON cannot take. */
static lua_Integer array_length(encoder *e, int idx) {
    lua_State *L = e->L;
    lua_Integer count = 0, max = 0;
    int only_ints = 1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 1) {
            lua_Integer k = lua_tointeger(L, -1);
            if (k > max) max = k;
        } else if (lua_type(L, -1) == LUA_TSTRING || lua_isinteger(L, -1)) {
            only_ints = 0;
        } else {
            snprintf(e->msg, sizeof e->msg, "cannot encode a table key of type %s",
                     lua_type(L, -1) == LUA_TNUMBER ? "float" : luaL_typename(L, -1));
            lua_pop(L, 1);
            return -1;
        }
        count++;
    }
    return only_ints && count == max ? max : 0;
}

static int encode_table(encoder *e, int idx) {
    lua_State *L = e->L;
    if (!lua_checkstack(L, 6)) {
        snprintf(e->msg, sizeof e->msg, "nested too deep for the Lua stack");
        return -1;
    }
    lua_Integer n = array_length(e, idx);
    if (n < 0) return -1;
    int is_array = n > 0;
    if (!is_array && lua_getmetatable(L, idx)) {
        luaL_getmetatable(L, ARRAY_MT);
        is_array = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
        if (is_array) { /* n == 0: empty, or keys other than 1..n (then not an array) */
            lua_pushnil(L);
            is_array = !lua_next(L, idx);
            if (!is_array) lua_pop(L, 2);
        }
    }
    if (is_array) {
        if (gen_failed(e, yajl_gen_array_open(e->g), "array")) return -1;
        for (lua_Integer i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            int rc = encode_value(e, lua_gettop(L));
            lua_pop(L, 1);
            if (rc < 0) return -1;
        }
        return gen_failed(e, yajl_gen_array_close(e->g), "array");
    }
    if (gen_failed(e, yajl_gen_map_open(e->g), "object")) return -1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        char num[32];
        size_t klen;
        const char *k;
        if (lua_type(L, -2) == LUA_TSTRING) {
            k = lua_tolstring(L, -2, &klen);
        } else { /* an integer key (array_length refused the rest) */
            klen = (size_t)snprintf(num, sizeof num, LUA_INTEGER_FMT, lua_tointeger(L, -2));
            k = num;
        }
        if (gen_failed(e, yajl_gen_string(e->g, (const unsigned char *)k, klen), "object key") < 0 ||
            encode_value(e, lua_gettop(L)) < 0) {
            lua_pop(L, 2);
            return -1;
        }
        lua_pop(L, 1);
    }
    return gen_failed(e, yajl_gen_map_close(e->g), "object");
}

static int encode_value(encoder *e, int idx) {
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return gen_failed(e, yajl_gen_null(e->g), "null");
    case LUA_TBOOLEAN: return gen_failed(e, yajl_gen_bool(e->g, lua_toboolean(L, idx)), "boolean");
    case LUA_TNUMBER: return encode_number(e, idx);
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return gen_failed(e, yajl_gen_string(e->g, (const unsigned char *)s, len), "string");
    }
    case LUA_TTABLE: return encode_table(e, idx);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) return gen_failed(e, yajl_gen_null(e->g), "null");
        /* fallthrough */
    default:
        snprintf(e->msg, sizeof e->msg, "cannot encode a value of type %s", luaL_typename(L, idx));
        return -1;
    }
}

/* pup.json.encode(value) -> text; raises naming what cannot be encoded. */
static int json_encode(lua_State *L) {
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    codec *c = codec_push(L);
    if (!c->g) {
        c->g = yajl_gen_alloc(NULL);
        if (!c->g) return luaL_error(L, "pup.json.encode: out of memory");
        yajl_gen_config(c->g, yajl_gen_validate_utf8, 1);
    }
    yajl_gen_reset(c->g, NULL);
    yajl_gen_clear(c->g);
    encoder e = {L, c->g, ""};
    if (encode_value(&e, 1) < 0) return luaL_error(L, "pup.json.encode: %s", e.msg);
    const unsigned char *buf;
    size_t len;
    yajl_gen_get_buf(c->g, &buf, &len);
    lua_pushlstring(L, (const char *)buf, len);
    return 1;
}

void pup_lua_open_json(lua_State *L) {
    if (luaL_newmetatable(L, CODEC_MT)) {
        lua_pushcfunction(L, codec_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, codec_close);
        lua_setfield(L, -2, "__close");
    }
    lua_pop(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, CODEC_MT ".shared");
    if (lua_isnil(L, -1)) {
        codec *c = lua_newuserdatauv(L, sizeof *c, 0);
        memset(c, 0, sizeof *c);
        luaL_setmetatable(L, CODEC_MT);
        lua_setfield(L, LUA_REGISTRYINDEX, CODEC_MT ".shared");
    }
    lua_pop(L, 1);

    lua_newtable(L); /* pup.json */
    lua_pushcfunction(L, json_encode);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, "pupsourcing.json_encode");
    lua_setfield(L, -2, "encode");
    lua_pushcfunction(L, json_decode);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, "pupsourcing.json_decode");
    lua_setfield(L, -2, "decode");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
    luaL_newmetatable(L, ARRAY_MT);
    lua_setfield(L, -2, "array_mt");
    lua_setfield(L, -2, "json");
}
