/*
 * pup_db.h -- the database layer: connections, cached prepared statements, parameter
 * arrays, libpq pipeline mode and the error type every layer reports through.
 *
 * Nothing here knows about Lua. A pup_conn is used by one thread at a time.
 */
#ifndef PUP_DB_H
#define PUP_DB_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

/* Error codes. Their names (the string Lua sees in err.code) are in one table in db.c:
 * pup_code_name() and pup_code_from_name() read it. */
typedef enum pup_code {
    PUP_OK = 0,
    PUP_ERR_CONFLICT,
    PUP_ERR_NO_EVENTS,
    PUP_ERR_INVALID_EVENT,
    PUP_ERR_DATABASE, /* sqlstate set */
    PUP_ERR_CONNECTION,
    PUP_ERR_NOT_MIGRATED,
    PUP_ERR_HANDLER,
    PUP_ERR_INVALID_PROJECTION,
    PUP_ERR_INVALID_ARGUMENT,
    PUP_ERR_OUT_OF_MEMORY,
    PUP_ERR_LAYOUT_CONFLICT, /* another layout of the projection is live (docs/operations.md) */
    PUP_ERR_DUPLICATE_EVENT /* an append's event_id exists, and it is not a retry of that append */
} pup_code;

/* An error as reported by every layer: a code, PostgreSQL's SQLSTATE when it gave one
 * (else ""), the violated constraint's name when the server named one (else ""), and a
 * message that names what was wrong. */
typedef struct pup_error {
    pup_code code;
    char sqlstate[6];
    char constraint[64];
    char message[4096];
} pup_error;

/* The stable name of a code ("optimistic_concurrency", "database", ...). */
const char *pup_code_name(pup_code code);
/* The code of a stable name: 0 with *code, or -1 when no code has that name. */
int pup_code_from_name(const char *name, pup_code *code);

/* Fills err (printf-style message, empty sqlstate and constraint). Returns -1 so callers
 * can `return pup_error_set(...)`. err may be NULL. */
