/*
 * lua_processor.c -- pup.processor(db, projection, opts): a projection table driven by
 * the C batch loop. The handler gets a managed tx (pipelined exec) and the event.
 */
#include "pup_lua.h"
#include "pup_processor.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

/* The processor userdata. References keep the db, the projection table and the
 * handler's tx alive; L is the state running the current call (set on entry). */
typedef struct lproc {
    pup_processor *p;
    lua_State *L;
    int proj_ref, tx_ref, db_ref, store_ref;
    pup_processor_stats *shared; /* runner's copy of the stats, or NULL */
    int json_log;
    int handler_timeout_ms; /* per-event limit on handler run time; 0 = none */
} lproc;

/* Count hook of a handler with a time limit: raises once the deadline has passed. */
static void deadline_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_getfield(L, LUA_REGISTRYINDEX, "pupsourcing.deadline");
    double deadline = lua_tonumber(L, -1);
    lua_pop(L, 1);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (deadline > 0 && (double)ts.tv_sec + ts.tv_nsec / 1e9 > deadline) {
        lua_getfield(L, LUA_REGISTRYINDEX, "pupsourcing.deadline_ms");
        luaL_error(L, "handler exceeded its time limit of %d ms", (int)lua_tointeger(L, -1));
    }
}

/* Calls projection[fname](tx, extra...) with nargs extra values on the stack. */
static int call_projection(lproc *lp, const char *fname, int nargs, pup_error *err) {
    lua_State *L = lp->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, lp->proj_ref);
    lua_getfield(L, -1, fname);
    lua_remove(L, -2);
    lua_rawgeti(L, LUA_REGISTRYINDEX, lp->tx_ref);
    if (nargs) {
        lua_rotate(L, -(nargs + 2), 2); /* fn, tx, extra... */
    }
    if (pup_lua_pcall(L, nargs + 1, 2, err) != LUA_OK) return -1;
    /* `return nil, err` from a handler fails it like a raise would. */
    if (!lua_toboolean(L, -2) && !lua_isnil(L, -1)) {
        const char *msg = luaL_tolstring(L, -1, NULL);
        pup_error_set(err, PUP_ERR_HANDLER, "%s returned an error: %s", fname, msg);
        lua_pop(L, 3);
        return -1;
    }
    lua_pop(L, 2);
    return 0;
}

static int cb_setup(void *ud, pup_conn *c, pup_error *err) {
    (void)c;
    return call_projection(ud, "setup", 0, err);
}

static int cb_handle(void *ud, pup_conn *c, const pup_event *ev, pup_error *err) {
    (void)c;
    lproc *lp = ud;
    lua_State *L = lp->L;
    if (lp->handler_timeout_ms <= 0) {
        pup_lua_push_event(L, ev);
        return call_projection(lp, "handle", 1, err);
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + ts.tv_nsec / 1e9 + lp->handler_timeout_ms / 1000.0);
    lua_setfield(L, LUA_REGISTRYINDEX, "pupsourcing.deadline");
    lua_pushinteger(L, lp->handler_timeout_ms);
    lua_setfield(L, LUA_REGISTRYINDEX, "pupsourcing.deadline_ms");
    lua_sethook(L, deadline_hook, LUA_MASKCOUNT, 10000);
    pup_lua_push_event(L, ev);
    int rc = call_projection(lp, "handle", 1, err);
    lua_sethook(L, NULL, 0, 0);
    return rc;
}

/* Collects the strings of list field k of the table at idx into an array that is left
 * on the stack (a userdata), so it stays alive until the caller is done with it. */
static const char **string_list(lua_State *L, int idx, const char *k, int *n) {
    *n = 0;
    if (lua_getfield(L, idx, k) != LUA_TTABLE) {
        lua_pop(L, 1);
        return NULL;
    }
    int len = (int)luaL_len(L, -1);
    const char **out = lua_newuserdatauv(L, (len + 1) * sizeof *out, 0); /* freed by the GC */
    for (int i = 0; i < len; i++) {
        lua_geti(L, -2, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "projection field %s must be a list of strings", k);
        out[i] = lua_tostring(L, -1); /* anchored by the projection table */
        lua_pop(L, 1);
    }
    lua_remove(L, -2); /* the list; the array stays on the stack */
    *n = len;
    return out;
}

