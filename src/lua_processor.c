/*
 * lua_processor.c -- pup.processor(db, projection, opts): a projection table driven by
 * the C batch loop. The handler gets a managed tx (pipelined exec) and the event; a
 * reactor's (kind = "reactor") gets the event alone, in the same loop.
 */
#include "pup_lua.h"
#include "pup_processor.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

/* Per-VM state of processor runs, one full userdata in the registry (key: &vm_key). The
 * count hook reads it, and so do coroutines a handler created (they inherit the hook). */
typedef struct vmstate {
    int busy;        /* a processor of this VM is running: no other may run inside it */
    double deadline; /* CLOCK_MONOTONIC seconds the running handler must end by; 0: none */
    int limit_ms;
    lua_Hook prev;   /* the hook installed before the deadline hook (luacov, a debugger) */
    int prev_mask, prev_count;
} vmstate;

static const char vm_key = 0; /* its address is the registry key of the vmstate */

/* The processor userdata. References keep the db, the projection table and the
 * handler's tx alive; L is the state running the current call (set on entry). */
typedef struct lproc {
    pup_processor *p;
    lua_State *L;
    vmstate *vm; /* anchored in the registry for the VM's lifetime */
    int proj_ref, tx_ref, db_ref, store_ref;
    pup_processor_stats *shared; /* runner's copy of the stats, or NULL */
    int json_log;
    int lifecycle;          /* log the lifecycle records too (the runner was given a log_format) */
    int running;            /* inside run/run_once: close() and nested runs raise */
    int handler_timeout_ms; /* per-event limit on handler run time; 0 = none */
    int reactor;            /* kind = "reactor": handle(event), no tx */
} lproc;

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The VM's vmstate, created on first use (by pup.processor, so hooks never allocate). */
static vmstate *vm_state(lua_State *L) {
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &vm_key) == LUA_TUSERDATA) {
        vmstate *vm = lua_touserdata(L, -1);
        lua_pop(L, 1);
        return vm;
    }
    lua_pop(L, 1);
    vmstate *vm = lua_newuserdatauv(L, sizeof *vm, 0);
    memset(vm, 0, sizeof *vm);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &vm_key);
    return vm;
}

int pup_lua_handler_deadline(lua_State *L, double *left, int *limit_ms) {
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &vm_key) != LUA_TUSERDATA) {
        lua_pop(L, 1);
        return 0;
    }
    const vmstate *vm = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (vm->deadline <= 0) return 0;
    *left = vm->deadline - mono_now();
    *limit_ms = vm->limit_ms;
    return 1;
}

/* Hook of a handler with a time limit: passes events on to the hook it replaced, and on
 * count events raises once the deadline has passed, then at every instruction: a pcall
 * that swallows the error (in a loop) hits it again as soon as it returns. */
static void deadline_hook(lua_State *L, lua_Debug *ar) {
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &vm_key) != LUA_TUSERDATA) {
        lua_pop(L, 1);
        return;
    }
    const vmstate *vm = lua_touserdata(L, -1);
    lua_pop(L, 1);
    int bit = ar->event == LUA_HOOKTAILCALL ? LUA_MASKCALL : 1 << ar->event;
    if (vm->prev && (vm->prev_mask & bit)) vm->prev(L, ar);
    if (ar->event == LUA_HOOKCOUNT && vm->deadline > 0 && mono_now() > vm->deadline) {
        if (lua_gethookcount(L) != 1) lua_sethook(L, deadline_hook, lua_gethookmask(L), 1);
        luaL_error(L, "handler exceeded its time limit of %d ms", vm->limit_ms);
    }
}

/* Starts the deadline of one handler call in thread L, keeping the hook it replaces
 * running (at that hook's count, if it has one). */
static void deadline_start(lua_State *L, vmstate *vm, int limit_ms) {
    lua_Hook cur = lua_gethook(L);
    if (cur != deadline_hook) { /* else a coroutine that inherited ours: vm->prev stands */
        vm->prev = cur;
        vm->prev_mask = cur ? lua_gethookmask(L) : 0;
        vm->prev_count = lua_gethookcount(L);
    }
    vm->limit_ms = limit_ms;
    vm->deadline = mono_now() + limit_ms / 1000.0;
    int count = (vm->prev_mask & LUA_MASKCOUNT) ? vm->prev_count : 10000;
    lua_sethook(L, deadline_hook, vm->prev_mask | LUA_MASKCOUNT, count);
}

