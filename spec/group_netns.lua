-- Issue 7, workers as separate hosts: run by the host binary (`pupsourcing spec/group_netns.lua`,
-- registered by spec/group.cmake as ctest test group.netns; exit 77 = skipped).
--
-- Makes a private network: a bridge with 10.231.N.1/24 (N random, unused) in the root
-- namespace, three network namespaces each joined to it by a veth pair (10.231.N.11..13),
-- and its own PostgreSQL listening on 10.231.N.1 only (pg_hba: trust for 10.231.N.0/24).
-- One `run --group` worker runs in each namespace (`ip netns exec`). Worker 2 is cut off
-- (its veth link down) while inside a batch: the others must hold and move on its
-- partitions after the lease TTL, the cut-off one must commit nothing afterwards (its open
-- transaction never commits: lease fence), and after the link is back everything ends
-- exact. Everything made here is removed at the end, whatever happens.
local src = os.getenv("PUP_SOURCE_DIR") or "."
package.path = src .. "/?.lua;" .. package.path
local pup = require "pupsourcing"
local H = require "spec.helpers"

local TTL = 2000
local SKIP = 77

local function log(fmt, ...) io.stderr:write("group_netns: ", fmt:format(...), "\n") end
local started = false -- once resources exist, a skip unwinds through the cleanup
local function skip(why)
  if started then error({ skip = why }, 0) end
  print("SKIP: " .. why)
  log("SKIP: %s", why)
  os.exit(SKIP)
end

-- Runs a shell command; returns ok, output.
local function sh(cmd)
  local r = H.sh(cmd)
  return r.code == 0, r.output
end
local function must(cmd)
  local ok, out = sh(cmd)
  if not ok then error(cmd .. " failed: " .. out, 2) end
  return out
end

-- ---- can we? ----
if not H.is_root() then skip("network namespaces need root (CAP_NET_ADMIN/CAP_SYS_ADMIN); running as non-root") end
if not sh("ip -V") then skip("`ip` (iproute2) is not installed") end
local bindir = H.pg_bindir()
if not bindir then skip("PostgreSQL server binaries not found under /usr/lib/postgresql") end

local id = ("%04x"):format(math.random(0, 0xffff))
local NS, HOST_IF, NS_IF = {}, {}, {}
for i = 1, 3 do
  NS[i] = "pupg" .. id .. "w" .. i
  HOST_IF[i] = "pg" .. id .. "h" .. i -- 8 characters: below the 15 of IFNAMSIZ
  NS_IF[i] = "pg" .. id .. "n" .. i
end
local BR = "pgb" .. id
local subnet
for _ = 1, 50 do
  local n = math.random(1, 254)
  local ok, out = sh("ip -o -4 addr show; ip -4 route show")
  if ok and not out:find("10%.231%." .. n .. "%.") then subnet = n break end
end
if not subnet then skip("no free 10.231.N.0/24 subnet") end
local NET = "10.231." .. subnet
local DB_ADDR = NET .. ".1"

-- ---- cleanup (always) ----
local made = { ns = {}, links = {} }
local pgdir, g
local function cleanup()
  if g then pcall(function() g:close() end) g = nil end
  for _, ns in ipairs(made.ns) do sh("ip netns pids " .. ns .. " | xargs -r kill -KILL; ip netns del " .. ns) end
  for _, l in ipairs(made.links) do sh("ip link del " .. l .. " 2>/dev/null") end
  if pgdir then
    sh(("runuser -u postgres -- %s/pg_ctl -D %s/data -m immediate -w stop"):format(bindir, pgdir))
    H.rmdir(pgdir)
  end
end

