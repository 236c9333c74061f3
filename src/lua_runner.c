/*
 * lua_runner.c -- pup.runner{...}: projection files run concurrently, one thread, Lua
 * VM and connection per (file, partition). The calling thread waits for SIGINT/SIGTERM
 * and shows progress on a terminal. A worker stopped by a handler failure is logged and
 * the others go on (unless fail_fast); any other failure stops every worker. With metrics_addr
 * it serves /metrics and /healthz (metrics.c) from the numbers the workers publish.
 */
#include "pup_lua.h"
#include "pup_metrics.h"
#include "pup_processor.h"

#include <errno.h>
#include <lualib.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct runner runner;

typedef struct worker {
    runner *r;
    pthread_t thread;
    int started;
    const char *file;
    int key, total;
    char name[256]; /* projection names are at most 200 bytes (pupsourcing.lua); under r->mu */
    pup_processor_stats stats; /* written by the worker's progress callback (atomics) */
    int done, failed;          /* atomics */
    int running;               /* atomic: its processor runs (set just before the loop) */
    long long hole;            /* under r->mu: the hole last seen waited on, and since when */
    double hole_since;         /* (CLOCK_REALTIME seconds; the runner looks every 200 ms) */
    pup_code code;
    char error[4096];
    /* warn() of its VM under --log-format json: the pieces of the warning being written,
     * and whether warnings are on ("@on"/"@off", off at start as in lua5.4). */
    char warning[1024];
    size_t warning_len;
    int warnings_on, warning_open;
} worker;

/* The runner userdata: every string is copied, so threads never touch the caller's VM. */
struct runner {
    worker *w;
    int n;
    char **files;
    int nfiles;
    char *url, *events, *heads, *checkpoints, *path, *cpath;
    int batch_size, poll_ms, once, json_log, handler_timeout_ms, group;
    int fail_fast; /* a handler failure stops every worker, not only its own */
    char *log_format; /* as given ("text", "json"), or NULL: no lifecycle lines */
    int lease_ttl_ms; /* 0: the processor's default */
    int stop[2];
    pthread_t supervisor; /* runs run()'s loop: a worker that ends wakes it (SIGURG) */
    pup_metrics *metrics; /* bound by pup.runner, serving during run() */
    pthread_mutex_t mu;   /* the workers' names and holes, for the metrics thread */
    int mu_init;
    double process_start; /* CLOCK_REALTIME seconds */
};

/* What each worker thread runs in its own VM. */
static const char worker_chunk[] =
    "local pup = require 'pupsourcing'\n"
    "local file, url, key, total, batch, poll, once, fd, stats, ev, hd, ck, json, limit, group, ttl, publish = ...\n"
    "local proj = pup.load_projection(file)\n"
    "publish(proj.name, false)\n"
    "local db <close>, cerr = pup.connect(url)\n"
    "if not db then return proj.name, cerr.code, cerr.message end\n"
    "local store = pup.store{events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck}\n"
    "local p <close> = pup.processor(db, proj, {partition_key = key, total_partitions = total,\n"
    "  batch_size = batch or proj.batch_size, poll_interval = poll, store = store,\n"
    "  handler_timeout = limit, group = group, lease_ttl = ttl})\n"
    "publish(proj.name, true)\n"
    "local n, err = p:_run_fd(fd, once, stats, json)\n"
    "return proj.name, err and err.code, err and err.message\n";

static void push_opt(lua_State *L, const char *s) {
    if (s) lua_pushstring(L, s);
    else lua_pushnil(L);
}

/* publish(name, running): the worker's projection name, and whether its loop starts now. */
static int l_publish(lua_State *L) {
    worker *w = lua_touserdata(L, lua_upvalueindex(1));
    const char *name = luaL_checkstring(L, 1);
    pthread_mutex_lock(&w->r->mu);
    snprintf(w->name, sizeof w->name, "%s", name);
    pthread_mutex_unlock(&w->r->mu);
    __atomic_store_n(&w->running, lua_toboolean(L, 2), __ATOMIC_RELEASE);
    return 0;
}

/* lua_WarnFunction for a worker VM under --log-format json: the warning as one JSON line
 * (Lua's own would write plain "Lua warning: ..." text into the JSON stream). */
