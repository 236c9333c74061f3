/*
 * pup_lua.h -- the Lua binding: `pupsourcing.core`. lua_db.c (connections,
 * transactions, values), lua_store.c (store methods, events), lua_processor.c
 * (projections and processors), lua_runner.c (projection files on threads),
 * lua_module.c (the module table).
 *
 * All state lives in userdata and the registry, so any number of lua_States (one per
 * runner thread) can use the binding at once.
 */
#ifndef PUP_LUA_H
#define PUP_LUA_H

#include <lauxlib.h>
#include <lua.h>
#include <signal.h>

#include "pup_db.h"
#include "pup_store.h"

#define PUP_DB_MT "pupsourcing.db"
#define PUP_TX_MT "pupsourcing.tx"
#define PUP_STORE_MT "pupsourcing.store"
#define PUP_ERROR_MT "pupsourcing.error"
#define PUP_EVENT_MT "pupsourcing.event"
#define PUP_RESULT_MT "pupsourcing.result"
#define PUP_PROCESSOR_MT "pupsourcing.processor"
#define PUP_RUNNER_MT "pupsourcing.runner"
/* A box holding a pup_processor_stats pointer: the runner's shared counters of a worker. */
#define PUP_STATS_MT "pupsourcing.stats"

/* Ranges of the numeric options of pup.processor and pup.runner (pup.limits in Lua; the
 * CLI checks its flags against them). PUP_LUA_MAX_PARTITIONS is processor.c's limit. */
#define PUP_LUA_MAX_BATCH 100000
#define PUP_LUA_MAX_PARTITIONS 4096
#define PUP_LUA_MAX_TIMEOUT_S 86400 /* handler_timeout: one day */
#define PUP_LUA_MAX_SECONDS 3600        /* poll_interval and lease_ttl */

/* luaopen for `require "pupsourcing.core"`; the host binary preloads it. */
int luaopen_pupsourcing_core(lua_State *L);

/* Registers each layer's metatables and functions into the module table at -1. */
void pup_lua_open_db(lua_State *L);
void pup_lua_open_store(lua_State *L);
void pup_lua_open_processor(lua_State *L);
void pup_lua_open_runner(lua_State *L);
/* pup.json (lua_json.c); also registers the encoder and decoder the C side calls. */
void pup_lua_open_json(lua_State *L);

/* Registers metatable `name` with __index = a table of methods, __gc and __close =
 * close, __tostring; leaves the methods table on the stack. */
void pup_lua_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   lua_CFunction close, lua_CFunction tostring);

/* Pushes nil and an error object (code, message, sqlstate, __tostring). Returns 2. */
int pup_lua_push_error(lua_State *L, const pup_error *err);
/* Builds the error object alone (for raising: lua_error keeps it intact). */
void pup_lua_new_error(lua_State *L, const pup_error *err);

/* The connection behind a db or tx argument; raises if it is neither or closed. */
pup_conn *pup_lua_checkconn(lua_State *L, int idx);
/* Marks the db behind a db or tx argument in use (a processor running a batch on its
 * connection): db:close() raises until the matching unpin. A managed tx has no db: a
 * no-op. */
void pup_lua_db_pin(lua_State *L, int idx);
void pup_lua_db_unpin(lua_State *L, int idx);
/* Params scratch of the db behind a db or tx argument. */
pup_params *pup_lua_params(lua_State *L, int idx);

/* A box owning a PGresult until collected or cleared, so a Lua error while converting
 * cannot leak it. Push the box first, then store the result in it. */
PGresult **pup_lua_result_box(lua_State *L);
void pup_lua_result_clear(PGresult **box);

/* A processor borrows the store at idx from creation to close: its __close raises
 * meanwhile (__gc still frees it). */
void pup_lua_store_pin(lua_State *L, int idx);
void pup_lua_store_unpin(lua_State *L, int idx);

/* The pup_store inside a store argument; raises if it is not one. */
const pup_store *pup_lua_checkstore(lua_State *L, int idx);

/* Pushes a persisted event table (event.data decodes the payload lazily). */
void pup_lua_push_event(lua_State *L, const pup_event *ev);


/* Pushes a transaction handle that the processor owns (commit/rollback raise): the
 * handler's `tx`. The conn must outlive it; pup_lua_tx_detach() closes it. */
void pup_lua_push_managed_tx(lua_State *L, pup_conn *conn, pup_params *params);
void pup_lua_tx_detach(lua_State *L, int idx);

/* Calls the function below nargs arguments with a traceback handler. On error returns
 * non-zero with "message\ntraceback" (or the error object's text) copied into err. */
int pup_lua_pcall(lua_State *L, int nargs, int nresults, pup_error *err);

/* Raises "<what>: unknown option <key>" unless every key of the table at idx is one of
 * the NULL-terminated list `known`. */
void pup_lua_check_keys(lua_State *L, int idx, const char *what, const char *const *known);

/* Option k (an integer from min to max) of the options table at idx (absent or nil: def);
 * raises "<what> <k> must be an integer from <min> to <max>" otherwise. */
int pup_lua_opt_int(lua_State *L, int idx, const char *what, const char *k, lua_Integer def, lua_Integer min,
                    lua_Integer max);

/* Option k (seconds, a number above 0 and at most max_s) of the options table at idx, in
 * milliseconds (at least 1); def_ms when absent. Raises otherwise. */
int pup_lua_opt_seconds(lua_State *L, int idx, const char *k, int def_ms, int max_s);

/* While a handler with a time limit runs in this VM: returns 1 with the seconds left
 * (negative once passed) and the limit. Else 0. pup.sleep() sleeps no longer. */
int pup_lua_handler_deadline(lua_State *L, double *left, int *limit_ms);

/* Ends a run that blocked SIGINT/SIGTERM (to read them from a signalfd): restores the
 * mask `old`, discarding those that arrived meanwhile instead of letting them kill the
 * process, and keeps the caller's signal actions. */
void pup_lua_unblock_signals(const sigset_t *old);

/* One log line on stderr: "pupsourcing: <prefix><msg>", or with json set one JSON object
 * {"time" (RFC 3339, UTC), "level", "msg"}. */
void pup_lua_log_line(int json, const char *level, const char *prefix, const char *msg);


#endif