static lua_Integer opt_int(lua_State *L, int idx, const char *k, lua_Integer def) {
    if (lua_isnoneornil(L, idx)) return def;
    lua_getfield(L, idx, k);
    lua_Integer v = def;
    if (!lua_isnil(L, -1)) {
        if (!lua_isinteger(L, -1)) luaL_error(L, "option %s must be an integer", k);
        v = lua_tointeger(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* pup.processor(db, projection, {partition_key, total_partitions, batch_size,
 * poll_interval (seconds), store}) */
static int l_processor(lua_State *L) {
    pup_conn *c = pup_lua_checkconn(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    lua_settop(L, 3); /* fixed argument slots; temporaries go above them */
    /* Validate through the Lua part's check_projection. */
    lua_getglobal(L, "require");
    lua_pushliteral(L, "pupsourcing");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "check_projection");
    lua_pushvalue(L, 2);
    lua_call(L, 1, 0);
    lua_pop(L, 1);

    pup_projection_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    lua_getfield(L, 2, "name");
    cfg.name = lua_tostring(L, -1);
    lua_pop(L, 1);
    cfg.aggregate_types = string_list(L, 2, "aggregate_types", &cfg.n_aggregate_types);
    cfg.event_types = string_list(L, 2, "event_types", &cfg.n_event_types);
    if (!lua_isnoneornil(L, 3)) {
        lua_getfield(L, 3, "group");
        cfg.group = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    cfg.partition_key = (int)opt_int(L, 3, "partition_key", 0);
    cfg.total_partitions = (int)opt_int(L, 3, "total_partitions", cfg.group ? 16 : 1);
    if (!lua_isnoneornil(L, 3) && lua_getfield(L, 3, "lease_ttl") != LUA_TNIL) {
        luaL_argcheck(L, lua_isnumber(L, -1) && lua_tonumber(L, -1) > 0, 3, "lease_ttl must be a positive number of seconds");
        cfg.lease_ttl_ms = (int)(lua_tonumber(L, -1) * 1000);
    }
    if (!lua_isnoneornil(L, 3)) lua_pop(L, 1);
    cfg.batch_size = (int)opt_int(L, 3, "batch_size", opt_int(L, 2, "batch_size", 100));
    luaL_argcheck(L, cfg.batch_size >= 1, 3, "batch_size must be >= 1");
    cfg.poll_interval_ms = 1000;
    if (!lua_isnoneornil(L, 3) && lua_getfield(L, 3, "poll_interval") != LUA_TNIL) {
        luaL_argcheck(L, lua_isnumber(L, -1) && lua_tonumber(L, -1) > 0, 3, "poll_interval must be a positive number of seconds");
        cfg.poll_interval_ms = (int)(lua_tonumber(L, -1) * 1000);
        if (cfg.poll_interval_ms < 1) cfg.poll_interval_ms = 1;
    }
    if (!lua_isnoneornil(L, 3)) lua_pop(L, 1);

    int timeout_ms = (int)opt_int(L, 3, "handler_timeout_ms", 0);
    luaL_argcheck(L, timeout_ms >= 0, 3, "handler_timeout_ms must be >= 0");
    const pup_store *store;
    int has_store = !lua_isnoneornil(L, 3) && lua_getfield(L, 3, "store") != LUA_TNIL;
    if (!has_store) {
        if (!lua_isnoneornil(L, 3)) lua_pop(L, 1);
        lua_getglobal(L, "require");
        lua_pushliteral(L, "pupsourcing.core");
        lua_call(L, 1, 1);
        lua_getfield(L, -1, "store");
        lua_call(L, 0, 1);
        lua_remove(L, -2);
    }
    store = pup_lua_checkstore(L, -1);
    int store_idx = lua_gettop(L);

    lproc *lp = lua_newuserdatauv(L, sizeof *lp, 0); /* closed until the processor exists */
    memset(lp, 0, sizeof *lp);
    lp->proj_ref = lp->tx_ref = lp->db_ref = lp->store_ref = LUA_NOREF;
    luaL_setmetatable(L, PUP_PROCESSOR_MT);
    lp->L = L;
    lp->handler_timeout_ms = timeout_ms;
    cfg.statement_timeout_ms = timeout_ms;
    pup_handler h = {lp, NULL, cb_handle};
    lua_getfield(L, 2, "setup");
    if (lua_isfunction(L, -1)) h.setup = cb_setup;
    lua_pop(L, 1);
    pup_error err;
    lp->p = pup_processor_new(store, c, &cfg, &h, &err);
    if (!lp->p) {
        lua_pushstring(L, err.message);
        return lua_error(L); /* invalid partitioning is misuse */
    }
    lua_pushvalue(L, 2);
    lp->proj_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, 1);
    lp->db_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, store_idx);
    lp->store_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    pup_lua_push_managed_tx(L, c, pup_lua_params(L, 1));
    lp->tx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 1;
}

static lproc *checkproc(lua_State *L) {
    lproc *lp = luaL_checkudata(L, 1, PUP_PROCESSOR_MT);
    if (!lp->p) luaL_argerror(L, 1, "processor is closed");
    lua_rawgeti(L, LUA_REGISTRYINDEX, lp->db_ref);
    pup_lua_checkconn(L, lua_gettop(L)); /* raises if the db was closed */
    lua_pop(L, 1);
    lp->L = L;
    return lp;
}

static int proc_close(lua_State *L) {
    lproc *lp = luaL_checkudata(L, 1, PUP_PROCESSOR_MT);
    if (lp->tx_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, lp->tx_ref);
        pup_lua_tx_detach(L, -1);
        lua_pop(L, 1);
    }
    pup_processor_free(lp->p);
    lp->p = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, lp->proj_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, lp->tx_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, lp->db_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, lp->store_ref);
    lp->proj_ref = lp->tx_ref = lp->db_ref = lp->store_ref = LUA_NOREF;
    return 0;
}