static void json_warn(void *ud, const char *msg, int tocont) {
    worker *w = ud;
    if (!w->warning_open && *msg == '@') { /* a control message */
        if (strcmp(msg, "@on") == 0) w->warnings_on = 1;
        else if (strcmp(msg, "@off") == 0) w->warnings_on = 0;
        return;
    }
    size_t n = strlen(msg), room = sizeof w->warning - 1 - w->warning_len;
    if (n > room) n = room;
    memcpy(w->warning + w->warning_len, msg, n);
    w->warning_len += n;
    w->warning[w->warning_len] = '\0';
    w->warning_open = tocont;
    if (tocont) return;
    if (w->warnings_on) pup_lua_log_line(1, "warning", "Lua warning: ", w->warning);
    w->warning_len = 0;
}

static void *worker_main(void *arg) {
    worker *w = arg;
    runner *r = w->r;
    lua_State *L = luaL_newstate();
    if (!L) {
        snprintf(w->error, sizeof w->error, "%s: cannot create a Lua state", w->file);
        __atomic_store_n(&w->failed, 1, __ATOMIC_RELEASE);
        __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
        return NULL;
    }
    if (r->json_log) lua_setwarnf(L, json_warn, w); /* w outlives L (closed below) */
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_pushstring(L, r->path);
    lua_setfield(L, -2, "path");
    lua_pushstring(L, r->cpath);
    lua_setfield(L, -2, "cpath");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_pupsourcing_core);
    lua_setfield(L, -2, "pupsourcing.core");
    lua_pop(L, 2);
    if (luaL_loadbuffer(L, worker_chunk, sizeof worker_chunk - 1, "=runner") != LUA_OK) {
        snprintf(w->error, sizeof w->error, "%s", lua_tostring(L, -1));
        __atomic_store_n(&w->failed, 1, __ATOMIC_RELEASE);
    } else {
        lua_pushstring(L, w->file);
        push_opt(L, r->url);
        lua_pushinteger(L, w->key);
        lua_pushinteger(L, w->total);
        if (r->batch_size > 0) lua_pushinteger(L, r->batch_size);
        else lua_pushnil(L);
        lua_pushnumber(L, r->poll_ms / 1000.0);
        lua_pushboolean(L, r->once);
        lua_pushinteger(L, r->stop[0]);
        pup_processor_stats **box = lua_newuserdatauv(L, sizeof *box, 0);
        *box = &w->stats;
        luaL_newmetatable(L, PUP_STATS_MT); /* before the module registers it */
        lua_setmetatable(L, -2);
        push_opt(L, r->events);
        push_opt(L, r->heads);
        push_opt(L, r->checkpoints);
        push_opt(L, r->log_format);
        if (r->handler_timeout_ms > 0) lua_pushnumber(L, r->handler_timeout_ms / 1000.0);
        else lua_pushnil(L);
        lua_pushboolean(L, r->group);
        if (r->lease_ttl_ms > 0) lua_pushnumber(L, r->lease_ttl_ms / 1000.0);
        else lua_pushnil(L);
        lua_pushlightuserdata(L, w);
        lua_pushcclosure(L, l_publish, 1);
        /* No traceback: a handler's error already carries its own. */
        if (lua_pcall(L, 17, 3, 0) != LUA_OK) {
            snprintf(w->error, sizeof w->error, "%s", luaL_tolstring(L, -1, NULL));
            w->code = PUP_ERR_INVALID_PROJECTION;
            __atomic_store_n(&w->failed, 1, __ATOMIC_RELEASE);
        } else {
            pthread_mutex_lock(&r->mu);
            snprintf(w->name, sizeof w->name, "%s", lua_tostring(L, -3));
            pthread_mutex_unlock(&r->mu);
            if (lua_isstring(L, -1)) {
                snprintf(w->error, sizeof w->error, "%s", lua_tostring(L, -1));
                w->code = PUP_ERR_HANDLER;
                if (lua_isstring(L, -2)) pup_code_from_name(lua_tostring(L, -2), &w->code);
                __atomic_store_n(&w->failed, 1, __ATOMIC_RELEASE);
            }
        }
    }
    lua_close(L);
    /* A handler failure stops its own worker only (the partition is marked failed in the
     * database); one of the runner or the database stops them all. */
    int stop_all = w->failed && (r->fail_fast || w->code != PUP_ERR_HANDLER);
    if (w->failed && !stop_all && r->n > 1) { /* told now: the others may run for days */
        char prefix[sizeof w->name + 64];
        pthread_mutex_lock(&r->mu);
        snprintf(prefix, sizeof prefix, "projection %s stopped (the other projections go on): ", w->name);
        pthread_mutex_unlock(&r->mu);
        pup_lua_log_line(r->json_log, "error", prefix, w->error);
    }
    __atomic_store_n(&w->running, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
    if (stop_all && write(r->stop[1], "x", 1) < 0) {
    }
    pthread_kill(r->supervisor, SIGURG); /* its loop looks at once (run --once exits when done) */
    return NULL;
}

