-- partitioned: the same projection in several processes, each owning one hash partition.
--
--   PARTITION_KEY=0 pupsourcing examples/partitioned/main.lua    # terminal 1 (also appends)
--   PARTITION_KEY=1 pupsourcing examples/partitioned/main.lua    # terminal 2
--   PARTITION_KEY=2 pupsourcing examples/partitioned/main.lua    # terminal 3
--   PARTITION_KEY=3 pupsourcing examples/partitioned/main.lua    # terminal 4
--
-- Flags: --partition-key=K (or PARTITION_KEY), --total-partitions=N (or TOTAL_PARTITIONS,
-- default 4), --events=8 (sample users partition 0 appends at start; 0 = none),
-- --batch-size=B, --once (stop when caught up instead of waiting for Ctrl+C).
--
-- An event belongs to partition FNV-1a-32(aggregate_id) % N (pup.partition_of), so all
-- events of one user go to one process, in order. Each partition keeps its own checkpoint.
local pup = require "pupsourcing"
local common = dofile((arg[0]:match("^(.*)/") or ".") .. "/../common.lua") -- shared plumbing

common.die_and_log("partitioned", 2)

-- CLI configuration: flag first, then environment variable, then default.
local opts, int = common.options(arg)
local partition_key, total = common.partition_flags(int, "partition-key", "total-partitions")
local events = int("events", "EVENTS", 8)
local batch_size = int("batch-size", "BATCH_SIZE", nil)
local once = opts.once and true or false

local tag = ("[Partition %d/%d]"):format(partition_key, total)
local log = common.logger(tag)

local db, store = common.connect()

-- Only partition 0 appends the sample events, so they are not appended four times.
if partition_key == 0 and events > 0 then
  log("Appending %d sample events...", events)
  for i = 1, events do common.append_new(db, store, "User", "UserCreated", common.person(i)) end
end

local projection = pup.load_projection(common.root .. "/projections/user_read_model.lua")
common.on_handled(projection, function(event, d, count)
  log("%s: %s (aggregate %s, position %d) - partition total: %d", event.event_type,
      tostring(d.name or d.email or ""), event.aggregate_id:sub(1, 8), event.global_position, count)
end)

local processor = pup.processor(db, projection, {
  partition_key = partition_key, total_partitions = total, batch_size = batch_size,
})
log("Starting projection %s on partition %d of %d (events where hash(aggregate_id) %% %d == %d)",
    projection.name, partition_key, total, total, partition_key)
if not once then log("Press Ctrl+C to stop") end

local handled = common.or_exit(tag .. " projection error", processor:run { once = once })
if not once then log("Received shutdown signal, stopped gracefully.") end
log("Stopped. Handled %d events on this partition.", handled)
db:close()
