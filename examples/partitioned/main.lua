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
io.stdout:setvbuf("line")

local DEFAULT_URL = "postgresql://postgres@127.0.0.1:54329/pupsourcing"
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
local root = here .. "/../.."

local function die(fmt, ...)
  io.stderr:write("partitioned: ", fmt:format(...), "\n")
  os.exit(2)
end
local function redact(url) return (url:gsub("(//[^:/@]+):[^@/]*@", "%1:***@")) end

-- CLI configuration: flag first, then environment variable, then default.
local opts = pup.args(arg)
local function int_option(flag, env, default)
  local v = opts[flag]
  if v == nil or v == true then v = os.getenv(env) end
  if v == nil or v == "" then return default end
  local n = math.tointeger(tonumber(v))
  if not n then die("--%s (%s) must be an integer, got %q", flag, env or "-", tostring(v)) end
  return n
end
local partition_key = int_option("partition-key", "PARTITION_KEY", -1)
local total = int_option("total-partitions", "TOTAL_PARTITIONS", 4)
local events = int_option("events", "EVENTS", 8)
local batch_size = int_option("batch-size", "BATCH_SIZE", nil)
local once = opts.once and true or false
if partition_key < 0 then die("partition-key is required (use --partition-key flag or PARTITION_KEY env var)") end
if total < 1 then die("total-partitions must be at least 1") end
if partition_key >= total then
  die("partition-key (%d) must be less than total-partitions (%d)", partition_key, total)
end

local tag = ("[Partition %d/%d]"):format(partition_key, total)
local function log(fmt, ...) io.write(os.date("%H:%M:%S "), tag, " ", fmt:format(...), "\n") end

local url = os.getenv("DATABASE_URL")
if not url or url == "" then url = DEFAULT_URL end
local db, err = pup.connect(url)
if not db then
  die("cannot connect to %s: %s\n(start the example database with: scripts/pg.sh start)",
      redact(url), tostring(err))
end
local store = pup.store()
assert(store:migrate(db))

-- Only partition 0 appends the sample events, so they are not appended four times.
if partition_key == 0 and events > 0 then
  log("Appending %d sample events...", events)
  local NAMES = { "Alice Smith", "Bob Johnson", "Carol Williams", "Dave Brown",
                  "Eve Davis", "Frank Miller", "Grace Wilson", "Henry Moore" }
  for i = 1, events do
    local name = NAMES[(i - 1) % #NAMES + 1]
    if i > #NAMES then name = name .. " " .. ((i - 1) // #NAMES + 1) end
    local r, aerr = store:append(db, pup.no_stream(), {
      { aggregate_type = "User", aggregate_id = pup.uuid(), event_type = "UserCreated",
        payload = { email = name:lower():gsub("%s+", ".") .. "@example.com", name = name } },
    })
    if not r then die("append failed: %s", tostring(aerr)) end
  end
end

local projection = pup.load_projection(root .. "/projections/user_read_model.lua")
local handle = projection.handle
local count = 0
projection.handle = function(tx, event)
  handle(tx, event)
  count = count + 1
  local d = type(event.data) == "table" and event.data or {}
  log("%s: %s (aggregate %s, position %d) - partition total: %d", event.event_type,
      tostring(d.name or d.email or ""), event.aggregate_id:sub(1, 8), event.global_position, count)
end

local processor = pup.processor(db, projection, {
  partition_key = partition_key, total_partitions = total, batch_size = batch_size,
})
log("Starting projection %s on partition %d of %d (events where hash(aggregate_id) %% %d == %d)",
    projection.name, partition_key, total, total, partition_key)
if not once then log("Press Ctrl+C to stop") end

local handled, perr = processor:run { once = once }
if not handled then
  io.stderr:write(tag, " projection error: ", tostring(perr), "\n")
  os.exit(1)
end
if not once then log("Received shutdown signal, stopped gracefully.") end
log("Stopped. Handled %d events on this partition.", handled)
db:close()
