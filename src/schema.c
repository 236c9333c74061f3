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
 * (the NOTIFY follows the commit: pup_conn_exec_notify). $3 NULL = any. The current
 * version is the greater of the head row and the highest event version (one index
 * probe): events written by another tool without a head row, or without moving it, do
 * not block the aggregate. `source` yields the events' columns: binary arrays for many
 * events, plain parameters for one. */
static char *append_sql(const pup_store *s, const char *source) {
    return fmt(
        "WITH cur AS (SELECT GREATEST((SELECT aggregate_version FROM %s"
        " WHERE aggregate_type = $1 AND aggregate_id = $2), (SELECT max(aggregate_version) FROM %s"
        " WHERE aggregate_type = $1 AND aggregate_id = $2), 0) AS v),"
        " ok AS (SELECT v FROM cur WHERE $3::bigint IS NULL OR v = $3::bigint),"
        " ins AS (INSERT INTO %s (aggregate_type, aggregate_id, aggregate_id_hash, aggregate_version,"
        " event_id, event_type, event_version, payload, metadata, causation_id, correlation_id,"
        " trace_id, created_at)"
        " SELECT $1, $2, $13::bigint, ok.v + u.ord, COALESCE(u.event_id::uuid, gen_random_uuid()),"
        " u.event_type, u.event_version::int, u.payload, u.metadata::jsonb, u.causation_id,"
        " u.correlation_id, u.trace_id, COALESCE(u.created_at::timestamptz, now())"
        " FROM ok, %s AS u(event_id, event_type, event_version, payload, metadata, causation_id,"
        " correlation_id, trace_id, created_at, ord) ORDER BY u.ord"
        " RETURNING global_position, aggregate_version),"
        " head AS (INSERT INTO %s (aggregate_type, aggregate_id, aggregate_version, updated_at)"
        " SELECT $1, $2, max(aggregate_version), now() FROM ins HAVING count(*) > 0"
        " ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET"
        " aggregate_version = EXCLUDED.aggregate_version, updated_at = EXCLUDED.updated_at"
        " RETURNING 1)"
        " SELECT cur.v, ins.global_position, ins.aggregate_version"
        " FROM cur LEFT JOIN ins ON true"
        " ORDER BY ins.aggregate_version",
        s->q_heads, s->q_events, s->q_events, source, s->q_heads);
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
    s->sql_group_get = fmt("SELECT total_partitions, previous_total FROM %s WHERE projection_name = $1"
                           " FOR UPDATE", s->q_groups);
    s->sql_group_set = fmt("INSERT INTO %s (projection_name, total_partitions, previous_total) VALUES ($1, $2, $3)"
                           " ON CONFLICT (projection_name) DO UPDATE SET total_partitions = EXCLUDED.total_partitions,"
                           " previous_total = EXCLUDED.previous_total, changed_at = now()", s->q_groups);
    return s->sql_status && s->sql_reset && s->sql_group_workers && s->sql_group_get && s->sql_group_set ? 0 : -1;
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
    quote_name(s->q_sequence, sizeof s->q_sequence, s->events, "_global_position_seq");
    snprintf(s->channel, sizeof s->channel, PUP_CHANNEL_PREFIX "%s", s->events);
    snprintf(s->version_key, sizeof s->version_key, "%s_aggregate_version_key", base_name(s->events));
    snprintf(s->heads_key, sizeof s->heads_key, "%s_pkey", base_name(s->heads));

    const char *E = s->q_events;
    s->sql_append = append_sql(s, "unnest($4::text[], $5::text[], $6::text[], $7::bytea[], $8::text[],"
                                  " $9::text[], $10::text[], $11::text[], $12::text[]) WITH ORDINALITY");
    s->sql_append_one = append_sql(s, "(SELECT $4::text, $5::text, $6::text, $7::bytea, $8::text,"
                                      " $9::text, $10::text, $11::text, $12::text, 1::bigint)");
    s->sql_read = fmt("SELECT " PUP_EVENT_COLUMNS " FROM %s WHERE global_position > $1"
                      " ORDER BY global_position LIMIT $2", E);
    s->sql_stream = fmt("SELECT " PUP_EVENT_COLUMNS " FROM %s WHERE aggregate_type = $1"
                        " AND aggregate_id = $2 AND aggregate_version >= $3"
                        " AND ($4::bigint < 0 OR aggregate_version <= $4::bigint)"
                        " ORDER BY aggregate_version", E);
    s->sql_head = fmt("SELECT COALESCE(max(global_position), 0) FROM %s", E);
    if (!s->sql_append || !s->sql_append_one || !s->sql_read || !s->sql_stream || !s->sql_head ||
        operator_sql(s) < 0) {
        pup_store_free(s);
        return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    }
    return 0;
}

void pup_store_free(pup_store *s) {
    char **texts[] = {&s->sql_append, &s->sql_append_one, &s->sql_read, &s->sql_stream, &s->sql_head,
                      &s->sql_status, &s->sql_reset, &s->sql_group_workers, &s->sql_group_get,
                      &s->sql_group_set};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        free(*texts[i]);
        *texts[i] = NULL;
    }
}

char *pup_store_schema_sql(const pup_store *s) {
    const char *seq = s->q_sequence;
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
        "    PRIMARY KEY (projection_name, total_partitions, partition_key)\n"
        ");\n"
        "\n"
        "-- Worker groups (`pupsourcing run --group`): live workers by heartbeat, and each\n"
        "-- projection's partition count (previous_total while a repartition settles).\n"
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
        "    changed_at TIMESTAMPTZ NOT NULL DEFAULT now()\n"
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
        "COMMIT;\n",
        seq, fn, seq, s->q_events, fn, uq, s->q_events, s->q_events, seq, s->q_events, seq,
        s->q_events, s->q_heads,
        s->q_checkpoints, s->q_workers, s->q_groups,
        /* a compound literal keeps the buffer local to this call */
        pup_snapshot_table(s, (char[PUP_SNAPSHOT_TABLE_MAX]){0}, PUP_SNAPSHOT_TABLE_MAX));
}

int pup_store_migrate(const pup_store *s, pup_conn *c, pup_error *err) {
    char *sql = pup_store_schema_sql(s);
    if (!sql) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    int rc = pup_conn_command(c, sql, err);
    free(sql);
    if (rc < 0) pup_conn_rollback(c);
    return rc;
}

long long pup_be_int(const char *p, int width) {
    unsigned long long v = 0;
    for (int i = 0; i < width; i++) v = (v << 8) | (unsigned char)p[i];
    if (width == 4) return (long long)(int)(unsigned)v;
    if (width == 2) return (long long)(short)(unsigned short)v;
    return (long long)v;
}
