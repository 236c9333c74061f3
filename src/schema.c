/*
 * schema.c -- table names (validated, quoted) and the migration SQL. See pup_store.h.
 */
#include "pup_store.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* [A-Za-z_][A-Za-z0-9_]{0,62}, once or twice joined by a dot (schema.table). The names
 * derived from it are checked against the limit by derived_too_long(). */
static int valid_name(const char *name) {
    int parts = 0;
    const char *p = name;
    for (;;) {
        size_t n = 0;
        if (!(isalpha((unsigned char)*p) || *p == '_')) return 0;
        while (isalnum((unsigned char)p[n]) || p[n] == '_') n++;
        if (n > PUP_IDENT_MAX) return 0;
        parts++;
        p += n;
        if (*p == '\0') return 1;
        if (*p != '.' || parts == 2) return 0;
        p++;
    }
}

/* "a.b" + suffix -> "a"."b<suffix>"; "b" + suffix -> "b<suffix>". */
static void quote_name(char *out, size_t size, const char *name, const char *suffix) {
    const char *dot = strchr(name, '.');
    if (dot)
        snprintf(out, size, "\"%.*s\".\"%s%s\"", (int)(dot - name), name, dot + 1, suffix);
    else
        snprintf(out, size, "\"%s%s\"", name, suffix);
}

/* asprintf that returns NULL on failure instead of leaving the pointer undefined. */
static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...) {
    va_list ap;
    char *s = NULL;
    va_start(ap, f);
    if (vasprintf(&s, f, ap) < 0) s = NULL;
    va_end(ap);
    return s;
}

/* One statement per append: check the expected version, insert the events (versions
 * from the current one, positions in version order) and move the head, all or nothing
 * $3 NULL = any. The current
 * version is the greater of the head row and the highest event version (one index
 * probe): events written by another tool without a head row, or without moving it, do
 * not block the aggregate. When an event_id exists nothing is written and `dup` says so
 * (append.c then tells a retry of the same append from a duplicate), without failing the
 * statement: a caller's transaction goes on. With $14 true (an append outside a
 * transaction: append.c) the statement is also the wake-up, coalesced: it notifies only if
 * no other append's wake-up is under way (a transaction-scoped advisory lock, tried after
 * the insert drew the positions, so a reader woken by that other append already sees them
 * drawn: docs/ordering.md, "Wake-ups"). PostgreSQL serialises the commits of notifying
 * transactions, so one notifier at a time lets the others commit together. `id_cast` casts the trace ids to uuid
 * columns (the Go library's tables). Two shapes share these parts: many events (binary
 * arrays) and one (plain parameters, without the unnest, its sort and the head's
 * aggregate: a fifth of the server's time on a 1-event append). %s: heads, events. */
#define APPEND_CURRENT                                                                            \
    "WITH cur AS (SELECT GREATEST((SELECT aggregate_version FROM %s"                              \
    " WHERE aggregate_type = $1 AND aggregate_id = $2), (SELECT max(aggregate_version) FROM %s" \
    " WHERE aggregate_type = $1 AND aggregate_id = $2), 0) AS v,"
#define APPEND_EXPECTED "NOT dup AND ($3::bigint IS NULL OR v = $3::bigint)"
#define APPEND_INSERT                                                                        \
    " ins AS (INSERT INTO %s (aggregate_type, aggregate_id, aggregate_id_hash, aggregate_version," \
    " event_id, event_type, event_version, payload, metadata, causation_id, correlation_id,"    \
    " trace_id, created_at)"
#define APPEND_WAKE_UP                                                                 \
    " CASE WHEN $14::boolean AND ins.aggregate_version = cur.v + 1 AND"                    \
    " pg_try_advisory_xact_lock(hashtextextended('pupsourcing.wake-up/%s', 0))"            \
    " THEN pg_notify('%s', '') END"
#define APPEND_HEAD_CONFLICT                                 \
    " ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET" \
    " aggregate_version = EXCLUDED.aggregate_version, updated_at = EXCLUDED.updated_at"

static char *append_sql(const pup_store *s, const char *id_cast) {
    /* Every event_id is probed by its own index lookup (a scalar subquery is never turned
     * into a join), so a plan made while the table was empty never becomes a scan. */
    return fmt(APPEND_CURRENT
               " EXISTS (SELECT 1 FROM unnest($4::text[]) AS d(id)"
               " WHERE (SELECT true FROM %s WHERE event_id = d.id::uuid)) AS dup),"
               " ok AS (SELECT v FROM cur WHERE " APPEND_EXPECTED "),"
               APPEND_INSERT
               " SELECT $1, $2, $13::bigint, ok.v + u.ord, COALESCE(u.event_id::uuid, gen_random_uuid()),"
               " u.event_type, u.event_version::int, u.payload, u.metadata::jsonb, u.causation_id%s,"
               " u.correlation_id%s, u.trace_id%s, COALESCE(u.created_at::timestamptz, now())"
               " FROM ok, unnest($4::text[], $5::text[], $6::text[], $7::bytea[], $8::text[], $9::text[],"
               " $10::text[], $11::text[], $12::text[]) WITH ORDINALITY AS u(event_id, event_type,"
               " event_version, payload, metadata, causation_id, correlation_id, trace_id, created_at, ord)"
               " ORDER BY u.ord RETURNING global_position, aggregate_version),"
               " head AS (INSERT INTO %s (aggregate_type, aggregate_id, aggregate_version, updated_at)"
               " SELECT $1, $2, max(aggregate_version), now() FROM ins HAVING count(*) > 0"
               APPEND_HEAD_CONFLICT ")"
               " SELECT cur.v, ins.global_position, ins.aggregate_version, cur.dup," APPEND_WAKE_UP
               " FROM cur LEFT JOIN ins ON true ORDER BY ins.aggregate_version",
               s->q_heads, s->q_events, s->q_events, s->q_events, id_cast, id_cast, id_cast, s->q_heads,
               s->events, s->channel);
}