/* Ends it: puts the replaced hook back, unless the handler installed one of its own. */
static void deadline_stop(lua_State *L, vmstate *vm) {
    vm->deadline = 0;
    if (lua_gethook(L) == deadline_hook) lua_sethook(L, vm->prev, vm->prev_mask, vm->prev_count);
}

/* One call of projection[fname](tx[, event]), run by call_projection in one protected
 * call: the lookups (a projection table may have an __index), building the event, the
 * call and the check of its results can all raise, and none may unwind through
 * processor.c. */
typedef struct call_ctx {
    lproc *lp;
    const char *fname; /* "setup" or "handle" */
    const pup_event *ev; /* NULL for setup */
} call_ctx;

/* Returns nothing, or the message of a `return nil, err`. */
static int projection_call(lua_State *L) {
    const call_ctx *cx = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, cx->lp->proj_ref);
    if (lua_getfield(L, -1, cx->fname) != LUA_TFUNCTION)
        return luaL_error(L, "projection field %s is not a function anymore (got %s)", cx->fname,
                          luaL_typename(L, -1));
    /* A reactor's handle(event) gets no tx: its side effects are not the batch's. */
    int with_tx = !(cx->ev && cx->lp->reactor);
    if (with_tx) lua_rawgeti(L, LUA_REGISTRYINDEX, cx->lp->tx_ref);
    if (cx->ev) pup_lua_push_event(L, cx->ev);
    lua_call(L, with_tx + (cx->ev != NULL), 2);
    /* `return nil, err` from a handler fails it like a raise would. */
    if (!lua_toboolean(L, -2) && !lua_isnil(L, -1)) {
        luaL_tolstring(L, -1, NULL);
        return 1;
    }
    return 0;
}

static int call_projection(lproc *lp, const char *fname, const pup_event *ev, pup_error *err) {
    lua_State *L = lp->L;
    call_ctx cx = {lp, fname, ev};
    int timed = ev && lp->handler_timeout_ms > 0;
    if (timed) deadline_start(L, lp->vm, lp->handler_timeout_ms);
    lua_pushcfunction(L, projection_call);
    lua_pushlightuserdata(L, &cx);
    int rc = pup_lua_pcall(L, 1, 1, err);
    if (timed) deadline_stop(L, lp->vm);
    if (rc != LUA_OK) return -1;
    rc = 0;
    if (lua_type(L, -1) == LUA_TSTRING) {
        pup_error_set(err, PUP_ERR_HANDLER, "%s returned an error: %s", fname, lua_tostring(L, -1));
        rc = -1;
    }
    lua_pop(L, 1);
    return rc;
}

/* handle_batch(tx, events), run in one protected call (the events' list is built inside
 * it). Returns nothing, or, for a `return nil, err`, the message and the position err
 * names (err.position, an integer; nil if none). */
typedef struct batch_ctx {
    lproc *lp;
    const pup_event *evs;
    int n;
} batch_ctx;

