-- The host binary's subcommands, parsed by lua-argparse (Debian `lua-argparse`): per-command
-- --help, `pupsourcing help CMD`, unknown flags refused with a suggestion.
-- `pupsourcing SCRIPT.lua` never comes here (src/main.c runs the script itself).
--
-- A command is one table in COMMANDS: name, summary, a `flags(cmd)` function declaring its
-- arguments and options on the argparse command `cmd`, and `run(a)` taking the parsed table
-- (option --batch-size is a.batch_size) and returning the exit code. Usage errors raise a
-- string or return fail(msg) (exit 2). Every command also takes the store flags
-- (--database-url and the tables: store_opts(a), connect(a)). For example:
--
--   COMMANDS[#COMMANDS + 1] = {
--     name = "rebuild", summary = "reset a projection and run it again to the head",
--     flags = function(cmd) projection_arg(cmd) end,      -- a.file
--     run = function(a)
--       local db <close> = connect(a)
--       ... pup.rebuild(db, pup.load_projection(a.file), pup.store(store_opts(a))) ...
--       return 0
--     end,
--   }
--
-- and its flags in README.md's CLI reference (spec/cli_reference_spec.lua checks them).
local argparse = require "argparse"
local pup = require "pupsourcing"

local M = {}

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

local L = pup.limits
-- Ranges of the integer flags (and their environment variables).
local RANGE = {
  workers = { 1, L.partitions }, partition_key = { 0, L.partitions - 1 },
  total_partitions = { 1, L.partitions }, partitions = { 1, L.partitions },
  batch_size = { 1, L.batch_size },
}

-- An integer flag (or its environment variable) within RANGE[k]; returns the value and
-- where it came from.
local function int_flag(a, k, env)
  local v = a[k]
  local from = "--" .. k:gsub("_", "-")
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

-- Durations: a number with a unit (ms, s, m or min, h). A bare number is read as
-- milliseconds, the unit these flags had before units, with a deprecation warning: existing
-- scripts keep working and are told what to write (docs/lua-api.md, "Durations").
local UNIT = { ms = 1, s = 1000, m = 60000, min = 60000, h = 3600000 }
-- Ranges in milliseconds, with the text of each bound.
local DURATION = {
  poll_interval = { 1, L.seconds * 1000, "1ms", "1h" },
  handler_timeout = { 1, L.handler_timeout * 1000, "1ms", "24h" },
  lease_ttl = { 100, L.seconds * 1000, "100ms", "1h" },
}

-- A duration flag in whole milliseconds, or nil when not given.
local function duration_flag(a, k)
  local v = a[k]
  if v == nil then return nil end
  local flag = "--" .. k:gsub("_", "-")
  local num, unit = v:match("^(%d+%.?%d*)(%a*)$")
  local x = num and (unit == "" and tonumber(num) or UNIT[unit] and tonumber(num) * UNIT[unit])
  -- (1.1 * 1000 is 1100.0000000000002 in floating point)
  local ms = x and math.tointeger(math.floor(x + 0.5))
  if ms and math.abs(x - ms) > 1e-6 then ms = nil end
  local r = DURATION[k]
  if not ms or ms < r[1] or ms > r[2] then
    error(("%s must be a duration from %s to %s in whole milliseconds (like 500ms, 2s, 1m), got %q")
      :format(flag, r[3], r[4], v), 0)
  end
  if unit == "" then
    log(("warning: %s %s has no unit: read as %dms (deprecated: write %dms or %gs)")
      :format(flag, v, ms, ms, ms / 1000), "warning")
  end
  return ms
end

local function store_opts(a)
  return { events_table = a.events_table, aggregate_heads_table = a.aggregate_heads_table,
    checkpoints_table = a.checkpoints_table }
end

local function connect(a)
  local db, err = pup.connect(a.database_url)
  if not db then error(tostring(err), 0) end
  return db
end

-- Declares the FILE.lua argument (a.file) of a command on one projection.
local function projection_arg(cmd)
  cmd:argument("FILE.lua", "the projection file"):target "file"
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

local COMMANDS = {}

