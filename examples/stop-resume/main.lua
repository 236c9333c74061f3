-- stop-resume: stop a projection part-way and resume exactly where it stopped.
--
--   pupsourcing examples/stop-resume/main.lua --mode=append --events=20
--   pupsourcing examples/stop-resume/main.lua --mode=process     # Ctrl+C part-way
--   pupsourcing examples/stop-resume/main.lua --mode=status
--   pupsourcing examples/stop-resume/main.lua --mode=process     # resumes at the checkpoint
--
-- Flags: --mode=append|process|status, --events=N (append, default 10),
-- --batch-size=B (process, default 5: a checkpoint every 5 events),
-- --delay=SECONDS (process, default 0.2 per event, so there is time to press Ctrl+C),
-- --once (process: stop when caught up instead of waiting for Ctrl+C).
--
-- The projection inserts one row per user into reliable_users with a plain INSERT (no
-- upsert): if an event were ever handled twice the batch would fail on the primary key.
-- Rows and checkpoint commit together, so after Ctrl+C the table matches the checkpoint.
local pup = require "pupsourcing"
local common = dofile((arg[0]:match("^(.*)/") or ".") .. "/../common.lua") -- shared plumbing

local NAME = "reliable_checkpoint_projection"
local RULE = "═══════════════════════════════════════════════════════"

local die, log = common.die_and_log("stop-resume", 2)

local opts, int = common.options(arg)
local mode = opts.mode
if mode == nil or mode == true then
  die("mode is required: use --mode=append, --mode=process, or --mode=status")
end
local events = int("events", nil, 10)
local batch_size = int("batch-size", nil, 5)
local delay = tonumber(opts.delay or "0.2")
local once = opts.once and true or false
if events < 0 then die("--events must be an integer >= 0") end
if batch_size < 1 then die("--batch-size must be an integer >= 1") end
if not delay or delay < 0 then die("--delay must be a number of seconds >= 0") end

local db, store = common.connect()

-- The saved checkpoint of our projection (single partition): 0 when it never ran.
local function checkpoint()
  for _, row in ipairs(pup.status(db)) do
    if row.projection == NAME and row.partition_key == 0 and row.total_partitions == 1 then
      return row.position, row
    end
  end
  return 0
end

-- Events our projection has still to handle after a position.
local function pending_after(position)
  return assert(db:query([[SELECT count(*) AS n, coalesce(max(global_position), 0) AS last
                           FROM events WHERE global_position > $1
                           AND aggregate_type = 'User' AND event_type = 'UserCreated']], position))[1]
end

if mode == "append" then
  log("Appending %d events...", events)
  for i = 1, events do
    local user = common.numbered_user(i)
    user.timestamp = os.date("!%Y-%m-%dT%H:%M:%SZ")
    local _, r = common.append_new(db, store, "User", "UserCreated", user)
    log("  → Event %d appended at position %d", i, r.global_positions[1])
  end
  log("✓ Successfully appended %d events", events)
  log("Now run: pupsourcing examples/stop-resume/main.lua --mode=status   (to check the checkpoint)")
  log("     or: pupsourcing examples/stop-resume/main.lua --mode=process  (to start processing)")

elseif mode == "process" then
  local count = 0
  local projection = {
    name = NAME,
    aggregate_types = { "User" },
    event_types = { "UserCreated" },
    setup = function(tx)
      common.create_table(tx, "reliable_users", [[
        user_id         TEXT PRIMARY KEY,
        name            TEXT,
        email           TEXT,
        global_position BIGINT NOT NULL UNIQUE,
        processed_at    TIMESTAMPTZ NOT NULL DEFAULT now()]])
    end,
    handle = function(tx, event)
      local d = type(event.data) == "table" and event.data or {}
      assert(tx:exec("INSERT INTO reliable_users (user_id, name, email, global_position) VALUES ($1, $2, $3, $4)",
                     event.aggregate_id, d.name, d.email, event.global_position))
      count = count + 1
      log("✓ Processed event #%d (position: %d, aggregate: %s): %s", count, event.global_position,
          event.aggregate_id:sub(1, 8), tostring(d.name))
      if delay > 0 then pup.sleep(delay) end -- slow on purpose, so Ctrl+C lands part-way
    end,
    reset = function(tx) assert(tx:exec("DELETE FROM reliable_users")) end,
  }

  local start = checkpoint()
  log(RULE)
  if start > 0 then
    log("Resuming from checkpoint: position %d", start)
  else
    log("Starting fresh (no checkpoint found)")
  end
  log(RULE)
  log("Processing events in batches of %d... %s", batch_size,
      once and "(--once: stops when caught up)" or "(Press Ctrl+C to stop)")

  local processor = pup.processor(db, projection, { batch_size = batch_size })
  local handled = common.or_exit("stop-resume: projection error", processor:run { once = once })
  local now = checkpoint()
  log(RULE)
  log(once and "Caught up, stopped" or "Received Ctrl+C - stopped gracefully")
  log("  Events processed in this run: %d", handled)
  log("  Checkpoint: position %d (was %d)", now, start)
  log("  Still to process: %d", pending_after(now).n)
  log(RULE)
  log("Checkpoint saved! You can safely:")
  log("  1. Append more events: pupsourcing examples/stop-resume/main.lua --mode=append")
  log("  2. Resume processing:  pupsourcing examples/stop-resume/main.lua --mode=process")
  log("  3. Check status:       pupsourcing examples/stop-resume/main.lua --mode=status")

elseif mode == "status" then
  local position, row = checkpoint()
  local head = assert(db:query("SELECT coalesce(max(global_position), 0) AS head FROM events"))[1].head
  local pending = pending_after(position)
  log(RULE)
  log("Projection Status: %s", NAME)
  log(RULE)
  log("Current checkpoint position: %d", position)
  log("Head of the event log: position %d", head)
  if row and row.updated_at then log("Last checkpoint update: %s", tostring(row.updated_at)) end
  if position == 0 then
    log("Status: Not started (will process %d events)", pending.n)
  elseif pending.n == 0 then
    log("Status: Caught up (all events processed)")
  else
    log("Status: Behind by %d events (%.1f%% of the log read)", pending.n, position / head * 100)
  end
  log(RULE)
  log("Raw checkpoint rows: SELECT * FROM projection_checkpoints WHERE projection_name = '%s';", NAME)

else
  die("invalid mode: %s (use append, process, or status)", tostring(mode))
end
db:close()