static int batch_call(lua_State *L) {
    const batch_ctx *cx = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, cx->lp->proj_ref);
    if (lua_getfield(L, -1, "handle_batch") != LUA_TFUNCTION)
        return luaL_error(L, "projection field handle_batch is not a function anymore (got %s)", luaL_typename(L, -1));
    lua_rawgeti(L, LUA_REGISTRYINDEX, cx->lp->tx_ref);
    lua_createtable(L, cx->n, 0);
    for (int i = 0; i < cx->n; i++) {
        pup_lua_push_event(L, &cx->evs[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_call(L, 2, 2);
    if (lua_toboolean(L, -2) || lua_isnil(L, -1)) return 0;
    int e = lua_gettop(L);
    lua_pushnil(L);
    if (lua_type(L, e) == LUA_TTABLE) {
        if (lua_getfield(L, e, "position") == LUA_TNUMBER && lua_isinteger(L, -1)) lua_replace(L, e + 1);
        else lua_pop(L, 1);
        if (lua_getfield(L, e, "message") == LUA_TSTRING) {
            lua_pushvalue(L, e + 1);
            return 2;
        }
        lua_pop(L, 1);
    }
    luaL_tolstring(L, e, NULL);
    lua_pushvalue(L, e + 1);
    return 2;
}

static int cb_handle_batch(void *ud, pup_conn *c, const pup_event *evs, int n, long long *pos, pup_error *err) {
    (void)c;
    lproc *lp = ud;
    lua_State *L = lp->L;
    batch_ctx cx = {lp, evs, n};
    int timed = lp->handler_timeout_ms > 0;
    if (timed) deadline_start(L, lp->vm, lp->handler_timeout_ms);
    lua_pushcfunction(L, batch_call);
    lua_pushlightuserdata(L, &cx);
    int rc = pup_lua_pcall(L, 1, 2, err);
    if (timed) deadline_stop(L, lp->vm);
    if (rc != LUA_OK) return -1;
    rc = 0;
    if (lua_type(L, -2) == LUA_TSTRING) {
        if (lua_isinteger(L, -1)) *pos = lua_tointeger(L, -1);
        pup_error_set(err, PUP_ERR_HANDLER, "handle_batch returned an error: %s", lua_tostring(L, -2));
        rc = -1;
    }
    lua_pop(L, 2);
    return rc;
}

static int cb_setup(void *ud, pup_conn *c, pup_error *err) {
    (void)c;
    return call_projection(ud, "setup", NULL, err);
}

static int cb_handle(void *ud, pup_conn *c, const pup_event *ev, pup_error *err) {
    (void)c;
    return call_projection(ud, "handle", ev, err);
}

/* Collects the strings of list field k of the table at idx into an array that is left
 * on the stack (a userdata whose user value anchors the strings: an __index may make
 * them up), so they stay alive until the caller is done with them. */
static const char **string_list(lua_State *L, int idx, const char *k, int *n) {
    *n = 0;
    if (lua_getfield(L, idx, k) != LUA_TTABLE) {
        lua_pop(L, 1);
        return NULL;
    }
    int len = (int)luaL_len(L, -1);
    const char **out = lua_newuserdatauv(L, (len + 1) * sizeof *out, 1); /* freed by the GC */
    lua_createtable(L, len, 0);
    lua_setiuservalue(L, -2, 1);
    lua_getiuservalue(L, -1, 1);
    for (int i = 0; i < len; i++) {
        lua_geti(L, -3, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "projection field %s must be a list of strings", k);
        out[i] = lua_tostring(L, -1);
        lua_rawseti(L, -2, i + 1);
    }
    lua_pop(L, 1);
    lua_remove(L, -2); /* the list; the array stays on the stack */
    *n = len;
    return out;
}

void pup_lua_check_keys(lua_State *L, int idx, const char *what, const char *const *known) {
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        int ok = 0;
        for (const char *const *k = known; *k && !ok; k++)
            ok = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), *k) == 0;
        if (!ok) luaL_error(L, "%s: unknown option %s", what, luaL_tolstring(L, -1, NULL));
    }
}

/* Integer option k of the table at idx (absent or nil: def), in [min, max]. */
int pup_lua_opt_int(lua_State *L, int idx, const char *what, const char *k, lua_Integer def, lua_Integer min,
                    lua_Integer max) {
    if (lua_isnoneornil(L, idx)) return (int)def;
    lua_getfield(L, idx, k);
    lua_Integer v = def;
    if (!lua_isnil(L, -1)) {
        if (!lua_isinteger(L, -1)) luaL_error(L, "%s %s must be an integer from %I to %I", what, k, min, max);
        v = lua_tointeger(L, -1);
        if (v < min || v > max)
            luaL_error(L, "%s %s must be an integer from %I to %I, got %I", what, k, min, max, v);
    }
    lua_pop(L, 1);
    return (int)v;
}

