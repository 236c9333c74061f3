-- worker-pool: several partitions of one projection in one process, one thread each.
--
--   pupsourcing examples/worker-pool/main.lua --workers=4 [--events=20] [--batch-size=B] [--once]
--
-- Appends sample users, then starts the runner with partitions 0..workers-1 of the user read
-- model (each worker: its own thread, Lua VM, connection and checkpoint). Ctrl+C (SIGINT) or
-- SIGTERM stops all workers cleanly; it then prints what each partition handled.
-- The same as `pupsourcing run --workers 4 projections/user_read_model.lua`.
local pup = require "pupsourcing"
local common = dofile((arg[0]:match("^(.*)/") or ".") .. "/../common.lua") -- shared plumbing

local die, log = common.die_and_log("worker-pool", 2)

local opts, int = common.options(arg)
local workers = int("workers", "WORKERS", 4)
local events = int("events", "EVENTS", 20)
local batch_size = int("batch-size", "BATCH_SIZE", nil)
local once = opts.once and true or false
if workers < 1 then die("--workers must be at least 1") end

local db, store, url = common.connect()

if events > 0 then
  log("Appending %d sample events...", events)
  for i = 1, events do common.append_new(db, store, "User", "UserCreated", common.numbered_user(i)) end
end

local runner = pup.runner {
  files = { common.here .. "/projection.lua" },
  workers = workers,
  batch_size = batch_size,
  once = once,
  database_url = url,
}
log("Starting %d workers (partitions 0..%d of user_read_model)%s", workers, workers - 1,
    once and " (--once: stop when caught up)" or "")
if not once then log("Press Ctrl+C to stop") end

local result = common.or_exit("worker-pool: runner error", runner:run())
if not once then log("Received shutdown signal, all workers stopped.") end

-- result = { [projection name] = { handled = n, partitions = number of partitions } }
for name, r in pairs(result) do
  log("Stopped. %s: handled %d events in total across %d workers.", name, r.handled or 0, workers)
end

-- How the load spread: the read model's users per partition (hash(id) %% workers).
local per = {}
for k = 0, workers - 1 do per[k] = 0 end
for _, row in ipairs(assert(db:query("SELECT id FROM users"))) do
  local k = pup.partition_of(row.id, workers)
  per[k] = per[k] + 1
end
for k = 0, workers - 1 do log("  partition %d: %d users in the read model", k, per[k]) end
log("Checkpoints: SELECT * FROM projection_checkpoints WHERE projection_name = 'user_read_model';")
db:close()
