-- single-worker: one projection, one worker, checkpointing, graceful shutdown.
--
--   pupsourcing examples/single-worker/main.lua [--events=3] [--batch-size=100] [--once]
--
-- Appends a few UserCreated events, then runs the user read model
-- (projections/user_read_model.lua) in this process until you press Ctrl+C (SIGINT) or send
-- SIGTERM. The current batch finishes or rolls back, the checkpoint is saved, and the
-- example says how many events it handled. Run it again: it resumes at the checkpoint.
-- --once: stop by itself when caught up with the log as it was at start.
local pup = require "pupsourcing"
local common = dofile((arg[0]:match("^(.*)/") or ".") .. "/../common.lua") -- shared plumbing

local die, log = common.die_and_log("single-worker", 1)

-- Configuration: flags, then environment, then defaults.
local opts, int = common.options(arg)
local events = int("events", "EVENTS", 3)
local batch_size = int("batch-size", nil, nil)
local once = opts.once and true or false
if events < 0 then die("--events must be a number >= 0") end

-- Connect and migrate.
local db, store = common.connect()

-- Sample events.
if events > 0 then
  log("Appending %d sample events...", events)
  for i = 1, events do common.append_new(db, store, "User", "UserCreated", common.person(i)) end
end

-- The projection, from its file, with a little logging around its handler.
local projection = pup.load_projection(common.root .. "/projections/user_read_model.lua")
common.on_handled(projection, function(event, d)
  if event.event_type == "UserCreated" then
    log("User created: %s (%s) - position %d", tostring(d.name), tostring(d.email), event.global_position)
  else
    log("%s for user %s - position %d", event.event_type, event.aggregate_id, event.global_position)
  end
end)

local processor = pup.processor(db, projection, { batch_size = batch_size })
log("Starting single-worker projection %s%s", projection.name,
    once and " (--once: stops when caught up)" or "")
if not once then log("Press Ctrl+C to stop") end

local handled = common.or_exit("single-worker: projection error", processor:run { once = once })

if not once then log("Received shutdown signal, stopped gracefully.") end
log("Projection stopped. Handled %d events in this run.", handled)
local rows = assert(db:query("SELECT count(*) AS n FROM users"))
log("Read model: %d users (SELECT * FROM users)", rows[1].n)
db:close()
