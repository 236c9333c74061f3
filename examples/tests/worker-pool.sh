#!/usr/bin/env bash
# examples/worker-pool: --workers=4 in one process; Ctrl+C stops all; then --once.
source "$(dirname "$0")/_lib.sh"
use_fresh_db worker_pool
N=40

users_are() { [ "$(q 'SELECT count(*) FROM users')" = "$1" ]; }

start pool -- examples/worker-pool/main.lua --workers=4 --events=$N
wait_output pool 'Press Ctrl\+C'
wait_until 30 "$N users" users_are $N
wait_until 30 "four checkpoints caught up" partitions_caught_up user_read_model 4
stop pool INT
expect_eq "handled in total" "$(number_after pool 'handled')" $N
has_output pool "handled $N events in total across 4 workers" || fail "no total line"
expect_eq "event lines" "$(grep -c '\[worker-pool\] UserCreated' "$WORK/pool.out")" $N
# The load spread: every user (one event each here) counted in its partition.
while read -r k expected _; do
  has_output pool "partition $k: $expected users in the read model" || fail "partition $k should hold $expected users"
done < <(partition_counts 4)

# Again, to completion: only the new events.
run pool2 -- examples/worker-pool/main.lua --workers=4 --events=8 --once
has_output pool2 "handled 8 events in total across 4 workers" || fail "second run should handle 8"
users_are $((N + 8)) || fail "expected $((N + 8)) users"
partitions_caught_up user_read_model 4 || fail "checkpoints not at head: $(checkpoints user_read_model)"
note "ok"