static char *append_one_sql(const pup_store *s, const char *id_cast) {
    return fmt(APPEND_CURRENT
               " $4::text IS NOT NULL AND EXISTS (SELECT 1 FROM %s WHERE event_id = $4::text::uuid) AS dup),"
               APPEND_INSERT
               " SELECT $1, $2, $13::bigint, v + 1, COALESCE($4::text::uuid, gen_random_uuid()), $5::text,"
               " $6::text::int, $7::bytea, $8::text::jsonb, $9::text%s, $10::text%s, $11::text%s,"
               " COALESCE($12::text::timestamptz, now())"
               " FROM cur WHERE " APPEND_EXPECTED " RETURNING global_position, aggregate_version),"
               " head AS (INSERT INTO %s (aggregate_type, aggregate_id, aggregate_version, updated_at)"
               " SELECT $1, $2, aggregate_version, now() FROM ins" APPEND_HEAD_CONFLICT ")"
               " SELECT cur.v, ins.global_position, ins.aggregate_version, cur.dup," APPEND_WAKE_UP
               " FROM cur LEFT JOIN ins ON true",
               s->q_heads, s->q_events, s->q_events, s->q_events, id_cast, id_cast, id_cast, s->q_heads,
               s->events, s->channel);
}

/* The table name without its schema. */
static const char *base_name(const char *name) {
    const char *dot = strchr(name, '.');
    return dot ? dot + 1 : name;
}

/* Checks that the names derived from table option `what` = `name` (the prefixed or
 * suffixed objects migrate creates, the NOTIFY channel) fit PostgreSQL's identifier
 * limit: beyond it the server truncates (names no longer match) or refuses (NOTIFY). */
static int derived_too_long(int table, const char *what, const char *name, pup_error *err) {
    static const char *const suffixes[3][5] = {
        {"_global_position_seq", "_next_position", "_aggregate_version_key", "_event_id_key", "_pkey"},
        {"_pkey"},
        {"_workers_pkey", "_groups_pkey", "_pkey"}};
    const char *base = base_name(name);
    for (int i = 0; i < 5 && suffixes[table][i]; i++)
        if (strlen(base) + strlen(suffixes[table][i]) > PUP_IDENT_MAX)
            return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                                 "invalid %s \"%s\": the derived name \"%s%s\" is over PostgreSQL's "
                                 "%d-byte limit for names (shorten the table name)",
                                 what, name, base, suffixes[table][i], PUP_IDENT_MAX);
    if (table == 0 && strlen(PUP_CHANNEL_PREFIX) + strlen(name) > PUP_IDENT_MAX)
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                             "invalid %s \"%s\": the derived notification channel \"%s%s\" is over "
                             "PostgreSQL's %d-byte limit for names (shorten the schema or table name)",
                             what, name, PUP_CHANNEL_PREFIX, name, PUP_IDENT_MAX);
    return 0;
}

/* One row: whether the events table exists and whether its global_position defaults to
 * the xid-first function (`status` and `run` warn when not: docs/ordering.md). */
static char *position_default_sql(const pup_store *s) {
    char fn[PUP_NAME_MAX + 32];
    quote_name(fn, sizeof fn, s->events, "_next_position");
    return fmt("SELECT to_regclass('%s') IS NOT NULL AS exists, EXISTS (SELECT 1 FROM pg_attrdef d"
               " JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
               " JOIN pg_depend p ON p.classid = 'pg_attrdef'::regclass AND p.objid = d.oid"
               " AND p.refclassid = 'pg_proc'::regclass WHERE d.adrelid = to_regclass('%s')"
               " AND a.attname = 'global_position' AND p.refobjid = to_regprocedure('%s()')) AS xid_first,"
               " '%s()' AS function",
               s->q_events, s->q_events, fn, fn);
}

