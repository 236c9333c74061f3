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
io.stdout:setvbuf("line")

local DEFAULT_URL = "postgresql://postgres@127.0.0.1:54329/pupsourcing"
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
local root = here .. "/../.."

local function log(fmt, ...) io.write(os.date("%H:%M:%S "), fmt:format(...), "\n") end
local function die(fmt, ...)
  io.stderr:write("single-worker: ", fmt:format(...), "\n")
  os.exit(1)
end
local function redact(url) return (url:gsub("(//[^:/@]+):[^@/]*@", "%1:***@")) end

-- Configuration: flags, then environment, then defaults.
local opts = pup.args(arg)
local events = tonumber(opts.events or os.getenv("EVENTS") or "3")
local batch_size = opts["batch-size"] and tonumber(opts["batch-size"])
local once = opts.once and true or false
if not events or events < 0 then die("--events must be a number >= 0") end

-- Connect and migrate.
local url = os.getenv("DATABASE_URL")
if not url or url == "" then url = DEFAULT_URL end
local db, err = pup.connect(url)
if not db then
  die("cannot connect to %s: %s\n(start the example database with: scripts/pg.sh start)",
      redact(url), tostring(err))
end
local store = pup.store()
assert(store:migrate(db))

-- Sample events.
local NAMES = { "Alice Smith", "Bob Johnson", "Carol Williams", "Dave Brown",
                "Eve Davis", "Frank Miller", "Grace Wilson", "Henry Moore" }
if events > 0 then
  log("Appending %d sample events...", events)
  for i = 1, events do
    local name = NAMES[(i - 1) % #NAMES + 1]
    if i > #NAMES then name = name .. " " .. ((i - 1) // #NAMES + 1) end
    local email = name:lower():gsub("%s+", ".") .. "@example.com"
    local r, aerr = store:append(db, pup.no_stream(), {
      { aggregate_type = "User", aggregate_id = pup.uuid(), event_type = "UserCreated",
        payload = { email = email, name = name } },
    })
    if not r then die("append failed: %s", tostring(aerr)) end
  end
end

-- The projection, from its file, with a little logging around its handler.
local projection = pup.load_projection(root .. "/projections/user_read_model.lua")
local handle = projection.handle
local seen = 0
projection.handle = function(tx, event)
  handle(tx, event)
  seen = seen + 1
  local d = type(event.data) == "table" and event.data or {}
  if event.event_type == "UserCreated" then
    log("User created: %s (%s) - position %d", tostring(d.name), tostring(d.email), event.global_position)
  else
    log("%s for user %s - position %d", event.event_type, event.aggregate_id, event.global_position)
  end
end

local processor = pup.processor(db, projection, { batch_size = batch_size })
log("Starting single-worker projection %s%s", projection.name,
    once and " (--once: stops when caught up)" or "")
if not once then log("Press Ctrl+C to stop") end

local handled, perr = processor:run { once = once }
if not handled then die("projection error: %s", tostring(perr)) end

if not once then log("Received shutdown signal, stopped gracefully.") end
log("Projection stopped. Handled %d events in this run.", handled)
local rows = assert(db:query("SELECT count(*) AS n FROM users"))
log("Read model: %d users (SELECT * FROM users)", rows[1].n)
db:close()
