-- Test helper: how many events of each partition the log holds.
--   pupsourcing examples/tests/_partitions.lua TOTAL [SQL-WHERE]
-- prints "partition count" lines for partitions 0..TOTAL-1 (pup.partition_of).
local pup = require "pupsourcing"
local total = assert(math.tointeger(tonumber(arg[1])), "usage: _partitions.lua TOTAL [WHERE]")
local where = arg[2] or "true"
local db = assert(pup.connect(os.getenv("DATABASE_URL")))
local counts = {}
for k = 0, total - 1 do counts[k] = 0 end
for _, row in ipairs(assert(db:query("SELECT aggregate_id FROM events WHERE " .. where))) do
  local k = pup.partition_of(row.aggregate_id, total)
  counts[k] = counts[k] + 1
end
for k = 0, total - 1 do io.write(k, " ", counts[k], "\n") end
db:close()