int pup_lua_opt_seconds(lua_State *L, int idx, const char *k, int def_ms, int max_s) {
    int ms = def_ms;
    if (lua_getfield(L, idx, k) != LUA_TNIL) {
        lua_Number s = lua_tonumber(L, -1);
        if (!lua_isnumber(L, -1) || !(s > 0 && s <= max_s))
            luaL_error(L, "option %s must be a number of seconds above 0 and at most %d", k, max_s);
        ms = (int)(s * 1000 + 0.5); /* rounded: 1.005 * 1000 is 1004.99... */
        if (ms < 1) ms = 1;
    }
    lua_pop(L, 1);
    return ms;
}

/* pup.processor(db, projection, {partition_key, total_partitions, batch_size,
 * poll_interval, handler_timeout, lease_ttl (all three in seconds), group, store}) */
static int l_processor(lua_State *L) {
    static const char *const keys[] = {"partition_key", "total_partitions", "batch_size", "poll_interval",
                                       "handler_timeout", "group", "lease_ttl", "store", NULL};
    pup_conn *c = pup_lua_checkconn(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    else {
        lua_settop(L, 2);
        lua_newtable(L);
    }
    lua_settop(L, 3); /* fixed argument slots; temporaries go above them */
    pup_lua_check_keys(L, 3, "pup.processor", keys);
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
    lua_getfield(L, 2, "name"); /* stays on the stack: an __index may have made it up */
    cfg.name = lua_tostring(L, -1);
    cfg.aggregate_types = string_list(L, 2, "aggregate_types", &cfg.n_aggregate_types);
    cfg.event_types = string_list(L, 2, "event_types", &cfg.n_event_types);
    lua_getfield(L, 3, "group");
    cfg.group = lua_toboolean(L, -1);
    lua_pop(L, 1);
    cfg.partition_key = pup_lua_opt_int(L, 3, "option", "partition_key", 0, 0, PUP_LUA_MAX_PARTITIONS - 1);
    cfg.total_partitions = pup_lua_opt_int(L, 3, "option", "total_partitions", cfg.group ? 16 : 1, 1, PUP_LUA_MAX_PARTITIONS);
    cfg.lease_ttl_ms = pup_lua_opt_seconds(L, 3, "lease_ttl", 0, PUP_LUA_MAX_SECONDS);
    lua_getfield(L, 2, "kind");
    int reactor = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "reactor") == 0;
    lua_pop(L, 1);
    /* A reactor's batch transaction stays open across its side effects, and a crash
     * delivers the whole batch again: one event per batch unless asked otherwise. */
    int def_batch = pup_lua_opt_int(L, 2, "option", "batch_size", reactor ? 1 : 100, 1, PUP_LUA_MAX_BATCH);
    cfg.batch_size = pup_lua_opt_int(L, 3, "option", "batch_size", def_batch, 1, PUP_LUA_MAX_BATCH);
    cfg.poll_interval_ms = pup_lua_opt_seconds(L, 3, "poll_interval", 1000, PUP_LUA_MAX_SECONDS);
    int timeout_ms = pup_lua_opt_seconds(L, 3, "handler_timeout", 0, PUP_LUA_MAX_TIMEOUT_S);
    /* The poison policy (checked by check_projection above). */
    lua_getfield(L, 2, "on_error");
    const char *policy = lua_tostring(L, -1);
    cfg.on_error = !policy ? PUP_ON_ERROR_STOP : strcmp(policy, "skip") == 0 ? PUP_ON_ERROR_SKIP
                   : strcmp(policy, "retry") == 0 ? PUP_ON_ERROR_RETRY : PUP_ON_ERROR_STOP;
    lua_pop(L, 1);
    cfg.max_attempts = pup_lua_opt_int(L, 2, "projection field", "max_attempts", 3, 1, 1000);
    cfg.retry_backoff_ms = pup_lua_opt_seconds(L, 2, "retry_backoff", 1000, PUP_LUA_MAX_SECONDS);
    if (lua_getfield(L, 3, "store") == LUA_TNIL) {
        lua_pop(L, 1);
        lua_getglobal(L, "require");
        lua_pushliteral(L, "pupsourcing.core");
        lua_call(L, 1, 1);
        lua_getfield(L, -1, "store");
        lua_call(L, 0, 1);
        lua_remove(L, -2);
    }
    const pup_store *store = pup_lua_checkstore(L, -1);
    int store_idx = lua_gettop(L);
    vmstate *vm = vm_state(L);

    lproc *lp = lua_newuserdatauv(L, sizeof *lp, 0); /* closed until the processor exists */
    memset(lp, 0, sizeof *lp);
    lp->proj_ref = lp->tx_ref = lp->db_ref = lp->store_ref = LUA_NOREF;
    luaL_setmetatable(L, PUP_PROCESSOR_MT);
    lp->L = L;
    lp->vm = vm;
    lp->handler_timeout_ms = timeout_ms;
    lp->reactor = reactor;
    cfg.statement_timeout_ms = timeout_ms;
    cfg.side_effects = reactor;
    pup_handler h = {lp, NULL, cb_handle, NULL};
    lua_getfield(L, 2, "setup");
    if (lua_isfunction(L, -1)) h.setup = cb_setup;
    lua_pop(L, 1);
    lua_getfield(L, 2, "handle_batch");
    if (lua_isfunction(L, -1)) h.handle_batch = cb_handle_batch;
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
    pup_lua_store_pin(L, store_idx);
    lua_pushvalue(L, store_idx);
    lp->store_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    pup_lua_push_managed_tx(L, c, pup_lua_params(L, 1));
    lp->tx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 1;
}

