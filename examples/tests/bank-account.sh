#!/usr/bin/env bash
# examples/bank-account, as its README runs it: writers racing on three accounts, then the
# checks the example prints, and the database's own view of them.
source "$(dirname "$0")/_lib.sh"
use_fresh_db bank_account

run bank -- examples/bank-account/main.lua --writers 4 --commands 25
has_output bank '^Stored MoneyDeposited v1 \{"cents":10000\} reads as v2 amount 100$' || fail "the old deposit was not upcast"
has_output bank '^4 writers sent 100 deposits; [0-9]+ lost races were retried$' || fail "the writers did not all get through"
has_output bank '^no lost update' || fail "no lost-update line"
has_output bank '^withdrawing 1000000 from account 2: rejected \(insufficient funds\)$' || fail "the withdrawal was not rejected"
has_output bank '^read model: 3 of 3 accounts match their aggregates$' || fail "the read model differs"
# 3 opens + 1 old deposit + 100 deposits; nothing from the rejected withdrawal
expect_eq "events" "$(q 'SELECT count(*) FROM events')" 104
expect_eq "withdrawals" "$(q "SELECT count(*) FROM events WHERE event_type = 'MoneyWithdrawn'")" 0
expect_eq "stored old deposits" "$(q "SELECT count(*) FROM events WHERE event_version = 1 AND event_type = 'MoneyDeposited'")" 1
expect_eq "snapshots" "$(q 'SELECT count(*) FROM events_snapshots WHERE version >= 20')" 3
expect_eq "read model total" "$(q 'SELECT sum(balance) FROM bank_balances')" \
  "$(q "SELECT sum(CASE WHEN event_version = 1 THEN (convert_from(payload, 'UTF8')::jsonb->>'cents')::bigint / 100 ELSE (convert_from(payload, 'UTF8')::jsonb->>'amount')::bigint END) FROM events WHERE event_type = 'MoneyDeposited'")"
# The reactor: one notification recorded as sent per deposit (101: 100 + the old one)
has_output bank '^reactor: 101 deliveries, 101 notifications sent for 101 deposits$' || fail "the reactor missed deposits"
expect_eq "notifications" "$(q 'SELECT count(*) FROM bank_notifications')" 101
expect_eq "notified deposits" "$(q "SELECT count(*) FROM events e JOIN bank_notifications n ON n.event_id = e.event_id::text WHERE e.event_type = 'MoneyDeposited'")" 101
# More deposits, then the reactor as `pupsourcing run` (a batch per event): the new ones only
accounts=$(q "SELECT string_agg(DISTINCT aggregate_id, ',') FROM events")
run more -- examples/bank-account/main.lua --writer 9 --commands 30 --accounts "$accounts"
run reactor -- run --once examples/bank-account/reactors/notifications.lua
expect_eq "notifications after run" "$(q 'SELECT count(*) FROM bank_notifications')" 131
expect_eq "reactor checkpoint" "$(q "SELECT last_global_position FROM projection_checkpoints WHERE projection_name = 'bank_notifications'")" \
  "$(q 'SELECT max(global_position) FROM events')"
grep -q '^pupsourcing: bank_notifications: 30 event(s) handled' "$WORK/reactor.err" || fail "the reactor did not handle the 30 new deposits"
note "ok"