static char *dupfield(lua_State *L, int idx, const char *k) {
    char *out = NULL;
    if (lua_getfield(L, idx, k) == LUA_TSTRING) out = strdup(lua_tostring(L, -1));
    else if (!lua_isnil(L, -1)) luaL_error(L, "runner option %s must be a string", k);
    lua_pop(L, 1);
    return out;
}

/* Integer option k (absent: def), in [min, max]. */
static int runner_gc(lua_State *L) {
    runner *r = luaL_checkudata(L, 1, PUP_RUNNER_MT);
    for (int i = 0; i < r->nfiles; i++) free(r->files[i]);
    free(r->files);
    free(r->w);
    free(r->url);
    free(r->events);
    free(r->heads);
    free(r->checkpoints);
    free(r->path);
    free(r->cpath);
    free(r->log_format);
    if (r->stop[0] >= 0) close(r->stop[0]);
    if (r->stop[1] >= 0) close(r->stop[1]);
    pup_metrics_free(r->metrics);
    if (r->mu_init) pthread_mutex_destroy(&r->mu);
    memset(r, 0, sizeof *r);
    r->stop[0] = r->stop[1] = -1;
    return 0;
}

/* pup.runner{files=, workers= | partition_key=, total_partitions=, batch_size=,
 * poll_interval=, once=, database_url=, store={...}, log_format=, metrics_addr=}
 * -> runner | nil, err (the metrics address cannot be listened on) */