local RUN = {
  name = "run",
  summary = "run projections until SIGINT/SIGTERM (or caught up, with --once)",
  flags = function(cmd)
    cmd:argument("FILE.lua", "projection files, run concurrently"):target("files"):args "+"
    cmd:option("--partition-key", "run partition K of --total-partitions (env PARTITION_KEY)"):argname "K"
    cmd:option("--total-partitions", "the partition count (env TOTAL_PARTITIONS)"):argname "N"
    cmd:option("-w --workers", "run partitions 0..N-1 in this process, a thread, VM and connection each")
      :argname "N"
    cmd:flag("-g --group", "join the projection's worker group: partitions are shared among"
      .. " all --group processes by leases")
    cmd:option("--partitions", "a new group's partition count (default 16)"):argname "N"
    cmd:option("--lease-ttl", "a silent group worker loses its partitions after this (default 10s)")
      :argname "DURATION"
    cmd:option("-b --batch-size", "events per batch and transaction (default: the file's, else 100)")
      :argname "B"
    cmd:option("--poll-interval", "fallback poll when no notification comes (default 1s)")
      :argname "DURATION"
    cmd:flag("--once", "stop when caught up with the log as it was at start")
    cmd:option("--handler-timeout", "fail a handler that runs longer than this on one event")
      :argname "DURATION"
    cmd:option("--log-format", "text, or json: every line on stderr is one JSON object"):argname "text|json"
    cmd:option("--metrics-addr", "serve Prometheus /metrics and /healthz there (docs/operations.md)")
      :argname "HOST:PORT"
    cmd:flag("--fail-fast", "a handler failure stops every projection (default: only its own;"
      .. " run exits 1 at the end either way)")
  end,
  run = function(a)
    local files = a.files
    local workers = int_flag(a, "workers")
    local key, key_from = int_flag(a, "partition_key", "PARTITION_KEY")
    local total, total_from = int_flag(a, "total_partitions", "TOTAL_PARTITIONS")
    local batch = int_flag(a, "batch_size")
    local poll = duration_flag(a, "poll_interval")
    local limit = duration_flag(a, "handler_timeout")
    if workers and (a.partition_key or a.total_partitions) then
      return fail("--workers and --partition-key/--total-partitions exclude each other")
    end
    local partitions = int_flag(a, "partitions")
    local ttl = duration_flag(a, "lease_ttl")
    if a.group then
      if workers or a.partition_key or a.total_partitions then
        return fail("--group shares partitions by leases: drop --workers/--partition-key/--total-partitions (use --partitions)")
      end
      if a.once then return fail("--once is not supported with --group") end
      key, total = nil, nil
    elseif partitions or ttl then
      return fail("--partitions and --lease-ttl go with --group")
    end
    if not a.group and key and not workers then -- (a group was checked above)
      total = total or 1
      if key >= total then
        return fail(("%s %d must be below %s %d"):format(key_from, key, total_from, total))
      end
    elseif not a.group and total and total > 1 and not workers then
      return fail("--total-partitions needs --partition-key (or PARTITION_KEY)")
    end
    local fmt = a.log_format or "text"
    if fmt ~= "text" and fmt ~= "json" then return fail("--log-format must be text or json") end
    -- Check every file before touching the database.
    local names = {}
    for _, file in ipairs(files) do
      local p = pup.load_projection(file)
      if names[p.name] then
        return fail(("%s: projection name %q is also used by %s"):format(file, p.name, names[p.name]))
      end
      names[p.name] = file
    end
    pup.store(store_opts(a)) -- and the table names (raises naming the bad one)
    local opts = {
      files = files, workers = workers, partition_key = not workers and key or nil,
      total_partitions = not workers and total or nil, batch_size = batch,
      poll_interval = poll and poll / 1000 or nil, once = a.once and true or false,
      database_url = a.database_url, store = store_opts(a),
      log_format = a.log_format, -- given: lifecycle lines too (docs/operations.md, "Logs")
      handler_timeout = limit and limit / 1000, group = a.group and true or nil,
      lease_ttl = ttl and ttl / 1000 or nil, metrics_addr = a.metrics_addr,
      fail_fast = a.fail_fast and true or nil,
    }
    if a.group then opts.total_partitions = partitions or 16 end
    do -- best effort: the runner reports a database it cannot reach
      local db <close> = pup.connect(a.database_url)
      local warning = db and pup.position_warning(db, pup.store(opts.store))
      if warning then log(warning:gsub("^warning: ", ""), "warning") end
    end
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
  end,
}
COMMANDS[#COMMANDS + 1] = RUN

COMMANDS[#COMMANDS + 1] = {
  name = "migrate",
  summary = "create or update the tables (idempotent); the Go library's tables are refused"
    .. " unless --upgrade (docs/go.md)",
  flags = function(cmd)
    cmd:flag("--upgrade", "convert the Go library's tables in place (docs/go.md)")
  end,
  run = function(a)
    local store = pup.store(store_opts(a))
    local db <close> = connect(a)
    local ok, err = store:migrate(db, { upgrade = a.upgrade and true or false })
    if not ok then return fail(tostring(err)) end
    local n = store:names()
    print(("%s: %s, %s, %s"):format(a.upgrade and "migrated (--upgrade)" or "migrated", n.events_table,
      n.aggregate_heads_table, n.checkpoints_table))
    return 0
  end,
}

COMMANDS[#COMMANDS + 1] = {
  name = "migrate-gen",
  summary = "write the schema SQL to a file (migrations/init.sql); needs no database",
  flags = function(cmd)
    cmd:option("-o --output", "the directory to write to (created if missing)"):argname "DIR"
    cmd:option("-f --filename", "the file's name (default init.sql)"):argname "F"
  end,
  run = function(a)
    if not a.output then return fail("migrate-gen needs --output DIR") end
    local store = pup.store(store_opts(a))
    local dir = a.output
    if not os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "'") then
      return fail("cannot create directory " .. dir)
    end
    local path = dir .. "/" .. (a.filename or "init.sql")
    local f, err = io.open(path, "wb")
    if not f then return fail(err) end
    f:write(store:schema_sql())
    f:close()
    print("wrote " .. path)
    return 0
  end,
}