static int proc_tostring(lua_State *L) {
    lproc *lp = luaL_checkudata(L, 1, PUP_PROCESSOR_MT);
    if (!lp->p) lua_pushliteral(L, "pupsourcing.processor (closed)");
    else {
        const pup_projection_cfg *c = pup_processor_cfg(lp->p);
        lua_pushfstring(L, "pupsourcing.processor (%s %d/%d)", c->name, c->partition_key, c->total_partitions);
    }
    return 1;
}

/* processor:run_once() -> events handled in one batch | nil, err */
static int proc_run_once(lua_State *L) {
    lproc *lp = checkproc(L);
    int acquired, handled, waiting;
    long long advanced;
    pup_error err;
    if (pup_processor_acquire(lp->p, &acquired, &err) < 0) return pup_lua_push_error(L, &err);
    if (!acquired) {
        pup_error_set(&err, PUP_ERR_DATABASE, "projection %s: another processor holds this partition",
                      pup_processor_cfg(lp->p)->name);
        return pup_lua_push_error(L, &err);
    }
    if (pup_processor_batch(lp->p, &handled, &advanced, &waiting, &err) < 0)
        return pup_lua_push_error(L, &err);
    lua_pushinteger(L, handled);
    return 1;
}

static void share_progress(void *ud, const pup_processor *p) {
    lproc *lp = ud;
    if (!lp->shared) return;
    pup_processor_stats s;
    pup_processor_stats_get(p, &s);
    __atomic_store_n(&lp->shared->handled, s.handled, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->position, s.position, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->head, s.head, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->waiting_position, s.waiting_position, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->standby, s.standby, __ATOMIC_RELAXED);
}