static int l_runner(lua_State *L) {
    static const char *const keys[] = {"files", "workers", "partition_key", "total_partitions", "batch_size",
                                       "poll_interval", "once", "database_url", "store", "log_format",
                                       "handler_timeout", "group", "lease_ttl", "metrics_addr", "fail_fast",
                                       NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    pup_lua_check_keys(L, 1, "pup.runner", keys);
    runner *r = lua_newuserdatauv(L, sizeof *r, 0); /* empty until filled below */
    memset(r, 0, sizeof *r);
    r->stop[0] = r->stop[1] = -1;
    luaL_setmetatable(L, PUP_RUNNER_MT);
    if (pthread_mutex_init(&r->mu, NULL) != 0) luaL_error(L, "cannot create a mutex");
    r->mu_init = 1;

    if (lua_getfield(L, 1, "files") != LUA_TTABLE) luaL_error(L, "runner needs files = {\"projection.lua\", ...}");
    int nfiles = (int)luaL_len(L, -1);
    if (nfiles < 1) return luaL_error(L, "runner needs at least one projection file");
    r->files = calloc((size_t)nfiles, sizeof *r->files);
    if (!r->files) luaL_error(L, "out of memory");
    r->nfiles = nfiles;
    for (int i = 0; i < nfiles; i++) {
        lua_geti(L, -1, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "runner files[%d] must be a string", i + 1);
        r->files[i] = strdup(lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "group");
    r->group = lua_toboolean(L, -1);
    lua_pop(L, 1);
    r->lease_ttl_ms = pup_lua_opt_seconds(L, 1, "lease_ttl", 0, PUP_LUA_MAX_SECONDS);
    int workers = pup_lua_opt_int(L, 1, "runner option", "workers", 0, 1, PUP_LUA_MAX_PARTITIONS);
    int key = pup_lua_opt_int(L, 1, "runner option", "partition_key", -1, 0, PUP_LUA_MAX_PARTITIONS - 1);
    int total = pup_lua_opt_int(L, 1, "runner option", "total_partitions", r->group ? 16 : 1, 1, PUP_LUA_MAX_PARTITIONS);
    if (workers > 0 && key >= 0) luaL_error(L, "use either workers or partition_key/total_partitions, not both");
    if (r->group && (workers > 0 || key >= 0))
        luaL_error(L, "a group worker shares the partitions by leases: no workers or partition_key with group");
    if (key >= total) luaL_error(L, "partition_key %d must be below total_partitions %d", key, total);
    r->handler_timeout_ms = pup_lua_opt_seconds(L, 1, "handler_timeout", 0, PUP_LUA_MAX_TIMEOUT_S);
    r->batch_size = pup_lua_opt_int(L, 1, "runner option", "batch_size", 0, 1, PUP_LUA_MAX_BATCH);
    r->poll_ms = pup_lua_opt_seconds(L, 1, "poll_interval", 1000, PUP_LUA_MAX_SECONDS);
    lua_getfield(L, 1, "once");
    r->once = lua_toboolean(L, -1);
    lua_getfield(L, 1, "fail_fast");
    r->fail_fast = lua_toboolean(L, -1);
    lua_pop(L, 2);
    r->url = dupfield(L, 1, "database_url");
    if (lua_getfield(L, 1, "log_format") != LUA_TNIL) {
        const char *fmt = lua_tostring(L, -1);
        if (!fmt || (strcmp(fmt, "json") != 0 && strcmp(fmt, "text") != 0))
            luaL_error(L, "runner option log_format must be \"text\" or \"json\"");
        r->json_log = strcmp(fmt, "json") == 0;
        r->log_format = strdup(fmt);
        if (!r->log_format) luaL_error(L, "out of memory");
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "store") == LUA_TTABLE) {
        int s = lua_gettop(L);
        r->events = dupfield(L, s, "events_table");
        r->heads = dupfield(L, s, "aggregate_heads_table");
        r->checkpoints = dupfield(L, s, "checkpoints_table");
    }
    lua_pop(L, 1);
    lua_getglobal(L, "package");
    r->path = dupfield(L, -1, "path");
    r->cpath = dupfield(L, -1, "cpath");
    lua_pop(L, 1);

    int per_file = workers > 0 ? workers : 1;
    r->n = nfiles * per_file;
    r->w = calloc(r->n, sizeof *r->w);
    if (!r->w) luaL_error(L, "out of memory");
    for (int f = 0, i = 0; f < nfiles; f++)
        for (int k = 0; k < per_file; k++, i++) {
            worker *w = &r->w[i];
            w->r = r;
            w->file = r->files[f];
            w->key = workers > 0 ? k : (key >= 0 ? key : 0);
            w->total = workers > 0 ? workers : total;
        }
    /* Last, so that every misuse above raises before the port is taken. */
    if (lua_getfield(L, 1, "metrics_addr") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "runner option metrics_addr must be a string HOST:PORT");
        const char *addr = lua_tostring(L, -1);
        pup_error e;
        r->metrics = pup_metrics_bind(addr, &e);
        if (!r->metrics) return pup_lua_push_error(L, &e); /* the runner is freed by its __gc */
    }
    lua_pop(L, 1);
    return 1;
}

/* Progress on a terminal, rewritten in place: per projection its lowest position, the
 * head, events handled per second and the time left at the current pace. */
