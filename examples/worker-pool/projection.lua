-- The user read model (projections/user_read_model.lua) with a log line per event.
--
-- The runner loads this file once per worker thread, each in its own Lua VM with its own
-- connection, so `count` below is per worker: nothing is shared between workers except
-- the database. That is what makes a projection "thread-safe" here.
local pup = require "pupsourcing"

local src = debug.getinfo(1, "S").source
local dir = src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/[^/]*$") or "."
local projection = pup.load_projection(dir .. "/../../projections/user_read_model.lua")

local handle = projection.handle
local count = 0
projection.handle = function(tx, event)
  handle(tx, event)
  count = count + 1
  local d = type(event.data) == "table" and event.data or {}
  -- One write per line: lines from different workers never interleave.
  io.stdout:write(("%s [worker-pool] %s: %s (aggregate %s, position %d) - this worker: %d\n")
    :format(os.date("%H:%M:%S"), event.event_type, tostring(d.name or d.email or ""),
            event.aggregate_id:sub(1, 8), event.global_position, count))
end

return projection