/* The operator's statements: status, reset and the worker group's. */
static int operator_sql(pup_store *s) {
    /* Checkpoints of every projection partition with the head and lag. */
    s->sql_status = fmt(
        "SELECT c.projection_name AS projection, c.partition_key, c.total_partitions,"
        " c.last_global_position AS position, h.head, h.head - c.last_global_position AS lag,"
        " to_char(c.updated_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.MSOF') AS updated_at, c.waiting_position,"
        " to_char(c.waiting_since, 'YYYY-MM-DD\"T\"HH24:MI:SS.MSOF') AS waiting_since, c.owner"
        " FROM %s c CROSS JOIN (SELECT COALESCE(max(global_position), 0) AS head FROM %s) h"
        " ORDER BY c.projection_name, c.total_partitions, c.partition_key",
        s->q_checkpoints, s->q_events);
    s->sql_reset = fmt("DELETE FROM %s WHERE projection_name = $1", s->q_checkpoints);
    /* Live group workers with the partitions they lease. */
    s->sql_group_workers = fmt(
        "SELECT projection_name, worker_id,"
        " round(extract(epoch FROM clock_timestamp() - heartbeat_at)::numeric, 1)::text AS age,"
        " (SELECT string_agg(partition_key::text, ',' ORDER BY partition_key) FROM %s c"
        " WHERE c.projection_name = w.projection_name AND c.owner = w.worker_id"
        " AND c.lease_expires_at > clock_timestamp()) AS partitions"
        " FROM %s w ORDER BY projection_name, worker_id",
        s->q_checkpoints, s->q_workers);
    s->sql_group_get = fmt("SELECT total_partitions, previous_total, mode FROM %s WHERE projection_name = $1"
                           " FOR UPDATE", s->q_groups);
    /* $4: the mode before ('static' when a repartition turns a static layout into a group). */
    s->sql_group_set = fmt("INSERT INTO %s (projection_name, total_partitions, previous_total, mode, previous_mode)"
                           " VALUES ($1, $2, $3, 'group', $4)"
                           " ON CONFLICT (projection_name) DO UPDATE SET total_partitions = EXCLUDED.total_partitions,"
                           " previous_total = EXCLUDED.previous_total, previous_mode = $4, mode = 'group', changed_at = now()",
                           s->q_groups);
    return s->sql_status && s->sql_reset && s->sql_group_workers && s->sql_group_get && s->sql_group_set ? 0 : -1;
}

/* The processor's statements for poison events: a dead letter, written in the batch
 * transaction that moves the checkpoint past the event (a retried dead letter updates
 * its row); a partition's failure, kept while it is stopped and cleared once it moves. */
static int poison_sql(pup_store *s) {
    s->sql_dead_letter = fmt(
        "INSERT INTO %s AS d (projection_name, global_position, partition_key, total_partitions, event_id,"
        " event_type, aggregate_type, aggregate_id, aggregate_version, error, attempts, first_failed_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, to_timestamp($12::float8))"
        " ON CONFLICT (projection_name, global_position) DO UPDATE SET partition_key = EXCLUDED.partition_key,"
        " total_partitions = EXCLUDED.total_partitions, error = EXCLUDED.error,"
        " attempts = d.attempts + EXCLUDED.attempts, last_failed_at = now()",
        s->q_dead_letters);
    s->sql_failure_set = fmt(
        "INSERT INTO %s AS f (projection_name, total_partitions, partition_key, global_position, error)"
        " SELECT $1, $2::int, k, $4::bigint, $5 FROM unnest($3::int[]) AS k"
        " ON CONFLICT (projection_name, total_partitions, partition_key) DO UPDATE SET"
        " failed_since = CASE WHEN f.global_position IS NOT DISTINCT FROM EXCLUDED.global_position"
        " THEN f.failed_since ELSE now() END,"
        " global_position = EXCLUDED.global_position, error = EXCLUDED.error, last_failed_at = now()",
        s->q_failures);
    s->sql_failure_clear = fmt("DELETE FROM %s WHERE projection_name = $1 AND total_partitions = $2::int"
                               " AND partition_key = ANY($3::int[])", s->q_failures);
    return s->sql_dead_letter && s->sql_failure_set && s->sql_failure_clear ? 0 : -1;
}

