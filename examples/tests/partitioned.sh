#!/usr/bin/env bash
# examples/partitioned: four processes, PARTITION_KEY=0..3 (one through the flags), together
# handle every event exactly once; Ctrl+C stops each.
source "$(dirname "$0")/_lib.sh"
use_fresh_db partitioned
N=40

# Bad configuration fails before touching the database.
rc=0; "$PUP" examples/partitioned/main.lua --partition-key=4 >"$WORK/bad.out" 2>"$WORK/bad.err" || rc=$?
[ "$rc" -ne 0 ] || fail "partition-key 4 of 4 was accepted"
grep -q "must be less than total-partitions (4)" "$WORK/bad.err" || fail "unclear error: $(cat "$WORK/bad.err")"
rc=0; "$PUP" examples/partitioned/main.lua >"$WORK/bad.out" 2>"$WORK/bad.err" || rc=$?
[ "$rc" -ne 0 ] && grep -q "partition-key is required" "$WORK/bad.err" || fail "missing key accepted"
rm -f "$WORK"/bad.*

start p0 PARTITION_KEY=0 -- examples/partitioned/main.lua --events=$N
start p1 PARTITION_KEY=1 -- examples/partitioned/main.lua
start p2 -- examples/partitioned/main.lua --partition-key=2 --total-partitions=4
start p3 PARTITION_KEY=3 TOTAL_PARTITIONS=4 -- examples/partitioned/main.lua

users_are() { [ "$(q 'SELECT count(*) FROM users')" = "$1" ]; }
wait_until 30 "$N users in the read model" users_are $N
wait_until 30 "four checkpoints caught up" partitions_caught_up user_read_model 4
for k in 0 1 2 3; do wait_output p$k 'Press Ctrl\+C'; done
for k in 0 1 2 3; do stop p$k INT; done

total=0
while read -r k expected _; do
  got=$(number_after p$k 'Handled')
  expect_eq "partition $k handled" "$got" "$expected"
  expect_eq "partition $k event lines" "$(grep -c 'UserCreated:' "$WORK/p$k.out")" "$expected"
  total=$((total + got))
done < <(partition_counts 4)
expect_eq "events handled by the four processes" "$total" $N
# No aggregate was printed by two processes.
dups=$(grep -ho 'aggregate [0-9a-f]\{8\}' "$WORK"/p?.out | sort | uniq -d | wc -l)
expect_eq "aggregates handled twice" "$dups" 0
note "ok"
