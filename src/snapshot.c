/*
 * snapshot.c -- aggregate snapshots: at most one row per aggregate in <events>_snapshots,
 * read together with the events after it in one statement. See pup_store.h.
 *
 * The SQL texts are formatted on the stack at each call: the statement cache is keyed by
 * text, so they are prepared once per connection and nothing is allocated here.
 */
#include "pup_store.h"

#include <stdio.h>
#include <string.h>

char *pup_snapshot_table(const pup_store *s, char *out, size_t size) {
    /* q_events ends with its closing quote: "events" -> "events_snapshots". */
    snprintf(out, size, "%.*s_snapshots\"", (int)strlen(s->q_events) - 1, s->q_events);
    return out;
}

PGresult *pup_snapshot_read(const pup_store *s, pup_conn *c, pup_str type, pup_str id,
                            int snapshot_version, pup_error *err) {
    char table[PUP_SNAPSHOT_TABLE_MAX], sql[2048];
    /* Row 0 is the snapshot when there is a usable one (global_position 0, its version in
     * aggregate_version, its state in payload); then the events after it, ascending. */
    snprintf(sql, sizeof sql,
             "WITH snap AS (SELECT version, state FROM %s WHERE aggregate_type = $1"
             " AND aggregate_id = $2 AND snapshot_version = $3)"
             " SELECT 0::bigint, $1::text, $2::text, version, NULL::text, NULL::text, NULL::int,"
             " state, NULL::text, NULL::text, NULL::text, NULL::text, NULL::timestamptz FROM snap"
             " UNION ALL (SELECT " PUP_EVENT_COLUMNS " FROM %s WHERE aggregate_type = $1"
             " AND aggregate_id = $2 AND aggregate_version > COALESCE((SELECT version FROM snap), 0))"
             " ORDER BY 4",
             pup_snapshot_table(s, table, sizeof table), s->q_events);
    const pup_stmt *st = pup_conn_prepare(c, sql, err);
    if (!st) {
        pup_store_error(err);
        return NULL;
    }
    pup_params p = {0};
    if (pup_params_reset(&p, 3) < 0) {
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
        return NULL;
    }
    pup_params_text(&p, 0, type.p, type.len);
    pup_params_text(&p, 1, id.p, id.len);
    pup_params_int(&p, 2, snapshot_version);
    PGresult *r = pup_conn_exec(c, st, &p, 1, err);
    pup_params_free(&p);
    if (!r) pup_store_error(err);
    return r;
}

int pup_snapshot_write(const pup_store *s, pup_conn *c, pup_str type, pup_str id,
                       long long version, int snapshot_version, pup_str state, pup_error *err) {
    char table[PUP_SNAPSHOT_TABLE_MAX], sql[2048];
    /* A row of a higher snapshot_version, or of the same one at a later version, is kept:
     * writers racing, or an older deployment still running, never move it back. A row
     * another transaction holds locked is skipped rather than waited for: a snapshot is
     * an optimisation and never blocks the command that writes it. $2 takes the column's
     * type: text, or uuid next to the Go library's events (docs/go.md). */
    snprintf(sql, sizeof sql,
             "INSERT INTO %s AS s (aggregate_type, aggregate_id, version, snapshot_version, state)"
             " SELECT $1::text, $2, $3::bigint, $4::int, $5::bytea"
             " WHERE NOT EXISTS (SELECT 1 FROM %s WHERE aggregate_type = $1 AND aggregate_id = $2)"
             " OR EXISTS (SELECT 1 FROM %s WHERE aggregate_type = $1 AND aggregate_id = $2"
             " FOR UPDATE SKIP LOCKED)"
             " ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE"
             " SET version = EXCLUDED.version, snapshot_version = EXCLUDED.snapshot_version,"
             " state = EXCLUDED.state, created_at = now()"
             " WHERE EXCLUDED.snapshot_version > s.snapshot_version"
             " OR (EXCLUDED.snapshot_version = s.snapshot_version AND EXCLUDED.version > s.version)",
             pup_snapshot_table(s, table, sizeof table), table, table);
    const pup_stmt *st = pup_conn_prepare(c, sql, err);
    if (!st) return pup_store_error(err);
    pup_params p = {0};
    if (pup_params_reset(&p, 5) < 0) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    pup_params_text(&p, 0, type.p, type.len);
    pup_params_text(&p, 1, id.p, id.len);
    pup_params_int(&p, 2, version);
    pup_params_int(&p, 3, snapshot_version);
    pup_params_binary(&p, 4, state.p, state.len);
    PGresult *r = pup_conn_exec(c, st, &p, 0, err);
    pup_params_free(&p);
    if (!r) return pup_store_error(err);
    int written = strcmp(PQcmdTuples(r), "1") == 0;
    PQclear(r);
    return written;
}