int pup_store_init(pup_store *s, const char *events, const char *heads,
                   const char *checkpoints, pup_error *err) {
    memset(s, 0, sizeof *s);
    const char *names[3] = {events ? events : "events", heads ? heads : "aggregate_heads",
                            checkpoints ? checkpoints : "projection_checkpoints"};
    const char *what[3] = {"events_table", "aggregate_heads_table", "checkpoints_table"};
    for (int i = 0; i < 3; i++) {
        if (!valid_name(names[i]))
            return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                                 "invalid %s \"%.80s\": use letters, digits and _ "
                                 "(optionally schema.table), at most %d characters a part",
                                 what[i], names[i], PUP_IDENT_MAX);
        if (derived_too_long(i, what[i], names[i], err) < 0) return -1;
    }
    snprintf(s->events, sizeof s->events, "%s", names[0]);
    snprintf(s->heads, sizeof s->heads, "%s", names[1]);
    snprintf(s->checkpoints, sizeof s->checkpoints, "%s", names[2]);
    quote_name(s->q_events, sizeof s->q_events, s->events, "");
    quote_name(s->q_heads, sizeof s->q_heads, s->heads, "");
    quote_name(s->q_checkpoints, sizeof s->q_checkpoints, s->checkpoints, "");
    snprintf(s->workers, sizeof s->workers, "%s_workers", s->checkpoints);
    snprintf(s->groups, sizeof s->groups, "%s_groups", s->checkpoints);
    quote_name(s->q_workers, sizeof s->q_workers, s->checkpoints, "_workers");
    quote_name(s->q_groups, sizeof s->q_groups, s->checkpoints, "_groups");
    snprintf(s->dead_letters, sizeof s->dead_letters, "%s_dead_letters", s->checkpoints);
    snprintf(s->failures, sizeof s->failures, "%s_failures", s->checkpoints);
    quote_name(s->q_dead_letters, sizeof s->q_dead_letters, s->checkpoints, "_dead_letters");
    quote_name(s->q_failures, sizeof s->q_failures, s->checkpoints, "_failures");
    quote_name(s->q_sequence, sizeof s->q_sequence, s->events, "_global_position_seq");
    snprintf(s->channel, sizeof s->channel, PUP_CHANNEL_PREFIX "%s", s->events);
    snprintf(s->version_key, sizeof s->version_key, "%s_aggregate_version_key", base_name(s->events));
    snprintf(s->heads_key, sizeof s->heads_key, "%s_pkey", base_name(s->heads));

    const char *E = s->q_events;
    s->sql_append = append_sql(s, "");
    s->sql_append_one = append_one_sql(s, "");
    s->sql_append_uuid = append_sql(s, "::uuid");
    s->sql_append_one_uuid = append_one_sql(s, "::uuid");
    s->sql_id_types = fmt("SELECT 1 FROM %s WHERE aggregate_id = $1 AND causation_id = $2"
                          " AND correlation_id = $3 AND trace_id = $4 LIMIT 0", E);
    s->sql_position_default = position_default_sql(s);
    s->sql_read = fmt("SELECT " PUP_EVENT_COLUMNS " FROM %s WHERE global_position > $1"
                      " ORDER BY global_position LIMIT $2", E);
    s->sql_stream = fmt("SELECT " PUP_EVENT_COLUMNS " FROM %s WHERE aggregate_type = $1"
                        " AND aggregate_id = $2 AND aggregate_version >= $3"
                        " AND ($4::bigint < 0 OR aggregate_version <= $4::bigint)"
                        " ORDER BY aggregate_version", E);
    s->sql_head = fmt("SELECT COALESCE(max(global_position), 0) FROM %s", E);
    /* The gap-safe read (read.c): in one statement, as the processor's, a header row (the
     * snapshot's xmin, the last position drawn) and then the window (UNION ALL runs its
     * branches in turn); rows outside the scope ($3, $4: text[] or NULL) come without body. */
#define PUP_IN_SCOPE "($3::text[] IS NULL OR aggregate_type = ANY($3::text[])) AND" \
                     " ($4::text[] IS NULL OR event_type = ANY($4::text[]))"
    s->sql_read_safe = fmt("SELECT pg_snapshot_xmin(pg_current_snapshot())::text, " PUP_LAST_DRAWN ","
                           " NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
                           " UNION ALL (SELECT NULL, NULL, " PUP_IN_SCOPE " AS mine, "
                           PUP_EVENT_COLUMNS_WITH("CASE WHEN " PUP_IN_SCOPE " THEN payload END",
                                                  "CASE WHEN " PUP_IN_SCOPE " THEN metadata::text END")
                           " FROM %s WHERE global_position > $1 ORDER BY global_position LIMIT $2)",
                           s->q_sequence, s->q_sequence, E);
#undef PUP_IN_SCOPE
    /* An append whose event_id exists (append.c): the stored events of those ids. */
    s->sql_same_events = fmt("SELECT event_id::text, global_position, aggregate_type, aggregate_id::text,"
                             " aggregate_version, event_type, event_version, payload FROM %s"
                             " WHERE event_id = ANY($1::uuid[])", E);
    /* (the channel is a valid name with a prefix: no quote needs escaping) */
    s->sql_listen = fmt("LISTEN \"%s\"", s->channel);
    s->sql_listening = fmt("SELECT EXISTS (SELECT FROM pg_listening_channels() AS c WHERE c = '%s')", s->channel);
    if (!s->sql_append || !s->sql_append_one || !s->sql_append_uuid || !s->sql_append_one_uuid ||
        !s->sql_id_types || !s->sql_position_default || !s->sql_read || !s->sql_stream || !s->sql_head ||
        !s->sql_read_safe || !s->sql_same_events || !s->sql_listen || !s->sql_listening || operator_sql(s) < 0 ||
        poison_sql(s) < 0) {
        pup_store_free(s);
        return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    }
    return 0;
}

