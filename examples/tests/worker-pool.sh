#!/usr/bin/env bash
# examples/worker-pool: --workers=4 in one process; Ctrl+C stops all; then --once.
source "$(dirname "$0")/_lib.sh"
use_fresh_db worker_pool
N=40

users_are() { [ "$(q 'SELECT count(*) FROM users')" = "$1" ]; }
all_at_head() {
  local head; head=$(q 'SELECT max(global_position) FROM events')
  [ "$(checkpoints user_read_model)" = "$(printf '0|4|%s\n1|4|%s\n2|4|%s\n3|4|%s' "$head" "$head" "$head" "$head")" ]
}

start pool -- examples/worker-pool/main.lua --workers=4 --events=$N
wait_output pool 'Press Ctrl\+C'
wait_until 30 "$N users" users_are $N
wait_until 30 "four checkpoints at the head" all_at_head
stop pool INT
expect_eq "handled in total" "$(number_after pool 'handled')" $N
has_output pool "handled $N events in total across 4 workers" || fail "no total line"
expect_eq "event lines" "$(grep -c '\[worker-pool\] UserCreated' "$WORK/pool.out")" $N
if has_output pool 'partition [0-9]+: handled'; then
  while read -r k expected; do
    expect_eq "partition $k handled" "$(grep -Eo "partition $k: handled [0-9]+" "$WORK/pool.out" | grep -Eo '[0-9]+$')" "$expected"
  done < <(partition_counts 4)
fi

# Again, to completion: only the new events.
run pool2 -- examples/worker-pool/main.lua --workers=4 --events=8 --once
has_output pool2 "handled 8 events in total across 4 workers" || fail "second run should handle 8"
users_are $((N + 8)) || fail "expected $((N + 8)) users"
all_at_head || fail "checkpoints not at head: $(checkpoints user_read_model)"
note "ok"
