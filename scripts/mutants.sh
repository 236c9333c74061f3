#!/usr/bin/env bash
# Mutation testing (issue 17): applies each mutation of the list below to a scratch copy
# of this working tree (never to the tree itself), builds it, runs the ctest tests that
# should catch it against a throwaway PostgreSQL, and prints killed/survived.
#
#   bash scripts/mutants.sh             every mutation
#   bash scripts/mutants.sh gap lease   only those whose name contains one of the words
#   bash scripts/mutants.sh -l          list the mutations
#
#   PUP_MUTANTS_DIR=DIR      scratch directory (default: a new one under /tmp, removed at
#                            the end); an existing one is refreshed and its builds reused
#   PUP_MUTANTS_JOBS=N       mutations run at a time, each in its own copy, build and
#                            PostgreSQL (default 3; 1 with PUP_TEST_DATABASE_URL)
#   PUP_MUTANTS_BASELINE=0   skip the baseline run (the unmutated copy must pass every
#                            test the list names, or every "kill" would mean nothing)
#   PUP_TEST_DATABASE_URL=…  use that database instead of a throwaway server
#   PUP_TEST_JOBS=N          ctest parallelism per mutation (default 2)
#
# A mutation is a textual replacement: file, the exact old text (it must occur exactly
# once, else "NOT APPLIED"), the new text, a ctest -R regex, and optionally a ctest
# time limit in seconds for mutants that make a test wait for ever (a hang counts as a kill).
# A mutation that does not apply or does not build counts as a failure, so the list stays
# in sync with the code.
# Exit status: 0 only if every mutation applied and was killed. A full run takes about
# 4 minutes on 2 cores (docs/reliability.md, "Mutation testing").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# The list. Records are separated by blank lines; `old+:`/`new+:` continue the text on a
# new line; exactly one space follows the colon, the rest of the line is the text.
mutations() {
  cat <<'EOF'
name: dead-letter-not-written
why: issue 12: a skipped poison event moves the checkpoint without its dead letter
file: src/batch.c
old: if (rc == 0 && w->dead_row >= 0) rc = dead_letter(p, w, err);
new: if (rc == 0 && w->dead_row >= 0 && 0) rc = dead_letter(p, w, err);
tests: ^lua\.poison$

name: rollback-keeps-owed-notify
why: issue 13: a rolled-back append's wake-up is sent at the connection's next commit
file: src/db.c
old: void pup_conn_rollback(pup_conn *c) {
old+:     pup_error ignored;
old+:     c->owed[0] = '\0';
new: void pup_conn_rollback(pup_conn *c) {
new+:     pup_error ignored;
tests: ^lua\.notify_commit$

name: inline-runs-on-retried-append
why: issue 15: a retried append (the same event_ids) applies its inline projections twice
file: lua/pupsourcing/aggregate.lua
old: if res.retried then return end -- the same append again: its handlers ran with it
new: -- (retried appends run the handlers again)
tests: ^lua\.inline_projections$

name: gap-bound-snapshot-xmax
why: issue 17 #1: a hole's bound from the snapshot's xmax, not the reader's own xid
file: src/batch.c
old: PGresult *xr = pup_proc_run(p, err, "SELECT pg_current_xact_id()::text", 0);
new: PGresult *xr = pup_proc_run(p, err, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text", 0);
tests: ^lua\.ordering$

name: lease-fence-owner-or-lease
why: issue 17 #2: the group checkpoint write accepts another worker's valid lease
file: src/processor.c
old: " AND owner = $7 AND lease_expires_at > clock_timestamp() AND generation = $8"
new: " AND (owner = $7 OR lease_expires_at > clock_timestamp()) AND generation = $8"
tests: ^lua\.fence$

name: checkpoint-fence-ge
why: issue 17 #3: a checkpoint moved forward under a running batch is overwritten
file: src/processor.c
old: " AND last_global_position = $8 AND generation = $9 RETURNING 1",
new: " AND last_global_position >= $8 AND generation = $9 RETURNING 1",
tests: ^lua\.fence$

name: exact-negative-accepted
why: issue 17 #4: pup.exact(-1) becomes an unconditional append
file: src/lua_store.c
old: luaL_argcheck(L, v >= 0, 1, "version must be >= 0");
new: (void)0;
tests: ^lua\.store_append$

name: standby-retry-5s
why: issue 17 #5: a static standby retries its lock every 5 s instead of 1 s (test by h-proc)
file: src/run_loop.c
old: if (!acquired) return wait_for(p, o, p->cfg.group ? 200 : 1000);
new: if (!acquired) return wait_for(p, o, p->cfg.group ? 200 : 5000);
tests: ^lua\.processor_liveness$

name: pqclear-only-on-error
why: issue 17 #6: a pipelined statement's result leaks unless it failed
file: src/db.c
old:             if (keep && st == PGRES_TUPLES_OK && !c->kept) c->kept = r;
old+:             else PQclear(r);
new:             if (keep && st == PGRES_TUPLES_OK && !c->kept) c->kept = r;
new+:             else if (st == PGRES_FATAL_ERROR) PQclear(r);
tests: ^reliability\.resources$

name: notify-wakeup-ignored
why: issue 17 #7: an idle processor no longer wakes on an append's NOTIFY (test by h-proc)
file: src/run_loop.c
old: int sock = p->listening && pup_conn_ok(p->conn) ? PQsocket(pg) : -1;
new: int sock = -1;
tests: ^lua\.processor_liveness$

name: gap-bound-read-xmin
why: a hole's bound from the reading snapshot's xmin (below a running writer's xid)
file: src/batch.c
old: pup_gaps_set_bound(&p->gaps, bound);
new: pup_gaps_set_bound(&p->gaps, xmin);
tests: ^lua\.ordering$

name: gap-new-hole-passed
why: a hole seen for the first time is stepped over at once
file: src/gap.c
old: if (!wait_lo && (!g || xmin <= g->bound)) return seen + 1;
new: if (!wait_lo && (g && xmin <= g->bound)) return seen + 1;
tests: ^lua\.ordering$|^c\.test_gap$

name: gap-forgotten-before-bound
why: the holes of a batch are forgotten before they get their bound (never decided)
file: src/batch.c
old: pup_gaps_forget(&p->gaps, w->last, 0);
new: pup_gaps_forget(&p->gaps, w->last, 1);
tests: ^lua\.ordering$
timeout: 25

name: gap-any-containing
why: a new hole is decided by an older hole's bound when it merely starts after it
file: src/gap.c
old: if (s->g[k].lo <= lo && s->g[k].hi >= hi) return &s->g[k];
new: if (s->g[k].lo <= lo && hi >= lo) return &s->g[k];
tests: ^lua\.ordering$|^c\.test_gap$

name: gap-bound-equal-passes
why: a hole passes when xmin equals its bound (equivalent on a live database; the rule itself says wait)
file: src/gap.c
old: return g->bound != PUP_GAP_PENDING && xmin > g->bound;
new: return g->bound != PUP_GAP_PENDING && xmin >= g->bound;
tests: ^c\.test_gap$

name: checkpoint-unfenced
why: the static checkpoint write is not fenced at all
file: src/processor.c
old: " AND last_global_position = $8 AND generation = $9 RETURNING 1",
new: " AND (last_global_position = $8 OR true) AND generation = $9 RETURNING 1",
tests: ^lua\.fence$

name: lease-fence-no-expiry
why: a worker whose lease lapsed still commits
file: src/processor.c
old: " AND owner = $7 AND lease_expires_at > clock_timestamp() AND generation = $8"
new: " AND owner = $7 AND generation = $8"
tests: ^lua\.fence$

name: lease-fence-count-ignored
why: a group batch commits although some of its partitions' leases were lost
file: src/batch.c
old: if (n != (group ? p->nheld : 1)) return pup_proc_fenced(p, from, n, err);
new: if (group ? n == 0 && p->nheld == 0 : n != 1) return pup_proc_fenced(p, from, n, err);
tests: ^lua\.fence$

name: append-head-only
why: the current version comes from the head row when there is one, though events went past it
file: src/schema.c
old: "WITH cur AS (SELECT GREATEST((SELECT aggregate_version FROM %s"
new: "WITH cur AS (SELECT COALESCE((SELECT aggregate_version FROM %s"
tests: ^lua\.append_conflict$

name: reconnect-keeps-session-state
why: after a reconnect the processor still believes it holds its lock, LISTEN and leases
file: src/lease.c
old: if (p->session != pup_conn_session(p->conn)) { /* reconnected: lock, LISTEN, leases gone */
new: if (0) {
tests: ^lua\.processor_liveness$
timeout: 120

name: append-expected-ahead
why: append's expected-version check accepts an expected version ahead of the stream
file: src/schema.c
old: #define APPEND_EXPECTED "NOT dup AND ($3::bigint IS NULL OR v = $3::bigint)"
new: #define APPEND_EXPECTED "NOT dup AND ($3::bigint IS NULL OR v <= $3::bigint)"
tests: ^lua\.store_append$

name: append-expected-off-by-one
why: append's expected-version check compares with the next version instead of the current
file: src/schema.c
old: #define APPEND_EXPECTED "NOT dup AND ($3::bigint IS NULL OR v = $3::bigint)"
new: #define APPEND_EXPECTED "NOT dup AND ($3::bigint IS NULL OR v + 1 = $3::bigint)"
tests: ^lua\.store_append$

name: append-no-stream-as-any
why: no_stream/exact(0) travel as "any"
file: src/append.c
old: if (expected != PUP_ANY) pup_params_int(p, 2, expected);
new: if (expected > 0) pup_params_int(p, 2, expected);
tests: ^lua\.store_append$

name: exact-float-truncated
why: pup.exact(1.5) is taken as exact(1)
file: src/lua_store.c
old: lua_Integer v = luaL_checkinteger(L, 1);
new: lua_Integer v = (lua_Integer)luaL_checknumber(L, 1);
tests: ^lua\.store_append$

name: checkpoint-not-advanced-in-memory
why: a committed batch does not move the processor's own checkpoint
file: src/batch.c
old: if (p->held[k] && p->cp[k] < w->last) p->cp[k] = w->last;
new: if (p->held[k] && p->cp[k] < w->last) p->cp[k] = w->from;
tests: ^lua\.(processor|ordering)$

name: transient-deadlock-fatal
why: a deadlock (40P01) in a handler stops the projection instead of being retried
file: src/db.c
old: strcmp(err->sqlstate, "40P01") == 0 || strcmp(err->sqlstate, "55P03")
new: strcmp(err->sqlstate, "55P03") == 0 || strcmp(err->sqlstate, "55P03")
tests: ^lua\.retry$

name: transient-connection-fatal
why: a lost connection stops the projection instead of reconnecting
file: src/db.c
old: return err->code == PUP_ERR_CONNECTION || strcmp(err->sqlstate, "40001") == 0 ||
new: return strcmp(err->sqlstate, "40001") == 0 ||
tests: ^lua\.retry$

name: pipeline-failure-first-row
why: a pipelined handler statement's failure is blamed on the batch's first event
file: src/batch.c
old: if (t >= FIRST_EVENT_ROW && t < w->nrows) return event_error(p, w->r, (int)t, err);
new: if (t >= FIRST_EVENT_ROW && t < w->nrows) return event_error(p, w->r, FIRST_EVENT_ROW, err);
tests: ^lua\.(retry|processor)$

name: pipeline-failure-noticing-row
why: a pipelined statement's failure read during a later handler is blamed on that later event
file: src/batch.c
old: *err = *pup_conn_failure(p->conn, NULL);
old+:         return failed_at(p, w, tag, err);
new: *err = *pup_conn_failure(p->conn, NULL);
new+:         return event_error(p, r, i, err);
tests: ^lua\.(retry|processor)$

name: handler-nil-err-ignored
why: a handler's `return nil, err` no longer fails its batch
file: src/lua_processor.c
old: if (!lua_toboolean(L, -2) && !lua_isnil(L, -1)) {
new: if (0) {
tests: ^lua\.(errors|processor)$

name: partition-hash-seed
why: the FNV-1a offset basis changes: partitions disagree with the stored hash and the Go library
file: src/partition.c
old: uint32_t h = 2166136261u;
new: uint32_t h = 2166136263u;
tests: ^lua\.partition$|^c\.test_store$

name: partition-modulo-off
why: an aggregate's partition is taken modulo total - 1
file: src/partition.c
old: return total <= 1 ? 0 : (int)(pup_fnv1a32(id, len) % (uint32_t)total);
new: return total <= 1 ? 0 : (int)(pup_fnv1a32(id, len) % (uint32_t)(total - 1));
tests: ^lua\.partition$|^c\.test_store$

name: scope-filter-or
why: an event in scope by aggregate type OR event type is handed to the projection
file: src/processor.c
old: " UNION ALL (SELECT NULL, NULL, NULL, NULL, (%s AND %s) AS mine, "
new: " UNION ALL (SELECT NULL, NULL, NULL, NULL, (%s OR %s) AS mine, "
tests: ^lua\.(processor|projections)$

name: scope-array-unescaped
why: issue 11: a scope's type names go into the text[] parameter without escaping quotes and backslashes
file: src/processor.c
old: if (*c == '"' || *c == '\\') *w++ = '\\';
new: (void)0;
tests: ^lua\.store_names$

name: read-safe-passes-hole
why: issue 12: store:read_events returns events above an undecided hole (the raw read's skip)
file: src/read.c
old: if (wait_lo) continue; /* noted, so one bound decides every hole of the window */
new: if (wait_lo) wait_lo = 0;
tests: ^lua\.(read_events_gaps|subscribe)$

name: read-safe-bound-own-xid
why: issue 12: a read inside a transaction that has an xid takes that older xid as the holes' bound
file: src/read.c
old: c, "SELECT CASE WHEN pg_current_xact_id_if_assigned() IS NULL THEN pg_current_xact_id()::text END", err);
new: c, "SELECT pg_current_xact_id()::text", err);
tests: ^lua\.read_events_gaps$

name: drawn-not-looked-for
why: issue 13: a processor woken by another append's wake-up does not look again at positions drawn above the head (an append that left its wake-up to that one, committing after it)
file: src/run_loop.c
old: long long in_flight = p->stats.drawn > p->stats.head ? p->stats.drawn : 0;
new: long long in_flight = 0;
tests: ^lua\.wake_up$
timeout: 120

name: slow-skipper-no-notify
why: issue 13: an append that left its wake-up to another's and commits long after it never notifies: readers stopped looking for it
file: src/append.c
old: if (r && own && took > WAKE_UP_SLOW_SECONDS && !PQgetisnull(r, 0, 1) && PQgetisnull(r, 0, 4)) {
new: if (0 && r && own && took > WAKE_UP_SLOW_SECONDS && !PQgetisnull(r, 0, 1) && PQgetisnull(r, 0, 4)) {
tests: ^lua\.wake_up$
timeout: 120

name: last-drawn-without-privilege-check
why: issue 13: a role without privileges on the events' sequence can no longer read the log gap-safely
file: src/pup_store.h
old: "COALESCE(CASE WHEN has_sequence_privilege('%s', 'SELECT, USAGE')"
new: "COALESCE(CASE WHEN has_sequence_privilege('%s', 'SELECT, USAGE') OR true"
tests: ^lua\.wake_up$
timeout: 120

name: drawn-look-never
why: issue 13: the look at positions drawn above the head, shared by processors and pup.subscribe, never looks again soon (both wait for their 60 s poll)
file: src/gap.c
old: if (in_flight <= 0) return poll;
new: if (1) return poll;
tests: ^lua\.wake_up$
timeout: 120

name: read-no-in-flight
why: issue 13: store:read_events never reports positions drawn above what it read, so pup.subscribe misses an append that left its wake-up to another's
file: src/read.c
old: if (nrows < window && drawn > top) out->in_flight = drawn;
new: if (0 && nrows < window && drawn > top) out->in_flight = drawn;
tests: ^lua\.wake_up$
timeout: 120

name: append-never-wakes
why: issue 13: an append outside a transaction never notifies (the coalesced wake-up always skipped)
file: src/schema.c
old: " CASE WHEN $14::boolean AND ins.aggregate_version = cur.v + 1 AND"
new: " CASE WHEN false AND ins.aggregate_version = cur.v + 1 AND"
tests: ^lua\.notify_commit$

name: append-no-dup-check
why: issue 12: an append whose event_id exists fails with a raw unique violation instead of returning the original positions
file: src/schema.c
old: " EXISTS (SELECT 1 FROM unnest($4::text[]) AS d(id)"
new: " false AND EXISTS (SELECT 1 FROM unnest($4::text[]) AS d(id)"
tests: ^lua\.append_idempotent$

name: append-one-no-dup-check
why: issue 13: the 1-event append statement of its own (schema.c) drops the duplicate check: a retried single-event append fails with a raw unique violation
file: src/schema.c
old: " $4::text IS NOT NULL AND EXISTS (SELECT 1 FROM %s WHERE event_id = $4::text::uuid) AS dup),"
new: " false AND EXISTS (SELECT 1 FROM %s WHERE event_id = $4::text::uuid) AS dup),"
tests: ^lua\.append_idempotent$

name: append-many-head-first-version
why: issue 13: the many-event append moves the head to the first appended version, not the last
file: src/schema.c
old: " SELECT $1, $2, max(aggregate_version), now() FROM ins HAVING count(*) > 0"
new: " SELECT $1, $2, min(aggregate_version), now() FROM ins HAVING count(*) > 0"
tests: ^lua\.store_append$

name: append-same-payload-bytes-only
why: issue 12: a retried table payload encoded in another key order (another process) is called a duplicate
file: src/lua_store.c
old: s->buf.same_payload = same_json;
new: s->buf.same_payload = 0 ? same_json : NULL;
tests: ^lua\.append_idempotent$

name: store-error-not-migrated-off
why: issue 12: the store's own tables missing are no longer not_migrated
file: src/read.c
old: err->code = PUP_ERR_NOT_MIGRATED;
new: (void)0;
tests: ^lua\.(errors|not_migrated)$

name: subscribe-stop-cursor-past-batch
why: issue 15: fn returning false mid-batch returns the batch's cursor, so resuming skips the rest of the batch
file: lua/pupsourcing/subscribe.lua
old: if fn(ev) == false then return core._cursor_at(next_cursor, ev.global_position), "stopped" end
new: if fn(ev) == false then return next_cursor, "stopped" end
tests: ^lua\.subscribe$

name: chain-failed-commit-moves
why: issue 13: a COMMIT that failed behind the next batch is taken as committed: the checkpoint moves in memory past writes that were rolled back
file: src/db.c
old: int pup_conn_behind_committed(const pup_conn *c) { return c->behind == 0; }
new: int pup_conn_behind_committed(const pup_conn *c) { return c->behind != -2; }
tests: ^lua\.chain$

name: reactor-chains
why: issue 13: a reactor's batch commits behind the next one, so the next event's side effect runs before the batch before it committed (a crash then repeats two events, not one)
file: src/batch.c
old: return chain_started > 0 && !p->cfg.side_effects && w->ahead_sent
new: return chain_started > 0 && w->ahead_sent
tests: ^lua\.reactors$

name: window-read-custom-plans
why: issue 13: a batch's window reads are planned anew each time (a custom plan costs more than the read at batch 1000)
file: src/processor.c
old: " set_config('plan_cache_mode', 'force_generic_plan', true)"
new: " set_config('plan_cache_mode', 'auto', true)"
tests: ^lua\.chain$

name: handler-plans-not-restored
why: issue 13: handlers run with the generic planning meant for the window reads, not with the session's plan_cache_mode
file: src/processor.c
old: "set_config('plan_cache_mode', COALESCE(NULLIF(current_setting('pupsourcing.plan_cache_mode', true), '')," \
new: "set_config('pupsourcing.unused', COALESCE(NULLIF(current_setting('pupsourcing.plan_cache_mode', true), '')," \
tests: ^lua\.chain$

name: queue-after-failure
why: issue 13: statements are still sent after a failure; behind a COMMIT that failed, those after a Sync (a prepare, a savepoint) run and commit in a transaction of their own
file: src/db.c
old: if (c->failed) return -1;
new: if (0 && c->failed) return -1;
tests: ^lua\.chain$

name: behind-failure-named-current
why: issue 13: a failure of the batch chained behind, read while the next batch is walked, is named for the next batch (its positions, or no event: the skip policy cannot dead-letter the event that failed)
file: src/batch.c
old: if (w->behind && owns(w->behind, tag, &t)) w = w->behind;
new: if (0 && w->behind && owns(w->behind, tag, &t)) w = w->behind;
tests: ^lua\.chain$

name: behind-unread-on-raise
why: issue 13: a handler that raises while the batch behind's failed write is unread gets the blame, and the event that failed is not named
file: src/batch.c
old: int rc = p->h.handle(p->h.ud, p->conn, &ev, err);
old+:     if (rc < 0) read_behind(p, w);
new: int rc = p->h.handle(p->h.ud, p->conn, &ev, err);
tests: ^lua\.chain$

name: reader-reads-store-names
why: issue 13: the read-ahead session reads the tables by the store's names, not as the processor's connection resolves them (its search_path): another schema's events
file: src/processor.c
old: read_sql(p, PQgetvalue(r, 0, 0), PQgetvalue(r, 1, 0), PQgetvalue(r, 2, 0), 0)
new: read_sql(p, p->store->q_events, p->store->q_groups, p->store->q_sequence, 0)
tests: ^lua\.read_beside$

name: reader-not-reopened
why: issue 13: a read-ahead session that was killed is not opened again: catch-up after a server restart stays on one session
file: src/processor.c
old: p->reader_off = pup_conn_ok(p->reader) && !(err && strcmp(err->sqlstate, "55P03") == 0);
new: p->reader_off = 1 + 0 * (err != NULL);
tests: ^lua\.read_beside$

name: reader-unread-after-failure
why: issue 13: a failed batch leaves its read-ahead session sending a window nobody reads, its snapshot (and, before, the generation lock) held until the next catch-up
file: src/batch.c
old: pup_conn_rollback(p->conn);
old+:     pup_proc_close_reader(p);
new: pup_conn_rollback(p->conn);
tests: ^lua\.read_beside$

name: reader-left-open-on-free
why: issue 13: a processor freed in the middle of a catch-up leaves its read-ahead session open
file: src/processor.c
old: pup_conn_close(p->reader);
old+:     free(p->sql_read_reader);
new: free(p->sql_read_reader);
tests: ^lua\.read_beside$

name: reader-result-left-to-caller
why: issue 13: the read-ahead session's rows are read only when the batch takes them: a window larger than the socket buffers keeps its backend sending with the table's lock held, a DDL queues behind it and a handler's read behind the DDL (a deadlock through the client)
file: src/db.c
old: c->reading = pthread_create(&c->reader, NULL, read_sent, c) == 0;
old+:     pthread_sigmask(SIG_SETMASK, &old, NULL);
old+:     if (!c->reading) { /* no thread: the caller must not wait for this session */
old+:         read_sent(c);
old+:         return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "pup_conn_send_now: cannot start its reading thread");
old+:     }
old+:     return 0;
old+: }
old+: 
old+: PGresult *pup_conn_take_sent(pup_conn *c, pup_error *err) {
old+:     join_reader(c);
new: c->reading = 0;
new+:     pthread_sigmask(SIG_SETMASK, &old, NULL);
new+:     return 0;
new+: }
new+: 
new+: PGresult *pup_conn_take_sent(pup_conn *c, pup_error *err) {
new+:     if (!c->sent_result) read_sent(c);
tests: ^lua\.read_beside$
timeout: 300

name: reader-kept-after-set-role
why: issue 13: a role or row-level security set on the processor's connection is not seen (before its first run or between two): the read-ahead session reads events that role cannot see
file: src/batch.c
old: if (strcmp(PQgetvalue(r, 0, 0), "t") != 0) {
new: if (0 && strcmp(PQgetvalue(r, 0, 0), "t") != 0) {
tests: ^lua\.read_beside$

name: reader-through-session-pooler
why: issue 13: behind a pooler in session mode the processor opens its read-ahead session through it: one more pooled connection, and with a full pool the batch waits for one (PgBouncer's query_wait_timeout) holding its transaction open
file: src/processor.c
old: if (pup_conn_via_pooler(p->conn)) return;
new: if (pup_conn_pooled(p->conn)) return;
tests: ^lua\.pgbouncer$

name: copy-refused-before-earlier-failure
why: issue 13: a COPY refused in a handler is recorded before the failure of a statement queued earlier (unread): the wrong event is blamed
file: src/db.c
old: if (pup_conn_in_pipeline(c)) drain(c, &ignored);
new: (void)ignored;
tests: ^lua\.chain$

name: chain-fence-not-raising
why: issue 13: a fenced checkpoint write queued before its COMMIT does not raise, so the COMMIT behind it commits the batch's writes without the checkpoint (after a reset: applied twice)
file: src/processor.c
old: "WITH moved AS (%s) SELECT 1 / count(*)::int FROM moved"
new: "WITH moved AS (%s) SELECT 1 / (count(*) + 1)::int FROM moved"
tests: ^lua\.(chain|reset_race)$
timeout: 300

name: read-ahead-empty-window-used
why: issue 13: an empty window read ahead decides "caught up", so an append just after it waits for a poll
file: src/batch.c
old: if (r && PQntuples(r) > FIRST_EVENT_ROW && p->ahead_from == from && p->ahead_gen == p->gen &&
new: if (r && p->ahead_from == from && p->ahead_gen == p->gen &&
tests: ^lua\.read_ahead$

name: created-at-epoch
why: issue 13: created_at read in PostgreSQL's epoch (2000-01-01) as if it were Unix time
file: src/read.c
old: : pup_be_int(PQgetvalue(r, row, first + 12), 8) + PG_EPOCH_US;
new: : pup_be_int(PQgetvalue(r, row, first + 12), 8);
tests: ^(c\.test_store|lua\.store_read)$

name: wait-not-listening-waits
why: issue 15: store:wait that starts listening waits for a NOTIFY already sent, so an append committed after the subscriber's read waits for the poll
file: src/lua_store.c
old: int got = !listening;
new: int got = 0;
tests: ^lua\.wake_up$

name: own-statement-expected-version-1
why: issue 13: the bench's second append ceiling sends expected version 1 for a new aggregate, so pgbench appends nothing and measures no writes
file: bench/own_statement.lua
old: local params = { ":t", "(md5(:id::text)::uuid::text)", ":v",
new: local params = { ":t", "(md5(:id::text)::uuid::text)", ":ev",
tests: ^lua\.bench_own_statement$
EOF
}

list_only=0
filters=()
for a in "$@"; do
  case "$a" in
    -l|--list) list_only=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) filters+=("$a") ;;
  esac
done

# Parses the list into parallel arrays.
names=(); whys=(); files=(); olds=(); news=(); tests=(); timeouts=()
parse() {
  local name="" why="" file="" old="" new="" test="" timeout="" line key val
  flush() {
    if [ -n "$name" ]; then
      names+=("$name"); whys+=("$why"); files+=("$file"); olds+=("$old"); news+=("$new"); tests+=("$test")
      timeouts+=("$timeout")
    fi
    name="" why="" file="" old="" new="" test="" timeout=""
  }
  while IFS= read -r line; do
    if [ -z "$line" ]; then flush; continue; fi
    key=${line%%:*}
    val=${line#*: }
    case "$key" in
      name) name=$val ;; why) why=$val ;; file) file=$val ;; tests) test=$val ;; timeout) timeout=$val ;;
      old) old=$val ;; old+) old+=$'\n'$val ;;
      new) new=$val ;; new+) new+=$'\n'$val ;;
      *) echo "mutants.sh: bad line in the list: $line" >&2; exit 2 ;;
    esac
  done < <(mutations)
  flush
}
parse

selected=()
for i in "${!names[@]}"; do
  keep=1
  if [ ${#filters[@]} -gt 0 ]; then
    keep=0
    for f in "${filters[@]}"; do [[ ${names[$i]} == *"$f"* ]] && keep=1; done
  fi
  [ $keep = 1 ] && selected+=("$i")
done
if [ $list_only = 1 ]; then
  for i in "${selected[@]}"; do printf '%-34s %-22s %s\n' "${names[$i]}" "${files[$i]}" "${whys[$i]}"; done
  exit 0
fi
[ ${#selected[@]} -gt 0 ] || { echo "mutants.sh: no mutation matches: ${filters[*]}" >&2; exit 2; }

bash scripts/deps.sh test

# Mutations run PUP_MUTANTS_JOBS at a time (default 3: a mutation's tests mostly wait, one
# at a time used a third of 2 cores), each worker in its own scratch copy with its own build
# and its own throwaway PostgreSQL (specs create roles and start servers of their own, so
# two workers never share a server). With PUP_TEST_DATABASE_URL: one.
jobs=${PUP_MUTANTS_JOBS:-3}
[[ $jobs =~ ^[1-9][0-9]*$ ]] || { echo "mutants.sh: PUP_MUTANTS_JOBS must be a positive integer" >&2; exit 2; }
[ -n "${PUP_TEST_DATABASE_URL:-}" ] && jobs=1
[ "$jobs" -gt ${#selected[@]} ] && jobs=${#selected[@]}

t_start=$(date +%s)
scratch=${PUP_MUTANTS_DIR:-}
own_scratch=0
if [ -z "$scratch" ]; then
  scratch=$(mktemp -d /tmp/pup-mutants.XXXXXX)
  own_scratch=1
fi
mkdir -p "$scratch"
chmod 755 "$scratch"
# One run per scratch directory at a time.
exec 8>"$scratch/run.lock"
flock -n 8 || { echo "mutants.sh: another run uses $scratch" >&2; exit 2; }
pgdirs=() pids=()
# The workers first (each is a process group of its own; `timeout` makes groups of its own,
# and every test process names the scratch copy on its command line), then their servers.
cleanup() {
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  pkill -TERM -f -- "$scratch/" 2>/dev/null || true
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pkill -KILL -f -- "$scratch/" 2>/dev/null || true
  for d in "${pgdirs[@]}"; do
    bash "$root/scripts/pg.sh" stop "$d/data" || true
    rm -rf "$d"
  done
  [ $own_scratch = 1 ] && rm -rf "$scratch"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The workers' copies: the tree's tracked and untracked (not ignored) files as they are now.
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf "$scratch/tree.tar"
urls=()
for w in $(seq 1 "$jobs"); do
  mkdir -p "$scratch/w$w/src" "$scratch/w$w/log"
  tar -C "$scratch/w$w/src" -xf "$scratch/tree.tar"
  # A run stopped between applying and restoring a mutation leaves a newer object of the
  # mutated file in a reused directory: the files mutations touch are built again.
  for f in "${files[@]}"; do [ -e "$scratch/w$w/src/$f" ] && touch "$scratch/w$w/src/$f"; done
  cmake -S "$scratch/w$w/src" -B "$scratch/w$w/build" -DPUP_WERROR=ON >/dev/null
  if [ -n "${PUP_TEST_DATABASE_URL:-}" ]; then
    urls+=("$PUP_TEST_DATABASE_URL")
  else
    d=$(mktemp -d /tmp/pupsourcing-mutants-pg.XXXXXX)
    chmod 755 "$d"
    pgdirs+=("$d")
    urls+=("$(bash scripts/pg.sh start "$d/data" $((54330 + w)))")
  fi
done
echo "mutants: $jobs scratch copies in $scratch/w*/src"

run_tests() { # worker, regex, log file, [seconds] -> ctest's status
  local limit=()
  # (timeout signals its whole process group: ctest and the busted it started)
  [ -n "${4:-}" ] && limit=(timeout -k 5 "$4")
  # the specs' directories in the worker's copy (spec/helpers.lua), emptied per mutation:
  # tests a mutation fails or kills do not clean up after themselves
  rm -rf "$scratch/w$1/tmp" && mkdir -m 755 "$scratch/w$1/tmp"
  DATABASE_URL=${urls[$1 - 1]} PUP_SPEC_TMPDIR=$scratch/w$1/tmp "${limit[@]}" ctest --test-dir "$scratch/w$1/build" \
    --output-on-failure -j "${PUP_TEST_JOBS:-2}" -R "$2" >"$3" 2>&1
}
build() { cmake --build "$scratch/w$1/build" -j2 >"$2" 2>&1; } # worker, log file
# Whether worker w's server still answers: failing tests count as a kill only then.
server_up() { psql -X -qAt "${urls[$1 - 1]}" -c "SELECT 1" >/dev/null 2>&1; }

if [ "${PUP_MUTANTS_BASELINE:-1}" != 0 ]; then
  regex=""
  for i in "${selected[@]}"; do regex+="${regex:+|}${tests[$i]}"; done
  echo "mutants: baseline (unmutated) run of $regex"
  build 1 "$scratch/w1/log/baseline.build" || { cat "$scratch/w1/log/baseline.build"; echo "mutants: the unmutated copy does not build" >&2; exit 1; }
  if ! run_tests 1 "$regex" "$scratch/w1/log/baseline.test"; then
    tail -n 40 "$scratch/w1/log/baseline.test"
    echo "mutants: the unmutated copy fails its tests: fix that first" >&2
    exit 1
  fi
  echo "mutants: baseline passed in $(( $(date +%s) - t_start )) s"
fi

# The queue: the next index into `selected`, taken under a lock by whichever worker is free.
mkdir -p "$scratch/results"
rm -f "$scratch/results/"*
echo 0 >"$scratch/next"
take() {
  local k
  {
    flock -x 9
    k=$(cat "$scratch/next")
    echo $((k + 1)) >"$scratch/next"
  } 9>"$scratch/next.lock"
  echo "$k"
}

# One mutation in worker w's copy; writes its status line to results/K.
mutate() { # worker, k
  local w=$1 k=$2 i=${selected[$2]} src=$scratch/w$1/src log=$scratch/w$1/log
  local name=${names[$i]} file=${files[$i]} t0 status line
  t0=$(date +%s)
  cp "$src/$file" "$scratch/w$w/orig"
  if ! MUT_FILE="$src/$file" MUT_OLD="${olds[$i]}" MUT_NEW="${news[$i]}" lua5.4 -e '
      local path, old, new = os.getenv("MUT_FILE"), os.getenv("MUT_OLD"), os.getenv("MUT_NEW")
      local f = assert(io.open(path, "rb")); local s = f:read("a"); f:close()
      local at, e = s:find(old, 1, true)
      if not at or s:find(old, e + 1, true) then os.exit(1) end
      f = assert(io.open(path, "wb")); f:write(s:sub(1, at - 1), new, s:sub(e + 1)); f:close()'; then
    status="NOT APPLIED (old text not found exactly once in $file)"
  elif ! build "$w" "$log/$name.build"; then
    status="BUILD FAILED (see $log/$name.build)"
  elif run_tests "$w" "${tests[$i]}" "$log/$name.test" "${timeouts[$i]}"; then
    if grep -q "No tests were found" "$log/$name.test"; then
      status="SURVIVED (no test matches ${tests[$i]})"
    else
      status="SURVIVED (${tests[$i]} passed)"
    fi
  elif server_up "$w"; then
    status="killed"
  else
    status="SERVER LOST (the tests failed and worker $w's PostgreSQL does not answer)"
  fi
  cp "$scratch/w$w/orig" "$src/$file"
  line=$(printf '%-34s %-8s %4ss  %s' "$name" "${status%% *}" "$(( $(date +%s) - t0 ))" "$status")
  echo "$line" >"$scratch/results/$k"
  echo "$line"
}

worker() { # w
  local k
  while k=$(take) && [ "$k" -lt ${#selected[@]} ]; do mutate "$1" "$k"; done
  # leave the copy's build matching its sources
  build "$1" "$scratch/w$1/log/final.build" || true
}
set -m # each worker a process group of its own, for cleanup
for w in $(seq 1 "$jobs"); do
  worker "$w" &
  pids+=($!)
done
set +m
for pid in "${pids[@]}"; do wait "$pid" || true; done
pids=()

killed=0 survived=0 failed=0
for k in "${!selected[@]}"; do
  if ! line=$(cat "$scratch/results/$k" 2>/dev/null); then
    line=$(printf '%-34s %-8s %4ss  %s' "${names[${selected[$k]}]}" NOT - "NOT RUN (its worker stopped)")
    echo "$line"
  fi
  case "$(awk '{ print $2 }' <<<"$line")" in
    killed) killed=$((killed + 1)) ;;
    SURVIVED) survived=$((survived + 1)) ;;
    *) failed=$((failed + 1)) ;;
  esac
done
total=${#selected[@]}
echo "mutants: $total mutations: $killed killed, $survived survived, $failed not applied, not built, not run or with their server lost;" \
  "$(( $(date +%s) - t_start )) s ($jobs at a time)"
[ "$killed" = "$total" ]
