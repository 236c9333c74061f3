#!/usr/bin/env bash
# examples/multiple-projections: three projections, own checkpoints and read models.
source "$(dirname "$0")/_lib.sh"
use_fresh_db multiple_projections

all_done() {
  [ "$(q 'SELECT count(*) FROM users')" = "$1" ] &&
  [ "$(q 'SELECT sum(count) FROM event_type_counts')" = "$2" ] &&
  [ "$(q 'SELECT sum(orders) FROM user_revenue')" = "$3" ]
}

start mp -- examples/multiple-projections/main.lua
wait_output mp 'Press Ctrl\+C'
wait_until 30 "all three read models" all_done 3 6 3
stop mp INT
has_output mp 'user_read_model +handled 3 events' || fail "user_read_model count"
has_output mp 'event_counter +handled 6 events' || fail "event_counter count"
has_output mp 'revenue_tracker +handled 3 events' || fail "revenue_tracker count"
has_output mp 'revenue: \$299.97' || fail "revenue total"
expect_eq "order lines" "$(grep -c '\[revenue\] Order placed' "$WORK/mp.out")" 3
# Each projection has its own checkpoint, at or past its last event (users: 1-3, orders: 4-6).
expect_eq "projections with a checkpoint" \
  "$(q "SELECT string_agg(projection_name || ':' || (last_global_position >= CASE projection_name WHEN 'user_read_model' THEN 3 ELSE 6 END), ' ' ORDER BY projection_name) FROM projection_checkpoints")" \
  "event_counter:true revenue_tracker:true user_read_model:true"

# Once more, to completion: exact counts, nothing handled twice.
run mp2 -- examples/multiple-projections/main.lua --once
all_done 6 12 6 || fail "read models after the second run"
has_output mp2 'event_counter +handled 6 events' || fail "second run event_counter count"
has_output mp2 'revenue: \$599.94' || fail "second run revenue total"
expect_eq "counts by type" "$(q "SELECT string_agg(event_type || '=' || count, ' ' ORDER BY event_type) FROM event_type_counts")" \
  "OrderPlaced=6 UserCreated=6"
note "ok"
