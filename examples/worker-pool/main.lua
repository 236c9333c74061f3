-- worker-pool: several partitions of one projection in one process, one thread each.
--
--   pupsourcing examples/worker-pool/main.lua --workers=4 [--events=20] [--batch-size=B] [--once]
--
-- Appends sample users, then starts the runner with partitions 0..workers-1 of the user read
-- model (each worker: its own thread, Lua VM, connection and checkpoint). Ctrl+C (SIGINT) or
-- SIGTERM stops all workers cleanly; it then prints what each partition handled.
-- The same as `pupsourcing run --workers 4 projections/user_read_model.lua`.
local pup = require "pupsourcing"
io.stdout:setvbuf("line")

local DEFAULT_URL = "postgresql://postgres@127.0.0.1:54329/pupsourcing"
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."

local function log(fmt, ...) io.write(os.date("%H:%M:%S "), fmt:format(...), "\n") end
local function die(fmt, ...)
  io.stderr:write("worker-pool: ", fmt:format(...), "\n")
  os.exit(2)
end
local function redact(url) return (url:gsub("(//[^:/@]+):[^@/]*@", "%1:***@")) end

local opts = pup.args(arg)
local function int_option(flag, env, default)
  local v = opts[flag]
  if v == nil or v == true then v = os.getenv(env) end
  if v == nil or v == "" then return default end
  local n = math.tointeger(tonumber(v))
  if not n then die("--%s must be an integer, got %q", flag, tostring(v)) end
  return n
end
local workers = int_option("workers", "WORKERS", 4)
local events = int_option("events", "EVENTS", 20)
local batch_size = int_option("batch-size", "BATCH_SIZE", nil)
local once = opts.once and true or false
if workers < 1 then die("--workers must be at least 1") end

local url = os.getenv("DATABASE_URL")
if not url or url == "" then url = DEFAULT_URL end
local db, err = pup.connect(url)
if not db then
  die("cannot connect to %s: %s\n(start the example database with: scripts/pg.sh start)",
      redact(url), tostring(err))
end
local store = pup.store()
assert(store:migrate(db))

if events > 0 then
  log("Appending %d sample events...", events)
  for i = 1, events do
    local name = ("User %d"):format(i)
    local r, aerr = store:append(db, pup.no_stream(), {
      { aggregate_type = "User", aggregate_id = pup.uuid(), event_type = "UserCreated",
        payload = { email = ("user%d@example.com"):format(i), name = name } },
    })
    if not r then die("append failed: %s", tostring(aerr)) end
  end
end

local runner = pup.runner {
  files = { here .. "/projection.lua" },
  workers = workers,
  batch_size = batch_size,
  once = once,
  database_url = url,
}
log("Starting %d workers (partitions 0..%d of user_read_model)%s", workers, workers - 1,
    once and " (--once: stop when caught up)" or "")
if not once then log("Press Ctrl+C to stop") end

local result, rerr = runner:run()
if not result then
  io.stderr:write("worker-pool: runner error: ", tostring(rerr), "\n")
  os.exit(1)
end
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
