-- Shared helpers of the busted specs. Loaded by `busted --helper=spec/helpers.lua` (see
-- spec/tests.cmake) and requirable from specs as `require "spec.helpers"` (same table).
--
-- Every spec uses its own tables (fresh_store) so ctest may run spec files in parallel.
local M = {}

M.source_dir = os.getenv("PUP_SOURCE_DIR") or "."
M.binary_dir = os.getenv("PUP_BINARY_DIR") or (M.source_dir .. "/build")
M.bin = os.getenv("PUP_BIN") or (M.binary_dir .. "/pupsourcing")

-- ctest sets LUA_PATH/LUA_CPATH; make sure the module of this tree is found even when a
-- spec is run by hand (`busted spec/x_spec.lua` from the source directory).
do
  local lp = M.source_dir .. "/lua/?.lua;" .. M.source_dir .. "/lua/?/init.lua"
  if not package.path:find(lp, 1, true) then package.path = lp .. ";" .. package.path end
  local cp = M.binary_dir .. "/lib/?.so"
  if not package.cpath:find(cp, 1, true) then package.cpath = cp .. ";" .. package.cpath end
end

local function pup() return require "pupsourcing" end

-- The database every spec talks to (scripts/test.sh points it at a throwaway server).
function M.url()
  local url = os.getenv("DATABASE_URL")
  assert(url and url ~= "", "DATABASE_URL is not set (run the specs through scripts/test.sh)")
  return url
end

