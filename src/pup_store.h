/*
 * pup_store.h -- the event store: table names and schema (schema.c), the append path
 * (append.c) and reading the log and one aggregate's stream (read.c).
 */
#ifndef PUP_STORE_H
#define PUP_STORE_H

#include "pup_db.h"
#include "pup_gap.h"

#define PUP_NAME_MAX 128
#define PUP_IDENT_MAX 63 /* PostgreSQL's limit for a name, in bytes (NAMEDATALEN - 1) */
#define PUP_CHANNEL_PREFIX "pupsourcing."

/* Table names, validated and kept both raw and quoted ("schema"."table"). */
typedef struct pup_store {
    char events[PUP_NAME_MAX], heads[PUP_NAME_MAX], checkpoints[PUP_NAME_MAX];
    char q_events[PUP_NAME_MAX + 8], q_heads[PUP_NAME_MAX + 8], q_checkpoints[PUP_NAME_MAX + 8];
    /* Worker groups (leases): <checkpoints>_workers and <checkpoints>_groups. */
    char workers[PUP_NAME_MAX + 16], groups[PUP_NAME_MAX + 16];
    char q_workers[PUP_NAME_MAX + 24], q_groups[PUP_NAME_MAX + 24];
    char q_sequence[PUP_NAME_MAX + 32]; /* <events>_global_position_seq, quoted */
    char channel[PUP_NAME_MAX + 16]; /* LISTEN/NOTIFY channel of the events table */
    /* The constraints a concurrent writer of the same aggregate version violates: a
     * unique violation there is a lost race (optimistic_concurrency). Sized for any input
     * (the compiler cannot see the check): pup_store_init refuses names whose constraint
     * names would be longer than PostgreSQL's 63 bytes. */
    char version_key[PUP_NAME_MAX + 32], heads_key[PUP_NAME_MAX + 32];
    /* SQL texts, built once; prepared per connection through the statement cache. The
     * operator's (status, reset, group status, repartition) are here too, so no caller
     * derives a table name: the Lua side gets them from store:names(). */
    char *sql_append, *sql_append_one, *sql_read, *sql_stream, *sql_head;
    /* Events tables whose id columns are uuid (the Go library's, docs/go.md): the append
     * statements with casts, the statement whose parameter types tell the kind, and the
     * check that global_position defaults to the xid-first function. */
    char *sql_append_uuid, *sql_append_one_uuid, *sql_id_types, *sql_position_default;
    char *sql_read_safe, *sql_same_events; /* read.c's gap-safe read; append.c's retry check */
    char *sql_listen, *sql_listening; /* LISTEN on the channel; whether the session does */
    char *sql_status, *sql_reset, *sql_group_workers, *sql_group_get, *sql_group_set;
    /* Poison events: <checkpoints>_dead_letters (events given up on) and
     * <checkpoints>_failures (partitions stopped by a handler failure); the processor's
     * statements that write them (docs/operations.md, "Poison events"). Both names are
     * no longer than <checkpoints>_workers_pkey; their primary keys' names are left to
     * PostgreSQL, which shortens them to fit (nothing refers to them). */
    char dead_letters[PUP_NAME_MAX + 16], q_dead_letters[PUP_NAME_MAX + 24];
    char failures[PUP_NAME_MAX + 16], q_failures[PUP_NAME_MAX + 24];
    char *sql_dead_letter, *sql_failure_set, *sql_failure_clear;
} pup_store;

/* Prepared transactions of the cluster, oldest first: until each ends, every projection
 * waits at a hole it may fill (`pupsourcing status` warns of them). */
#define PUP_SQL_PREPARED_XACTS                                                                 \
    "SELECT gid, database, transaction::text AS xid,"                                          \
    " to_char(prepared, 'YYYY-MM-DD\"T\"HH24:MI:SS.MSOF') AS since FROM pg_prepared_xacts" \
    " ORDER BY prepared"

/* Validates the names (NULL = default "events", "aggregate_heads",
 * "projection_checkpoints"): [A-Za-z_][A-Za-z0-9_]* with at most one "schema." prefix,
 * and every name derived from them (sequences, functions, constraints, worker tables,
 * the NOTIFY channel) within PostgreSQL's 63-byte limit. Returns -1 with err (code
 * invalid_argument) naming the table option and the name that does not fit. */
int pup_store_init(pup_store *s, const char *events, const char *heads,
                   const char *checkpoints, pup_error *err);
/* Frees the SQL texts. */
void pup_store_free(pup_store *s);

/* The migration SQL (malloc'd; caller frees): idempotent CREATE ... IF NOT EXISTS; the
 * ALTERs run only when the catalog lacks what they add, so on an up-to-date schema it
 * takes no strong lock. */
char *pup_store_schema_sql(const pup_store *s);
/* Applies the schema in one transaction. Tables of the Go library's shapes (docs/go.md)
 * are refused (code not_migrated, SQLSTATE PU001, a message listing the differences and
 * what an upgrade does) and nothing is changed. */
