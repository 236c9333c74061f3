-- W5 appender: one append every `--interval` seconds (fixed cadence), each a new User
-- aggregate; stores the wall-clock time at which each append's commit returned (and, as an
-- upper bound, when the append was called) in committed(pos, committed_at, called_at). Then waits for the projection to have seen them all and
-- prints median and p99 of seen_at - committed_at.
--   pupsourcing bench/latency.lua --url URL --appends N [--interval 0.01]
local pup = require "pupsourcing"
local a = pup.args(arg)
local n = math.tointeger(tonumber(a.appends)) or 2000
local interval = tonumber(a.interval) or 0.01
local db = assert(pup.connect(a.url))
local store = pup.store()

local payload = '{"email":"u@example.com","name":"User"}'
local pos, at, t0s = {}, {}, {}
local start = pup.now()
for i = 1, n do
  local due = start + (i - 1) * interval
  local wait = due - pup.now()
  if wait > 0 then pup.sleep(wait) end
  t0s[i] = pup.now()
  local res = assert(store:append(db, pup.no_stream(), { {
    aggregate_type = "User", aggregate_id = pup.uuid(), event_type = "UserCreated",
    payload = payload, metadata = "{}" } }))
  at[i] = pup.now()
  pos[i] = res.global_positions[1]
end
local span = pup.now() - start

-- Record the commit times, then wait (up to 30 s) for the handler to see every event.
assert(db:transaction(function(tx)
  for i = 1, n do
    assert(tx:exec("INSERT INTO committed (pos, committed_at, called_at) VALUES ($1, $2, $3)",
                   pos[i], at[i], t0s[i]))
  end
  return true
end))
local deadline = pup.now() + 30
local seen
repeat
  seen = assert(db:query("SELECT count(*) AS c FROM seen s JOIN committed c USING (pos)"))[1].c
  if seen < n then pup.sleep(0.1) end
until seen >= n or pup.now() > deadline

local r = assert(db:query([[
  SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY (s.seen_at - c.committed_at)) * 1000 AS p50,
         percentile_cont(0.99) WITHIN GROUP (ORDER BY (s.seen_at - c.committed_at)) * 1000 AS p99,
         max(s.seen_at - c.committed_at) * 1000 AS max,
         min(s.seen_at - c.committed_at) * 1000 AS min,
         count(*) FILTER (WHERE s.seen_at - c.committed_at > 0.005) AS over5,
         percentile_cont(0.5) WITHIN GROUP (ORDER BY (s.seen_at - c.called_at)) * 1000 AS c50,
         percentile_cont(0.99) WITHIN GROUP (ORDER BY (s.seen_at - c.called_at)) * 1000 AS c99
    FROM seen s JOIN committed c USING (pos)]]))[1]
print(("RESULT appends=%d seen=%d span=%.2f p50_ms=%.2f p99_ms=%.2f max_ms=%.2f min_ms=%.2f over5ms=%d"
  .. " from_call_p50_ms=%.2f from_call_p99_ms=%.2f")
  :format(n, seen, span, r.p50, r.p99, r.max, r.min, r.over5, r.c50, r.c99))
