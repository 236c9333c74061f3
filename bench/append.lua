-- W1/W2: N appends of K events, each to a new User aggregate (random UUID), one connection.
--   pupsourcing bench/append.lua --url URL --appends N --events K
-- Prints one line: RESULT appends=N events=E seconds=S eps=E/S
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

local t0 = pup.now()
for _ = 1, n do
  local res, err = store:append(db, pup.no_stream(), batch())
  if not res then error(tostring(err)) end
end
local dt = pup.now() - t0
print(("RESULT appends=%d events=%d seconds=%.3f eps=%.1f"):format(n, n * k, dt, n * k / dt))