/* The open processor at argument 1 whose db is open too. */
static lproc *checkproc(lua_State *L) {
    lproc *lp = luaL_checkudata(L, 1, PUP_PROCESSOR_MT);
    if (!lp->p) luaL_argerror(L, 1, "processor is closed");
    lua_rawgeti(L, LUA_REGISTRYINDEX, lp->db_ref);
    pup_lua_checkconn(L, lua_gettop(L)); /* raises if the db was closed */
    lua_pop(L, 1);
    return lp;
}

/* Enters a run: refuses one inside a handler (this processor's or another's of the VM),
 * and pins the db so that neither it nor the processor can be closed meanwhile. */
static lproc *begin_run(lua_State *L) {
    lproc *lp = checkproc(L);
    if (lp->running) luaL_error(L, "processor is running: a handler cannot run its own processor");
    if (lp->vm->busy) luaL_error(L, "a processor cannot run inside another processor's handler");
    lua_rawgeti(L, LUA_REGISTRYINDEX, lp->db_ref);
    pup_lua_db_pin(L, -1);
    lua_pop(L, 1);
    lp->running = lp->vm->busy = 1;
    lp->L = L;
    return lp;
}

static void end_run(lua_State *L, lproc *lp) {
    lp->running = lp->vm->busy = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, lp->db_ref);
    pup_lua_db_unpin(L, -1);
    lua_pop(L, 1);
}

/* close/__close/__gc. A running processor refuses (its handler is on the C stack). */
static int proc_close(lua_State *L) {
    lproc *lp = luaL_checkudata(L, 1, PUP_PROCESSOR_MT);
    if (lp->running) luaL_error(L, "processor is running: it can be closed once run/run_once returns");
    if (lp->tx_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, lp->tx_ref);
        pup_lua_tx_detach(L, -1);
        lua_pop(L, 1);
    }
    pup_processor_free(lp->p);
    lp->p = NULL;
    if (lp->store_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, lp->store_ref);
        pup_lua_store_unpin(L, -1);
        lua_pop(L, 1);
    }
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
    lproc *lp = begin_run(L);
    int acquired, handled = 0, waiting;
    long long advanced;
    pup_error err;
    int rc = pup_processor_acquire(lp->p, &acquired, &err);
    if (rc == 0 && !acquired)
        rc = pup_error_set(&err, PUP_ERR_DATABASE, "projection %s: another processor holds this partition",
                           pup_processor_cfg(lp->p)->name);
    if (rc == 0) rc = pup_processor_batch(lp->p, &handled, &advanced, &waiting, &err);
    end_run(L, lp);
    if (rc < 0) return pup_lua_push_error(L, &err);
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
    __atomic_store_n(&lp->shared->held, s.held, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->retries, s.retries, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->handler_errors, s.handler_errors, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->dead_letters, s.dead_letters, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->oldest_pending_ms, s.oldest_pending_ms, __ATOMIC_RELAXED);
    for (int b = 0; b <= PUP_BATCH_BUCKETS; b++)
        __atomic_store_n(&lp->shared->batch_buckets[b], s.batch_buckets[b], __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->batch_us, s.batch_us, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->batch_started_ms, s.batch_started_ms, __ATOMIC_RELAXED);
    __atomic_store_n(&lp->shared->reader_session, s.reader_session, __ATOMIC_RELAXED);
}

