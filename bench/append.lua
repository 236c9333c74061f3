-- W1/W2/W6: N appends of K events, each to a new User aggregate (random UUID), one connection.
--   pupsourcing bench/append.lua --url URL --appends N --events K [--start-at EPOCH]
-- --start-at: after connecting and the warm-up, wait until that wall-clock time (W6 starts
-- its concurrent writers together). Prints one line:
--   RESULT appends=N events=E seconds=S eps=E/S start=T0 end=T1 (T0/T1 wall clock)
local pup = require "pupsourcing"
local a = pup.args(arg)
local n = math.tointeger(tonumber(a.appends)) or 20000
local k = math.tointeger(tonumber(a.events)) or 1
local db = assert(pup.connect(a.url))
local store = pup.store()
assert(store:migrate(db))

local payload = '{"email":"u@example.com","name":"User"}'
local function batch()
  local id = pup.uuid()
  local evs = {}
  for i = 1, k do
    evs[i] = { aggregate_type = "User", aggregate_id = id, event_type = "UserCreated",
               payload = payload, metadata = "{}" }
  end
  return evs
end

-- A few warm-up appends (statement preparation, caches) are not timed.
for _ = 1, 5 do assert(store:append(db, pup.no_stream(), batch())) end

local start_at = tonumber(a["start-at"])
if start_at and start_at > pup.now() then pup.sleep(start_at - pup.now()) end
local t0 = pup.now()
for _ = 1, n do
  local res, err = store:append(db, pup.no_stream(), batch())
  if not res then error(tostring(err)) end
end
local dt = pup.now() - t0
print(("RESULT appends=%d events=%d seconds=%.3f eps=%.1f start=%.6f end=%.6f")
  :format(n, n * k, dt, n * k / dt, t0, t0 + dt))
