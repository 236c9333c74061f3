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
note "ok"
