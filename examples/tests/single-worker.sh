#!/usr/bin/env bash
# examples/single-worker: run until Ctrl+C, then again with --once; SIGTERM stops it too.
source "$(dirname "$0")/_lib.sh"
use_fresh_db single_worker

users_are() { [ "$(q 'SELECT count(*) FROM users')" = "$1" ]; }
caught_up() {
  [ "$(checkpoints user_read_model)" = "0|1|$(q 'SELECT max(global_position) FROM events')" ]
}

start sw1 -- examples/single-worker/main.lua --events=5
wait_output sw1 'Press Ctrl\+C'
wait_until 20 "5 users in the read model" users_are 5
wait_until 20 "the checkpoint at the head" caught_up
stop sw1 INT
expect_eq "handled in run 1" "$(number_after sw1 'Handled')" 5
expect_eq "'User created' lines" "$(grep -c 'User created:' "$WORK/sw1.out")" 5
has_output sw1 'stopped gracefully' || fail "no graceful-stop message"

# Run again: appends 2 more, resumes at the checkpoint, handles only those 2.
run sw2 -- examples/single-worker/main.lua --events=2 --once
expect_eq "handled in run 2" "$(number_after sw2 'Handled')" 2
users_are 7 || fail "expected 7 users, got $(q 'SELECT count(*) FROM users')"
caught_up || fail "checkpoint not at head after --once: $(checkpoints user_read_model)"

# SIGTERM behaves like Ctrl+C.
start sw3 -- examples/single-worker/main.lua --events=1
wait_until 20 "8 users" users_are 8
stop sw3 TERM
expect_eq "handled in run 3" "$(number_after sw3 'Handled')" 1
expect_eq "read model rows == events" "$(q 'SELECT count(*) FROM users')" "$(q 'SELECT count(*) FROM events')"
note "ok"
