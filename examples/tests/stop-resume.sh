#!/usr/bin/env bash
# examples/stop-resume: append 20, process and Ctrl+C part-way, status, resume: the second
# run starts at the saved checkpoint and the total is exactly 20.
source "$(dirname "$0")/_lib.sh"
use_fresh_db stop_resume
EX=examples/stop-resume/main.lua

run append -- $EX --mode=append --events=20
expect_eq "events" "$(q 'SELECT count(*) FROM events')" 20
run status0 -- $EX --mode=status
has_output status0 'Not started \(will process 20 events\)' || fail "status before processing"

rows_at_least() { [ "$(q 'SELECT count(*) FROM reliable_users' 2>/dev/null || echo 0)" -ge "$1" ]; }
start proc1 -- $EX --mode=process
wait_output proc1 'Starting fresh'
wait_until 30 "a first batch committed" rows_at_least 5
stop proc1 INT
n1=$(number_after proc1 'Events processed in this run:')
[ -n "$n1" ] && [ "$n1" -ge 5 ] && [ "$n1" -lt 20 ] || fail "first run should stop part-way, handled '$n1'"
p1=$(q "SELECT last_global_position FROM projection_checkpoints WHERE projection_name = 'reliable_checkpoint_projection'")
# The read model matches the checkpoint exactly.
expect_eq "rows after run 1" "$(q 'SELECT count(*) FROM reliable_users')" "$n1"
expect_eq "events up to the checkpoint" "$(q "SELECT count(*) FROM events WHERE global_position <= $p1")" "$n1"
note "stopped after $n1 events, checkpoint $p1"

run status1 -- $EX --mode=status
has_output status1 "Current checkpoint position: $p1\$" || fail "status shows another checkpoint"
has_output status1 "Behind by $((20 - n1)) events" || fail "status lag"

run proc2 -- $EX --mode=process --once
has_output proc2 "Resuming from checkpoint: position $p1\$" || fail "second run did not resume at $p1"
n2=$(number_after proc2 'Events processed in this run:')
expect_eq "events handled in both runs" "$((n1 + n2))" 20
expect_eq "rows after run 2" "$(q 'SELECT count(*) FROM reliable_users')" 20
first2=$(grep -Eo 'position: [0-9]+' "$WORK/proc2.out" | head -n 1 | grep -Eo '[0-9]+')
expect_eq "first position of run 2" "$first2" "$(q "SELECT min(global_position) FROM events WHERE global_position > $p1")"

run status2 -- $EX --mode=status
has_output status2 'Caught up' || fail "status after resuming"
note "ok"
