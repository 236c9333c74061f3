#!/usr/bin/env bash
# examples/scaling: append once, then start workers 0..3 one after another; each catches up
# on its own partition; later appends spread over all four; nothing lost or repeated.
source "$(dirname "$0")/_lib.sh"
use_fresh_db scaling

run append1 -- examples/scaling/main.lua --worker-id=0 --append
expect_eq "events appended" "$(q 'SELECT count(*) FROM events')" 20
declare -A expect lastpos
while read -r k n l; do expect[$k]=$n; lastpos[$k]=$l; done < <(partition_counts 4)

done_by() { [ "$(q "SELECT count(*) FROM scaling_assignments WHERE worker_id = $1")" = "$2" ]; }
at_head() { # the worker's checkpoint is at or past the last event of its partition
  local pos
  pos=$(q "SELECT last_global_position FROM projection_checkpoints WHERE projection_name = 'scalable_projection' AND partition_key = $1 AND total_partitions = 4")
  [ -n "$pos" ] && [ "$pos" -ge "${lastpos[$1]}" ]
}

for k in 0 1 2 3; do
  start w$k WORKER_ID=$k -- examples/scaling/main.lua
  wait_output w$k 'Press Ctrl\+C'
  wait_until 30 "worker $k to catch up on its ${expect[$k]} events" done_by $k "${expect[$k]}"
  wait_until 30 "worker $k checkpoint caught up" at_head $k
  # The workers already running kept their share: nothing was taken over or repeated.
  for j in $(seq 0 $k); do done_by $j "${expect[$j]}" || fail "worker $j count changed when $k joined"; done
done

# New events while all four run: the load spreads over the four workers.
run append2 -- examples/scaling/main.lua --worker-id=0 --append
while read -r k n l; do expect[$k]=$n; lastpos[$k]=$l; done < <(partition_counts 4)
total_is() { [ "$(q 'SELECT count(*) FROM scaling_assignments')" = "$1" ]; }
wait_until 30 "all 40 events handled" total_is 40
for k in 0 1 2 3; do stop w$k INT; done

sum=0
for k in 0 1 2 3; do
  done_by $k "${expect[$k]}" || fail "worker $k handled $(q "SELECT count(*) FROM scaling_assignments WHERE worker_id = $k"), expected ${expect[$k]}"
  got=$(number_after w$k 'Handled')
  expect_eq "worker $k reported" "$got" "${expect[$k]}"
  sum=$((sum + got))
done
expect_eq "handled by all workers" "$sum" 40
expect_eq "distinct events handled" "$(q 'SELECT count(DISTINCT global_position) FROM scaling_assignments')" 40
expect_eq "events not handled" "$(q 'SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM scaling_assignments a WHERE a.global_position = e.global_position)')" 0
note "ok"