static void show_progress(runner *r, double elapsed, int final) {
    if (!isatty(2) || r->json_log) return; /* JSON logs: nothing but JSON lines */
    char line[1024];
    size_t n = 0;
    for (int i = 0; i < r->n && n < sizeof line - 128; i++) {
        worker *w = &r->w[i];
        if (i > 0 && r->w[i - 1].file == w->file) continue; /* first worker of each file */
        long long handled = 0, pos = -1, head = 0;
        for (int j = i; j < r->n && r->w[j].file == w->file; j++) {
            handled += __atomic_load_n(&r->w[j].stats.handled, __ATOMIC_RELAXED);
            long long p = __atomic_load_n(&r->w[j].stats.position, __ATOMIC_RELAXED);
            long long h = __atomic_load_n(&r->w[j].stats.head, __ATOMIC_RELAXED);
            if (pos < 0 || p < pos) pos = p;
            if (h > head) head = h;
        }
        double rate = elapsed > 0 ? handled / elapsed : 0;
        double pos_rate = elapsed > 0 ? pos / elapsed : 0;
        const char *name = strrchr(w->file, '/') ? strrchr(w->file, '/') + 1 : w->file;
        n += (size_t)snprintf(line + n, sizeof line - n, "%s%s %lld/%lld %.0f ev/s", n ? " | " : "",
                              name, pos, head, rate);
        if (head > pos && pos_rate > 0)
            n += (size_t)snprintf(line + n, sizeof line - n, " ETA %.0fs", (head - pos) / pos_rate);
    }
    fprintf(stderr, "\r\033[K%s%s", line, final ? "\n" : "");
    fflush(stderr);
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double realtime(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* When this process started (CLOCK_REALTIME seconds): /proc/self/stat's start time in
 * clock ticks after boot, plus the boot time from /proc/stat; 0 when unreadable. */
static double process_start_time(void) {
    char buf[1024];
    double start = 0;
    FILE *f = fopen("/proc/self/stat", "r");
    if (f) {
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = '\0';
        fclose(f);
        char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
        unsigned long long ticks = 0;
        /* after ")": state and 18 more fields, then starttime (field 22) */
        if (p && sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu",
                        &ticks) == 1)
            start = (double)ticks / (double)sysconf(_SC_CLK_TCK);
    }
    unsigned long long btime = 0;
    f = fopen("/proc/stat", "r");
    if (f) {
        while (fgets(buf, sizeof buf, f))
            if (sscanf(buf, "btime %llu", &btime) == 1) break;
        fclose(f);
    }
    return btime && start > 0 ? (double)btime + start : 0;
}

/* Resident set size in bytes (/proc/self/statm); 0 when unreadable. */
static long long rss_bytes(void) {
    long long pages = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%*s %lld", &pages) != 1) pages = 0;
        fclose(f);
    }
    return pages * sysconf(_SC_PAGESIZE);
}

/* One worker's numbers, copied for a scrape. */
typedef struct worker_view {
    char name[256], partition[16];
    pup_processor_stats s;
    int running, failed, handler_failed;
    long long hole, handler_errors, dead_letters;
    double hole_age, lag_seconds, batch_running;
    long long batch_buckets[PUP_BATCH_BUCKETS + 1], batch_us;
} worker_view;

static void view_worker(runner *r, worker *w, double now, worker_view *v) {
    v->s.handled = __atomic_load_n(&w->stats.handled, __ATOMIC_RELAXED);
    v->s.position = __atomic_load_n(&w->stats.position, __ATOMIC_RELAXED);
    v->s.head = __atomic_load_n(&w->stats.head, __ATOMIC_RELAXED);
    v->s.standby = __atomic_load_n(&w->stats.standby, __ATOMIC_RELAXED);
    v->s.held = __atomic_load_n(&w->stats.held, __ATOMIC_RELAXED);
    v->s.retries = __atomic_load_n(&w->stats.retries, __ATOMIC_RELAXED);
    v->handler_errors = __atomic_load_n(&w->stats.handler_errors, __ATOMIC_RELAXED);
    v->dead_letters = __atomic_load_n(&w->stats.dead_letters, __ATOMIC_RELAXED);
    long long oldest = __atomic_load_n(&w->stats.oldest_pending_ms, __ATOMIC_RELAXED);
    v->lag_seconds = oldest > 0 && now > oldest / 1000.0 ? now - oldest / 1000.0 : 0;
    for (int b = 0; b <= PUP_BATCH_BUCKETS; b++)
        v->batch_buckets[b] = __atomic_load_n(&w->stats.batch_buckets[b], __ATOMIC_RELAXED);
    v->batch_us = __atomic_load_n(&w->stats.batch_us, __ATOMIC_RELAXED);
    v->s.reader_session = __atomic_load_n(&w->stats.reader_session, __ATOMIC_RELAXED);
    long long started = __atomic_load_n(&w->stats.batch_started_ms, __ATOMIC_RELAXED);
    v->batch_running = started > 0 && now > started / 1000.0 ? now - started / 1000.0 : 0;
    v->running = __atomic_load_n(&w->running, __ATOMIC_ACQUIRE);
    v->failed = __atomic_load_n(&w->failed, __ATOMIC_ACQUIRE); /* then code and error are set */
    v->handler_failed = v->failed && w->code == PUP_ERR_HANDLER;
    if (v->handler_errors < v->handler_failed) v->handler_errors = 1; /* failed before the loop counted it */
    pthread_mutex_lock(&r->mu);
    snprintf(v->name, sizeof v->name, "%s", w->name[0] ? w->name : w->file);
    v->hole = w->hole;
    v->hole_age = w->hole ? now - w->hole_since : 0;
    pthread_mutex_unlock(&r->mu);
    if (r->group) snprintf(v->partition, sizeof v->partition, "group");
    else snprintf(v->partition, sizeof v->partition, "%d", w->key);
}