COMMANDS[#COMMANDS + 1] = {
  name = "status",
  summary = "per projection partition: position, head, lag, updated, the hole it waits at; group workers",
  flags = function(cmd)
    cmd:flag("-j --json", "one JSON array of the rows on stdout")
  end,
  run = function(a)
    local store = pup.store(store_opts(a))
    local db <close> = connect(a)
    local position = pup.position_warning(db, store)
    local rows, serr = pup.status(db, store)
    if not rows then return fail(tostring(serr) .. (position and "\n" .. position or "")) end
    local prepared = prepared_warnings(db, store)
    if position then table.insert(prepared, 1, position) end
    local layouts, live = assert(pup.layouts(db, store)), {}
    for _, l in ipairs(layouts) do live[l.projection] = l end
    for _, r in ipairs(rows) do -- which layout each row belongs to (docs/operations.md)
      local l = live[r.projection]
      if l then
        r.layout = ("%s %d"):format(l.mode, l.total_partitions)
        r.live_layout = r.total_partitions == l.total_partitions
        r.generation = l.generation
      end
    end
    if a.json then
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
    local line = "%s %9s %12s %12s %10s  %-10s  %s"
    print(line:format(pad("projection"), "partition", "position", "head", "lag", "layout", "updated / waiting"))
    for _, r in ipairs(rows) do
      local wait = r.waiting_position ~= pup.null
          and ("  waiting for position %d since %s"):format(r.waiting_position, r.waiting_since) or ""
      -- the live layout's mode; rows of the layout before it, kept while the change settles
      local l = live[r.projection]
      local layout = not l and "-" or r.live_layout and l.mode or "superseded"
      local dead = (r.dead_letters or 0) > 0 and ("  %d dead letter(s)"):format(r.dead_letters) or ""
      print(line:format(pad(r.projection), r.partition_key .. "/" .. r.total_partitions,
        r.position, r.head, r.lag, layout, r.updated_at .. wait .. dead))
      if r.failed_since then
        print(("  failed since %s: %s"):format(r.failed_since, (r.error:match("^[^\n]*"))))
      end
    end
    if workers and #workers > 0 then
      print("\ngroup workers")
      for _, wk in ipairs(workers) do
        print(("  %s  %s  heartbeat %ss ago  partitions %s"):format(wk.projection_name, wk.worker_id, wk.age,
          wk.partitions ~= pup.null and wk.partitions or "-"))
      end
    end
    return 0
  end,
}