int pup_store_migrate(const pup_store *s, pup_conn *c, pup_error *err);
/* pup_store_migrate; with upgrade != 0 the Go library's tables are converted in place
 * (`pupsourcing migrate --upgrade`), without rewriting the events table. A shape it
 * cannot convert (bounded_context) is still refused. */
int pup_store_migrate_ex(const pup_store *s, pup_conn *c, int upgrade, pup_error *err);

#define PUP_UUIDOID 2950
/* Whether the events table's id columns (aggregate_id, causation_id, correlation_id,
 * trace_id) are uuid (1) or text (0) on this connection's database; -1 with err when
 * they are mixed or the table is missing. One round trip the first time per connection
 * (a statement prepared and cached), none after. */
int pup_store_id_kind(const pup_store *s, pup_conn *c, pup_error *err);

/* Expected version for append: PUP_ANY, or n >= 0 (0 = no stream yet). */
#define PUP_ANY (-1LL)

/* A byte string that may be NULL (p == NULL) and may contain NULs. */
typedef struct pup_str {
    const char *p;
    size_t len;
} pup_str;

/* One event to append. Strings are borrowed for the duration of the call. */
typedef struct pup_event_in {
    pup_str event_id; /* NULL: a new random UUID */
    pup_str event_type;
    int event_version;
    pup_str payload;
    pup_str metadata; /* JSON text or NULL */
    pup_str causation_id, correlation_id, trace_id;
    pup_str created_at; /* timestamp text or NULL (now) */
} pup_event_in;

/* Reusable scratch for append: the binary arrays it sends. same_payload (NULL: equal
 * bytes) tells whether a stored payload and a given one are the same, for an append whose
 * event_id exists; the Lua binding compares JSON values, whatever their key order. */
typedef struct pup_append_buf {
    char *data;
    size_t len, cap;
    pup_params params;
    int (*same_payload)(void *ud, pup_str stored, pup_str given);
    void *same_ud;
} pup_append_buf;
void pup_append_buf_free(pup_append_buf *b);

typedef struct pup_append_result {
    long long from_version, to_version;
    long long *positions; /* n positions, malloc'd: caller frees */
    int n;
    int retried; /* 1: these events existed (a retry of the same append): nothing written */
} pup_append_result;

/* Appends n events to one aggregate in a single statement (one round trip): checks the
 * expected version, inserts the events, moves the aggregate head and notifies
 * listeners. Fails with PUP_ERR_CONFLICT when the version does not match or a
 * concurrent writer won; nothing of the append is then written. */
int pup_store_append(const pup_store *s, pup_conn *c, pup_append_buf *buf,
                     const char *aggregate_type, size_t type_len, const char *aggregate_id,
                     size_t id_len, long long expected, const pup_event_in *events, int n,
                     pup_append_result *out, pup_error *err);

/* A persisted event, pointing into a PGresult (valid until it is cleared). */
typedef struct pup_event {
    long long global_position, aggregate_version;
    int event_version;
    pup_str aggregate_type, aggregate_id, event_id, event_type, payload, metadata;
    pup_str causation_id, correlation_id, trace_id;
    long long created_at; /* microseconds since 1970-01-01 UTC */
} pup_event;

/* Writes Unix microseconds as "YYYY-MM-DDTHH:MM:SS.UUUUUUZ" (an event's created_at as the
 * Lua surface shows it) into buf; returns the length, as snprintf. */
int pup_format_time(long long unix_us, char *buf, size_t size);

/* The column list every event read selects, in the order pup_event_from_row expects,
 * starting at column `first`; _WITH takes other expressions for payload and metadata.
 * Results must be in binary format: created_at comes as the server's microseconds and is
 * formatted by the client (to_char cost the server a quarter of a catch-up read). */
#define PUP_EVENT_COLUMNS_WITH(payload, metadata)                                          \
    "global_position, aggregate_type, aggregate_id::text, aggregate_version, event_id::text, " \
    "event_type, event_version, " payload ", " metadata ", causation_id::text, "                \
    "correlation_id::text, trace_id::text, created_at::timestamptz"
#define PUP_EVENT_COLUMNS PUP_EVENT_COLUMNS_WITH("payload", "metadata::text")
/* The last position drawn from the events' sequence (0: none, or a role without SELECT or
 * USAGE on it, which then waits for wake-ups and polls only: docs/ordering.md, "Wake-ups").
 * Both %s: the quoted sequence name. */
#define PUP_LAST_DRAWN                                                                      \
    "COALESCE(CASE WHEN has_sequence_privilege('%s', 'SELECT, USAGE')"                     \
    " THEN pg_sequence_last_value('%s') END, 0)"
void pup_event_from_row(const PGresult *r, int row, int first, pup_event *ev);

/* Makes c LISTEN on the store's channel unless it already does (a new session, or after an
 * UNLISTEN). Returns 1 when it was listening already, 0 when it starts now (an append may
 * have committed unheard since the caller last read: read again before waiting), -1 with
 * err. */
