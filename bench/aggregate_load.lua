-- Issue 15: loading a 50,000-event aggregate with snapshots every 100 (goal: under 2 ms).
--   pupsourcing bench/aggregate_load.lua --url URL [--events 50000] [--every 100] [--loads 1000]
-- On tables of its own (bench_agg_*; dropped first). The aggregate gets events-100 events by
-- store:append, one command by store:handle (which writes the snapshot), then 99 events more:
-- the worst case of snapshot_every = 100, a snapshot followed by 99 events to fold. Prints
-- median and p99 of store:load with the snapshot, of a full fold without it, and of a
-- store:handle (load + decide + append) with snapshots; checks both loads agree.
local pup = require "pupsourcing"
local a = pup.args(arg)
local n = math.tointeger(tonumber(a.events)) or 50000
local every = math.tointeger(tonumber(a.every)) or 100
local loads = math.tointeger(tonumber(a.loads)) or 1000
assert(n > every, "--events must be more than --every")
local db = assert(pup.connect(a.url))
for _, t in ipairs { "bench_agg_events", "bench_agg_heads", "bench_agg_checkpoints", "bench_agg_events_snapshots" } do
  assert(db:exec("DROP TABLE IF EXISTS " .. t .. " CASCADE"))
end
assert(db:exec("DROP SEQUENCE IF EXISTS bench_agg_events_global_position_seq"))
local store = pup.store { events_table = "bench_agg_events", aggregate_heads_table = "bench_agg_heads",
                          checkpoints_table = "bench_agg_checkpoints" }
assert(store:migrate(db))

local Account = {
  initial = function() return { balance = 0, deposits = 0 } end,
  evolve = function(s, e)
    s.balance = s.balance + e.data.amount
    s.deposits = s.deposits + 1
    return s
  end,
  snapshot_every = every,
}
local plain = { initial = Account.initial, evolve = Account.evolve }
local id = "acc-1"
local function deposits(k)
  local list = {}
  for i = 1, k do
    list[i] = { aggregate_type = "Account", aggregate_id = id, event_type = "Deposited",
                payload = { amount = i % 100, note = "bench deposit" } }
  end
  return list
end
local function append(k)
  while k > 0 do
    local c = math.min(k, 1000)
    assert(store:append(db, pup.any(), deposits(c)))
    k = k - c
  end
end
append(n - every)
local _, _, res = assert(store:handle(db, "Account", id, function()
  return { { event_type = "Deposited", payload = { amount = 1, note = "bench deposit" } } }
end, Account))
assert(res.snapshot == true, "the snapshot was not written")
append(every - 1)

local function timed(count, fn)
  local t = {}
  for i = 1, count do
    local t0 = pup.now()
    fn()
    t[i] = (pup.now() - t0) * 1000
  end
  table.sort(t)
  return t[(count + 1) // 2], t[math.max(1, math.ceil(count * 0.99))]
end

local snap_state, snap_version = assert(store:load(db, "Account", id, Account))
local full_state, full_version = assert(store:load(db, "Account", id, plain))
assert(snap_version == n and full_version == n, "wrong version")
assert(snap_state.balance == full_state.balance and snap_state.deposits == full_state.deposits,
  "the snapshot load differs from the full fold")

local sm, sp = timed(loads, function() assert(store:load(db, "Account", id, Account)) end)
local fm, fp = timed(math.max(5, loads // 100), function() assert(store:load(db, "Account", id, plain)) end)
local hm, hp = timed(math.max(10, loads // 10), function()
  assert(store:handle(db, "Account", id, function()
    return { { event_type = "Deposited", payload = { amount = 1, note = "bench deposit" } } }
  end, Account))
end)
print(("aggregate of %d events, snapshot every %d (99 events after it at worst)"):format(n, every))
print(("load with snapshot    median %.3f ms  p99 %.3f ms  (%d loads)  goal < 2 ms: %s")
  :format(sm, sp, loads, sm < 2 and "met" or "MISSED"))
print(("load, full fold       median %.3f ms  p99 %.3f ms"):format(fm, fp))
print(("handle with snapshot  median %.3f ms  p99 %.3f ms"):format(hm, hp))
for _, t in ipairs { "bench_agg_events", "bench_agg_heads", "bench_agg_checkpoints", "bench_agg_events_snapshots" } do
  assert(db:exec("DROP TABLE IF EXISTS " .. t .. " CASCADE"))
end