void pup_store_free(pup_store *s) {
    char **texts[] = {&s->sql_append, &s->sql_append_one, &s->sql_read, &s->sql_stream, &s->sql_head,
                      &s->sql_read_safe, &s->sql_same_events, &s->sql_listen, &s->sql_listening,
                      &s->sql_status, &s->sql_reset, &s->sql_group_workers, &s->sql_group_get,
                      &s->sql_group_set, &s->sql_append_uuid, &s->sql_append_one_uuid, &s->sql_id_types,
                      &s->sql_position_default, &s->sql_dead_letter, &s->sql_failure_set, &s->sql_failure_clear};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        free(*texts[i]);
        *texts[i] = NULL;
    }
}

/* The body of the guard that pup_store_schema_sql runs before creating anything. It
 * finds tables this project cannot use as they are (the Go library's shapes: see
 * docs/go.md) and, unless `upgrade`, refuses with the differences and what an upgrade
 * does (SQLSTATE PU001, nothing changed: the migration is one transaction). With
 * `upgrade` it converts them in place without rewriting the events table: no column
 * changes type (uuid ids stay uuid: the C side reads them as text and writes them
 * through casts), the position default becomes the xid-first function, the version key
 * gets the name the append path recognises, and a Go checkpoint table (one row per
 * projection) becomes partition 0 of 1 of each projection, at the same position.
 * Declared before it: ev, ck (regclass or NULL), fn, vk, seq (text) and upgrade. */
static const char guard_body[] =
    "    diffs text := '';\n"
    "    todo text := '';\n"
    "    ids text;\n"
    "    def text;\n"
    "    uq name;\n"
    "    pk name;\n"
    "BEGIN\n"
    "    IF ev IS NOT NULL THEN\n"
    "        IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = ev AND attname = 'bounded_context'\n"
    "                   AND NOT attisdropped) THEN\n"
    "            RAISE EXCEPTION USING ERRCODE = 'PU001', MESSAGE = format('migrate: %s has a bounded_context'\n"
    "                ' column (the newest Go library''s shape): pupsourcing for C and Lua does not support'\n"
    "                ' bounded contexts, with or without --upgrade; nothing was changed (docs/go.md)', ev);\n"
    "        END IF;\n"
    "        SELECT string_agg(attname, ', ' ORDER BY attnum) INTO ids FROM pg_attribute WHERE attrelid = ev\n"
    "            AND NOT attisdropped AND atttypid = 'uuid'::regtype\n"
    "            AND attname IN ('aggregate_id', 'causation_id', 'correlation_id', 'trace_id');\n"
    "        SELECT pg_get_expr(d.adbin, d.adrelid) INTO def FROM pg_attrdef d JOIN pg_attribute a\n"
    "            ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE d.adrelid = ev AND a.attname = 'global_position';\n"
    "        IF NOT EXISTS (SELECT 1 FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid\n"
    "                       AND a.attnum = d.adnum JOIN pg_depend p ON p.classid = 'pg_attrdef'::regclass\n"
    "                       AND p.objid = d.oid AND p.refclassid = 'pg_proc'::regclass\n"
    "                       WHERE d.adrelid = ev AND a.attname = 'global_position'\n"
    "                       AND p.refobjid = to_regprocedure(fn || '()')) THEN\n"
    "            diffs := diffs || format(E'\\n  - %s.global_position defaults to %s, not %s(): writers do not take'\n"
    "                ' a transaction id before drawing a position, so the ordering rule (docs/ordering.md)'\n"
    "                ' is not in force', ev, coalesce(def, 'nothing'), fn);\n"
    "            todo := todo || format(E'\\n  - set the default of global_position to %s() (same sequence,'\n"
    "                ' every position kept)', fn);\n"
    "            IF upgrade THEN\n"
    "                EXECUTE format('SELECT setval(%L, max(global_position)) FROM %s HAVING max(global_position)'\n"
    "                    ' > (SELECT last_value FROM %s)', seq, ev, seq);\n"
    "                EXECUTE format('ALTER TABLE %s ALTER COLUMN global_position SET DEFAULT %s()', ev, fn);\n"
    "            END IF;\n"
    "        END IF;\n"
    "        SELECT c.conname INTO uq FROM pg_constraint c WHERE c.conrelid = ev AND c.contype = 'u'\n"
    "            AND (SELECT array_agg(attname::text ORDER BY attname) FROM pg_attribute WHERE attrelid = ev\n"
    "                 AND attnum = ANY (c.conkey)) = ARRAY['aggregate_id', 'aggregate_type', 'aggregate_version'];\n"
    "        IF uq IS NOT NULL AND uq <> vk THEN\n"
    "            diffs := diffs || format(E'\\n  - the unique key on (aggregate_type, aggregate_id, aggregate_version)'\n"
    "                ' is named %I: a lost append race would not be reported as optimistic_concurrency', uq);\n"
    "            todo := todo || format(E'\\n  - rename it to %I', vk);\n"
    "            IF upgrade THEN\n"
    "                EXECUTE format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I', ev, uq, vk);\n"
    "            END IF;\n"
    "        END IF;\n"
    "        IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = ev AND attname = 'aggregate_id_hash'\n"
    "                       AND NOT attisdropped) THEN\n"
    "            todo := todo || E'\\n  - add the column aggregate_id_hash (NULL for existing rows, no rewrite)';\n"
    "        END IF;\n"
    "    END IF;\n"
    "    IF ck IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = ck\n"
    "                                      AND attname = 'partition_key' AND NOT attisdropped) THEN\n"
    "        diffs := diffs || format(E'\\n  - %s keeps one checkpoint per projection (the Go library''s shape),'\n"
    "            ' not one per projection partition', ck);\n"
    "        todo := todo || E'\\n  - convert it in place: a projection at position N continues as partition 0'\n"
    "            ' of 1 at N (Go processors then need a checkpoint table of their own: docs/go.md)';\n"
    "        IF upgrade THEN\n"
    "            SELECT conname INTO pk FROM pg_constraint WHERE conrelid = ck AND contype = 'p';\n"
    "            IF pk IS NOT NULL THEN\n"
    "                EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', ck, pk);\n"
    "            END IF;\n"
    "            EXECUTE format('ALTER TABLE %s ADD COLUMN partition_key INT NOT NULL DEFAULT 0,'\n"
    "                ' ADD COLUMN total_partitions INT NOT NULL DEFAULT 1,'\n"
    "                ' ADD COLUMN IF NOT EXISTS waiting_position BIGINT, ADD COLUMN IF NOT EXISTS waiting_since TIMESTAMPTZ,'\n"
    "                ' ADD COLUMN IF NOT EXISTS owner TEXT, ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMPTZ,'\n"
    "                ' ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ', ck);\n"
    "            EXECUTE format('UPDATE %s SET updated_at = now() WHERE updated_at IS NULL', ck);\n"
    "            EXECUTE format('ALTER TABLE %s ALTER COLUMN last_global_position SET NOT NULL,'\n"
    "                ' ALTER COLUMN updated_at SET NOT NULL, ALTER COLUMN updated_at SET DEFAULT now(),'\n"
    "                ' ADD PRIMARY KEY (projection_name, total_partitions, partition_key)', ck);\n"
    "        END IF;\n"
    "    END IF;\n"
    "    IF diffs <> '' AND NOT upgrade THEN\n"
    "        RAISE EXCEPTION USING ERRCODE = 'PU001', MESSAGE = format(E'migrate: the existing tables are not in a'\n"
    "            ' shape pupsourcing can use; nothing was changed.%s\\n`pupsourcing migrate --upgrade`'\n"
    "            ' (store:migrate(db, {upgrade = true})) converts them in place, without rewriting the events'\n"
    "            ' table:%s%s', diffs, todo, CASE WHEN ids IS NULL THEN '' ELSE format(E'\\n  - keep %s of %s'\n"
    "            ' as uuid (read back as canonical text; aggregate ids must then be UUIDs)', ids, ev) END);\n"
    "    END IF;\n"
    "END\n"
    "$guard$;\n";