-- A new connection; raises (with the error object's text) when it fails.
function M.connect(url)
  local db, err = pup().connect(url or M.url())
  if not db then error("connect failed: " .. tostring(err), 2) end
  return db
end

-- Table names of one spec area: t_<name>_events, t_<name>_heads, t_<name>_checkpoints.
function M.tables(name)
  assert(type(name) == "string" and name:match("^[%w_]+$"), "bad table prefix")
  return {
    events_table = "t_" .. name .. "_events",
    aggregate_heads_table = "t_" .. name .. "_heads",
    checkpoints_table = "t_" .. name .. "_checkpoints",
  }
end

-- Drops a spec area's tables (and what migrate created with them).
function M.drop_tables(db, name)
  local t = M.tables(name)
  local cp = t.checkpoints_table
  for _, tbl in ipairs { t.events_table, t.aggregate_heads_table, cp, cp .. "_workers", cp .. "_groups",
                         cp .. "_dead_letters", cp .. "_failures",
                         t.events_table .. "_snapshots" } do
    assert(db:exec('DROP TABLE IF EXISTS "' .. tbl .. '" CASCADE'))
  end
  assert(db:exec('DROP SEQUENCE IF EXISTS "' .. t.events_table .. '_global_position_seq" CASCADE'))
end

-- Extra connections a case opens, closed together after it, also when it fails (an open
-- transaction left behind would block the next case's DROP TABLE):
--   local conns = H.connections()  ...  conns:connect()  ...  after_each: conns:close_all()
function M.connections()
  local list = {}
  return {
    connect = function()
      local c = M.connect()
      list[#list + 1] = c
      return c
    end,
    close_all = function()
      for _, c in ipairs(list) do c:close() end
      list = {}
    end,
  }
end

-- A migrated store on empty tables of its own: returns store, db, table names.
-- `db` is a new connection unless one is given.
function M.fresh_store(name, db)
  db = db or M.connect()
  M.drop_tables(db, name)
  local names = M.tables(name)
  local store = pup().store(names)
  local ok, err = store:migrate(db)
  if not ok then error("migrate failed: " .. tostring(err), 2) end
  return store, db, names
end

function M.drop_database(name)
  local db = M.connect()
  assert(db:exec("DROP DATABASE IF EXISTS " .. name .. " WITH (FORCE)"))
  db:close()
end

-- A new empty database `name` on the test server (dropped first if it exists); returns its URL.
function M.fresh_database(name)
  M.drop_database(name)
  local db = M.connect()
  assert(db:exec("CREATE DATABASE " .. name))
  db:close()
  return (M.url():gsub("/[^/?]*$", "/" .. name, 1))
end

local counter = 0
-- A string unique within this run and across concurrent runs (for aggregate ids).
function M.uid(prefix)
  counter = counter + 1
  return string.format("%s-%d-%d-%d", prefix or "id", os.time(), math.random(1, 1 << 30), counter)
end

-- An event to append; fields of `over` replace the defaults.
function M.event(over)
  local e = { aggregate_type = "User", aggregate_id = "user-1", event_type = "UserCreated",
              payload = { email = "a@x.io" } }
  for k, v in pairs(over or {}) do e[k] = v end
  return e
end

-- n events of one aggregate.
function M.events(n, over)
  local list = {}
  for i = 1, n do
    local o = { event_type = "E" .. i, payload = { i = i } }
    for k, v in pairs(over or {}) do o[k] = v end
    list[i] = M.event(o)
  end
  return list
end

-- Quotes a word for /bin/sh.
function M.shquote(s)
  s = tostring(s)
  if s:match("^[%w%-_./=:@,+]+$") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- The keys of a set, sorted.
function M.sorted(set)
  local out = {}
  for k in pairs(set) do out[#out + 1] = k end
  table.sort(out)
  return out
end

function M.read_file(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

function M.write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

-- Where spec directories go: PUP_SPEC_TMPDIR (scripts/test.sh and mutants.sh give each run
-- one and remove it at the end, so what a killed test leaves goes with it), else /tmp.
local tmp_root = os.getenv("PUP_SPEC_TMPDIR") or "/tmp"

-- A new empty directory under the spec root; removed by M.rmdir.
function M.tmpdir()
  local p = assert(io.popen("mktemp -d " .. M.shquote(tmp_root .. "/pupspec.XXXXXX")))
  local dir = p:read("l")
  p:close()
  assert(dir and dir ~= "", "mktemp failed")
  return dir
end

function M.rmdir(dir)
  assert(dir:sub(1, #tmp_root + 9) == tmp_root .. "/pupspec." and not dir:find("/", #tmp_root + 2, true),
    "refusing to remove " .. tostring(dir))
  os.execute("rm -rf " .. M.shquote(dir))
end

-- Runs a command line with optional environment overrides and stdin text.
-- Returns {code=, stdout=, stderr=, output=stdout..stderr}.
function M.sh(cmdline, opts)
  opts = opts or {}
  local dir = M.tmpdir()
  -- Under the sanitizers the specs run with LD_PRELOAD=libasan (see spec/tests.cmake);
  -- child processes must not inherit it (psql hangs with it; the host binary links
  -- the runtime itself).
  local prefix = "env -u LD_PRELOAD "
  if opts.env then
    local parts = {}
    for k, v in pairs(opts.env) do
      if v == false then
        parts[#parts + 1] = "-u " .. k
      else
        parts[#parts + 1] = k .. "=" .. M.shquote(v)
      end
    end
    prefix = prefix .. table.concat(parts, " ") .. " "
  end
  local stdin = "/dev/null"
  if opts.stdin then
    stdin = dir .. "/stdin"
    M.write_file(stdin, opts.stdin)
  end
  local full = string.format("%s%s <%s >%s/out 2>%s/err", prefix, cmdline, stdin, dir, dir)
  local ok, how, code = os.execute(full)
  local r = { stdout = M.read_file(dir .. "/out"), stderr = M.read_file(dir .. "/err") }
  if how == "exit" then r.code = code else r.code = 128 + (code or 0) end
  r.ok = ok == true
  r.output = r.stdout .. r.stderr
  M.rmdir(dir)
  return r
end

-- Runs the host binary with the given arguments (a list of words, each quoted).
function M.run(args, opts)
  local words = { M.shquote(M.bin) }
  for _, a in ipairs(args or {}) do words[#words + 1] = M.shquote(a) end
  return M.sh(table.concat(words, " "), opts)
end

-- Writes `source` to a temporary script and runs it with the host binary.
function M.run_script(source, args, opts)
  local dir = M.tmpdir()
  local path = dir .. "/script.lua"
  M.write_file(path, source)
  local all = { path }
  for _, a in ipairs(args or {}) do all[#all + 1] = a end
  local r = M.run(all, opts)
  r.script = path
  M.rmdir(dir)
  return r
end

-- Bytes of a string as hex, for readable failure messages.
function M.hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- The table flags of the host binary (run/status/reset/migrate) for tables T (M.tables).
function M.table_flags(T)
  return { "--events-table", T.events_table, "--aggregate-heads-table", T.aggregate_heads_table,
           "--checkpoints-table", T.checkpoints_table }
end

-- A copy of the word list `args` followed by the table flags of T.
function M.with_tables(T, args)
  local all = {}
  for _, a in ipairs(args) do all[#all + 1] = a end
  for _, a in ipairs(M.table_flags(T)) do all[#all + 1] = a end
  return all
end

-- The first line a shell command prints (nil when none).
local function first_line(cmd)
  local p = assert(io.popen(cmd))
  local line = p:read("l")
  p:close()
  return line
end

function M.is_root() return first_line("id -u") == "0" end

-- The newest PostgreSQL server bin directory under /usr/lib/postgresql, or nil.
function M.pg_bindir()
  local d = first_line("ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1")
  if d == "" then return nil end
  return d
end

-- A spec area of busted specs with background processes and files: a fresh store on
-- tables t_<name>_* (M.fresh_store), the tables `drop` (a list) dropped, and a temp
-- directory. Returns store, db, table names, dir; M.close_area(db, dir) undoes it.
function M.fresh_area(name, drop)
  local store, db, T = M.fresh_store(name)
  for _, t in ipairs(drop or {}) do assert(db:exec("DROP TABLE IF EXISTS " .. t)) end
  return store, db, T, M.tmpdir()
end

function M.close_area(db, dir)
  db:close()
  M.rmdir(dir)
end

-- A projection for `pupsourcing run` (a template for spec/reliability/common.lua's
-- template(): %{NAME}, %{CNT}, %{SEEN}): a NON-idempotent counter (n = n + 1) plus a log
-- of handled positions, exact only if every event is handled exactly once. REL_SLEEP
-- (seconds per event) slows it down, REL_SETUP_SLEEP its setup.
M.COUNTER_TEMPLATE = [[
local sleep = tonumber(os.getenv("REL_SLEEP") or "")
local pup = require "pupsourcing"
return {
  name = "%{NAME}",
  batch_size = 100,
  setup = function(tx)
    assert(tx:exec("CREATE TABLE IF NOT EXISTS %{CNT} (agg text PRIMARY KEY, n bigint NOT NULL)"))
    assert(tx:exec("CREATE TABLE IF NOT EXISTS %{SEEN} (pos bigint NOT NULL, agg text NOT NULL)"))
    local setup_sleep = tonumber(os.getenv("REL_SETUP_SLEEP") or "")
    if setup_sleep then assert(tx:query("SELECT pg_sleep($1::float8) AS rel_setup_sleep", setup_sleep)) end
  end,
  handle = function(tx, e)
    assert(tx:exec("INSERT INTO %{CNT} AS c (agg, n) VALUES ($1, 1) ON CONFLICT (agg) DO UPDATE SET n = c.n + 1",
      e.aggregate_id))
    assert(tx:exec("INSERT INTO %{SEEN} (pos, agg) VALUES ($1, $2)", e.global_position, e.aggregate_id))
    if sleep then pup.sleep(sleep) end
  end,
}
]]

-- Background processes (spec/group_spec.lua, spec/group_netns.lua, spec/run_spec.lua,
-- spec/reliability/common.lua) ---------------------------------------------------------

-- Polls fn every `interval` seconds (0.05) until it returns a true value, which it
-- returns; raises after `seconds`. `what` may be a function returning the text of the
-- failure (called only on timeout).
function M.wait_until(what, seconds, fn, interval)
  local deadline = pup().now() + seconds
  while true do
    local v = fn()
    if v then return v end
    if pup().now() > deadline then
      error("timed out after " .. seconds .. " s waiting for " .. (type(what) == "function" and what() or what), 2)
    end
    pup().sleep(interval or 0.05)
  end
end

-- Starts `words` (program and arguments, each quoted here) in the background with
-- bash job control, so SIGINT is not ignored, and without LD_PRELOAD. opts.env adds
-- variables (false unsets one); opts.prefix (a list of words) runs before env, e.g. {"ip", "netns", "exec", ns}.
-- Returns {pid=, dir=} once the pid is known; pid is the program's own (sh execs it).
-- See M.exit_code, M.wait_exit, M.stderr_of, M.signal, M.reap.
function M.spawn(words, opts)
  opts = opts or {}
  local dir = M.tmpdir()
  local q = {}
  for _, w in ipairs(words) do q[#q + 1] = M.shquote(w) end
  local pre = {}
  for _, w in ipairs(opts.prefix or {}) do pre[#pre + 1] = M.shquote(w) end
  local envp = { "env", "-u", "LD_PRELOAD" }
  for k, v in pairs(opts.env or {}) do
    if v == false then envp[#envp + 1] = "-u " .. k else envp[#envp + 1] = k .. "=" .. M.shquote(v) end
  end
  local inner = ("%s %s sh -c 'echo $$ > %s/pid.tmp; mv %s/pid.tmp %s/pid; exec \"$@\"' sh %s >%s/out 2>%s/err;"
    .. " echo $? > %s/rc.tmp; mv %s/rc.tmp %s/rc"):format(table.concat(pre, " "), table.concat(envp, " "),
    dir, dir, dir, table.concat(q, " "), dir, dir, dir, dir, dir)
  os.execute("bash -c " .. M.shquote("set -m; (" .. inner .. ") </dev/null >/dev/null 2>&1 &"))
  local proc = { dir = dir }
  M.wait_until("a background process to start: " .. table.concat(q, " "), 10, function()
    local f = io.open(dir .. "/pid")
    if not f then return false end
    proc.pid = tonumber(f:read("l"))
    f:close()
    return proc.pid ~= nil
  end, 0.005)
  return proc
end

-- The exit code of a spawned process (128 + signal when killed), nil while it runs.
function M.exit_code(proc)
  local f = io.open(proc.dir .. "/rc")
  if not f then return nil end
  local rc = tonumber(f:read("l"))
  f:close()
  return rc
end

-- Waits up to `seconds` for a spawned process to exit; its exit code, or nil.
function M.wait_exit(proc, seconds)
  local deadline = pup().now() + seconds
  repeat
    local rc = M.exit_code(proc)
    if rc then return rc end
    pup().sleep(0.02)
  until pup().now() > deadline
  return nil
end

function M.stderr_of(proc) return M.read_file(proc.dir .. "/err") end
function M.stdout_of(proc) return M.read_file(proc.dir .. "/out") end

-- Sends SIG<sig> ("TERM" by default, "KILL", "STOP", "CONT", ...) to a spawned process
-- that runs.
function M.signal(proc, sig)
  if not M.exit_code(proc) then os.execute("kill -" .. (sig or "TERM") .. " " .. proc.pid .. " 2>/dev/null") end
end

-- Kills (SIGCONT first, in case it is stopped, then SIGKILL) a spawned process if it
-- still runs, waits for it and removes its directory.
function M.reap(proc)
  if not M.exit_code(proc) then
    os.execute("kill -CONT " .. proc.pid .. " 2>/dev/null; kill -KILL " .. proc.pid .. " 2>/dev/null")
    M.wait_exit(proc, 5)
  end
  M.rmdir(proc.dir)
end

-- Worker groups (spec/group_spec.lua, spec/group_netns.lua) --------------------------
-- M.group(prefix, opts) makes an area: a fresh store on tables t_<prefix>_*, a
-- NON-idempotent counter projection "grp_counter" (read model t_<prefix>_counter: n per
-- aggregate; t_<prefix>_seen: one row per handled event with position, transaction and
-- worker pid) written to a file, and helpers to start `run --group` workers and writers
-- and to look at leases. Plain errors, no luassert: the netns test runs outside busted.

local GROUP_FIXTURE = [==[
-- generated by spec/helpers.lua (M.group): FX_SLEEP = seconds per event
local pup = require "pupsourcing"
local sleep = tonumber(os.getenv("FX_SLEEP") or "")
local f = assert(io.open("/proc/self/stat"))
local pid = f:read("l"):match("^(%d+)")
f:close()
local C, S = "@C@", "@S@"
local function tables(tx)
  assert(tx:exec("CREATE TABLE IF NOT EXISTS " .. C .. " (agg text PRIMARY KEY, n bigint NOT NULL)"))
  assert(tx:exec("CREATE TABLE IF NOT EXISTS " .. S .. " (pos bigint NOT NULL, agg text NOT NULL, xid text NOT NULL, pid int NOT NULL)"))
end
return {
  name = "grp_counter",
  batch_size = @BATCH@,
  setup = function(tx)
    tables(tx)
    -- session-wide (survives the commit): lets a test find this worker's backend
    assert(tx:exec("SET application_name = 'grp-" .. pid .. "'"))
  end,
  handle = function(tx, e)
    -- a window read for other partitions carries no payloads (src/batch.c, read_ahead)
    assert(e.payload, "event " .. e.global_position .. " came without its payload")
    assert(tx:exec("INSERT INTO " .. C .. " (agg, n) VALUES ($1, 1) ON CONFLICT (agg) DO UPDATE SET n = " .. C .. ".n + 1",
      e.aggregate_id))
    assert(tx:exec("INSERT INTO " .. S .. " (pos, agg, xid, pid) VALUES ($1, $2, pg_current_xact_id()::text, $3)",
      e.global_position, e.aggregate_id, pid))
    if sleep then pup.sleep(sleep) end
  end,
  reset = function(tx)
    tables(tx)
    assert(tx:exec("DELETE FROM " .. C))
    assert(tx:exec("DELETE FROM " .. S))
  end,
}
]==]

-- A writer: appends `per` events to each of `naggs` aggregates <prefix>1.., `chunk`
-- events per append, round robin, pausing `pause` s between appends until the file
-- <fast> exists; then it writes the rest at once. Prints "done N" and exits 0.
local GROUP_WRITER = [==[
local pup = require "pupsourcing"
local url, ev, hd, ck, prefix, naggs, per, chunk, pause, fast = table.unpack(arg)
naggs, per, chunk, pause = tonumber(naggs), tonumber(per), tonumber(chunk), tonumber(pause)
local db = assert(pup.connect(url))
local store = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
local n = 0
for round = 1, per // chunk do
  for a = 1, naggs do
    local evs = {}
    for i = 1, chunk do
      evs[i] = { aggregate_type = "User", aggregate_id = prefix .. a, event_type = "W",
                 payload = { round = round, i = i } }
    end
    assert(store:append(db, pup.any(), evs))
    n = n + chunk
    local f = io.open(fast)
    if f then f:close() else pup.sleep(pause) end
  end
end
print("done " .. n)
]==]

local G = {}
G.__index = G

function M.group(prefix, opts)
  opts = opts or {}
  local g = setmetatable({ prefix = prefix, url = opts.url or M.url(), ttl = opts.ttl or 2000,
                           partitions = opts.partitions or 8, procs = {}, writers = {} }, G)
  local db = M.connect(g.url)
  local t = M.tables(prefix)
  for _, tbl in ipairs { t.checkpoints_table .. "_workers", t.checkpoints_table .. "_groups",
                         "t_" .. prefix .. "_counter", "t_" .. prefix .. "_seen" } do
    assert(db:exec('DROP TABLE IF EXISTS "' .. tbl .. '"'))
  end
  g.store, g.db, g.names = M.fresh_store(prefix, db)
  g.counter, g.seen = "t_" .. prefix .. "_counter", "t_" .. prefix .. "_seen"
  g.workers_table, g.groups_table = t.checkpoints_table .. "_workers", t.checkpoints_table .. "_groups"
  assert(db:exec("CREATE TABLE " .. g.counter .. " (agg text PRIMARY KEY, n bigint NOT NULL)"))
  assert(db:exec("CREATE TABLE " .. g.seen .. " (pos bigint NOT NULL, agg text NOT NULL, xid text NOT NULL, pid int NOT NULL)"))
  g.dir = M.tmpdir()
  os.execute("chmod 755 " .. g.dir) -- readable by processes in other namespaces too
  g.file = g.dir .. "/grp_counter.lua"
  M.write_file(g.file, (GROUP_FIXTURE:gsub("@C@", g.counter):gsub("@S@", g.seen)
    :gsub("@BATCH@", tostring(opts.batch_size or 100))))
  g.writer_file = g.dir .. "/writer.lua"
  M.write_file(g.writer_file, GROUP_WRITER)
  g.fast = g.dir .. "/fast"
  g.flags = { "--database-url", g.url, "--events-table", t.events_table, "--aggregate-heads-table",
              t.aggregate_heads_table, "--checkpoints-table", t.checkpoints_table }
  return g
end

function G:q(sql, ...)
  local r, err = self.db:query(sql, ...)
  if not r then error(tostring(err), 2) end
  return r
end
function G:one(sql, ...) return self:q(sql, ...)[1] end

-- The pupsourcing arguments `args` plus this area's tables and database.
function G:args(args)
  local all = {}
  for _, a in ipairs(args) do all[#all + 1] = a end
  for _, a in ipairs(self.flags) do all[#all + 1] = a end
  return all
end

-- Runs `pupsourcing <args> <tables>` to completion (M.run's result).
function G:cli(args, opts) return M.run(self:args(args), opts) end

-- naggs aggregates <prefix>1.. with `per` events each, appended at once.
function G:append(prefix, naggs, per)
  for a = 1, naggs do
    local evs = {}
    for i = 1, per do
      evs[i] = { aggregate_type = "User", aggregate_id = prefix .. a, event_type = "S", payload = { i = i } }
    end
    assert(self.store:append(self.db, pup().any(), evs))
  end
end

-- Starts `run --group` worker; opts.env (e.g. FX_SLEEP), opts.prefix (words before it),
-- opts.args (more flags). Returns the process (see M.spawn).
function G:worker(opts)
  opts = opts or {}
  local words = { M.bin, "run", "--group", "--partitions", tostring(self.partitions),
                  "--lease-ttl", tostring(self.ttl), "--poll-interval", "100" }
  for _, a in ipairs(opts.args or {}) do words[#words + 1] = a end
  for _, a in ipairs(self.flags) do words[#words + 1] = a end
  words[#words + 1] = self.file
  local p = M.spawn(words, { env = opts.env, prefix = opts.prefix })
  self.procs[#self.procs + 1] = p
  return p
end

-- Starts a writer (see GROUP_WRITER): naggs aggregates <prefix>1.. of `per` events.
function G:writer(prefix, naggs, per, chunk, pause, spawn_opts)
  local t = M.tables(self.prefix)
  local p = M.spawn({ M.bin, self.writer_file, self.url, t.events_table, t.aggregate_heads_table,
                      t.checkpoints_table, prefix, tostring(naggs), tostring(per), tostring(chunk),
                      tostring(pause), self.fast }, spawn_opts)
  self.procs[#self.procs + 1] = p
  self.writers[#self.writers + 1] = p
  return p
end

-- Lets the writers write the rest at once and waits for them (raises unless all exit 0).
function G:finish_writers(seconds)
  M.write_file(self.fast, "")
  for _, w in ipairs(self.writers) do
    local rc = M.wait_exit(w, seconds or 30)
    if rc ~= 0 then error(("writer exited %s: %s"):format(tostring(rc), M.stderr_of(w)), 2) end
  end
end

function G:head()
  return self:one(('SELECT COALESCE(max(global_position), 0)::bigint AS h FROM "%s"'):format(self.names.events_table)).h
end

-- The group's partition count and previous count (nil when settled), from <ck>_groups.
function G:total()
  local r = self:one(('SELECT total_partitions AS t, previous_total AS p FROM "%s" WHERE projection_name = $1')
    :format(self.groups_table), "grp_counter")
  if not r then return nil end
  return r.t, r.p ~= pup().null and r.p or nil
end

-- Pid of an owner id host/pid/random.
function M.owner_pid(owner) return tonumber(tostring(owner):match("/(%d+)/%x+$")) end

-- The live leases of the group's current partition count: {total=, owner={[k]=pid},
-- pos={[k]=checkpoint}, by={[pid]={k,...}}}.
function G:leases()
  local total = self:total() or self.partitions
  local rows = self:q(('SELECT partition_key AS k, last_global_position AS pos,'
    .. ' CASE WHEN owner IS NOT NULL AND lease_expires_at > clock_timestamp() THEN owner END AS owner'
    .. ' FROM "%s" WHERE projection_name = $1 AND total_partitions = $2 ORDER BY partition_key')
    :format(self.names.checkpoints_table), "grp_counter", total)
  local l = { total = total, owner = {}, pos = {}, by = {}, rows = #rows }
  for _, r in ipairs(rows) do
    l.pos[r.k] = r.pos
    if r.owner ~= pup().null then
      local pid = M.owner_pid(r.owner)
      l.owner[r.k] = pid
      l.by[pid] = l.by[pid] or {}
      table.insert(l.by[pid], r.k)
    end
  end
  return l
end

-- A readable picture of the group for failure messages.
function G:describe()
  local l = self:leases()
  local parts = {}
  for k = 0, l.total - 1 do
    parts[#parts + 1] = ("%d:%s@%s"):format(k, tostring(l.owner[k] or "-"), tostring(l.pos[k]))
  end
  local ws = {}
  for _, w in ipairs(self:q(('SELECT worker_id, round(extract(epoch FROM clock_timestamp() - heartbeat_at)::numeric, 2)::text AS age FROM "%s"'
    .. ' WHERE projection_name = $1 ORDER BY worker_id'):format(self.workers_table), "grp_counter")) do
    ws[#ws + 1] = ("%s(%ss)"):format(w.worker_id, w.age)
  end
  local t, prev = self:total()
  return ("partitions %s (previous %s), head %d; leases [%s]; workers [%s]"):format(tostring(t), tostring(prev),
    self:head(), table.concat(parts, " "), table.concat(ws, " "))
end

-- Settled on `procs`: every partition of the current count leased, by exactly these
-- processes, each holding floor(total/n) or one more (fair: no one more than one above
-- another). Returns ok, why.
function G:settled(procs)
  local l = self:leases()
  if l.rows ~= l.total then return false, ("%d checkpoint rows for %d partitions"):format(l.rows, l.total) end
  local want = {}
  for _, p in ipairs(procs) do want[p.pid] = true end
  for k = 0, l.total - 1 do
    if not l.owner[k] then return false, "partition " .. k .. " not leased" end
    if not want[l.owner[k]] then return false, ("partition %d leased by pid %d, not a live worker"):format(k, l.owner[k]) end
  end
  local lo, hi = math.huge, 0
  for _, p in ipairs(procs) do
    local n = l.by[p.pid] and #l.by[p.pid] or 0
    lo, hi = math.min(lo, n), math.max(hi, n)
  end
  if hi - lo > 1 or lo < l.total // #procs then return false, ("unfair shares: %d..%d"):format(lo, hi) end
  return true
end

-- The pid, exit code and last stderr lines of each process, for failure messages.
function G:procs_text(procs)
  local out = {}
  for _, p in ipairs(procs or self.procs) do
    local err = M.stderr_of(p)
    local tail = {}
    for line in err:gmatch("[^\n]+") do tail[#tail + 1] = line end
    out[#out + 1] = ("pid %d (exit %s): %s"):format(p.pid, tostring(M.exit_code(p)),
      table.concat(tail, " | ", math.max(1, #tail - 3)))
  end
  return table.concat(out, "\n  ")
end

function G:wait_settled(procs, seconds, what)
  local why
  M.wait_until(function() return (what or "the group to settle") .. " on " .. #procs .. " worker(s): "
    .. tostring(why) .. "; " .. self:describe() .. "\n  " .. self:procs_text() end, seconds, function()
    local ok, w = self:settled(procs)
    why = w
    return ok
  end)
end

-- The backend xid of a worker's open transaction that wrote (nil if none). uncommitted:
-- not one whose backend runs the COMMIT the worker sent before it was stopped or cut off
-- (a slow WAL flush): that one commits under a valid lease, as it should.
function G:open_xid(proc, uncommitted)
  local r = self:one("SELECT backend_xid::text AS x FROM pg_stat_activity WHERE application_name = $1"
    .. " AND backend_xid IS NOT NULL" .. (uncommitted and " AND NOT (state = 'active' AND query ILIKE 'commit%')" or ""),
    "grp-" .. proc.pid)
  return r and r.x or nil
end

-- After the worker was stopped or cut off, the xid of its open transaction that is not
-- committing and stays so (a COMMIT still on its way would have arrived); nil if none.
function G:halted_xid(proc)
  local xid = self:open_xid(proc, true)
  if not xid then return nil end
  pup().sleep(0.1)
  return self:open_xid(proc, true) == xid and xid or nil
end

-- Rows of the seen log written by transaction xid (a 32-bit xid from pg_stat_activity).
function G:rows_of_xid(xid)
  return self:one(("SELECT count(*) AS n FROM %s WHERE (xid::numeric %% 4294967296)::text = $1"):format(self.seen), xid).n
end

-- Every checkpoint of the current count at the head, nothing left of a previous count.
function G:caught_up()
  local t, prev = self:total()
  if prev then return false end
  local r = self:one(('SELECT count(*) AS n, COALESCE(min(last_global_position), 0) AS lo,'
    .. ' count(*) FILTER (WHERE total_partitions <> $2) AS other FROM "%s" WHERE projection_name = $1')
    :format(self.names.checkpoints_table), "grp_counter", t or self.partitions)
  return r.n == t and r.other == 0 and r.lo == self:head()
end

-- The read model is exact: each aggregate counted once per event, each position
-- handled once (no duplicates, none missing). Returns ok, why.
function G:exact()
  local bad = self:one(("SELECT count(*) AS n FROM (SELECT aggregate_id, count(*) AS n FROM \"%s\" GROUP BY aggregate_id) e"
    .. " FULL JOIN %s c ON c.agg = e.aggregate_id WHERE c.n IS DISTINCT FROM e.n"):format(self.names.events_table, self.counter)).n
  local s = self:one(("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM %s"):format(self.seen))
  local missing = self:one(('SELECT count(*) AS n FROM "%s" e WHERE NOT EXISTS (SELECT 1 FROM %s s WHERE s.pos = e.global_position)')
    :format(self.names.events_table, self.seen)).n
  local head = self:head()
  local events = self:one(('SELECT count(*) AS n FROM "%s"'):format(self.names.events_table)).n
  if bad ~= 0 or s.n ~= events or s.d ~= events or missing ~= 0 then
    local dups = self:q(("SELECT pos, count(*) AS n, string_agg(pid::text || '/' || xid, ',') AS by FROM %s GROUP BY pos HAVING count(*) > 1 ORDER BY pos LIMIT 5"):format(self.seen))
    local d = {}
    for _, r in ipairs(dups) do d[#d + 1] = ("%d x%d by %s"):format(r.pos, r.n, r.by) end
    local gaps = self:q(('SELECT min(e.global_position) AS lo, max(e.global_position) AS hi, e.aggregate_id AS agg, count(*) AS n'
      .. ' FROM "%s" e WHERE NOT EXISTS (SELECT 1 FROM %s s WHERE s.pos = e.global_position)'
      .. ' GROUP BY e.aggregate_id ORDER BY 1 LIMIT 5'):format(self.names.events_table, self.seen))
    local m = {}
    for _, r in ipairs(gaps) do
      local near = self:q(("SELECT pos, pid, xid FROM %s WHERE pos BETWEEN $1 - 3 AND $2 + 3 ORDER BY pos"):format(self.seen), r.lo, r.hi)
      local nb = {}
      for _, x in ipairs(near) do nb[#nb + 1] = ("%d:%d/%s"):format(x.pos, x.pid, x.xid) end
      m[#m + 1] = ("%s partition %d/%d: %d missing in %d..%d (near: %s)"):format(r.agg,
        pup().partition_of(r.agg, self.partitions or 8), self.partitions or 8, r.n, r.lo, r.hi, table.concat(nb, " "))
    end
    return false, ("read model not exact: %d aggregate(s) miscounted, %d handled rows for %d events (%d distinct), %d event(s) never handled, head %d; duplicates: %s; missing: %s")
      :format(bad, s.n, events, s.d, missing, head, table.concat(d, "; "), table.concat(m, "; "))
  end
  return true
end

-- Stops every process left (SIGCONT + SIGKILL), closes the connection, removes files.
function G:close()
  for _, p in ipairs(self.procs) do M.reap(p) end
  self.procs = {}
  if self.db then self.db:close() self.db = nil end
  if self.dir then M.rmdir(self.dir) self.dir = nil end
end

math.randomseed(os.time(), tonumber(tostring({}):match("0x(%x+)") or "1", 16) or 1)

package.loaded["spec.helpers"] = M
-- A fixture for specs that run `pupsourcing run` on projection `name`, which writes each
-- handled position to t_<prefix>_seen (pos): a fresh store, that table, a scratch directory
-- with the projection as <prefix>.lua, and the processes it spawned, which :close() reaps.
-- Fields: store, db, T (table names), dir, file.
local Fixture = {}
Fixture.__index = Fixture

function M.processor_fixture(prefix, name)
  local f = setmetatable({ procs = {}, seen_table = "t_" .. prefix .. "_seen" }, Fixture)
  f.store, f.db, f.T = M.fresh_store(prefix)
  assert(f.db:exec("DROP TABLE IF EXISTS " .. f.seen_table))
  assert(f.db:exec("CREATE TABLE " .. f.seen_table .. " (pos bigint NOT NULL)"))
  f.dir = M.tmpdir()
  f.file = f.dir .. "/" .. prefix .. ".lua"
  M.write_file(f.file, ([[
return { name = %q, handle = function(tx, e)
  assert(tx:exec("INSERT INTO %s (pos) VALUES ($1)", e.global_position)) end }
]]):format(name, f.seen_table))
  return f
end

-- M.spawn(words), reaped by :close().
function Fixture:spawn(words)
  local p = M.spawn(words)
  self.procs[#self.procs + 1] = p
  return p
end

-- Spawns `pupsourcing run --poll-interval poll_ms FILE` on the store's tables (FILE: the
-- fixture's projection unless given).
function Fixture:run(poll_ms, file)
  local words = { M.bin }
  for _, a in ipairs(M.with_tables(self.T, { "run", "--poll-interval", tostring(poll_ms), file or self.file })) do
    words[#words + 1] = a
  end
  return self:spawn(words)
end

-- The rows of the seen table (those of position pos when given).
function Fixture:seen(pos)
  if pos then
    return assert(self.db:query("SELECT count(*) AS n FROM " .. self.seen_table .. " WHERE pos = $1", pos))[1].n
  end
  return assert(self.db:query("SELECT count(*) AS n FROM " .. self.seen_table))[1].n
end

function Fixture:close()
  for _, p in ipairs(self.procs) do M.reap(p) end
  self.db:close()
  M.rmdir(self.dir)
end

return M