/* Writes s as the inside of a JSON string into buf: quotes, backslashes and control
 * characters escaped, bytes that are not UTF-8 replaced by U+FFFD; stops at a whole
 * character when buf is full. */
static void json_escape(char *buf, size_t size, const char *s) {
    size_t n = 0;
    while (*s && n + 8 < size) {
        unsigned char ch = (unsigned char)*s;
        int len = ch < 0x80 ? 1 : ch >= 0xc2 && ch <= 0xdf ? 2 : ch >= 0xe0 && ch <= 0xef ? 3
                  : ch >= 0xf0 && ch <= 0xf4 ? 4 : 0;
        for (int k = 1; k < len; k++)
            if (((unsigned char)s[k] & 0xc0) != 0x80) len = 0;
        if (len == 0) {
            n += (size_t)snprintf(buf + n, size - n, "\\ufffd");
            s++;
        } else if (ch == '"' || ch == '\\') {
            buf[n++] = '\\';
            buf[n++] = (char)ch;
            s++;
        } else if (ch == '\n') {
            buf[n++] = '\\';
            buf[n++] = 'n';
            s++;
        } else if (ch < 0x20) {
            n += (size_t)snprintf(buf + n, size - n, "\\u%04x", ch);
            s++;
        } else {
            memcpy(buf + n, s, (size_t)len);
            n += (size_t)len;
            s += len;
        }
    }
    buf[n] = '\0';
}

/* t (Unix seconds) as RFC 3339 in UTC with milliseconds: 2026-11-30T02:51:31.123Z. */
static void rfc3339(char *buf, size_t size, double t) {
    time_t secs = (time_t)t;
    struct tm tm;
    gmtime_r(&secs, &tm);
    unsigned ms = (unsigned)((t - (double)secs) * 1000) % 1000;
    size_t n = strftime(buf, size, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, size - n, ".%03uZ", ms);
}

static double wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

void pup_lua_log_line(int json, const char *level, const char *prefix, const char *msg) {
    if (!json) {
        fprintf(stderr, "pupsourcing: %s%s\n", prefix, msg);
        return;
    }
    char buf[2600], now[40];
    json_escape(buf, sizeof buf, msg);
    rfc3339(now, sizeof now, wall_now());
    fprintf(stderr, "{\"time\":\"%s\",\"level\":\"%s\",\"msg\":\"%s%s\"}\n", now, level, prefix, buf);
}

/* Appends ,"key":"escaped value" to the line being built in buf (n bytes used). */
static size_t json_field(char *buf, size_t size, size_t n, const char *key, const char *value) {
    char esc[2600];
    json_escape(esc, sizeof esc, value);
    if (n < size) n += (size_t)snprintf(buf + n, size - n, ",\"%s\":\"%s\"", key, esc);
    return n;
}

/* Records of the loop, as text or one JSON object with their fields. They tell of changes
 * no batch reports (standby, took over, a retry), so the runner's copy of the stats is
 * refreshed too. */
