-- Issue 16, failover: a primary and a synchronous streaming standby started here (in a
-- throwaway directory, as the postgres user when root), a connection string naming both
-- (`target_session_attrs=read-write`), writers appending and `run --workers 4` on a
-- NON-idempotent counter; the primary is stopped with `-m immediate` and the standby
-- promoted. Writers and processors must go on against the new primary, every
-- acknowledged append must be there and the counter must be exact.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local NWRITERS = 4

-- A writer owning one aggregate: appends event n+1 with pup.exact(n), so a retried append
-- whose first attempt landed (its answer lost with the server) is a conflict, not a
-- duplicate; on a lost connection it reconnects (any host, read-write) and retries the
-- same append. Writes each acknowledged version to `ackfile`; stops when `stopfile`
-- exists; prints "acked N retries R".
local WRITER = [==[
local pup = require "pupsourcing"
local url, ev, hd, ck, agg, stopfile, ackfile = table.unpack(arg)
local store = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
local function connect()
  for _ = 1, 600 do
    local db = pup.connect(url)
    if db then return db end
    pup.sleep(0.05)
  end
  error("no read-write server for 30 s")
end
local function exists(p) local f = io.open(p) if f then f:close() return true end return false end
local db, v, retries = connect(), 0, 0
local ack = assert(io.open(ackfile, "w"))
while not exists(stopfile) do
  while true do
    local evs = { { aggregate_type = "W", aggregate_id = agg, event_type = "N", payload = { n = v + 1 } } }
    -- every other append in a transaction of its own: its COMMIT, not the statement, is
    -- what the standby acknowledges (sent with its wake-up, src/db.c commit_then_notify)
    local ok, err
    if v % 2 == 0 then ok, err = store:append(db, pup.exact(v), evs)
    else ok, err = db:transaction(function(tx) return store:append(tx, pup.exact(v), evs) end) end
    if ok or err.code == "optimistic_concurrency" then break end
    -- lost connection; 25006: a session that went read-only under us
    if err.code ~= "connection" and err.sqlstate ~= "25006" then error(tostring(err)) end
    retries = retries + 1
    db:close()
    db = connect()
  end
  v = v + 1
  ack:write(v, "\n")
  ack:flush()
  pup.sleep(0.005)
end
print(("acked %d retries %d"):format(v, retries))
]==]

-- The last line of a file as a number (0 when none yet).
local function last_number(path)
  local f = io.open(path)
  if not f then return 0 end
  local n = 0
  for l in f:lines() do n = tonumber(l) or n end
  f:close()
  return n
end

