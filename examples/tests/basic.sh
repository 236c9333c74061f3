#!/usr/bin/env bash
# examples/basic, as its README runs it: generate the migration, apply it, run the script
# (twice: it must be safe to repeat).
source "$(dirname "$0")/_lib.sh"
use_fresh_db basic

mkdir -p "$WORK/migrations"
run migrate_gen -- migrate-gen --output "$WORK/migrations"
if [ -d "$WORK/migrations" ]; then
  sql=$(ls "$WORK"/migrations/*.sql 2>/dev/null | head -n 1)
else
  sql="$WORK/migrations"
fi
[ -n "$sql" ] && [ -s "$sql" ] || fail "migrate-gen wrote no SQL file under $WORK/migrations"
grep -q "CREATE TABLE" "$sql" || fail "migration $sql has no CREATE TABLE"
psql "$DATABASE_URL" -qX -v ON_ERROR_STOP=1 -f "$sql" >/dev/null || fail "applying $sql failed"
q "SELECT 1 FROM events LIMIT 0" >/dev/null || fail "no events table after applying the migration"

run basic1 -- examples/basic/main.lua
has_output basic1 'Stream User/[0-9a-f-]{36} \(3 events' || fail "basic did not print the stream"
has_output basic1 'v1 +UserCreated' || fail "missing v1 UserCreated line"
has_output basic1 'v3 +UserRenamed' || fail "missing v3 UserRenamed line"
has_output basic1 'refused: optimistic_concurrency' || fail "stale append was not refused"
has_output basic1 'Read model row: Alice Smith-Jones <alice.smith@example.com>, version 3' \
  || fail "read model row not printed"
expect_eq "events after one run" "$(q 'SELECT count(*) FROM events')" 3

run basic2 -- examples/basic/main.lua
expect_eq "events after two runs" "$(q 'SELECT count(*) FROM events')" 6
expect_eq "aggregates after two runs" "$(q 'SELECT count(DISTINCT aggregate_id) FROM events')" 2
has_output basic2 'handled 3 events in this run' || fail "second run should handle exactly its 3 new events"
expect_eq "read model rows" "$(q 'SELECT count(*) FROM basic_user_directory')" 2
expect_eq "checkpoint" "$(checkpoints basic_user_directory)" "0|1|6"
note "ok"