static void log_record(void *ud, const pup_log_rec *rec) {
    lproc *lp = ud;
    share_progress(lp, lp->p);
    if (rec->lifecycle && !lp->lifecycle) return;
    if (!lp->json_log) {
        fprintf(stderr, "pupsourcing: %s\n", rec->msg);
        return;
    }
    char line[8192], t[40];
    size_t n = 0, size = sizeof line - 2;
    rfc3339(t, sizeof t, wall_now());
    n += (size_t)snprintf(line, size, "{\"time\":\"%s\",\"level\":\"%s\",\"event\":\"%s\"", t, rec->level, rec->event);
    n = json_field(line, size, n, "projection", rec->projection);
    if (rec->group) {
        n = json_field(line, size, n, "partition", "group");
        n = json_field(line, size, n, "worker", rec->worker);
        if (n < size) n += (size_t)snprintf(line + n, size - n, ",\"partitions_held\":%d", rec->held);
    } else if (n < size)
        n += (size_t)snprintf(line + n, size - n, ",\"partition\":%d", rec->partition);
    if (n < size)
        n += (size_t)snprintf(line + n, size - n, ",\"total_partitions\":%d,\"position\":%lld", rec->total_partitions,
                              rec->position);
    if (rec->err) {
        n = json_field(line, size, n, "error", rec->err->message);
        n = json_field(line, size, n, "code", pup_code_name(rec->err->code));
        if (rec->err->sqlstate[0]) n = json_field(line, size, n, "sqlstate", rec->err->sqlstate);
    }
    if (strcmp(rec->event, "retry") == 0 && n < size)
        n += (size_t)snprintf(line + n, size - n, ",\"retry_in_ms\":%d", rec->retry_in_ms);
    if (rec->hole && n < size) n += (size_t)snprintf(line + n, size - n, ",\"hole_position\":%lld", rec->hole);
    if (rec->hole_since > 0) {
        rfc3339(t, sizeof t, rec->hole_since);
        n = json_field(line, size, n, "hole_since", t);
    }
    if (rec->reason) n = json_field(line, size, n, "reason", rec->reason);
    n = json_field(line, size, n, "msg", rec->msg);
    if (n >= size) n = size - 1; /* cut: still one line, closed below */
    line[n++] = '}';
    line[n] = '\0';
    fprintf(stderr, "%s\n", line);
}

/* A plain line of ours (no record), e.g. the signalfd warning. */
static void log_line(void *ud, const char *line) {
    lproc *lp = ud;
    share_progress(lp, lp->p);
    pup_lua_log_line(lp->json_log, "info", "", line);
}

/* Server notices (NOTICE, WARNING, connection terminated) during a run with JSON logs;
 * the level is the severity they start with, lower-cased. */
static void json_notice(void *arg, const char *message) {
    (void)arg;
    char line[1024], level[16] = "warning";
    size_t n = strlen(message), k = 0;
    while (n > 0 && (message[n - 1] == '\n' || message[n - 1] == ' ')) n--;
    snprintf(line, sizeof line, "%.*s", (int)n, message);
    while (k < sizeof level - 1 && message[k] >= 'A' && message[k] <= 'Z') k++;
    if (k > 0 && k < sizeof level - 1 && message[k] == ':') {
        for (size_t i = 0; i < k; i++) level[i] = (char)(message[i] - 'A' + 'a');
        level[k] = '\0';
    }
    pup_lua_log_line(1, level, "postgres: ", line);
}

/* Runs the loop with stop_fd; pushes handled-in-this-run or nil, err. */
static int run_loop(lua_State *L, lproc *lp, int stop_fd, int once) {
    pup_processor_stats before;
    pup_processor_stats_get(lp->p, &before);
    pup_run_opts o = {.stop_fd = stop_fd, .once = once, .progress = share_progress,
                      .log = log_line, .record = log_record, .ud = lp};
    pup_error err;
    lua_rawgeti(L, LUA_REGISTRYINDEX, lp->db_ref);
    PGconn *pg = pup_conn_pg(pup_lua_checkconn(L, -1));
    lua_pop(L, 1);
    /* db.c's notice processor takes no argument; PQreset keeps ours across reconnects. */
    PQnoticeProcessor text_notice = lp->json_log ? PQsetNoticeProcessor(pg, json_notice, NULL) : NULL;
    int rc = pup_processor_run(lp->p, &o, &err);
    if (text_notice) PQsetNoticeProcessor(pg, text_notice, NULL);
    share_progress(lp, lp->p);
    end_run(L, lp);
    if (rc < 0) return pup_lua_push_error(L, &err);
    pup_processor_stats after;
    pup_processor_stats_get(lp->p, &after);
    lua_pushinteger(L, after.handled - before.handled);
    return 1;
}