int pup_error_set(pup_error *err, pup_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Puts a printf-style prefix in front of err's message (truncating the end). */
void pup_error_prefix(pup_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Fills err from a failed result (or from the connection when res is NULL):
 * connection-class SQLSTATEs and a broken connection give PUP_ERR_CONNECTION,
 * everything else PUP_ERR_DATABASE (a missing table too: the store's functions make it
 * PUP_ERR_NOT_MIGRATED when it is one of theirs, see pup_store_error).
 * A result that started a COPY is refused (PUP_ERR_INVALID_ARGUMENT): the COPY is ended
 * on pg first, so the connection stays usable. Returns -1. */
int pup_error_from_pg(pup_error *err, PGconn *pg, const PGresult *res);

/* True when err is worth retrying after reconnecting or restarting the transaction:
 * lost connection, serialization failure, deadlock, lock timeout, and a table that
 * changed under a prepared statement ("cached plan must not change result type": the
 * connection prepares its statements again once the transaction is over). */
int pup_error_is_transient(const pup_error *err);

/* A prepared statement, cached per connection by SQL text. Parameter types come from
 * the server (Describe), so a string bound to a bytea parameter is sent as binary. */
typedef struct pup_stmt {
    char name[24];
    char *sql;
    int nparams;
    Oid *param_types;
} pup_stmt;

/* True when parameter i (0-based) of st is bytea: strings go there as binary. */
int pup_stmt_param_is_bytea(const pup_stmt *st, int i);

/* Reusable parameter arrays: grow-only, so binding allocates nothing once warm.
 * Values point at caller-owned memory (or at the per-slot scratch for numbers) and
 * must outlive the call that sends them. */
typedef struct pup_params {
    int n, cap;
    const char **values;
    int *lengths;
    int *formats;
    char (*scratch)[32];
} pup_params;

/* Sizes the arrays for n parameters, all NULL. Returns -1 on out of memory. */
int pup_params_reset(pup_params *p, int n);
/* Frees the arrays (the struct itself is the caller's). */
void pup_params_free(pup_params *p);
void pup_params_null(pup_params *p, int i);
void pup_params_text(pup_params *p, int i, const char *s, size_t len);
void pup_params_binary(pup_params *p, int i, const char *s, size_t len);
void pup_params_int(pup_params *p, int i, long long v);
void pup_params_double(pup_params *p, int i, double v);

typedef struct pup_conn pup_conn;

/* Opens a connection. url NULL or "" means DATABASE_URL, then libpq's defaults. The
 * session always uses client_encoding UTF8 (the bytes the server stores), whatever the
 * environment says. Returns NULL with err set (code "connection"): the target is described
 * from libpq's fields and the given string is never shown, so no password is either. */
pup_conn *pup_conn_open(const char *url, pup_error *err);
/* Closes the connection and frees every statement it cached. NULL is a no-op. */
void pup_conn_close(pup_conn *c);
/* The libpq handle, for callers that wait on its socket or read notifications. */
PGconn *pup_conn_pg(pup_conn *c);
/* 0 when the session's client_encoding is UTF8 (as pup_conn_open set it); else -1 with
 * err set (invalid_argument): ids are hashed over the bytes the caller gives and the
 * server stores, which differ once a SET client_encoding converts them. No round trip. */
int pup_conn_check_utf8(pup_conn *c, pup_error *err);
/* Reconnects in place after a lost connection (same parameters); forgets the
 * statement cache and any pipeline or transaction state. */
int pup_conn_reset(pup_conn *c, pup_error *err);
/* True when the server connection is still usable. */
int pup_conn_ok(pup_conn *c);
/* Changes with every reconnect (pup_conn_reset, also from pup_conn_rollback when libpq
 * stays in pipeline mode): what a caller held in the session (advisory locks, LISTEN,
 * session settings) is gone when it differs from the value seen when taking it. */
unsigned long pup_conn_session(const pup_conn *c);

/* True when the connection goes through a connection pooler (PgBouncer, ...): libpq was
 * given a backend pid that is not the server's. Such a connection prepares no named
 * statements (a transaction-mode pool runs each transaction on any server connection):
 * every statement is sent as text, unnamed, with the parameter types described once. */
int pup_conn_pooled(const pup_conn *c);
/* True when the connection goes through a pooler, in any mode (pup_conn_pooled turns false
 * once session pooling is proved): a second client would take another pooled connection. */
int pup_conn_via_pooler(const pup_conn *c);

/* A second session with c's connection options (not the settings c's session changed
 * since) to the server c is connected to (of a list of hosts, the one c chose), for
 * statements run beside c's: a processor's read-ahead. NULL with err (connection) when it
 * cannot connect; described from libpq's fields, never the URL. */
pup_conn *pup_conn_open_alike(pup_conn *c, pup_error *err);
/* Sends st with binary results on an idle connection outside pipeline mode, its own
 * transaction, without waiting; a result not taken before is discarded first. A thread
 * reads the result as it comes (the server never waits for the caller, holding the
 * statement's locks); until pup_conn_take_sent (or pup_conn_close) the connection is that
 * thread's: call nothing else on it. */
int pup_conn_send_now(pup_conn *c, const pup_stmt *st, const pup_params *p, pup_error *err);
/* Waits for the result of the statement pup_conn_send_now sent: its rows, or NULL with
 * err (also when nothing was sent). pup_conn_send_now fails, its result read and dropped,
 * when no thread can be started. */
PGresult *pup_conn_take_sent(pup_conn *c, pup_error *err);

/* For holders of session state (processors: advisory locks, LISTEN): 0 on a direct
 * connection or a pool in session mode (after which named statements are used again);
 * -1 with a clear error (invalid_argument) behind transaction or statement pooling.
 * Behind a pooler it probes with a second connection, once per session. */
int pup_conn_require_session(pup_conn *c, pup_error *err);

/* Returns the cached statement for sql, preparing and describing it on first use.
 * Inside pipeline mode the queue is synced first (see pup_conn_pipeline_*). COPY is
 * refused (PUP_ERR_INVALID_ARGUMENT). NULL on error. */
const pup_stmt *pup_conn_prepare(pup_conn *c, const char *sql, pup_error *err);

/* Runs a prepared statement and returns its result (caller PQclear()s it), or NULL with
 * err set. In pipeline mode the statement is queued behind the pending ones, whose
 * results are checked first, so an earlier failure is reported before this one.
 * binary_result asks for binary column values. Outside a transaction, a statement whose
 * table changed shape since it was prepared is prepared again and rerun once; st is then
 * no longer valid (nor any other statement of this connection). */
PGresult *pup_conn_exec(pup_conn *c, const pup_stmt *st, const pup_params *p,
                        int binary_result, pup_error *err);

/* pup_conn_exec inside a transaction for a write that listeners of channel must hear of
 * once it is committed (an append in a caller's transaction): the NOTIFY is owed, and
 * pup_conn_commit sends it behind the COMMIT as a transaction of its own (the write's
 * commit does not take PostgreSQL's notify lock, which would serialise the commits of
 * concurrent writers); a rollback forgets it. */
PGresult *pup_conn_exec_notify(pup_conn *c, const pup_stmt *st, const pup_params *p, int binary_result,
                               const char *channel, pup_error *err);
/* NOTIFY channel now (inside a transaction: PostgreSQL delivers it at the commit).
 * 0, or -1 with err. */
int pup_conn_notify(pup_conn *c, const char *channel, pup_error *err);
/* For a statement sent around pup_conn_command/pup_conn_commit (a script through the
 * simple protocol), r its result: when it ended the transaction, sends the NOTIFY an
 * append in it owed if it committed, forgets it if not. */
void pup_conn_settle_notify(pup_conn *c, PGresult *r);

/* Runs a parameterless command (BEGIN, COMMIT, SET ...) outside pipeline mode.
 * Returns 0, or -1 with err set. */
int pup_conn_command(pup_conn *c, const char *sql, pup_error *err);

/* Commits the open transaction (and sends the NOTIFY an append in it owes, pipelined
 * behind the COMMIT). A transaction the server had aborted answers COMMIT with
 * ROLLBACK: that returns -1 too, with the statement failure that aborted it. */
int pup_conn_commit(pup_conn *c, pup_error *err);

/* Rolls back whatever is open (leaving pipeline mode first), best effort: the way out
 * of a failed transaction. Forgets the recorded failure and any NOTIFY owed. */
void pup_conn_rollback(pup_conn *c);

/* Pipeline mode, for handler writes: pup_conn_send() queues a statement and returns at
 * once; the result is read later. Each queued statement remembers the tag current when
 * it was sent (the processor sets it to the event index), so a failure is attributed to
 * the event that caused it. */
int pup_conn_pipeline_begin(pup_conn *c, pup_error *err);
void pup_conn_set_tag(pup_conn *c, long tag);
int pup_conn_in_pipeline(const pup_conn *c);
int pup_conn_send(pup_conn *c, const pup_stmt *st, const pup_params *p, pup_error *err);
/* Queues st like pup_conn_send, with binary results, and keeps its result for
 * pup_conn_take_kept instead of discarding it (one kept statement at a time). */
int pup_conn_send_kept(pup_conn *c, const pup_stmt *st, const pup_params *p, pup_error *err);
/* The kept statement's rows once its result was read (NULL: not sent, not read yet, or
 * failed); the caller clears it. */
PGresult *pup_conn_take_kept(pup_conn *c);
/* Reads the results queued before the kept statement's and its own, not those queued
 * after it (they stay pending): the kept rows without waiting for the statements behind
 * them. Failures are recorded as usual; returns -1 with err set only when the connection
 * broke. */
int pup_conn_read_kept(pup_conn *c, pup_error *err);
/* Reads the results queued up to the first statement tagged `tag` and its own, as
 * pup_conn_read_kept does; nothing when none is queued. */
int pup_conn_read_upto(pup_conn *c, long tag, pup_error *err);
/* Queues, in pipeline mode (entered if need be), st (a transaction's last statement,
 * which must raise rather than let the COMMIT behind it commit something wrong), COMMIT
 * and BEGIN, tagged tags[0..2], and sends them without reading anything: the server
 * commits while the caller goes on, and what it queues next runs in the new transaction.
 * Their results are read with the next statements' (a failure is recorded with its tag,
 * as any). Returns 1,
 * queueing nothing, when the transaction owes listeners a wake-up (pup_conn_commit sends
 * it behind its COMMIT) or the connection goes through a pooler (a BEGIN after the COMMIT
 * could reach another server connection); -1 when sending failed. */
int pup_conn_commit_behind(pup_conn *c, const pup_stmt *st, const pup_params *p, const long tags[3],
                           pup_error *err);
/* After pup_conn_commit_behind, once the pipeline was read: 1 when its COMMIT's result
 * was read and said COMMIT; 0 when it failed, was skipped or was never read. */
int pup_conn_behind_committed(const pup_conn *c);
/* Counts the prepared statements sent (queued or run) in pipeline mode or by
 * pup_conn_send_now: a caller compares two counts to learn whether code it called sent any. */
unsigned long pup_conn_sent(const pup_conn *c);
/* Syncs and reads every pending result, staying in pipeline mode (tx:savepoint settles
 * the statements before it). Failures are recorded as usual (pup_conn_failure); returns
 * -1 with err set only when the connection broke. */
int pup_conn_pipeline_sync(pup_conn *c, pup_error *err);
/* Syncs, reads every pending result and leaves pipeline mode. Returns 0 when all
 * succeeded; else -1 with err set to the first failure and *failed_tag to its tag. */
int pup_conn_pipeline_end(pup_conn *c, pup_error *err, long *failed_tag);

/* Transaction bookkeeping used by tx objects: the first statement error inside a
 * transaction is remembered (with its tag), so a handler that ignored a failed
 * statement still fails its batch. */
void pup_conn_clear_failure(pup_conn *c);
/* Records err as the failure unless one is recorded (statements sent around pup_conn_exec,
 * e.g. a script through the simple protocol). */
void pup_conn_note_failure(pup_conn *c, const pup_error *err);
const pup_error *pup_conn_failure(const pup_conn *c, long *tag);

#endif
