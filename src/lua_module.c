/*
 * lua_module.c -- `pupsourcing.core`: the module table of the C binding.
 */
#include "pup_lua.h"
#include "pup_processor.h"

#include <errno.h>
#include <time.h>

/* pup.partition_of(aggregate_id, total) */
static int l_partition_of(lua_State *L) {
    size_t len;
    const char *id = luaL_checklstring(L, 1, &len);
    lua_Integer total = luaL_checkinteger(L, 2);
    luaL_argcheck(L, total >= 1 && total <= 0x7fffffff, 2, "total partitions must be >= 1");
    lua_pushinteger(L, pup_partition_of(id, len, (int)total));
    return 1;
}

static int l_fnv1a32(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_pushinteger(L, pup_fnv1a32(s, len));
    return 1;
}

/* pup.sleep(seconds). Inside a handler with a time limit it sleeps at most until the
 * deadline and then raises the time-limit error. */
static int l_sleep(lua_State *L) {
    lua_Number s = luaL_checknumber(L, 1);
    double left;
    int limit_ms, cut = pup_lua_handler_deadline(L, &left, &limit_ms) && s >= left;
    if (cut) s = left;
    if (s > 0) {
        struct timespec ts = {(time_t)s, (long)((s - (lua_Number)(time_t)s) * 1e9)};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
        }
    }
    if (cut) return luaL_error(L, "handler exceeded its time limit of %d ms", limit_ms);
    return 0;
}

/* core._repartition(db, store, projection_name, count) -> previous count (0: new group)
 * | nil, err. Sets a worker group's partition count in its own transaction. */
static int l_repartition(lua_State *L) {
    pup_conn *c = pup_lua_checkconn(L, 1);
    const pup_store *s = pup_lua_checkstore(L, 2);
    const char *name = luaL_checkstring(L, 3);
    lua_Integer n = luaL_checkinteger(L, 4);
    luaL_argcheck(L, n >= 1 && n <= PUP_LUA_MAX_PARTITIONS, 4, "partition count out of range");
    pup_error err;
    int previous;
    if (pup_group_repartition(s, c, name, (int)n, &previous, &err) < 0) return pup_lua_push_error(L, &err);
    lua_pushinteger(L, previous);
    return 1;
}

/* pup.now(): wall clock in seconds with sub-second precision. */
static int l_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + ts.tv_nsec / 1e9);
    return 1;
}

int luaopen_pupsourcing_core(lua_State *L) {
    lua_newtable(L);
    pup_lua_open_json(L);
    pup_lua_open_db(L);
    pup_lua_open_store(L);
    pup_lua_open_processor(L);
    pup_lua_open_runner(L);
    static const luaL_Reg funcs[] = {{"partition_of", l_partition_of}, {"fnv1a32", l_fnv1a32},
                                     {"sleep", l_sleep}, {"now", l_now},
                                     {"_repartition", l_repartition}, {NULL, NULL}};
    luaL_setfuncs(L, funcs, 0);
    return 1;
}
