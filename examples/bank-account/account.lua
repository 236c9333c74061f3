-- The bank account domain: the aggregate definition, its commands and the upcaster of the
-- old MoneyDeposited shape. main.lua and projections/balances.lua both `require "account"`,
-- so every Lua state that reads these events registers the upcaster once.
local pup = require "pupsourcing"

local M = {}

-- The aggregate type: store:load / store:handle take this table.
M.def = {
  initial = function() return { open = false, balance = 0 } end,
  evolve = function(state, event)
    if event.event_type == "AccountOpened" then
      state.open = true
    elseif event.event_type == "MoneyDeposited" then
      state.balance = state.balance + event.data.amount
    elseif event.event_type == "MoneyWithdrawn" then
      state.balance = state.balance - event.data.amount
    end
    return state
  end,
  snapshot_every = 20, -- a snapshot about every 20 events of an account
  max_retries = 30,    -- hot accounts: many writers race for the same versions
  retry_delay = 0.002,
}

-- Commands: each returns the decide function store:handle calls with (state, version).
function M.open(owner)
  return function(state)
    if state.open then return nil, "already open" end
    return { { event_type = "AccountOpened", payload = { owner = owner } } }
  end
end

-- balance_after records the balance the deposit was decided on: a lost update (a decision
-- on a stale state) would break the chain, which main.lua checks.
function M.deposit(amount)
  return function(state)
    if not state.open then return nil, "account not open" end
    return { { event_type = "MoneyDeposited", event_version = 2,
               payload = { amount = amount, balance_after = state.balance + amount } } }
  end
end

function M.withdraw(amount)
  return function(state)
    if state.balance < amount then
      return nil, { code = "insufficient_funds", message = "insufficient funds" }
    end
    return { { event_type = "MoneyWithdrawn", payload = { amount = amount } } }
  end
end

-- MoneyDeposited version 1 (an older release) stored {cents = n}; version 2 is {amount = n}.
pup.upcast("MoneyDeposited", 1, function(data)
  return { amount = data.cents // 100, balance_after = pup.null }
end)

return M