COMMANDS[#COMMANDS + 1] = {
  name = "reset",
  summary = "start a projection over: a new generation fences its running processors (they"
    .. " start over), its checkpoints are deleted and its reset(tx) runs, in one transaction",
  flags = projection_arg,
  run = function(a)
    local proj = pup.load_projection(a.file)
    local store = pup.store(store_opts(a))
    local db <close> = connect(a)
    local n = assert(pup.reset(db, proj, store))
    print(("reset %s: %d checkpoint row(s) deleted"):format(proj.name, n))
    return 0
  end,
}
local RESET = COMMANDS[#COMMANDS]

-- reset, then `run --once` with the same layout flags (and its progress line).
COMMANDS[#COMMANDS + 1] = {
  name = "rebuild",
  summary = "reset a projection, then catch up (run --once), with the progress line",
  flags = function(cmd)
    projection_arg(cmd)
    cmd:option("--partition-key", "as for run"):argname "K"
    cmd:option("--total-partitions", "as for run"):argname "N"
    cmd:option("-w --workers", "as for run"):argname "N"
    cmd:option("-b --batch-size", "as for run"):argname "B"
    cmd:option("--handler-timeout", "as for run"):argname "DURATION"
    cmd:option("--log-format", "as for run"):argname "text|json"
  end,
  run = function(a)
    local rc = RESET.run(a)
    if rc ~= 0 then return rc end
    a.files, a.once = { a.file }, true
    return RUN.run(a)
  end,
}

COMMANDS[#COMMANDS + 1] = {
  name = "repartition",
  summary = "change a worker group's partition count, safely mid-stream",
  flags = function(cmd)
    projection_arg(cmd)
    cmd:argument("N", ("the new partition count, 1 to %d"):format(L.partitions)):target "count"
  end,
  run = function(a)
    local count = math.tointeger(tonumber(a.count))
    if not count or count < 1 or count > L.partitions then
      return fail(("repartition takes a projection file and a partition count from 1 to %d, got %q")
        :format(L.partitions, a.count))
    end
    local proj = pup.load_projection(a.file)
    local store = pup.store(store_opts(a))
    local db <close> = connect(a)
    local before = assert(pup.repartition(db, proj, count, store))
    local res = before == count and "unchanged" or before == 0 and ("new group of %d"):format(count)
      or ("%d -> %d"):format(before, count)
    print(("repartition %s: %s partitions; running --group workers switch at their next heartbeat")
      :format(proj.name, res))
    return 0
  end,
}

COMMANDS[#COMMANDS + 1] = {
  name = "dead-letters",
  summary = "list, retry or discard the events a projection gave up on (on_error, docs/operations.md)",
  flags = function(cmd)
    cmd:argument("action", "list, retry (run the handler again, in order) or discard")
      :choices { "list", "retry", "discard" }
    projection_arg(cmd)
    cmd:option("--position", "only the dead letter of this global position"):argname "P"
  end,
  run = function(a)
    local pos = a.position and math.tointeger(tonumber(a.position))
    if a.position and not (pos and pos >= 1) then
      return fail(("--position must be a positive integer, got %q"):format(tostring(a.position)))
    end
    local proj = pup.load_projection(a.file)
    local store = pup.store(store_opts(a))
    local db <close> = connect(a)
    local opts = { position = pos, store = store }
    if a.action == "list" then
      local rows = assert(pup.dead_letters.list(db, proj, opts))
      if #rows == 0 then print(("%s: no dead letters"):format(proj.name)) return 0 end
      for _, d in ipairs(rows) do
        print(("%d  partition %d/%d  %s  event_id %s  %s %s v%d  attempts %d  first %s  last %s"):format(
          d.global_position, d.partition_key, d.total_partitions, d.event_type, d.event_id, d.aggregate_type,
          d.aggregate_id, d.aggregate_version, d.attempts, d.first_failed_at, d.last_failed_at))
        print("  " .. d.error:gsub("\n", "\n  "))
      end
      return 0
    end
    if a.action == "discard" then
      local n = assert(pup.dead_letters.discard(db, proj, opts))
      print(("%s: %d dead letter(s) discarded"):format(proj.name, n))
      return 0
    end
    local n, err, before = pup.dead_letters.retry(db, proj, opts)
    if not n then
      print(("%s: %d dead letter(s) retried, then:"):format(proj.name, before))
      log(tostring(err), "error")
      return 1
    end
    print(("%s: %d dead letter(s) retried"):format(proj.name, n))
    return 0
  end,
}

local EPILOG = [[
Run a Lua script (require "pupsourcing" works): pupsourcing SCRIPT.lua [args...]
Help on a command: pupsourcing help COMMAND, or pupsourcing COMMAND --help.
Every command takes -d/--database-url URL (else DATABASE_URL, else libpq defaults) and the
table names --events-table, --aggregate-heads-table, --checkpoints-table.
Durations take a unit: 500ms, 2s, 1m, 1h (a bare number is milliseconds, deprecated).
Reference: README.md ("CLI reference") and docs/lua-api.md.]]

-- The parser; `out` receives the text of --help / --version (printed by main, exit 0).
local function parser(out)
  local p = argparse("pupsourcing", "Event sourcing on PostgreSQL: migrate, run projections, show status.")
    :epilog(EPILOG):command_target "command"
  p:add_help { action = function() out.text = p:get_help() error(out, 0) end }
  p:flag("-V --version", "print the version and exit")
    :action(function() out.text = "pupsourcing " .. pup.version error(out, 0) end)
  for _, c in ipairs(COMMANDS) do
    local cmd = p:command(c.name, c.summary):summary(c.summary)
    cmd:add_help { action = function() out.text = cmd:get_help() error(out, 0) end }
    if c.flags then c.flags(cmd) end
    cmd:option("-d --database-url", "else DATABASE_URL, else libpq defaults (PGHOST, ...);"
      .. " a password is never printed"):argname "URL"
    cmd:option("--events-table", "the events table (default events)"):argname "NAME"
    cmd:option("--aggregate-heads-table", "the aggregate heads table (default aggregate_heads)"):argname "NAME"
    cmd:option("--checkpoints-table", "the checkpoints table (default projection_checkpoints)")
      :argname "NAME"
  end
  p:command("help", "show help for a command"):argument("name", "the command"):argname("COMMAND"):args "?"
  return p
end

-- Parses argv[1..]: returns the parsed table, or nil and the text to print with its exit
-- code (help and version: stdout, 0; usage errors: the message, 2).
local function parse(argv)
  local out = {}
  local p = parser(out)
  local ok, perr_ok, res = pcall(p.pparse, p, argv)
  if not ok then -- a help or version action (error(out)) or a bug
    if out.text then return nil, out.text, 0 end
    error(perr_ok, 0)
  end
  if not perr_ok then
    -- argparse tells the command only through the usage line: find it in argv
    local cmd
    for _, w in ipairs(argv) do
      if not w:match("^%-") then cmd = w break end
    end
    local known = false
    for _, c in ipairs(COMMANDS) do known = known or c.name == cmd end
    local where = known and cmd .. ": " or ""
    local hint = known and ("pupsourcing %s --help"):format(cmd) or "pupsourcing --help"
    return nil, ("%s%s (see %s)"):format(where, res:gsub("\nDid you mean", "; did you mean"), hint), 2
  end
  if res.command == "help" then
    if not res.name then return nil, p:get_help(), 0 end
    return parse { res.name, "--help" }
  end
  return res
end

function M.main(argv)
  local args = {}
  for i = 1, #argv do args[i] = argv[i] end
  for i, w in ipairs(args) do
    if w == "--log-format=json" or w == "--log-format" and args[i + 1] == "json" then json_log = true end
  end
  if #args == 0 then
    io.stderr:write(parser({}):get_help(), "\n")
    return 2
  end
  local ok, a, text, code = pcall(parse, args)
  if not ok then return fail(tostring(a)) end
  if not a then
    if code == 0 then io.write(text, "\n") return 0 end
    return fail(text)
  end
  for _, c in ipairs(COMMANDS) do
    if c.name == a.command then
      local rok, res = pcall(c.run, a)
      if not rok then return fail(tostring(res)) end
      return res
    end
  end
end

return M
