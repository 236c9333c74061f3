-- W5: records when the handler saw each event (the handler's wall clock, seconds since
-- the epoch) next to its global position; bench/latency.lua compares it with the time
-- the appender's commit returned.
local pup = require "pupsourcing"
return {
  name = "bench_latency",
  handle = function(tx, event)
    tx:exec("INSERT INTO seen (pos, seen_at) VALUES ($1, $2)", event.global_position, pup.now())
  end,
}