/* The migration SQL; `upgrade` lets its guard convert the Go library's tables. */
static char *schema_sql(const pup_store *s, int upgrade) {
    const char *seq = s->q_sequence;
    char snap[PUP_SNAPSHOT_TABLE_MAX];
    pup_snapshot_table(s, snap, sizeof snap);
    char fn[PUP_NAME_MAX + 32];
    char uq[sizeof s->version_key + 2];
    quote_name(fn, sizeof fn, s->events, "_next_position");
    /* Constraint and index names are never schema-qualified. */
    snprintf(uq, sizeof uq, "\"%s\"", s->version_key);
    return fmt(
        "-- pupsourcing schema, generated by `pupsourcing migrate-gen`. Idempotent.\n"
        "BEGIN;\n"
        "-- Serialize concurrent migrations of the same database.\n"
        "SELECT pg_advisory_xact_lock(hashtextextended('pupsourcing.migrate', 0));\n"
        "\n"
        "CREATE SEQUENCE IF NOT EXISTS %s;\n"
        "\n"
        "-- Every writer takes its transaction id before it draws a position, so readers can\n"
        "-- tell from snapshots when a gap in the positions can no longer be filled\n"
        "-- (docs/ordering.md). Writers that omit global_position get this default.\n"
        "CREATE OR REPLACE FUNCTION %s() RETURNS bigint\n"
        "LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $fn$\n"
        "BEGIN\n"
        "    PERFORM pg_current_xact_id();\n"
        "    RETURN nextval('%s');\n"
        "END\n"
        "$fn$;\n"
        "\n"
        "-- Tables of another shape (the Go library's): refused, or converted by --upgrade.\n"
        "DO $guard$\n"
        "DECLARE\n"
        "    ev regclass := to_regclass('%s');\n"
        "    ck regclass := to_regclass('%s');\n"
        "    fn text := '%s';\n"
        "    vk text := '%s';\n"
        "    seq text := '%s';\n"
        "    upgrade boolean := %s;\n"
        "%s"
        "\n"
        "CREATE TABLE IF NOT EXISTS %s (\n"
        "    global_position BIGINT PRIMARY KEY DEFAULT %s(),\n"
        "    aggregate_type TEXT NOT NULL,\n"
        "    aggregate_id TEXT NOT NULL,\n"
        "    aggregate_version BIGINT NOT NULL,\n"
        "    event_id UUID NOT NULL UNIQUE,\n"
        "    event_type TEXT NOT NULL,\n"
        "    event_version INT NOT NULL DEFAULT 1,\n"
        "    payload BYTEA NOT NULL,\n"
        "    trace_id TEXT,\n"
        "    correlation_id TEXT,\n"
        "    causation_id TEXT,\n"
        "    metadata JSONB,\n"
        "    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    CONSTRAINT %s UNIQUE (aggregate_type, aggregate_id, aggregate_version)\n"
        ");\n"
        "-- FNV-1a 32 of aggregate_id, written by pupsourcing's appenders (NULL from other\n"
        "-- writers): lets a partition's reader skip the bodies of other partitions' events.\n"
        "-- ALTER TABLE locks the table exclusively even when there is nothing to do, so it\n"
        "-- runs only when the catalog says it is needed: an up-to-date schema is left alone.\n"
        "DO $do$\n"
        "BEGIN\n"
        "    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '%s'::regclass\n"
        "                   AND attname = 'aggregate_id_hash' AND NOT attisdropped) THEN\n"
        "        ALTER TABLE %s ADD COLUMN aggregate_id_hash BIGINT;\n"
        "    END IF;\n"
        "    IF NOT EXISTS (SELECT 1 FROM pg_depend WHERE classid = 'pg_class'::regclass\n"
        "                   AND objid = '%s'::regclass AND refobjid = '%s'::regclass\n"
        "                   AND deptype = 'a') THEN\n"
        "        ALTER SEQUENCE %s OWNED BY %s.global_position;\n"
        "    END IF;\n"
        "END\n"
        "$do$;\n"
        "\n"
        "CREATE TABLE IF NOT EXISTS %s (\n"
        "    aggregate_type TEXT NOT NULL,\n"
        "    aggregate_id TEXT NOT NULL,\n"
        "    aggregate_version BIGINT NOT NULL,\n"
        "    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    PRIMARY KEY (aggregate_type, aggregate_id)\n"
        ");\n"
        "\n"
        "-- One row per projection partition. waiting_* say which position a processor waits\n"
        "-- for (an append still in flight) and since when; owner and lease_expires_at are\n"
        "-- the processor holding the partition.\n"
        "CREATE TABLE IF NOT EXISTS %s (\n"
        "    projection_name TEXT NOT NULL,\n"
        "    partition_key INT NOT NULL DEFAULT 0,\n"
        "    total_partitions INT NOT NULL DEFAULT 1,\n"
        "    last_global_position BIGINT NOT NULL DEFAULT 0,\n"
        "    waiting_position BIGINT,\n"
        "    waiting_since TIMESTAMPTZ,\n"
        "    owner TEXT,\n"
        "    lease_expires_at TIMESTAMPTZ,\n"
        "    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    generation BIGINT NOT NULL DEFAULT 1,\n"
        "    PRIMARY KEY (projection_name, total_partitions, partition_key)\n"
        ");\n"
        "\n"
        "-- Worker groups (`pupsourcing run --group`): live workers by heartbeat. The _groups\n"
        "-- table is every projection's registry: its one live layout (mode 'static' or\n"
        "-- 'group', total_partitions), the layout before a change while it settles\n"
        "-- (previous_*), and the generation that `reset` starts (checkpoint writes are fenced\n"
        "-- by it).\n"
        "CREATE TABLE IF NOT EXISTS %s (\n"
        "    projection_name TEXT NOT NULL,\n"
        "    worker_id TEXT NOT NULL,\n"
        "    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    backend_pid INT,\n"
        "    backend_start TIMESTAMPTZ,\n"
        "    PRIMARY KEY (projection_name, worker_id)\n"
        ");\n"
        "CREATE TABLE IF NOT EXISTS %s (\n"
        "    projection_name TEXT PRIMARY KEY,\n"
        "    total_partitions INT NOT NULL,\n"
        "    previous_total INT,\n"
        "    changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    mode TEXT NOT NULL DEFAULT 'group',\n"
        "    previous_mode TEXT,\n"
        "    generation BIGINT NOT NULL DEFAULT 1\n"
        ");\n"
        "-- Columns of the layout registry and the generation fence, added to older tables.\n"
        "DO $do$\n"
        "BEGIN\n"
        "    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '%s'::regclass\n"
        "                   AND attname = 'generation' AND NOT attisdropped) THEN\n"
        "        ALTER TABLE %s ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;\n"
        "    END IF;\n"
        "    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '%s'::regclass\n"
        "                   AND attname = 'generation' AND NOT attisdropped) THEN\n"
        "        ALTER TABLE %s ADD COLUMN mode TEXT NOT NULL DEFAULT 'group',\n"
        "            ADD COLUMN previous_mode TEXT, ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;\n"
        "    END IF;\n"
        "END\n"
        "$do$;\n"
        "\n"
        "-- Poison events (docs/operations.md): the events a projection gave up on, and the\n"
        "-- partitions a handler failure stopped (cleared once the partition moves again).\n"
        "CREATE TABLE IF NOT EXISTS %s (\n"
        "    projection_name TEXT NOT NULL,\n"
        "    global_position BIGINT NOT NULL,\n"
        "    partition_key INT NOT NULL,\n"
        "    total_partitions INT NOT NULL,\n"
        "    event_id UUID NOT NULL,\n"
        "    event_type TEXT NOT NULL,\n"
        "    aggregate_type TEXT NOT NULL,\n"
        "    aggregate_id TEXT NOT NULL,\n"
        "    aggregate_version BIGINT NOT NULL,\n"
        "    error TEXT NOT NULL,\n"
        "    attempts INT NOT NULL,\n"
        "    first_failed_at TIMESTAMPTZ NOT NULL,\n"
        "    last_failed_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    PRIMARY KEY (projection_name, global_position)\n"
        ");\n"
        "CREATE TABLE IF NOT EXISTS %s (\n"
        "    projection_name TEXT NOT NULL,\n"
        "    total_partitions INT NOT NULL,\n"
        "    partition_key INT NOT NULL,\n"
        "    global_position BIGINT,\n"
        "    error TEXT NOT NULL,\n"
        "    failed_since TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    last_failed_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    PRIMARY KEY (projection_name, total_partitions, partition_key)\n"
        ");\n"
        "\n"
        "-- Aggregate snapshots (store:load, store:handle): at most one per aggregate; a\n"
        "-- load uses it when snapshot_version matches and folds the events after it.\n"
        "CREATE TABLE IF NOT EXISTS %s (\n"
        "    aggregate_type TEXT NOT NULL,\n"
        "    aggregate_id TEXT NOT NULL,\n"
        "    version BIGINT NOT NULL,\n"
        "    snapshot_version INT NOT NULL,\n"
        "    state BYTEA NOT NULL,\n"
        "    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    PRIMARY KEY (aggregate_type, aggregate_id)\n"
        ");\n"
        "-- An events table with uuid ids (the Go library's, docs/go.md) has snapshots keyed\n"
        "-- by uuid too: a load compares one parameter with both tables' aggregate_id.\n"
        "DO $snap$\n"
        "BEGIN\n"
        "    IF (SELECT atttypid FROM pg_attribute WHERE attrelid = '%s'::regclass\n"
        "        AND attname = 'aggregate_id') = 'uuid'::regtype AND (SELECT atttypid FROM pg_attribute\n"
        "        WHERE attrelid = '%s'::regclass AND attname = 'aggregate_id') = 'text'::regtype THEN\n"
        "        ALTER TABLE %s ALTER COLUMN aggregate_id TYPE uuid USING aggregate_id::uuid;\n"
        "    END IF;\n"
        "END\n"
        "$snap$;\n"
        "COMMIT;\n",
        seq, fn, seq, s->q_events, s->q_checkpoints, fn, s->version_key, seq, upgrade ? "true" : "false",
        guard_body, s->q_events, fn, uq, s->q_events, s->q_events, seq, s->q_events, seq,
        s->q_events, s->q_heads,
        s->q_checkpoints, s->q_workers, s->q_groups, s->q_checkpoints, s->q_checkpoints, s->q_groups,
        s->q_groups, s->q_dead_letters, s->q_failures,
        /* a compound literal keeps the buffer local to this call */
        pup_snapshot_table(s, (char[PUP_SNAPSHOT_TABLE_MAX]){0}, PUP_SNAPSHOT_TABLE_MAX),
        s->q_events, snap, snap);
}