/* Log lines of the loop: text, or one JSON object a line for machines. */
static void log_line(void *ud, const char *line) {
    lproc *lp = ud;
    if (!lp->json_log) {
        fprintf(stderr, "pupsourcing: %s\n", line);
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char buf[2600];
    size_t n = 0;
    for (const char *s = line; *s && n < sizeof buf - 8; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') buf[n++] = '\\', buf[n++] = (char)ch;
        else if (ch == '\n') buf[n++] = '\\', buf[n++] = 'n';
        else if (ch < 0x20) n += (size_t)snprintf(buf + n, sizeof buf - n, "\\u%04x", ch);
        else buf[n++] = (char)ch;
    }
    buf[n] = '\0';
    fprintf(stderr, "{\"time\":%.3f,\"level\":\"info\",\"msg\":\"%s\"}\n",
            (double)ts.tv_sec + ts.tv_nsec / 1e9, buf);
}

/* Runs the loop with stop_fd; pushes handled-in-this-run or nil, err. */
static int run_loop(lua_State *L, lproc *lp, int stop_fd, int once) {
    pup_processor_stats before;
    pup_processor_stats_get(lp->p, &before);
    pup_run_opts o = {.stop_fd = stop_fd, .once = once, .progress = share_progress,
                      .log = log_line, .ud = lp};
    pup_error err;
    int rc = pup_processor_run(lp->p, &o, &err);
    share_progress(lp, lp->p);
    if (rc < 0) return pup_lua_push_error(L, &err);
    pup_processor_stats after;
    pup_processor_stats_get(lp->p, &after);
    lua_pushinteger(L, after.handled - before.handled);
    return 1;
}

/* processor:run{once=false} -> handled | nil, err; SIGINT/SIGTERM stop it cleanly. */
static int proc_run(lua_State *L) {
    lproc *lp = checkproc(L);
    int once = 0;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_getfield(L, 2, "once");
        once = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    int sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    int n = run_loop(L, lp, sfd, once);
    if (sfd >= 0) {
        struct signalfd_siginfo si;
        while (read(sfd, &si, sizeof si) == sizeof si) {
        } /* consume the signal that stopped us, so unblocking does not deliver it */
        close(sfd);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return n;
}

/* processor:_run_fd(fd, once, shared_stats, json_log) -- the runner's entry (no signal
 * handling). */
static int proc_run_fd(lua_State *L) {
    lproc *lp = checkproc(L);
    int fd = (int)luaL_checkinteger(L, 2);
    int once = lua_toboolean(L, 3);
    lp->shared = lua_touserdata(L, 4);
    lp->json_log = lua_toboolean(L, 5);
    return run_loop(L, lp, fd, once);
}

/* processor:stats() -> {handled, position, waiting_position, standby} */
static int proc_stats(lua_State *L) {
    lproc *lp = checkproc(L);
    pup_processor_stats s;
    pup_processor_stats_get(lp->p, &s);
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, s.handled);
    lua_setfield(L, -2, "handled");
    lua_pushinteger(L, s.position);
    lua_setfield(L, -2, "position");
    lua_pushinteger(L, s.waiting_position);
    lua_setfield(L, -2, "waiting_position");
    lua_pushboolean(L, s.standby);
    lua_setfield(L, -2, "standby");
    return 1;
}

void pup_lua_open_processor(lua_State *L) {
    static const luaL_Reg methods[] = {{"run_once", proc_run_once}, {"run", proc_run},
                                       {"_run_fd", proc_run_fd},    {"stats", proc_stats},
                                       {"close", proc_close},       {NULL, NULL}};
    pup_lua_class(L, PUP_PROCESSOR_MT, methods, proc_close, proc_tostring);
    lua_pop(L, 1);
    lua_pushcfunction(L, l_processor);
    lua_setfield(L, -2, "processor");
}