/* The families of /metrics, in the order shown. */
enum { M_POSITION, M_HEAD, M_LAG, M_LAG_SECONDS, M_BATCH_RUNNING, M_HANDLED, M_ERRORS, M_DEAD, M_RETRIES,
       M_HOLE, M_HOLE_AGE, M_STANDBY, M_HELD, M_RUNNING, M_COUNT };
static const struct {
    const char *name, *type, *help;
} families[M_COUNT] = {
    {"pupsourcing_position", "gauge", "Checkpoint: the last log position this partition has passed."},
    {"pupsourcing_head", "gauge", "The log head seen by the partition's last batch."},
    {"pupsourcing_lag_events", "gauge", "Log positions between the checkpoint and the head seen (head - position)."},
    {"pupsourcing_lag_seconds", "gauge",
     "Age of the first event after the checkpoint (now - its created_at; 0 when the last batch reached the head)."},
    {"pupsourcing_batch_running_seconds", "gauge", "How long the batch in progress has run (0 between batches)."},
    {"pupsourcing_events_handled_total", "counter", "Events given to the handler since the process started."},
    {"pupsourcing_handler_errors_total", "counter", "Handler failures that stopped the worker (the others go on unless --fail-fast)."},
    {"pupsourcing_dead_letters_total", "counter",
     "Events given up on (on_error skip or retry) and written to the dead-letter table by this process."},
    {"pupsourcing_retries_total", "counter", "Transient failures retried (lost connection, serialization failure, ...)."},
    {"pupsourcing_waiting_position", "gauge", "The first hole in the positions the partition waits on (0: none)."},
    {"pupsourcing_waiting_seconds", "gauge", "How long the partition has waited on that hole (0: none)."},
    {"pupsourcing_standby", "gauge", "1 while another processor holds the partition and this one waits to take over."},
    {"pupsourcing_partitions_held", "gauge", "Partitions this worker holds (a group worker may hold several)."},
    {"pupsourcing_running", "gauge", "1 while the worker's processor runs; 0 before it starts, after it stopped or failed."},
};

/* pupsourcing_batch_duration_seconds: cumulative buckets, +Inf, sum and count per worker. */
static void render_batch_histogram(pup_metrics_buf *b, const worker_view *v, int n) {
    static const double bounds[PUP_BATCH_BUCKETS] = PUP_BATCH_BUCKET_BOUNDS;
    const char *name = "pupsourcing_batch_duration_seconds";
    pup_metrics_family(b, name, "histogram", "Duration of committed batches that moved the checkpoint.");
    for (int i = 0; i < n; i++) {
        long long cum = 0;
        for (int k = 0; k <= PUP_BATCH_BUCKETS; k++) {
            cum += v[i].batch_buckets[k];
            pup_metrics_printf(b, "%s_bucket{", name);
            pup_metrics_label(b, 1, "projection", v[i].name);
            pup_metrics_label(b, 0, "partition", v[i].partition);
            if (k < PUP_BATCH_BUCKETS) pup_metrics_printf(b, ",le=\"%g\"} %lld\n", bounds[k], cum);
            else pup_metrics_printf(b, ",le=\"+Inf\"} %lld\n", cum);
        }
        for (int k = 0; k < 2; k++) {
            pup_metrics_printf(b, "%s_%s{", name, k ? "count" : "sum");
            pup_metrics_label(b, 1, "projection", v[i].name);
            pup_metrics_label(b, 0, "partition", v[i].partition);
            if (k) pup_metrics_printf(b, "} %lld\n", cum);
            else pup_metrics_printf(b, "} %.6f\n", v[i].batch_us / 1e6);
        }
    }
}

