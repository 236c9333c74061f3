-- The host binary's subcommands: run, migrate, migrate-gen, status, reset.
-- `pupsourcing SCRIPT.lua` never comes here (src/main.c runs the script itself).
local pup = require "pupsourcing"

local M = {}

local USAGE = [[
usage: pupsourcing SCRIPT.lua [args...]        run a Lua script (require "pupsourcing" works)
       pupsourcing run [options] FILE.lua...   run projections until SIGINT/SIGTERM
       pupsourcing migrate [options]           create the tables (idempotent)
       pupsourcing migrate-gen --output DIR [--filename F] [table options]
       pupsourcing status [--json] [options]   checkpoints, head, lag per partition
       pupsourcing reset [options] FILE.lua    delete a projection's checkpoints, run its reset
       pupsourcing repartition [options] FILE.lua N   change a worker group's partition count
       pupsourcing --help | --version

run options:
  --partition-key K --total-partitions N   run partition K of N (env PARTITION_KEY, TOTAL_PARTITIONS)
  --workers N                              run partitions 0..N-1 in this process (a thread each)
  --group                                  join the projection's worker group: partitions are
                                           shared among all --group processes by leases
  --partitions N                           a new group's partition count (default 16)
  --lease-ttl MS                           a silent worker loses its partitions after MS (10000)
  --batch-size B                           events per batch/transaction (default: the file's, else 100)
  --poll-interval MS                       fallback poll when no notification comes (default 1000)
  --once                                   stop when caught up with the log as it was at start
  --handler-timeout MS                     fail a handler that runs longer than MS on one event
  --log-format text|json                   json: every line on stderr is one JSON object
  --metrics-addr HOST:PORT                 serve Prometheus /metrics and /healthz there
ranges: partitions and workers 1..4096, --batch-size 1..100000, --poll-interval 1..3600000,
  --handler-timeout 1..86400000, --lease-ttl 100..3600000
common options:
  --database-url URL     else DATABASE_URL, else libpq defaults (PGHOST, ...)
  --events-table NAME  --aggregate-heads-table NAME  --checkpoints-table NAME
]]

-- With --log-format json every line the command prints to stderr is a JSON object.
local json_log = false

local function log(msg, level)
  if json_log then
    require("pupsourcing.core")._log_line(true, level or "info", msg) -- RFC 3339 time, as the run's own lines
  else
    io.stderr:write("pupsourcing: ", msg, "\n")
  end
end

local function fail(msg)
  log(msg, "error")
  return 2
end

-- Flags that take no value.
local BOOL = { once = true, json = true, help = true, version = true, group = true }

local L = pup.limits
-- Ranges of the integer flags (and their environment variables).
local RANGE = {
  workers = { 1, L.partitions }, ["partition-key"] = { 0, L.partitions - 1 },
  ["total-partitions"] = { 1, L.partitions }, partitions = { 1, L.partitions },
  ["batch-size"] = { 1, L.batch_size }, ["poll-interval"] = { 1, L.seconds * 1000 },
  ["handler-timeout"] = { 1, L.handler_timeout_ms }, ["lease-ttl"] = { 100, L.seconds * 1000 },
}

-- An integer flag (or its environment variable) within RANGE[k]; returns the value and
-- where it came from.
local function int_flag(flags, k, env)
  local v = flags[k]
  local from = "--" .. k
  if v == nil and env and os.getenv(env) and os.getenv(env) ~= "" then
    v, from = os.getenv(env), env
  end
  if v == nil then return nil, from end
  local n = math.tointeger(tonumber(v))
  local min, max = RANGE[k][1], RANGE[k][2]
  if not n or n < min or n > max then
    error(("%s must be an integer %s, got %q (range %d..%d)"):format(from,
      n and n > max and "<= " .. max or ">= " .. min, tostring(v), min, max), 0)
  end
  return n, from
end

local KNOWN = {
  run = { ["partition-key"] = 1, ["total-partitions"] = 1, workers = 1, ["batch-size"] = 1,
    ["poll-interval"] = 1, once = 1, ["log-format"] = 1, ["handler-timeout"] = 1, group = 1,
    partitions = 1, ["lease-ttl"] = 1, ["metrics-addr"] = 1 },
  migrate = {}, ["migrate-gen"] = { output = 1, filename = 1 }, status = { json = 1 }, reset = {},
  repartition = {},
}
local COMMON = { ["database-url"] = 1, ["events-table"] = 1, ["aggregate-heads-table"] = 1,
  ["checkpoints-table"] = 1 }

local function store_opts(flags)
  return { events_table = flags["events-table"], aggregate_heads_table = flags["aggregate-heads-table"],
    checkpoints_table = flags["checkpoints-table"] }
end

local function connect(flags)
  local db, err = pup.connect(flags["database-url"])
  if not db then error(tostring(err), 0) end
  return db
end

local commands = {}

function commands.migrate(flags)
  local store = pup.store(store_opts(flags))
  local db <close> = connect(flags)
  assert(store:migrate(db))
  local n = store:names()
  print(("migrated: %s, %s, %s"):format(n.events_table, n.aggregate_heads_table, n.checkpoints_table))
  return 0
end

commands["migrate-gen"] = function(flags)
  if not flags.output then return fail("migrate-gen needs --output DIR") end
  local store = pup.store(store_opts(flags))
  local dir = flags.output
  if not os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "'") then
    return fail("cannot create directory " .. dir)
  end
  local path = dir .. "/" .. (flags.filename or "init.sql")
  local f, err = io.open(path, "wb")
  if not f then return fail(err) end
  f:write(store:schema_sql())
  f:close()
  print("wrote " .. path)
  return 0