local function network()
  local ok, out = sh("ip netns add " .. NS[1])
  if not ok then skip("`ip netns add` is not permitted here: " .. out:gsub("%s+$", "")) end
  made.ns[1] = NS[1]
  ok, out = sh(("ip link add %s type bridge"):format(BR))
  if not ok then skip("cannot create a bridge: " .. out:gsub("%s+$", "")) end
  made.links[#made.links + 1] = BR
  must(("ip addr add %s/24 dev %s && ip link set %s up"):format(DB_ADDR, BR, BR))
  for i = 1, 3 do
    if i > 1 then
      must("ip netns add " .. NS[i])
      made.ns[i] = NS[i]
    end
    ok, out = sh(("ip link add %s type veth peer name %s"):format(HOST_IF[i], NS_IF[i]))
    if not ok then skip("cannot create veth pairs: " .. out:gsub("%s+$", "")) end
    made.links[#made.links + 1] = HOST_IF[i]
    must(("ip link set %s netns %s"):format(NS_IF[i], NS[i]))
    must(("ip link set %s master %s && ip link set %s up"):format(HOST_IF[i], BR, HOST_IF[i]))
    must(("ip netns exec %s sh -c 'ip link set lo up && ip addr add %s.%d/24 dev %s && ip link set %s up'")
      :format(NS[i], NET, 10 + i, NS_IF[i], NS_IF[i]))
  end
end

local function reachable()
  for i = 1, 3 do
    H.wait_until("namespace " .. i .. " to reach " .. DB_ADDR .. ":5432", 10, function()
      return sh(("ip netns exec %s timeout 2 bash -c 'exec 3<>/dev/tcp/%s/5432'"):format(NS[i], DB_ADDR))
    end, 0.2)
  end
end

local function postgres()
  pgdir = H.tmpdir()
  must("chmod 755 " .. pgdir .. " && mkdir " .. pgdir .. "/data && chown postgres: " .. pgdir .. "/data && chmod 700 " .. pgdir .. "/data")
  local as = "runuser -u postgres -- "
  must(("%s%s/initdb -D %s/data -U postgres --auth=trust -E UTF8 --locale=C"):format(as, bindir, pgdir))
  local hba = io.open(pgdir .. "/data/pg_hba.conf", "a")
  hba:write(("host all all %s.0/24 trust\n"):format(NET))
  hba:close()
  must(("%s%s/pg_ctl -D %s/data -w -t 60 -l %s/data/server.log -o \"-p 5432 -c listen_addresses=%s"
    .. " -c unix_socket_directories='' -c max_connections=100\" start"):format(as, bindir, pgdir, pgdir, DB_ADDR))
  must(("%s%s/createdb -h %s -p 5432 -U postgres pupsourcing"):format(as, bindir, DB_ADDR))
  return ("postgresql://postgres@%s:5432/pupsourcing"):format(DB_ADDR)
end

local function seen_by(pid)
  return g:one(("SELECT count(*) AS n FROM %s WHERE pid = $1"):format(g.seen), pid).n
end

local function check(cond, msg)
  if not cond then error(msg, 2) end
end

local problems = {}
local function soft(what, fn)
  local ok, err = pcall(fn)
  if not ok then
    problems[#problems + 1] = what .. ": " .. tostring(err)
    log("FAILED %s", problems[#problems])
  end
end

local function main()
  network()
  local url = postgres()
  reachable()
  log("network %s.0/24, database %s, namespaces %s", NET, url, table.concat(NS, " "))
  g = H.group("grp_netns", { url = url, ttl = TTL, partitions = 6, batch_size = 100 })
  g:append("s-", 100, 100) -- 10,000
  g:writer("w-", 100, 100, 25, 0.03) -- 10,000 more, from the database's host
  local ENV = { FX_SLEEP = "0.0003" }
  local w = {}
  for i = 1, 3 do w[i] = g:worker { prefix = { "ip", "netns", "exec", NS[i] }, env = ENV } end
  g:wait_settled(w, 15, "three workers in three namespaces to share 6 partitions")
  H.wait_until("worker 2 to handle events", 10, function() return seen_by(w[2].pid) > 0 end)

  -- cut worker 2 off while it is inside a batch (appending more when the group has caught
  -- up before that happened: a fast group can finish the log between two attempts)
  local xid, extra = nil, 0
  for attempt = 1, 50 do
    if g:caught_up() then
      g:append(("x%d-"):format(attempt), 30, 20)
      extra = extra + 600
    end
    H.wait_until("worker 2 to be in a batch", 10, function() return g:open_xid(w[2]) ~= nil end, 0.005)
    must("ip link set " .. HOST_IF[2] .. " down")
    pup.sleep(0.05)
    xid = g:halted_xid(w[2])
    if xid then break end
    must("ip link set " .. HOST_IF[2] .. " up")
    pup.sleep(0.3)
  end
  check(xid, "could not cut worker 2 off inside a batch")
  local cut_at = pup.now()
  local l = g:leases()
  local p2, before = l.by[w[2].pid] or {}, {}
  for _, k in ipairs(p2) do before[k] = l.pos[k] end
  local seen2 = seen_by(w[2].pid)
  log("cut off worker 2 (pid %d, partitions %s, open transaction %s)", w[2].pid, table.concat(p2, ","), xid)

  -- after the TTL the others hold its partitions and move them on
  soft("takeover of the cut-off worker's partitions", function()
    H.wait_until(function() return "workers 1 and 3 to take over and move on worker 2's partitions: " .. g:describe() end,
      TTL / 1000 + 10, function()
        local ll = g:leases()
        for _, k in ipairs(p2) do
          if not ll.owner[k] or ll.owner[k] == w[2].pid or ll.pos[k] <= before[k] then return false end
        end
        return true
      end, 0.05)
    check(pup.now() - cut_at > TTL / 1000 * 0.3, "the cut-off worker lost its partitions before its lease expired") -- leases are renewed TTL/5 apart between batches; never taken before expiry
    g:wait_settled({ w[1], w[3] }, 8, "workers 1 and 3 to share the 6 partitions")
  end)
  check(seen_by(w[2].pid) == seen2, "the cut-off worker committed while cut off")

  -- the link comes back: worker 2's open transaction must not commit; it rejoins
  must("ip link set " .. HOST_IF[2] .. " up")
  log("link of worker 2 up again after %.1f s", pup.now() - cut_at)
  g:wait_settled(w, 30, "worker 2 to rejoin after the link is back")
  g:finish_writers(30)
  check(g:head() == 20000 + extra, "head " .. g:head())
  H.wait_until(function() return "the group to catch up: " .. g:describe() end, 40, function() return g:caught_up() end, 0.1)
  for _, p in ipairs(w) do H.signal(p, "TERM") end
  for i, p in ipairs(w) do
    local rc = H.wait_exit(p, 10)
    check(rc == 0, ("worker %d exit code %s: %s"):format(i, tostring(rc), H.stderr_of(p)))
  end
  local n = g:rows_of_xid(xid)
  check(n == 0, ("the cut-off worker's transaction %s committed %d row(s) after it lost its lease"):format(xid, n))
  local ok, why = g:exact()
  check(ok, why)
  check(#problems == 0, table.concat(problems, "\n"))
  log("ok: %d events, exact read model, cut-off worker fenced (%.1f s)", 20000 + extra, pup.now() - cut_at)
end

started = true
local ok, err = xpcall(main, debug.traceback)
if not ok and type(err) ~= "table" and g then
  pcall(function() log("group: %s\n  %s", g:describe(), g:procs_text()) end)
end
cleanup()
if not ok and type(err) == "table" and err.skip then
  print("SKIP: " .. err.skip)
  log("SKIP: %s", err.skip)
  os.exit(SKIP)
end
if not ok then
  log("FAIL: %s", tostring(err))
  os.exit(1)
end
print("group_netns: ok")
os.exit(0)