static void render_metrics(void *ud, pup_metrics_buf *b) {
    runner *r = ud;
    double now = realtime();
    worker_view *v = calloc((size_t)r->n, sizeof *v);
    if (!v) {
        b->failed = 1;
        return;
    }
    int connections = 0;
    for (int i = 0; i < r->n; i++) {
        view_worker(r, &r->w[i], now, &v[i]);
        connections += v[i].running ? 1 + v[i].s.reader_session : 0;
    }
    for (int f = 0; f < M_COUNT; f++) {
        pup_metrics_family(b, families[f].name, families[f].type, families[f].help);
        for (int i = 0; i < r->n; i++) {
            const worker_view *x = &v[i];
            pup_metrics_printf(b, "%s{", families[f].name);
            pup_metrics_label(b, 1, "projection", x->name);
            pup_metrics_label(b, 0, "partition", x->partition);
            long long lag = x->s.head > x->s.position ? x->s.head - x->s.position : 0;
            long long val[M_COUNT] = {x->s.position, x->s.head, lag, 0, 0, x->s.handled, x->handler_errors,
                                      x->dead_letters, x->s.retries, x->hole, 0, x->s.standby, x->s.held, x->running};
            if (f == M_HOLE_AGE) pup_metrics_printf(b, "} %.3f\n", x->hole_age);
            else if (f == M_LAG_SECONDS) pup_metrics_printf(b, "} %.3f\n", x->lag_seconds);
            else if (f == M_BATCH_RUNNING) pup_metrics_printf(b, "} %.3f\n", x->batch_running);
            else pup_metrics_printf(b, "} %lld\n", val[f]);
        }
    }
    render_batch_histogram(b, v, r->n);
    free(v);
    pup_metrics_family(b, "pupsourcing_connections", "gauge", "Database connections of running workers (one each, two while one catches up).");
    pup_metrics_printf(b, "pupsourcing_connections %d\n", connections);
    pup_metrics_family(b, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
    pup_metrics_printf(b, "process_resident_memory_bytes %lld\n", rss_bytes());
    pup_metrics_family(b, "process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch in seconds.");
    pup_metrics_printf(b, "process_start_time_seconds %.2f\n", r->process_start);
}

/* Healthy when every worker's processor runs and none failed; else one reason a line. */
static int render_health(void *ud, pup_metrics_buf *b) {
    runner *r = ud;
    int ok = 1;
    for (int i = 0; i < r->n; i++) {
        worker *w = &r->w[i];
        worker_view v;
        view_worker(r, w, 0, &v);
        if (v.running && !v.failed) continue;
        ok = 0;
        pup_metrics_printf(b, "projection %s partition %s: ", v.name, v.partition);
        if (v.failed) pup_metrics_printf(b, "failed: %s\n", w->error);
        else if (__atomic_load_n(&w->done, __ATOMIC_ACQUIRE)) pup_metrics_printf(b, "stopped\n");
        else pup_metrics_printf(b, "starting\n");
    }
    return ok;
}

/* Notes when each worker's hole changed, for its age (the loop below calls it every 200 ms). */
static void track_holes(runner *r) {
    double now = realtime();
    for (int i = 0; i < r->n; i++) {
        worker *w = &r->w[i];
        long long hole = __atomic_load_n(&w->stats.waiting_position, __ATOMIC_RELAXED);
        pthread_mutex_lock(&r->mu);
        if (hole != w->hole) {
            w->hole = hole;
            w->hole_since = now;
        }
        pthread_mutex_unlock(&r->mu);
    }
}

/* runner:run() -> {[name] = {handled=, partitions=}} | nil, err */
static int runner_run(lua_State *L) {
    runner *r = luaL_checkudata(L, 1, PUP_RUNNER_MT);
    if (!r->w) luaL_argerror(L, 1, "runner is closed");
    if (r->stop[0] >= 0) luaL_argerror(L, 1, "runner already ran");
    if (pipe(r->stop) < 0) luaL_error(L, "pipe: %s", strerror(errno));

    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGURG); /* from a worker that ended (ignored by default, should one stray) */
    r->supervisor = pthread_self();
    pthread_sigmask(SIG_BLOCK, &set, &old); /* workers and the metrics thread inherit the mask */
    if (r->metrics) {
        r->process_start = process_start_time();
        pup_metrics_source src = {.ud = r, .render = render_metrics, .health = render_health};
        pup_error e;
        if (pup_metrics_start(r->metrics, &src, &e) < 0) {
            pup_lua_unblock_signals(&old);
            return pup_lua_push_error(L, &e);
        }
        char msg[400];
        snprintf(msg, sizeof msg, "metrics on http://%s/metrics and /healthz", pup_metrics_address(r->metrics));
        pup_lua_log_line(r->json_log, "info", "", msg);
    }
    int start_err = 0;
    worker *unstarted = NULL;
    for (int i = 0; i < r->n && !start_err; i++) {
        start_err = pthread_create(&r->w[i].thread, NULL, worker_main, &r->w[i]);
        r->w[i].started = start_err == 0;
        if (start_err) unstarted = &r->w[i];
    }
    if (start_err && write(r->stop[1], "x", 1) < 0) {
    } /* the started ones stop; they are joined below */
    double t0 = mono(), last_shown = 0;
    int stopping = 0, interrupted = 0;
    for (;;) {
        int done = 0;
        for (int i = 0; i < r->n; i++)
            if (!r->w[i].started || __atomic_load_n(&r->w[i].done, __ATOMIC_ACQUIRE)) done++;
        if (done == r->n) break;
        struct timespec ts = {0, 200 * 1000 * 1000};
        int sig = sigtimedwait(&set, NULL, &ts);
        if (sig > 0 && sig != SIGURG && !stopping) {
            stopping = interrupted = 1;
            char msg[80];
            snprintf(msg, sizeof msg, "%s received, finishing the current batches", sig == SIGINT ? "SIGINT" : "SIGTERM");
            if (!r->json_log && isatty(2)) fputc('\n', stderr); /* off the progress line */
            pup_lua_log_line(r->json_log, "info", "", msg);
            if (write(r->stop[1], "x", 1) < 0) {
            }
        }
        if (r->metrics) track_holes(r);
        double now = mono();
        if (now - last_shown >= 0.5) {
            show_progress(r, now - t0, 0);
            last_shown = now;
        }
    }
    for (int i = 0; i < r->n; i++)
        if (r->w[i].started) pthread_join(r->w[i].thread, NULL);
    pup_metrics_free(r->metrics); /* serves until every worker has stopped */
    r->metrics = NULL;
    show_progress(r, mono() - t0, 1);
    sigset_t urg;
    sigemptyset(&urg);
    sigaddset(&urg, SIGURG);
    while (sigtimedwait(&urg, NULL, &(struct timespec){0, 0}) > 0) {
    } /* the workers' wake-ups, not left pending for the caller */
    pup_lua_unblock_signals(&old);

    if (unstarted) {
        pup_error e;
        pup_error_set(&e, PUP_ERR_HANDLER, "cannot start a thread for %s (worker %d of %d): %s",
                      unstarted->file, (int)(unstarted - r->w) + 1, r->n, strerror(start_err));
        return pup_lua_push_error(L, &e);
    }
    int nfailed = 0;
    for (int i = 0; i < r->n; i++) nfailed += r->w[i].failed;
    for (int i = 0; i < r->n; i++) {
        worker *w = &r->w[i];
        if (w->failed) {
            pup_error e;
            if (nfailed > 1) pup_error_set(&e, w->code, "%d workers failed; the first: %s", nfailed, w->error);
            else pup_error_set(&e, w->code, "%s", w->error);
            return pup_lua_push_error(L, &e);
        }
    }
    lua_newtable(L);
    for (int i = 0; i < r->n; i++) {
        worker *w = &r->w[i];
        if (lua_getfield(L, -1, w->name) == LUA_TNIL) {
            lua_pop(L, 1);
            lua_createtable(L, 0, 2);
            lua_pushinteger(L, 0);
            lua_setfield(L, -2, "handled");
            lua_pushinteger(L, 0);
            lua_setfield(L, -2, "partitions");
            lua_pushvalue(L, -1);
            lua_setfield(L, -3, w->name);
        }
        lua_getfield(L, -1, "handled");
        lua_pushinteger(L, lua_tointeger(L, -1) + w->stats.handled);
        lua_setfield(L, -3, "handled");
        lua_pop(L, 1);
        lua_getfield(L, -1, "partitions");
        lua_pushinteger(L, lua_tointeger(L, -1) + 1);
        lua_setfield(L, -3, "partitions");
        lua_pop(L, 2);
    }
    lua_pushboolean(L, interrupted);
    return 2;
}

void pup_lua_open_runner(lua_State *L) {
    static const luaL_Reg methods[] = {{"run", runner_run}, {"close", runner_gc}, {NULL, NULL}};
    pup_lua_class(L, PUP_RUNNER_MT, methods, runner_gc, NULL);
    lua_pop(L, 1);
    lua_pushcfunction(L, l_runner);
    lua_setfield(L, -2, "runner");
}
