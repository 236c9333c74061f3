#!/usr/bin/env bash
# examples/c, as its README runs it: the C program (linked to the C core alone) appends 6
# events and its C handler counts them per type; run twice, the counts add up and the
# second run handles only its own 6 events. docs/c-api.md shows this very program.
source "$(dirname "$0")/_lib.sh"
: "${PUP_EXAMPLE_C:?PUP_EXAMPLE_C must name the built examples/c program}"
use_fresh_db c

# The program must need libpq alone: no Lua, no YAJL, no libuuid (those are the binding's).
# (ldd's output read once: with pipefail, `ldd | grep -q` fails when grep stops reading early)
libs=$(ldd "$PUP_EXAMPLE_C")
if grep -Eqi 'lua|yajl|uuid' <<<"$libs"; then fail "examples/c links more than libpq: $libs"; fi
grep -q libpq <<<"$libs" || fail "examples/c does not link libpq"

run_c() {
  note "run $1: examples/c"
  local rc=0
  timeout 60 "$PUP_EXAMPLE_C" >"$WORK/$1.out" 2>"$WORK/$1.err" || rc=$?
  [ "$rc" -eq 0 ] || fail "$1 exited with status $rc"
}

run_c c1
expect_eq "first run's output" "$(out c1)" "handled 6 events
OrderPaid 2
OrderPlaced 3
OrderShipped 1"
run_c c2
expect_eq "second run's output" "$(out c2)" "handled 6 events
OrderPaid 4
OrderPlaced 6
OrderShipped 2"
expect_eq "events" "$(q 'SELECT count(*) FROM cex_events')" 12
expect_eq "checkpoint" "$(q "SELECT last_global_position FROM cex_checkpoints WHERE projection_name = 'type_counts'")" 12
expect_eq "versions of the shipped orders" \
  "$(q "SELECT string_agg(DISTINCT aggregate_version::text, ',') FROM cex_events WHERE event_type = 'OrderShipped'")" 3

# docs/c-api.md's complete example is this file, verbatim.
doc=$(awk '/^<!-- examples\/c\/main.c -->$/ {on=1; next} on && /^```c$/ {getline; grab=1} grab && /^```$/ {exit} grab {print}' docs/c-api.md)
[ -n "$doc" ] || fail "docs/c-api.md has no block marked <!-- examples/c/main.c -->"
[ "$doc" = "$(cat examples/c/main.c)" ] || fail "docs/c-api.md's example differs from examples/c/main.c: $(diff <(echo "$doc") examples/c/main.c | head -20)"
note "ok"
