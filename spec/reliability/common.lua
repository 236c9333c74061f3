-- Shared tools of the reliability specs (issue 5): background processes, waiting, /proc
-- sampling, projection files written from templates, and a private PostgreSQL server.
-- Required as `require "spec.reliability.common"` (busted runs from the source directory).
local pup = require "pupsourcing"
local H = require "spec.helpers"

local M = {}

-- Polls fn every `interval` seconds (0.02) until it returns a true value (returned).
function M.wait_until(what, seconds, fn, interval) return H.wait_until(what, seconds, fn, interval or 0.02) end

-- Starts argv (a list of words; argv[1] is the program) in the background (H.spawn), with
-- extra environment `env` (a table; false unsets). Returns a process object:
--   p.pid, p.dir; p:code() (exit code, 128+signal, or nil while running); p:wait(seconds);
--   p:stderr(), p:stdout(); p:kill(sig); p:alive().
local Proc = {}
Proc.__index = Proc

M.spawned = {}

function M.spawn(argv, env)
  local p = setmetatable(H.spawn(argv, { env = env }), Proc)
  p.argv = argv
  M.spawned[#M.spawned + 1] = p
  return p
end

Proc.code, Proc.wait, Proc.stderr, Proc.stdout, Proc.kill = H.exit_code, H.wait_exit, H.stderr_of, H.stdout_of, H.signal
function Proc:alive() return self:code() == nil end

-- Kills (SIGKILL) whatever is still running and removes the directories.
function M.cleanup()
  for _, p in ipairs(M.spawned) do
    if p:alive() then
      p:kill("KILL")
      p:wait(5)
    end
    if not os.getenv("PUP_REL_KEEP") then H.rmdir(p.dir) end
  end
  M.spawned = {}
end

-- The host binary with arguments: a word list for spawn.
function M.pup_argv(args)
  local argv = { H.bin }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return argv
end

-- /proc sample of a process: rss and hwm in kB, fds, threads; nil when it is gone.
function M.sample(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  local out = {
    rss = tonumber(s:match("VmRSS:%s*(%d+)")),
    hwm = tonumber(s:match("VmHWM:%s*(%d+)")),
    threads = tonumber(s:match("Threads:%s*(%d+)")),
  }
  local p = io.popen("ls /proc/" .. pid .. "/fd 2>/dev/null | wc -l")
  out.fds = tonumber(p:read("l"))
  p:close()
  if not out.rss then return nil end
  return out
end

-- Writes `text` (with %{KEY} replaced by vars[KEY]) to dir/name; returns the path.
function M.template(dir, name, text, vars)
  local body = text:gsub("%%{([%w_]+)}", function(k)
    local v = vars[k]
    assert(v ~= nil, "template variable " .. k)
    return tostring(v)
  end)
  local path = dir .. "/" .. name
  H.write_file(path, body)
  return path
end

-- Table flags for the host binary (run/status/reset) of a spec area's tables.
M.table_flags = H.table_flags

-- Appends n events to aggregates "<prefix>1".."<prefix>naggs" round robin, `per` per append.
-- Payload {x = global counter}. Returns the head.
function M.populate(store, db, n, naggs, per, prefix)
  per = per or 500
  prefix = prefix or "agg-"
  local done, a = 0, 0
  while done < n do
    a = a % naggs + 1
    local k = math.min(per, n - done)
    local evs = {}
    for i = 1, k do
      evs[i] = { aggregate_type = "Counter", aggregate_id = prefix .. a, event_type = "Tick",
                 payload = { x = done + i } }
    end
    assert(store:append(db, pup.any(), evs))
    done = done + k
  end
  return assert(store:head(db))
end

function M.checkpoint(db, T, name, key, total)
  local r = assert(db:query(('SELECT last_global_position AS p FROM "%s" WHERE projection_name = $1'
    .. ' AND partition_key = $2 AND total_partitions = $3'):format(T.checkpoints_table), name, key or 0, total or 1))
  return r[1] and r[1].p or 0
end

function M.one(db, sql, ...)
  return assert(db:query(sql, ...))[1]
end

-- Appends a line to the figures file (PUP_REL_REPORT, default build/reliability-figures.txt)
-- that docs/reliability.md is written from.
function M.report(fmt, ...)
  local path = os.getenv("PUP_REL_REPORT") or (H.binary_dir .. "/reliability-figures.txt")
  local f = io.open(path, "a")
  local line = ("[%s] " .. fmt):format(os.date("!%Y-%m-%dT%H:%M:%SZ"), ...)
  if f then
    f:write(line, "\n")
    f:close()
  end
  io.stderr:write(line, "\n")
end

-- ---- a private PostgreSQL server the spec may restart ----

local function port_free(port)
  return not os.execute(("(exec 3<>/dev/tcp/127.0.0.1/%d) 2>/dev/null"):format(port))
end

local function sh_ok(cmd)
  local ok = os.execute(cmd)
  return ok == true
end

-- Starts a server in a new temp dir with scripts/pg.sh on a free port; returns
-- {url=, dir=, port=} with :stop(mode), :start(), :restart(mode, down_seconds), :destroy().
local Server = {}
Server.__index = Server

function M.server()
  local base = H.tmpdir()
  os.execute("chmod 755 " .. base)
  local port
  for _ = 1, 200 do
    local p = math.random(55000, 59999)
    if port_free(p) then port = p break end
  end
  assert(port, "no free port")
  local s = setmetatable({ base = base, dir = base .. "/data", port = port }, Server)
  s:start()
  return s
end

function Server:as_pg(cmd)
  if H.is_root() then return "runuser -u postgres -- " .. cmd end
  return cmd
end

function Server:start()
  local p = io.popen(("env -u LD_PRELOAD bash %s/scripts/pg.sh start %s %d 2>&1"):format(
    H.shquote(H.source_dir), H.shquote(self.dir), self.port))
  local out = p:read("a")
  p:close()
  local url = out:match("(postgresql://%S+)")
  assert(url, "scripts/pg.sh start failed: " .. out)
  self.url = url
  return url
end

-- pg_ctl stop with the given mode (fast | immediate | smart), as scripts/pg.sh runs pg_ctl.
function Server:stop(mode)
  local cmd = ("env -u LD_PRELOAD %s -D %s -m %s -w -t 60 stop >/dev/null 2>&1"):format(
    H.pg_bindir() .. "/pg_ctl", H.shquote(self.dir), mode or "fast")
  assert(sh_ok(self:as_pg(cmd)), "pg_ctl stop -m " .. tostring(mode) .. " failed")
end

function Server:restart(mode, down_seconds)
  self:stop(mode)
  if down_seconds and down_seconds > 0 then pup.sleep(down_seconds) end
  return self:start()
end

function Server:destroy()
  pcall(function() self:stop("immediate") end)
  H.rmdir(self.base)
end

return M
