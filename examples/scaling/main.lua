-- scaling: grow from 1 to N workers; each new worker catches up on its own partition.
--
--   pupsourcing examples/scaling/main.lua --worker-id=0 --append     # append 20 events, exit
--   WORKER_ID=0 pupsourcing examples/scaling/main.lua                # terminal 1
--   WORKER_ID=1 pupsourcing examples/scaling/main.lua                # terminal 2, later
--   WORKER_ID=2 pupsourcing examples/scaling/main.lua                # terminal 3, later
--   WORKER_ID=3 pupsourcing examples/scaling/main.lua                # terminal 4, later
--
-- Flags: --worker-id=K (or WORKER_ID), --total-workers=N (or TOTAL_WORKERS, default 4),
-- --append (append --events=20 sample events and exit), --batch-size=B, --once.
--
-- Worker K owns partition K of N: events whose hash(aggregate_id) % N == K. A worker that
-- starts late reads from its own checkpoint (0 the first time), so it catches up on its
-- share without touching the others'. The projection records which worker handled each
-- event in scaling_assignments with a plain INSERT on (total_workers, global_position):
-- an event handled twice would fail the batch, an event never handled is missing a row.
--   SELECT worker_id, count(*) FROM scaling_assignments GROUP BY 1 ORDER BY 1;
local pup = require "pupsourcing"
local common = dofile((arg[0]:match("^(.*)/") or ".") .. "/../common.lua") -- shared plumbing

common.die_and_log("scaling", 2)

local opts, int = common.options(arg)
local worker_id, total = common.partition_flags(int, "worker-id", "total-workers")
local events = int("events", nil, 20)
local batch_size = int("batch-size", nil, nil)
local once = opts.once and true or false
local append_only = opts.append and true or false

local tag = ("[Worker %d]"):format(worker_id)
local log = common.logger(tag)

local db, store = common.connect()

if append_only then
  log("Appending %d sample events...", events)
  local first, last
  for i = 1, events do
    local _, r = common.append_new(db, store, "User", "UserCreated", common.numbered_user(i))
    first = first or r.global_positions[1]
    last = r.global_positions[1]
  end
  log("Appended %d sample events (positions %s..%s). Start workers now.", events,
      tostring(first), tostring(last))
  db:close()
  return
end

local count = 0
local projection = {
  name = "scalable_projection", -- all workers share the name; each partition has its own checkpoint
  aggregate_types = { "User" },
  event_types = { "UserCreated" },

  setup = function(tx)
    common.create_table(tx, "scaling_assignments", [[
      total_workers   INT NOT NULL,
      global_position BIGINT NOT NULL,
      aggregate_id    TEXT NOT NULL,
      worker_id       INT NOT NULL,
      handled_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
      PRIMARY KEY (total_workers, global_position)]])
  end,

  handle = function(tx, event)
    assert(tx:exec([[INSERT INTO scaling_assignments (total_workers, global_position, aggregate_id, worker_id)
                     VALUES ($1, $2, $3, $4)]], total, event.global_position, event.aggregate_id, worker_id))
    count = count + 1
    local d = type(event.data) == "table" and event.data or {}
    log("Processing: %s (aggregate %s, position %d) - worker total: %d", tostring(d.name),
        event.aggregate_id:sub(1, 8), event.global_position, count)
  end,

  reset = function(tx) assert(tx:exec("DELETE FROM scaling_assignments")) end,
}

local processor = pup.processor(db, projection, {
  partition_key = worker_id, total_partitions = total, batch_size = batch_size,
})
log("═══════════════════════════════════════════════════════")
log("Worker %d of %d starting...", worker_id, total)
log("This worker processes events where hash(aggregate_id) %% %d == %d", total, worker_id)
if not once then log("Press Ctrl+C to stop") end
log("═══════════════════════════════════════════════════════")

local handled = common.or_exit(tag .. " projection error", processor:run { once = once })
if not once then log("Received shutdown signal, stopped gracefully.") end
log("Stopped. Handled %d events.", handled)
db:close()