char *pup_store_schema_sql(const pup_store *s) { return schema_sql(s, 0); }

int pup_store_migrate_ex(const pup_store *s, pup_conn *c, int upgrade, pup_error *err) {
    char *sql = schema_sql(s, upgrade);
    if (!sql) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    int rc = pup_conn_command(c, sql, err);
    free(sql);
    if (rc < 0) {
        pup_conn_rollback(c);
        if (err && strcmp(err->sqlstate, "PU001") == 0) err->code = PUP_ERR_NOT_MIGRATED;
    }
    return rc;
}

int pup_store_migrate(const pup_store *s, pup_conn *c, pup_error *err) {
    return pup_store_migrate_ex(s, c, 0, err);
}

int pup_store_id_kind(const pup_store *s, pup_conn *c, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(c, s->sql_id_types, err);
    if (!st) return pup_store_error(err);
    int uuids = 0;
    for (int i = 0; i < st->nparams; i++) uuids += st->param_types[i] == PUP_UUIDOID;
    if (uuids == 0 || uuids == st->nparams) return uuids > 0;
    return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                         "%s: the columns aggregate_id, causation_id, correlation_id and trace_id "
                         "must be all text or all uuid (docs/go.md)", s->events);
}

long long pup_be_int(const char *p, int width) {
    unsigned long long v = 0;
    for (int i = 0; i < width; i++) v = (v << 8) | (unsigned char)p[i];
    if (width == 4) return (long long)(int)(unsigned)v;
    if (width == 2) return (long long)(short)(unsigned short)v;
    return (long long)v;
}