int pup_store_listen(const pup_store *s, pup_conn *c, pup_error *err);

/* Reads up to limit events with global_position > after, ascending. Raw reads: events
 * still in flight below the highest visible position are not waited for, so a reader
 * that resumes after the last position it saw can skip one (pup_store_read_safe does
 * not). Returns the binary result, or NULL with err. */
PGresult *pup_store_read(const pup_store *s, pup_conn *c, long long after, long long limit,
                         pup_error *err);
/* A gap-safe reader's place in the log: the position read up to and the holes it noted
 * above it, each with the bound that decides it (pup_gap.h, docs/ordering.md). Start
 * zeroed with `position` set; resuming from a bare position is safe (holes are noted
 * again, which costs one more read before a dead one is passed). */
typedef struct pup_cursor {
    long long position;
    pup_gaps gaps;
} pup_cursor;

/* One window of a gap-safe read: its events [0, passed) passed the gap rule (the others
 * are above an undecided hole); pup_safe_event() gives those in scope. */
typedef struct pup_safe_read {
    PGresult *r; /* binary, a header row before the window's; the caller PQclears it */
    int passed;
    int found;  /* events in scope among the passed ones */
    int more;   /* 1: the window was full and passed whole: more may follow at once */
    long long waiting; /* the first undecided hole (0: none) */
    /* The last position drawn when it lies above every position the read could see: an
     * append not committed yet, or rolled back (0: none; set only when the window was
     * read whole). Its wake-up may have been another append's, sent before its commit:
     * a follower reads again soon (pup_drawn_look_wait, pup_gap.h). */
    long long in_flight;
} pup_safe_read;

/* Reads the window after cur->position (at most `window` rows of any scope) and walks it
 * by the processor's gap rule (gap.c): stops below the first hole a running transaction
 * may still fill, and after `limit` events in scope. scope[0] and scope[1] are text[]
 * literals of the aggregate and event types (NULL: any). Advances cur only on success.
 * When it noted holes it draws their bound, an xid of its own, unless the caller's
 * transaction already has one (then they wait for a read outside it). Returns 0, or -1
 * with err (nothing to clear). */
int pup_store_read_safe(const pup_store *s, pup_conn *c, pup_cursor *cur, const char *const scope[2],
                        long long window, long long limit, pup_safe_read *out, pup_error *err);
/* A window read (the processor's, the gap-safe one) begins with its header row: row 0
 * with column 0 set and first_event_col NULL (UNION ALL runs its branches in turn, so
 * this never fails but on a changed statement). 1 if so, else 0 with err set. */
int pup_window_header_ok(const PGresult *r, int first_event_col, pup_error *err);
/* Event i of a safe read when it passed and is in scope: fills ev and returns 1; else 0. */
int pup_safe_event(const pup_safe_read *rd, int i, pup_event *ev);

/* Makes a failure of one of the store's own statements on a missing relation (42P01)
 * not_migrated, with the hint to migrate: their relations are the store's tables. Other
 * statements (the user's) keep the plain database error naming the table. Returns -1. */
int pup_store_error(pup_error *err);

/* Reads one aggregate's events with from <= version <= to (to < 0: no upper bound). */
PGresult *pup_store_read_stream(const pup_store *s, pup_conn *c, pup_str type, pup_str id,
                                long long from, long long to, pup_error *err);
/* The highest global position (0 for an empty log), or -1 with err. */
long long pup_store_head(const pup_store *s, pup_conn *c, pup_error *err);

/* Reads a big-endian integer of the given width from a binary column. */
long long pup_be_int(const char *p, int width);

/* ---- Aggregate snapshots (snapshot.c): at most one row per aggregate in the table
 * <events_table>_snapshots (same schema), made by migrate. ---- */
#define PUP_SNAPSHOT_TABLE_MAX (PUP_NAME_MAX + 24)
/* Writes the quoted snapshots table name of s into out (size PUP_SNAPSHOT_TABLE_MAX) and
 * returns out. */
char *pup_snapshot_table(const pup_store *s, char *out, size_t size);
/* One aggregate's snapshot of snapshot_version (if any) and the events after it, in one
 * statement. Row 0 is the snapshot when its global_position column is 0 (version in
 * aggregate_version, state in payload); the other rows are events as
 * pup_event_from_row reads them, ascending. Returns the binary result, or NULL with err. */
PGresult *pup_snapshot_read(const pup_store *s, pup_conn *c, pup_str type, pup_str id,
                            int snapshot_version, pup_error *err);
/* Upserts the aggregate's snapshot unless the row holds a higher snapshot_version, or the
 * same one at a version >= version, or another transaction holds it locked (skipped, not
 * waited for). Returns 1 when written, 0 when not, -1 with err. */
int pup_snapshot_write(const pup_store *s, pup_conn *c, pup_str type, pup_str id,
                       long long version, int snapshot_version, pup_str state, pup_error *err);

#endif