end

-- Warning lines about prepared transactions: until each is committed or rolled back,
-- every projection stops at the first hole after its xid (xids are cluster-wide), and
-- `run --once` waits for it (docs/reliability.md).
local function prepared_warnings(db, store)
  local rows = assert(db:query(store:names().sql.prepared_xacts))
  local out = {}
  for _, x in ipairs(rows) do
    out[#out + 1] = ("warning: prepared transaction %q (xid %s, database %s) open since %s: projections"
      .. " wait at any hole it may fill until COMMIT PREPARED or ROLLBACK PREPARED"):format(
      x.gid, x.xid, x.database, x.since)
  end
  return out
end

function commands.status(flags)
  local store = pup.store(store_opts(flags))
  local db <close> = connect(flags)
  local rows = assert(pup.status(db, store))
  local prepared = prepared_warnings(db, store)
  if flags.json then
    for _, r in ipairs(rows) do
      for k, v in pairs(r) do if v == pup.null then r[k] = nil end end
    end
    print(#rows == 0 and "[]" or pup.json.encode(rows)) -- cjson writes an empty table as {}
    for _, line in ipairs(prepared) do io.stderr:write("pupsourcing: ", line, "\n") end
    return 0
  end
  local workers = db:query(store:names().sql.group_workers)
  for _, line in ipairs(prepared) do print(line) end
  if #rows == 0 then print("no projection checkpoints yet") return 0 end
  local w = #"projection"
  for _, r in ipairs(rows) do w = math.max(w, #r.projection) end
  -- string.format widths stop at 99: pad the name column (names go up to 200 bytes) by hand
  local function pad(s) return s .. (" "):rep(w - #s) end
  local line = "%s %9s %12s %12s %10s  %s"
  print(line:format(pad("projection"), "partition", "position", "head", "lag", "updated / waiting"))
  for _, r in ipairs(rows) do
    local wait = r.waiting_position ~= pup.null
        and ("  waiting for position %d since %s"):format(r.waiting_position, r.waiting_since) or ""
    print(line:format(pad(r.projection), r.partition_key .. "/" .. r.total_partitions,
      r.position, r.head, r.lag, r.updated_at .. wait))
  end
  if workers and #workers > 0 then
    print("\ngroup workers")
    for _, wk in ipairs(workers) do
      print(("  %s  %s  heartbeat %ss ago  partitions %s"):format(wk.projection_name, wk.worker_id, wk.age,
        wk.partitions ~= pup.null and wk.partitions or "-"))
    end
  end
  return 0
end

function commands.reset(flags, words)
  if #words ~= 1 then return fail("reset takes one projection file") end
  local proj = pup.load_projection(words[1])
  local store = pup.store(store_opts(flags))
  local db <close> = connect(flags)
  local n = assert(pup.reset(db, proj, store))
  print(("reset %s: %d checkpoint row(s) deleted"):format(proj.name, n))
  return 0
end

function commands.repartition(flags, words)
  local count = #words == 2 and math.tointeger(tonumber(words[2]))
  if not count or count < 1 or count > pup.limits.partitions then
    return fail(("repartition takes a projection file and a partition count from 1 to %d%s"):format(
      pup.limits.partitions, #words == 2 and (", got %q"):format(words[2]) or ""))
  end
  local proj = pup.load_projection(words[1])
  local n = math.tointeger(tonumber(words[2]))
  local store = pup.store(store_opts(flags))
  local db <close> = connect(flags)
  local before = assert(pup.repartition(db, proj, n, store))
  local res = before == n and "unchanged" or before == 0 and ("new group of %d"):format(n)
    or ("%d -> %d"):format(before, n)
  print(("repartition %s: %s partitions; running --group workers switch at their next heartbeat"):format(proj.name, res))
  return 0
end

function commands.run(flags, words)
  if #words == 0 then return fail("run needs at least one projection FILE.lua") end
  local workers = int_flag(flags, "workers")
  local key, key_from = int_flag(flags, "partition-key", "PARTITION_KEY")
  local total, total_from = int_flag(flags, "total-partitions", "TOTAL_PARTITIONS")
  local batch = int_flag(flags, "batch-size")
  local poll = int_flag(flags, "poll-interval")
  local limit = int_flag(flags, "handler-timeout")
  if workers and (flags["partition-key"] or flags["total-partitions"]) then
    return fail("--workers and --partition-key/--total-partitions exclude each other")
  end
  local partitions = int_flag(flags, "partitions")
  local ttl = int_flag(flags, "lease-ttl")
  if flags.group then
    if workers or flags["partition-key"] or flags["total-partitions"] then
      return fail("--group shares partitions by leases: drop --workers/--partition-key/--total-partitions (use --partitions)")
    end
    if flags.once then return fail("--once is not supported with --group") end
    key, total = nil, nil
  elseif partitions or ttl then
    return fail("--partitions and --lease-ttl go with --group")
  end
  if not flags.group and key and not workers then -- (a group was checked above)
    total = total or 1
    if key >= total then
      return fail(("%s %d must be below %s %d"):format(key_from, key, total_from, total))
    end
  elseif not flags.group and total and total > 1 and not workers then
    return fail("--total-partitions needs --partition-key (or PARTITION_KEY)")
  end
  local fmt = flags["log-format"] or "text"
  if fmt ~= "text" and fmt ~= "json" then return fail("--log-format must be text or json") end
  -- Check every file before touching the database.
  local names = {}
  for _, file in ipairs(words) do
    local p = pup.load_projection(file)
    if names[p.name] then
      return fail(("%s: projection name %q is also used by %s"):format(file, p.name, names[p.name]))
    end
    names[p.name] = file
  end
  pup.store(store_opts(flags)) -- and the table names (raises naming the bad one)
  local opts = {
    files = words, workers = workers, partition_key = not workers and key or nil,
    total_partitions = not workers and total or nil, batch_size = batch,
    poll_interval = poll and poll / 1000 or nil, once = flags.once and true or false,
    database_url = flags["database-url"], store = store_opts(flags),
    log_format = flags["log-format"], -- given: lifecycle lines too (docs/operations.md, "Logs")
    handler_timeout_ms = limit, group = flags.group and true or nil,
    lease_ttl = ttl and ttl / 1000 or nil, metrics_addr = flags["metrics-addr"],
  }
  if flags.group then opts.total_partitions = partitions or 16 end
  local r, rerr = pup.runner(opts)
  if not r then return fail("--metrics-addr " .. rerr.message:gsub("^metrics address ", "")) end
  local res, err = r:run()
  if not res then
    log(tostring(err), "error")
    return 1
  end
  for name, s in pairs(res) do
    log(("%s: %d event(s) handled by %d partition worker(s)"):format(name, s.handled, s.partitions))
  end
  return 0
end

function M.main(argv)
  local cmd = argv[1]
  if cmd == nil or cmd == "--help" or cmd == "-h" or cmd == "help" then
    io.write(USAGE)
    return cmd == nil and 2 or 0
  end
  if cmd == "--version" then
    print("pupsourcing " .. pup.version)
    return 0
  end
  if not commands[cmd] then return fail(("unknown command %q (see --help)"):format(cmd)) end
  local flags, perr = pup.args(argv, { first = 2, booleans = BOOL })
  if not flags then return fail(perr) end
  local words = {}
  for i, w in ipairs(flags) do
    words[i] = w
    flags[i] = nil
  end
  json_log = flags["log-format"] == "json"
  if flags.help then io.write(USAGE) return 0 end
  for k in pairs(flags) do
    if not (KNOWN[cmd][k] or COMMON[k]) then return fail(("%s: unknown flag --%s"):format(cmd, k)) end
  end
  local ok, res = pcall(commands[cmd], flags, words)
  if not ok then return fail(tostring(res)) end
  return res
end

return M