void pup_lua_unblock_signals(const sigset_t *old) {
    /* Ignoring a signal discards it when pending (POSIX), so none that arrived since the
     * last read kills the process on unblocking; then the caller's actions come back. */
    struct sigaction ign, was[2];
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigaction(SIGINT, &ign, &was[0]);
    sigaction(SIGTERM, &ign, &was[1]);
    pthread_sigmask(SIG_SETMASK, old, NULL);
    sigaction(SIGINT, &was[0], NULL);
    sigaction(SIGTERM, &was[1], NULL);
}

/* processor:run{once=false} -> handled | nil, err; SIGINT/SIGTERM stop it cleanly. */
static int proc_run(lua_State *L) {
    int once = 0;
    if (!lua_isnoneornil(L, 2)) {
        static const char *const keys[] = {"once", NULL};
        luaL_checktype(L, 2, LUA_TTABLE);
        pup_lua_check_keys(L, 2, "processor:run", keys);
        lua_getfield(L, 2, "once");
        once = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lproc *lp = begin_run(L);
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    int sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) {
        /* No way to watch them: leave them their default action (a killed run rolls its
         * batch back) rather than blocked for the whole run. */
        char msg[256];
        snprintf(msg, sizeof msg, "cannot watch for SIGINT/SIGTERM (signalfd: %s): they end the process at once",
                 strerror(errno));
        pup_lua_unblock_signals(&old);
        log_line(lp, msg);
    }
    int n = run_loop(L, lp, sfd, once);
    if (sfd >= 0) {
        close(sfd);
        pup_lua_unblock_signals(&old);
    }
    return n;
}

/* processor:_run_fd(fd, once, shared_stats, log) -- the runner's entry (no signal
 * handling); shared_stats is nil or the runner's PUP_STATS_MT box; log is nil (lines as
 * before, no lifecycle records), "text" or "json". */
static int proc_run_fd(lua_State *L) {
    int fd = (int)luaL_checkinteger(L, 2);
    int once = lua_toboolean(L, 3);
    pup_processor_stats **box = lua_isnoneornil(L, 4) ? NULL : luaL_checkudata(L, 4, PUP_STATS_MT);
    const char *log = lua_tostring(L, 5);
    lproc *lp = begin_run(L);
    lp->shared = box ? *box : NULL;
    lp->json_log = log && strcmp(log, "json") == 0;
    lp->lifecycle = log != NULL;
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

/* pup._log_line(json, level, msg): the CLI's own lines, as pup_lua_log_line writes them. */
static int l_log_line(lua_State *L) {
    int json = lua_toboolean(L, 1);
    const char *level = luaL_checkstring(L, 2), *msg = luaL_checkstring(L, 3);
    pup_lua_log_line(json, level, "", msg);
    return 0;
}

void pup_lua_open_processor(lua_State *L) {
    static const luaL_Reg methods[] = {{"run_once", proc_run_once}, {"run", proc_run},
                                       {"_run_fd", proc_run_fd},    {"stats", proc_stats},
                                       {"close", proc_close},       {NULL, NULL}};
    pup_lua_class(L, PUP_PROCESSOR_MT, methods, proc_close, proc_tostring);
    lua_pop(L, 1);
    luaL_newmetatable(L, PUP_STATS_MT);
    lua_pop(L, 1);
    /* pup.limits: the ranges of the numeric options (the CLI checks its flags with them). */
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, PUP_LUA_MAX_BATCH);
    lua_setfield(L, -2, "batch_size");
    lua_pushinteger(L, PUP_LUA_MAX_PARTITIONS);
    lua_setfield(L, -2, "partitions");
    lua_pushinteger(L, PUP_LUA_MAX_TIMEOUT_S);
    lua_setfield(L, -2, "handler_timeout");
    lua_pushinteger(L, PUP_LUA_MAX_SECONDS);
    lua_setfield(L, -2, "seconds");
    lua_setfield(L, -2, "limits");
    lua_pushcfunction(L, l_processor);
    lua_setfield(L, -2, "processor");
    lua_pushcfunction(L, l_log_line);
    lua_setfield(L, -2, "_log_line");
}