describe("failover to a promoted synchronous standby", function()
  local bindir = H.pg_bindir()
  local dir, primary, standby, procs = nil, nil, nil, {}

  local function as_pg(cmd)
    return (H.is_root() and "runuser -u postgres -- " or "") .. cmd
  end

  local function must(cmd, what)
    local r = H.sh(cmd)
    assert(r.code == 0, (what or cmd) .. " failed: " .. r.output)
    return r.stdout
  end

  -- scripts/pg.sh start: a server in `data` on a free port from `want`; its port.
  local function pg_start(data, want)
    local out = must("bash " .. H.shquote(H.source_dir .. "/scripts/pg.sh") .. " start " .. H.shquote(data)
      .. " " .. want, "pg.sh start " .. data)
    return assert(tonumber(out:match("127%.0%.0%.1:(%d+)/")), "no port in: " .. out)
  end

  local function pg_ctl(data, args)
    return H.sh(as_pg(H.shquote(bindir .. "/pg_ctl") .. " -D " .. H.shquote(data) .. " " .. args))
  end

  after_each(function()
    for _, p in ipairs(procs) do H.reap(p) end
    procs = {}
    for _, d in ipairs { primary, standby } do
      if d then pg_ctl(d, "-m immediate -w stop") end
    end
    if dir then H.rmdir(dir) end
    dir, primary, standby = nil, nil, nil
  end)

  it("writers and run --workers 4 go on, nothing acknowledged is lost, the counter is exact", function()
    if not bindir or not io.open(bindir .. "/pg_basebackup") then
      pending("PostgreSQL server binaries (pg_basebackup) not found: run scripts/deps.sh")
      return
    end
    dir = H.tmpdir()
    os.execute("chmod 755 " .. dir)
    primary, standby = dir .. "/primary", dir .. "/standby"
    local base = 20000 + math.random(0, 20000)
    local p1 = pg_start(primary, base)
    local direct = ("postgresql://postgres@127.0.0.1:%d/pupsourcing"):format(p1)
    -- The standby: a base backup with the streaming configuration (-R), started beside it.
    os.execute("mkdir -p " .. standby .. (H.is_root() and (" && chown postgres: " .. standby) or "")
      .. " && chmod 700 " .. standby)
    must(as_pg(H.shquote(bindir .. "/pg_basebackup") .. " -D " .. standby .. " -R -X stream -c fast -h 127.0.0.1 -p "
      .. p1 .. " -U postgres"), "pg_basebackup")
    local p2 = pg_start(standby, p1 + 1)
    local pdb = H.connect(direct)
    -- Synchronous: a commit returns once the standby has flushed it.
    assert(pdb:exec("ALTER SYSTEM SET synchronous_standby_names = '*'"))
    assert(pdb:query("SELECT pg_reload_conf()"))
    H.wait_until("the standby to stream synchronously", 20, function()
      local r = assert(pdb:query("SELECT count(*) AS n FROM pg_stat_replication WHERE sync_state = 'sync'"))
      return r[1].n == 1
    end, 0.1)

    local T = H.tables("fo")
    local store = pup.store(T)
    assert(store:migrate(pdb))
    pdb:close()
    local url = ("host=127.0.0.1,127.0.0.1 port=%d,%d dbname=pupsourcing user=postgres"
      .. " target_session_attrs=read-write connect_timeout=5"):format(p1, p2)

    local proj = dir .. "/fo_counter.lua"
    H.write_file(proj, (H.COUNTER_TEMPLATE:gsub("%%{NAME}", "fo_counter"):gsub("%%{CNT}", "t_fo_counter")
      :gsub("%%{SEEN}", "t_fo_seen")))
    local writer = dir .. "/writer.lua"
    H.write_file(writer, WRITER)
    local stopfile = dir .. "/stop"

    local run = H.spawn(H.with_tables(T, { H.bin, "run", "--workers", "4", "--poll-interval", "100",
      "--database-url", url, proj }), { env = { REL_SLEEP = "0.002" } }) -- the failover lands mid-batch
    procs[#procs + 1] = run
    local writers = {}
    for i = 1, NWRITERS do
      local w = H.spawn { H.bin, writer, url, T.events_table, T.aggregate_heads_table, T.checkpoints_table,
        "agg-" .. i, stopfile, dir .. "/ack" .. i }
      writers[i] = w
      procs[#procs + 1] = w
    end
    local function acked()
      local t = {}
      for i = 1, NWRITERS do t[i] = last_number(dir .. "/ack" .. i) end
      return t
    end
    -- Under way on the primary: every writer acknowledged, the counter counting.
    local cdb = H.connect(direct)
    H.wait_until("writers and the processor to make progress on the primary", 30, function()
      for _, n in ipairs(acked()) do if n < 20 then return false end end
      local r = cdb:query("SELECT COALESCE(sum(n), 0)::bigint AS n FROM t_fo_counter")
      return r and r[1].n > 20
    end, 0.1)
    cdb:close()

    -- The primary dies mid-flight; the standby is promoted.
    local r = pg_ctl(primary, "-m immediate -w stop")
    assert.equal(0, r.code, r.output)
    local before = acked()
    r = pg_ctl(standby, "-w -t 30 promote")
    assert.equal(0, r.code, r.output)

    -- Both go on against the new primary: each writer acknowledges 20 more.
    H.wait_until(function() return "writers to go on after the failover: " .. table.concat(acked(), ",")
      .. "\n" .. H.stderr_of(writers[1]) end, 30, function()
      local now = acked()
      for i = 1, NWRITERS do if now[i] < before[i] + 20 then return false end end
      return true
    end, 0.1)
    H.write_file(stopfile, "")
    local final, retries = {}, 0
    for i, w in ipairs(writers) do
      assert.equal(0, H.wait_exit(w, 30), H.stderr_of(w))
      local out = H.stdout_of(w)
      final[i] = tonumber(out:match("acked (%d+)"))
      assert.is_truthy(final[i], out)
      retries = retries + tonumber(out:match("retries (%d+)"))
    end
    assert.is_true(retries > 0, "no writer saw the failover") -- they were mid-flight

    local db = H.connect(("postgresql://postgres@127.0.0.1:%d/pupsourcing"):format(p2))
    local function one(sql, ...) return assert(db:query(sql, ...))[1] end
    -- Every acknowledged append is on the new primary, exactly once: versions 1..N of
    -- each writer's aggregate, nothing more.
    for i = 1, NWRITERS do
      local e = one(('SELECT count(*) AS n, count(DISTINCT v) AS d, COALESCE(min(v), 0) AS lo, COALESCE(max(v), 0) AS hi'
        .. ' FROM (SELECT (convert_from(payload, \'UTF8\')::jsonb->>\'n\')::int AS v FROM "%s" WHERE aggregate_id = $1) e')
        :format(T.events_table), "agg-" .. i)
      assert.same({ n = final[i], d = final[i], lo = 1, hi = final[i] }, e)
    end

    -- The processors catch up on the new primary and the counter is exact.
    local head
    H.wait_until(function()
      return ("run --workers 4 to catch up on the new primary (head %s, exit %s):\n%s"):format(tostring(head),
        tostring(H.exit_code(run)), H.stderr_of(run))
    end, 40, function()
      head = one(('SELECT COALESCE(max(global_position), 0)::bigint AS h FROM "%s"'):format(T.events_table)).h
      local c = one(('SELECT count(*) AS n, COALESCE(min(last_global_position), 0) AS lo FROM "%s"'
        .. ' WHERE projection_name = $1'):format(T.checkpoints_table), "fo_counter")
      return c.n == 4 and c.lo == head
    end, 0.1)
    assert.is_nil(H.exit_code(run), H.stderr_of(run))
    local bad = one(('SELECT count(*) AS n FROM (SELECT aggregate_id, count(*) AS n FROM "%s" GROUP BY aggregate_id) e'
      .. ' FULL JOIN t_fo_counter c ON c.agg = e.aggregate_id WHERE c.n IS DISTINCT FROM e.n'):format(T.events_table)).n
    assert.equal(0, bad)
    local events = one(('SELECT count(*) AS n FROM "%s"'):format(T.events_table)).n
    assert.same({ n = events, d = events }, one("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_fo_seen"))
    assert.is_truthy(H.stderr_of(run):find("reconnected", 1, true), H.stderr_of(run))
    db:close()
    H.signal(run, "TERM")
    assert.equal(0, H.wait_exit(run, 20), H.stderr_of(run))
  end)

  -- The connection breaks after the handler's statements all came back, before the
  -- batch's closing statements: a lost connection (retried), never a handler error.
  it("a connection lost at the end of a batch is retried, not blamed on the handler", function()
    local store, db, T = H.fresh_store("folost")
    assert(db:exec("DROP TABLE IF EXISTS t_folost_seen"))
    assert(db:exec("CREATE TABLE t_folost_seen (pos bigint NOT NULL)"))
    dir = H.tmpdir()
    local url = H.url()
    H.write_file(dir .. "/p.lua", ([==[
      local pup = require "pupsourcing"
      local killed = false
      return { name = "folost", handle = function(tx, e)
        assert(tx:exec("INSERT INTO t_folost_seen (pos) VALUES ($1)", e.global_position))
        if killed then return end
        killed = true
        -- every result read back (a query drains the pipeline), then the session ends
        local pid = assert(tx:query("SELECT pg_backend_pid() AS pid"))[1].pid
        local other = assert(pup.connect(%q))
        assert(other:query("SELECT pg_terminate_backend($1)", pid))
        for _ = 1, 200 do
          if assert(other:query("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid))[1].n == 0 then break end
          pup.sleep(0.01)
        end
        other:close()
      end }
    ]==]):format(url))
    assert(store:append(db, pup.any(), H.events(3, { aggregate_id = H.uid("l") })))
    local r = H.run(H.with_tables(T, { "run", "--once", dir .. "/p.lua" }))
    assert.equal(0, r.code, r.output)
    assert.falsy(r.stderr:find("ended or broke", 1, true), r.stderr)
    assert.truthy(r.stderr:find("retrying in", 1, true), r.stderr)
    assert.truthy(r.stderr:find("reconnected", 1, true), r.stderr)
    -- the first batch rolled back: each event counted once
    assert.same({ n = 3, d = 3 }, assert(db:query("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_folost_seen"))[1])
    db:close()
  end)

  it("an append whose commit never got the synchronous standby's answer is not acknowledged", function()
    -- The implicit transaction of an append commits at its Sync; with a synchronous
    -- standby that never answers the commit waits, and a session ended there has sent the
    -- statement's result but not the Sync's. That is no success: the append must return a
    -- connection error (it once returned the result, and a failover lost acknowledged
    -- appends).
    if not bindir then
      pending("PostgreSQL server binaries not found: run scripts/deps.sh")
      return
    end
    dir = H.tmpdir()
    os.execute("chmod 755 " .. dir)
    primary = dir .. "/primary"
    local p1 = pg_start(primary, 20000 + math.random(0, 20000))
    local url = ("postgresql://postgres@127.0.0.1:%d/pupsourcing"):format(p1)
    local db = H.connect(url)
    local T = H.tables("fosync")
    local store = pup.store(T)
    assert(store:migrate(db))
    assert(db:exec("ALTER SYSTEM SET synchronous_standby_names = 'nobody'"))
    db:close()
    -- started again, not reloaded: a reload reaches the checkpointer, which decides
    -- whether commits wait, in its own time
    local stop = pg_ctl(primary, "-m fast -w stop")
    assert(stop.code == 0, stop.output)
    url = ("postgresql://postgres@127.0.0.1:%d/pupsourcing"):format(pg_start(primary, p1))
    db = H.connect(url)
    -- Ends the session that waits for the standby (wait_event SyncRep), from another process.
    local killer = dir .. "/killer.lua"
    H.write_file(killer, [[
local pup = require "pupsourcing"
local db = assert(pup.connect(arg[1]))
for _ = 1, 200 do
  local r = assert(db:query("SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE wait_event = 'SyncRep'"))
  if r[1].n > 0 then print("terminated") return end
  pup.sleep(0.05)
end
print("nothing waited")
]])
    local k = H.spawn { H.bin, killer, url }
    procs[#procs + 1] = k
    local w = H.connect(url)
    local res, err = store:append(w, pup.any(), { H.event { aggregate_id = "sync-1" } })
    assert.equal(0, H.wait_exit(k, 20))
    assert.equal("terminated\n", H.stdout_of(k))
    assert.is_nil(res, "an append whose commit the standby never acknowledged was reported as done")
    assert.equal("connection", err.code, tostring(err))
    db:close()
  end)
end)
