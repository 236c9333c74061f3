-- bank-account: commands with retries on hot accounts, snapshots, an upcaster for an old
-- event version and a read model.
--
--   pupsourcing examples/bank-account/main.lua [--writers 4] [--commands 25]
--
-- 1. opens three accounts (store:handle) and appends one deposit in the shape an older
--    release wrote (MoneyDeposited version 1, upcast on every read);
-- 2. starts --writers processes, each sending --commands deposits to the three accounts at
--    random: they race for the same versions, and store:handle retries the lost races;
-- 3. checks every account: the chain of balance_after has no gap (no lost update), and the
--    state loaded from its snapshot equals the full fold;
-- 4. shows a rejected command (nothing written);
-- 5. runs the read model (projections/balances.lua) until caught up and compares it;
-- 6. runs the reactor (reactors/notifications.lua) until caught up: one notification
--    recorded as sent per deposit.
-- (--writer N is the writer process itself.)
local pup = require "pupsourcing"
local common = dofile((arg[0]:match("^(.*)/") or ".") .. "/../common.lua")
package.path = common.here .. "/?.lua;" .. package.path
local Account = require "account"

local function say(fmt, ...) io.write(fmt:format(...), "\n") end
local die = common.die_and_log("bank-account", 1)
local opts, int = common.options(arg)
local db, store = common.connect()

if opts.writer then -- a writer process: deposits to the accounts given
  local ids = {}
  for id in opts.accounts:gmatch("[^,]+") do ids[#ids + 1] = id end
  math.randomseed(int("writer", nil, 1) * 7919 + os.time())
  local done, retries = 0, 0
  for _ = 1, int("commands", nil, 25) do
    local id = ids[math.random(#ids)]
    local state, err, res = store:handle(db, "Account", id, Account.deposit(math.random(1, 9)), Account.def)
    if not state then die("deposit failed: %s", tostring(err)) end
    done, retries = done + 1, retries + res.attempts - 1
  end
  say("%d %d", done, retries)
  os.exit(0)
end

-- 1. Three accounts, and a deposit from an older release --------------------------------
local ids = {}
for i = 1, 3 do
  ids[i] = pup.uuid()
  local state, err = store:handle(db, "Account", ids[i], Account.open("owner " .. i), Account.def)
  if not state then die("open failed: %s", tostring(err)) end
end
assert(store:append(db, pup.exact(1), { { aggregate_type = "Account", aggregate_id = ids[1],
  event_type = "MoneyDeposited", event_version = 1, payload = { cents = 10000 } } }))
local first = store:read_aggregate_stream(db, "Account", ids[1])[2]
say("Stored MoneyDeposited v%d %s reads as v%d amount %d", first.stored_event_version, first.payload,
  first.event_version, first.data.amount)

-- 2. Writers racing on the same accounts ------------------------------------------------
local writers, commands = int("writers", nil, 4), int("commands", nil, 25)
local procs = {}
for w = 1, writers do
  procs[w] = assert(io.popen(("%s %s --writer %d --commands %d --accounts %s"):format(arg[-1], arg[0], w,
    commands, table.concat(ids, ","))))
end
local total, retried = 0, 0
for w, p in ipairs(procs) do
  local line = p:read("l")
  local ok = p:close()
  local done, retries = (line or ""):match("^(%d+) (%d+)$")
  if not ok or not done then die("writer %d failed", w) end
  total, retried = total + tonumber(done), retried + tonumber(retries)
end
say("%d writers sent %d deposits; %d lost races were retried", writers, total, retried)

-- 3. No lost update; snapshots agree with full folds ------------------------------------
local full = { initial = Account.def.initial, evolve = Account.def.evolve }
local states = {}
for i, id in ipairs(ids) do
  local events = store:read_aggregate_stream(db, "Account", id)
  local balance = 0
  for _, e in ipairs(events) do
    if e.event_type == "MoneyDeposited" then
      balance = balance + e.data.amount
      if e.data.balance_after ~= pup.null and e.data.balance_after ~= balance then
        die("account %d: a deposit at version %d was decided on a stale balance", i, e.aggregate_version)
      end
    end
  end
  local state, version = assert(store:load(db, "Account", id, Account.def))
  local folded = assert(store:load(db, "Account", id, full))
  if state.balance ~= folded.balance or state.balance ~= balance then die("account %d: loads differ", i) end
  states[id] = state
  say("account %d: balance %d at version %d (from its snapshot and the events after it)", i, state.balance, version)
end
say("no lost update: every balance_after follows from the one before")

-- 4. A rejected command -----------------------------------------------------------------
local _, err = store:handle(db, "Account", ids[2], Account.withdraw(1000000), Account.def)
say("withdrawing 1000000 from account 2: %s (%s)", err.code, err.message)

-- 5. The read model -----------------------------------------------------------------------
local p = pup.processor(db, pup.load_projection(common.here .. "/projections/balances.lua"))
assert(p:run { once = true })
p:close()
local matching = 0
for _, row in ipairs(assert(db:query("SELECT account_id, balance FROM bank_balances"))) do
  if states[row.account_id] and states[row.account_id].balance == row.balance then matching = matching + 1 end
end
say("read model: %d of %d accounts match their aggregates", matching, #ids)

-- 6. The reactor: a notification per deposit ---------------------------------------------
local r = pup.processor(db, pup.load_projection(common.here .. "/reactors/notifications.lua"))
local delivered = assert(r:run { once = true })
r:close()
local sent = assert(db:query([[SELECT count(DISTINCT n.event_id) AS distinct_events
  FROM bank_notifications n JOIN events e ON e.event_id::text = n.event_id]]))[1]
local deposits = assert(db:query("SELECT count(*) AS n FROM events WHERE event_type = 'MoneyDeposited'"))[1].n
say("reactor: %d deliveries, %d notifications sent for %d deposits", delivered, sent.distinct_events, deposits)
