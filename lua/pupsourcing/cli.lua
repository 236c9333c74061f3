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
  --log-format text|json
common options:
  --database-url URL     else DATABASE_URL, else libpq defaults (PGHOST, ...)
  --events-table NAME  --aggregate-heads-table NAME  --checkpoints-table NAME
]]

local function fail(msg)
  io.stderr:write("pupsourcing: ", msg, "\n")
  return 2
end

-- Flags that take no value.
local BOOL = { once = true, json = true, help = true, version = true, group = true }

-- An integer flag (or its environment variable); returns the value and where it came from.
local function int_flag(flags, k, env, min)
  local v = flags[k]
  local from = "--" .. k
  if v == nil and env and os.getenv(env) and os.getenv(env) ~= "" then
    v, from = os.getenv(env), env
  end
  if v == nil then return nil, from end
  local n = math.tointeger(tonumber(v))
  if not n or n < min then
    error(("%s must be an integer >= %d, got %q"):format(from, min, tostring(v)), 0)
  end
  return n, from
end

local KNOWN = {
  run = { ["partition-key"] = 1, ["total-partitions"] = 1, workers = 1, ["batch-size"] = 1,
    ["poll-interval"] = 1, once = 1, ["log-format"] = 1, ["handler-timeout"] = 1, group = 1,
    partitions = 1, ["lease-ttl"] = 1 },
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

function commands.status(flags)
  local store = pup.store(store_opts(flags))
  local db <close> = connect(flags)
  local rows = assert(pup.status(db, store))
  if flags.json then
    for _, r in ipairs(rows) do
      for k, v in pairs(r) do if v == pup.null then r[k] = nil end end
    end
    print(pup.json.encode(rows))
    return 0
  end
  local names = store:names()
  local workers = db:query(("SELECT projection_name, worker_id, round(extract(epoch FROM clock_timestamp() - heartbeat_at)::numeric, 1)::text AS age,"
    .. " (SELECT string_agg(partition_key::text, ',' ORDER BY partition_key) FROM %s c WHERE c.projection_name = w.projection_name"
    .. " AND c.owner = w.worker_id AND c.lease_expires_at > clock_timestamp()) AS partitions"
    .. " FROM %s w ORDER BY projection_name, worker_id"):format(names.checkpoints_quoted, names.checkpoints_quoted:gsub('"$', '_workers"')))
  if #rows == 0 then print("no projection checkpoints yet") return 0 end
  local w = #"projection"
  for _, r in ipairs(rows) do w = math.max(w, #r.projection) end
  local line = "%-" .. w .. "s %9s %12s %12s %10s  %s"
  print(line:format("projection", "partition", "position", "head", "lag", "updated / waiting"))
  for _, r in ipairs(rows) do
    local wait = r.waiting_position ~= pup.null
        and ("  waiting for position %d since %s"):format(r.waiting_position, r.waiting_since) or ""
    print(line:format(r.projection, r.partition_key .. "/" .. r.total_partitions,
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
  if #words ~= 2 or not math.tointeger(tonumber(words[2])) or math.tointeger(tonumber(words[2])) < 1 then
    return fail("repartition takes a projection file and a partition count >= 1")
  end
  local proj = pup.load_projection(words[1])
  local n = math.tointeger(tonumber(words[2]))
  local store = pup.store(store_opts(flags))
  local db <close> = connect(flags)
  local names = store:names()
  local groups = names.checkpoints_quoted:gsub('"$', '_groups"')
  local res = assert(db:transaction(function(tx)
    local rows = assert(tx:query(("SELECT total_partitions, previous_total FROM %s WHERE projection_name = $1 FOR UPDATE"):format(groups), proj.name))
    local cur = rows[1]
    if cur and cur.previous_total ~= pup.null then
      return nil, pup.new_error("invalid_argument", ("projection %s is still settling a repartition from %d to %d partitions; try again when `pupsourcing status` shows no previous count")
        :format(proj.name, cur.previous_total, cur.total_partitions))
    end
    if cur and cur.total_partitions == n then return "unchanged" end
    assert(tx:exec(("INSERT INTO %s (projection_name, total_partitions, previous_total) VALUES ($1, $2, $3)"
      .. " ON CONFLICT (projection_name) DO UPDATE SET total_partitions = EXCLUDED.total_partitions,"
      .. " previous_total = EXCLUDED.previous_total, changed_at = now()"):format(groups),
      proj.name, n, cur and cur.total_partitions or pup.null))
    return cur and ("%d -> %d"):format(cur.total_partitions, n) or ("new group of %d"):format(n)
  end))
  print(("repartition %s: %s partitions; running --group workers switch at their next heartbeat"):format(proj.name, res))
  return 0
end

function commands.run(flags, words)
  if #words == 0 then return fail("run needs at least one projection FILE.lua") end
  local workers = int_flag(flags, "workers", nil, 1)
  local key, key_from = int_flag(flags, "partition-key", "PARTITION_KEY", 0)
  local total, total_from = int_flag(flags, "total-partitions", "TOTAL_PARTITIONS", 1)
  local batch = int_flag(flags, "batch-size", nil, 1)
  local poll = int_flag(flags, "poll-interval", nil, 1)
  local limit = int_flag(flags, "handler-timeout", nil, 1)
  if workers and (flags["partition-key"] or flags["total-partitions"]) then
    return fail("--workers and --partition-key/--total-partitions exclude each other")
  end
  local partitions = int_flag(flags, "partitions", nil, 1)
  local ttl = int_flag(flags, "lease-ttl", nil, 100)
  if flags.group then
    if workers or flags["partition-key"] or flags["total-partitions"] then
      return fail("--group shares partitions by leases: drop --workers/--partition-key/--total-partitions (use --partitions)")
    end
    if flags.once then return fail("--once is not supported with --group") end
    key, total = nil, nil
  elseif partitions or ttl then
    return fail("--partitions and --lease-ttl go with --group")
  end
  if flags.group then
    -- checked above
  elseif key and not workers then
    total = total or 1
    if key >= total then
      return fail(("%s %d must be below %s %d"):format(key_from, key, total_from, total))
    end
  elseif total and total > 1 and not workers then
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
    database_url = flags["database-url"], store = store_opts(flags), log_format = fmt,
    handler_timeout_ms = limit, group = flags.group and true or nil,
    lease_ttl = ttl and ttl / 1000 or nil,
  }
  if flags.group then opts.total_partitions = partitions or 16 end
  local r = pup.runner(opts)
  local res, err = r:run()
  local function log(msg, level)
    if fmt == "json" then
      io.stderr:write(pup.json.encode { time = pup.now(), level = level or "info", msg = msg }, "\n")
    else
      io.stderr:write("pupsourcing: ", msg, "\n")
    end
  end
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
  if flags.help then io.write(USAGE) return 0 end
  for k in pairs(flags) do
    if not (KNOWN[cmd][k] or COMMON[k]) then return fail(("%s: unknown flag --%s"):format(cmd, k)) end
  end
  local ok, res = pcall(commands[cmd], flags, words)
  if not ok then return fail(tostring(res)) end
  return res
end

return M
