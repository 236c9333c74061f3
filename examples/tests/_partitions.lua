-- Test helper: what each partition of the log holds.
--   pupsourcing examples/tests/_partitions.lua TOTAL [SQL-WHERE]
-- prints "partition count last_position" for partitions 0..TOTAL-1 (pup.partition_of),
-- last_position 0 when the partition has no events.
local pup = require "pupsourcing"
local total = assert(math.tointeger(tonumber(arg[1])), "usage: _partitions.lua TOTAL [WHERE]")
local where = arg[2] or "true"
local db = assert(pup.connect(os.getenv("DATABASE_URL")))
local counts, last = {}, {}
for k = 0, total - 1 do counts[k], last[k] = 0, 0 end
for _, row in ipairs(assert(db:query("SELECT aggregate_id, global_position FROM events WHERE " .. where))) do
  local k = pup.partition_of(row.aggregate_id, total)
  counts[k] = counts[k] + 1
  if row.global_position > last[k] then last[k] = row.global_position end
end
for k = 0, total - 1 do io.write(k, " ", counts[k], " ", last[k], "\n") end
db:close()
