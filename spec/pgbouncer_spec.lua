-- Issue 16, connection poolers: a real PgBouncer (Debian `pgbouncer`) started here on a
-- free port, in front of the test database, with two pools: `tx` in transaction pooling
-- mode (2 server connections, so clients share them) and `sess` in session mode.
-- Appenders work through transaction pooling (no named prepared statements behind a
-- pooler); processors refuse it with a clear error and work through session pooling.
local pup = require "pupsourcing"
local H = require "spec.helpers"

-- The pgbouncer binary (Debian installs it in /usr/sbin), or nil.
local function find_bouncer()
  for _, d in ipairs { "/usr/sbin/", "/usr/bin/", "/usr/local/bin/" } do
    local f = io.open(d .. "pgbouncer")
    if f then f:close() return d .. "pgbouncer" end
  end
end

-- Appends through 4 connections in turn, each followed by a parameterized query: on a
-- shared server connection a named statement of one client is "already there" or
-- "missing" for the next. Prints "ok N".
local APPENDERS = [==[
local pup = require "pupsourcing"
local url, ev, hd, ck, rounds = table.unpack(arg)
local store = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
local dbs = {}
for i = 1, 4 do dbs[i] = assert(pup.connect(url)) end
local n = 0
for r = 1, tonumber(rounds) do
  for i = 1, 4 do
    assert(store:append(dbs[i], pup.exact(r - 1), { { aggregate_type = "A", aggregate_id = "pgb-" .. i,
      event_type = "E", payload = { r = r } } }))
    local rows = assert(dbs[i]:query("SELECT $1::int + $2::int AS x", r, i))
    assert(rows[1].x == r + i, "wrong answer")
    assert(store:head(dbs[i]))
    n = n + 1
  end
end
for i = 1, 4 do dbs[i]:close() end
print("ok " .. n)
]==]

