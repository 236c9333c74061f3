-- The read model: one row per account with its balance, from the events (upcast: an old
-- MoneyDeposited arrives in the current shape).
local dir = debug.getinfo(1, "S").source:match("^@(.*)/projections/[^/]*$") or "examples/bank-account"
if not package.path:find(dir .. "/?.lua", 1, true) then package.path = dir .. "/?.lua;" .. package.path end
require "account"

return {
  name = "bank_balances",
  aggregate_types = { "Account" },
  setup = function(tx)
    assert(tx:exec([[CREATE TABLE IF NOT EXISTS bank_balances (
      account_id text PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL, version bigint NOT NULL)]]))
  end,
  handle = function(tx, e)
    if e.event_type == "AccountOpened" then
      assert(tx:exec("INSERT INTO bank_balances VALUES ($1, $2, 0, $3)", e.aggregate_id, e.data.owner,
        e.aggregate_version))
      return
    end
    local delta = e.event_type == "MoneyDeposited" and e.data.amount or -e.data.amount
    assert(tx:exec("UPDATE bank_balances SET balance = balance + $2, version = $3 WHERE account_id = $1",
      e.aggregate_id, delta, e.aggregate_version))
  end,
  reset = function(tx) assert(tx:exec("DROP TABLE IF EXISTS bank_balances")) end,
}
