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
  for _, tbl in ipairs { t.events_table, t.aggregate_heads_table, t.checkpoints_table } do
    assert(db:exec('DROP TABLE IF EXISTS "' .. tbl .. '" CASCADE'))
  end
  assert(db:exec('DROP SEQUENCE IF EXISTS "' .. t.events_table .. '_global_position_seq" CASCADE'))
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

-- A new empty directory under /tmp; removed by M.rmdir.
function M.tmpdir()
  local p = assert(io.popen("mktemp -d /tmp/pupspec.XXXXXX"))
  local dir = p:read("l")
  p:close()
  assert(dir and dir ~= "", "mktemp failed")
  return dir
end

function M.rmdir(dir)
  assert(dir:match("^/tmp/pupspec%."), "refusing to remove " .. tostring(dir))
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

-- Background processes (spec/group_spec.lua, spec/group_netns.lua) ---------------------

-- Polls fn every `interval` seconds (0.05) until it returns true; raises after `seconds`.
-- `what` may be a function returning the text of the failure (called only on timeout).
function M.wait_until(what, seconds, fn, interval)
  local deadline = pup().now() + seconds
  while not fn() do
    if pup().now() > deadline then
      error("timed out after " .. seconds .. " s waiting for " .. (type(what) == "function" and what() or what), 2)
    end
    pup().sleep(interval or 0.05)
  end
end

-- Starts `words` (program and arguments, each quoted here) in the background with
-- bash job control, so SIGINT is not ignored, and without LD_PRELOAD. opts.env adds
-- variables; opts.prefix (a list of words) runs before env, e.g. {"ip", "netns", "exec", ns}.
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
  for k, v in pairs(opts.env or {}) do envp[#envp + 1] = k .. "=" .. M.shquote(v) end
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
  end, 0.01)
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

-- Sends SIG<sig> ("TERM", "KILL", "STOP", "CONT", ...) to a spawned process that runs.
function M.signal(proc, sig)
  if not M.exit_code(proc) then os.execute("kill -" .. sig .. " " .. proc.pid .. " 2>/dev/null") end
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

math.randomseed(os.time(), tonumber(tostring({}):match("0x(%x+)") or "1", 16) or 1)

package.loaded["spec.helpers"] = M
return M