describe("through PgBouncer", function()
  local bouncer = find_bouncer()
  local dir, pidfile, port, store, db, T

  local function as_pg(cmd) return (H.is_root() and "runuser -u postgres -- " or "") .. cmd end

  setup(function()
    if not bouncer then return end
    local user, host, pgport, dbname = H.url():match("^postgres[ql]*://([^@:/]+)[^@]*@([^:/]+):(%d+)/([^?]+)")
    assert(user, "cannot read user, host and port from DATABASE_URL")
    dir = H.tmpdir()
    if H.is_root() then os.execute("chown postgres: " .. dir) end
    pidfile = dir .. "/pgbouncer.pid"
    H.write_file(dir .. "/users.txt", ('"%s" ""\n'):format(user))
    -- A free port: pgbouncer says so in its log when the one tried is taken.
    for _ = 1, 20 do
      port = math.random(20000, 60000)
      H.write_file(dir .. "/pgbouncer.ini", table.concat({
        "[databases]",
        ("tx = host=%s port=%s dbname=%s pool_mode=transaction pool_size=2"):format(host, pgport, dbname),
        ("sess = host=%s port=%s dbname=%s pool_mode=session pool_size=10"):format(host, pgport, dbname),
        ("sess1 = host=%s port=%s dbname=%s pool_mode=session pool_size=1"):format(host, pgport, dbname),
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        "listen_port = " .. port,
        "unix_socket_dir =",
        "auth_type = trust",
        "auth_file = " .. dir .. "/users.txt",
        "pidfile = " .. pidfile,
        "logfile = " .. dir .. "/pgbouncer.log",
        "max_client_conn = 200",
        "query_wait_timeout = 20",
      }, "\n") .. "\n")
      if H.is_root() then os.execute("chown postgres: " .. dir .. "/*") end
      local r = H.sh(as_pg(H.shquote(bouncer) .. " -d " .. dir .. "/pgbouncer.ini"))
      local listening = r.code == 0 and pcall(H.wait_until, "pgbouncer to accept connections", 5, function()
        local c = pup.connect(("postgresql://%s@127.0.0.1:%d/sess"):format(user, port))
        if c then c:close() end
        return c ~= nil
      end, 0.1)
      if listening then break end
      port = nil
    end
    assert(port, "pgbouncer did not start: " .. (io.open(dir .. "/pgbouncer.log") and H.read_file(dir .. "/pgbouncer.log") or "no log"))
  end)

  teardown(function()
    if pidfile and io.open(pidfile) then
      local pid = tonumber(H.read_file(pidfile):match("%d+"))
      if pid then os.execute("kill -INT " .. pid) end
      H.wait_until("pgbouncer to exit", 10, function() return io.open(pidfile) == nil end)
    end
    if dir then H.rmdir(dir) end
  end)

  local function url(pool) return ("postgresql://postgres@127.0.0.1:%d/%s"):format(port, pool) end

  before_each(function()
    if not bouncer then return end
    store, db, T = H.fresh_store("pgb")
    for _, t in ipairs { "t_pgb_counter", "t_pgb_seen" } do assert(db:exec("DROP TABLE IF EXISTS " .. t)) end
  end)

  after_each(function() if db then db:close() db = nil end end)

  local function skip_without()
    if not bouncer then pending("pgbouncer not installed: run scripts/deps.sh test") return true end
  end

  local function one(sql, ...) return assert(db:query(sql, ...))[1] end

  local function projection()
    local path = dir .. "/pgb_counter.lua"
    H.write_file(path, (H.COUNTER_TEMPLATE:gsub("%%{NAME}", "pgb_counter"):gsub("%%{CNT}", "t_pgb_counter")
      :gsub("%%{SEEN}", "t_pgb_seen")))
    return path
  end

  local function populate(naggs, per)
    for a = 1, naggs do
      local evs = {}
      for i = 1, per do evs[i] = H.event { aggregate_id = "p-" .. a, payload = { i = i } } end
      assert(store:append(db, pup.any(), evs))
    end
  end

  it("appenders work through transaction pooling", function()
    if skip_without() then return end
    local script = dir .. "/appenders.lua"
    H.write_file(script, APPENDERS)
    local r = H.run({ script, url("tx"), T.events_table, T.aggregate_heads_table, T.checkpoints_table, "25" })
    assert.equal(0, r.code, r.output)
    assert.equal("ok 100", r.stdout:match("ok %d+"), r.output)
    for i = 1, 4 do
      assert.same({ n = 25, v = 25 }, one(('SELECT count(*) AS n, max(aggregate_version) AS v FROM "%s" WHERE aggregate_id = $1')
        :format(T.events_table), "pgb-" .. i))
    end
  end)

  it("a processor behind transaction pooling stops at once, naming the fix", function()
    if skip_without() then return end
    populate(5, 10)
    local r = H.run(H.with_tables(T, { "run", "--once", "--database-url", url("tx"), projection() }))
    assert.equal(1, r.code, r.output)
    assert.is_truthy(r.stderr:find("transaction pooling mode", 1, true), r.stderr)
    assert.is_truthy(r.stderr:find("session mode", 1, true), r.stderr)
    assert.is_truthy(r.stderr:find('database "tx" on host 127.0.0.1 port ' .. port, 1, true), r.stderr)
    assert.is_falsy(r.stderr:find("postgresql://", 1, true), r.stderr) -- described, not echoed
    -- nothing handled, no checkpoint moved
    assert.equal(0, one(('SELECT count(*) AS n FROM "%s" WHERE last_global_position > 0'):format(T.checkpoints_table)).n)
  end)

  it("processors work through session pooling, exactly once", function()
    if skip_without() then return end
    populate(12, 20)
    local r = H.run(H.with_tables(T, { "run", "--once", "--workers", "2", "--database-url", url("sess"), projection() }))
    assert.equal(0, r.code, r.output)
    assert.same({ aggs = 12, total = 240, lo = 20, hi = 20 },
      one("SELECT count(*) AS aggs, sum(n)::bigint AS total, min(n) AS lo, max(n) AS hi FROM t_pgb_counter"))
    assert.same({ n = 240, d = 240 }, one("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_pgb_seen"))
  end)

  it("a full session pool: the probe's second client waits 5 s at most, then the processor runs", function()
    if skip_without() then return end
    -- full windows of 10: a catch-up that, on a direct connection, reads ahead on a second
    -- session; never through a pooler (here it would wait for a server connection)
    populate(3, 100)
    local t0 = pup.now()
    local r = H.run(H.with_tables(T, { "run", "--once", "--batch-size", "10", "--database-url", url("sess1"), projection() }))
    assert.equal(0, r.code, r.output)
    assert.is_true(pup.now() - t0 < 15, "took " .. (pup.now() - t0) .. " s")
    assert.same({ n = 300, d = 300 }, one("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_pgb_seen"))
  end)

  it("a connection's statements from before its processor proved session pooling still run", function()
    if skip_without() then return end
    populate(2, 3)
    local script = dir .. "/before.lua"
    H.write_file(script, [==[
      local pup = require "pupsourcing"
      local url, ev, hd, ck = table.unpack(arg)
      local db = assert(pup.connect(url))
      -- described while the connection was only known to be behind a pooler (unnamed)
      assert(assert(db:query("SELECT $1::int + 1 AS x", 41))[1].x == 42)
      local store = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
      local p = pup.processor(db, { name = "pgb_before", handle = function() end }, { store = store })
      assert(p:run_once() == 6)
      -- after the session probe: the same statement, then another, then the first again
      assert(assert(db:query("SELECT $1::int + 1 AS x", 41))[1].x == 42)
      assert(assert(db:query("SELECT $1::text AS y", "other"))[1].y == "other")
      assert(assert(db:query("SELECT $1::int + 1 AS x", 1))[1].x == 2)
      print("ok")
    ]==])
    local r = H.run({ script, url("sess"), T.events_table, T.aggregate_heads_table, T.checkpoints_table })
    assert.equal(0, r.code, r.output)
    assert.equal("ok\n", r.stdout)
  end)
end)
