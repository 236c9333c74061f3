-- Issues 10 and 17: how a running `pupsourcing run` waits and wakes, measured.
--   - waiting at a hole costs a small query, not a window read, until the hole changes;
--     the event is handled once its writer commits, and a rolled-back hole is stepped over;
--   - an idle processor reacts to a NOTIFY well below --poll-interval;
--   - a standby takes over a SIGKILLed processor's partition within the documented bound;
--   - two projections whose names differ only at the end take different locks.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("processor liveness", function()
  local store, db, T, dir
  local procs, conns = {}, {}

  -- An extra connection, closed after the test whatever happens (an open writer
  -- transaction would block the next test's DROP TABLE).
  local function connect()
    local c = H.connect()
    conns[#conns + 1] = c
    return c
  end

  -- A projection that logs each handled position with the time and its backend.
  local function projection_file(name, tbl)
    local path = dir .. "/" .. tbl .. ".lua"
    H.write_file(path, ([[
return {
  name = %q,
  setup = function(tx)
    assert(tx:exec("CREATE TABLE IF NOT EXISTS %s (pos bigint NOT NULL,"
      .. " at timestamptz NOT NULL DEFAULT clock_timestamp(), pid int NOT NULL DEFAULT pg_backend_pid())"))
  end,
  handle = function(tx, e)
    assert(tx:exec("INSERT INTO %s (pos) VALUES ($1)", e.global_position))
  end,
}
]]):format(name, tbl, tbl))
    return path
  end

  local function start(args)
    local words = { H.bin, "run", "--database-url", H.url() }
    for _, a in ipairs(H.table_flags(T)) do words[#words + 1] = a end
    for _, a in ipairs(args) do words[#words + 1] = a end
    local p = H.spawn(words)
    procs[#procs + 1] = p
    return p
  end

  local function one(sql, ...) return assert(db:query(sql, ...))[1] end

  local function handled(tbl, pos)
    return one(("SELECT count(*) AS n FROM %s WHERE pos = $1"):format(tbl), pos).n
  end

  local function append(conn, id, n)
    return assert(store:append(conn, pup.any(), H.events(n or 1, { aggregate_id = id })))
  end

  -- Rows of the events table fetched by index scans and read by sequential scans so far.
  local function fetched()
    local r = one("SELECT COALESCE(idx_tup_fetch, 0) AS f, seq_scan AS s FROM pg_stat_user_tables"
      .. " WHERE relid = $1::regclass",
      T.events_table)
    return r.f, r.s
  end

  before_each(function()
    local logs = { "t_live_wake", "t_live_hole", "t_live_standby", "t_live_long_a", "t_live_long_b", "t_live_reconn" }
    store, db, T, dir = H.fresh_area("live", logs)
    for _, tbl in ipairs(logs) do -- as the projections' setup makes them, so the spec can poll at once
      assert(db:exec(("CREATE TABLE %s (pos bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp(),"
        .. " pid int NOT NULL DEFAULT pg_backend_pid())"):format(tbl)))
    end
  end)

  after_each(function()
    for _, p in ipairs(procs) do H.reap(p) end
    procs = {}
    for _, c in ipairs(conns) do pcall(c.close, c) end
    conns = {}
    H.close_area(db, dir)
  end)

  it("waits at a hole with small queries, not window reads; handles it on commit, steps over a rollback", function()
    local file = projection_file("live_hole", "t_live_hole")
    -- enough rows that every read goes through the index
    for i = 1, 20 do append(db, "seed-" .. i, 100) end
    assert(db:exec(('ANALYZE "%s"'):format(T.events_table)))
    local p = start { file }
    local head = assert(store:head(db))
    H.wait_until("the seed to be handled", 30, function()
      return one("SELECT count(*) AS n FROM t_live_hole").n == head
    end)

    -- A writer draws the next position and keeps its transaction open; 100 events after it commit.
    local w, b = connect(), connect()
    local tx = assert(w:begin())
    local hole = append(tx, "writer").global_positions[1]
    local after = append(b, "after", 100).global_positions
    H.wait_until("the processor to wait at the hole", 10, function()
      local st = assert(pup.status(db, store))
      return st[1] and st[1].waiting_position == hole
    end)
    pup.sleep(1.2) -- the processor's backend reports its statistics at most once a second
    local f0, s0 = fetched()
    local t0 = pup.now()
    pup.sleep(3)
    local f1, s1 = fetched()
    local dt = pup.now() - t0
    -- one read of the window fetches the 100 rows after the hole
    local reads = (f1 - f0) / 100
    print(("# hole wait: %.1f window reads in %.1f s"):format(reads, dt))
    assert.equal(s0, s1, "no sequential scans of the events table (the measure counts index fetches)")
    assert.is_true(reads < dt / 0.2,
      ("%.1f window reads in %.1f s while waiting at a hole (at most one per 200 ms expected)"):format(reads, dt))
    assert.equal(0, handled("t_live_hole", after[1]), "nothing after the hole is handled while it may fill")

    -- The writer commits: the hole and everything after it are handled at once.
    t0 = pup.now()
    assert(tx:commit())
    H.wait_until("the hole's event and the 100 after it", 5, function()
      return handled("t_live_hole", hole) == 1 and handled("t_live_hole", after[#after]) == 1
    end, 0.01)
    assert.is_true(pup.now() - t0 < 1, ("handled %.2f s after the commit"):format(pup.now() - t0))

    -- A rolled-back hole is stepped over (no NOTIFY comes from a rollback).
    tx = assert(w:begin())
    local dead = append(tx, "dead").global_positions[1]
    local later = append(b, "later", 10).global_positions
    H.wait_until("the processor to wait at the second hole", 10, function()
      local st = assert(pup.status(db, store))
      return st[1] and st[1].waiting_position == dead
    end)
    assert(tx:rollback())
    -- (older transactions of parallel tests may delay it)
    H.wait_until("the events after the rolled-back hole", 20, function()
      return handled("t_live_hole", later[#later]) == 1
    end, 0.01)
    local r = one("SELECT count(*) AS n, count(DISTINCT pos) AS d, count(*) FILTER (WHERE pos = $1) AS dead"
      .. " FROM t_live_hole", dead)
    local total = assert(store:head(db)) - 1 -- every position but the rolled-back one
    assert.same({ n = total, d = total, dead = 0 }, r)
    assert.is_nil(H.exit_code(p), H.stderr_of(p))
  end)

  it("an idle processor handles a new event within 1 s although --poll-interval is 10 s", function()
    local file = projection_file("live_wake", "t_live_wake")
    local p = start { "--poll-interval", "10000", file }
    append(db, "first")
    H.wait_until("the first event", 10, function() return handled("t_live_wake", 1) == 1 end)
    pup.sleep(0.5) -- caught up: now waiting for a notification or the 10 s poll
    for i = 1, 3 do
      local t0 = pup.now()
      local pos = append(db, "wake-" .. i).global_positions[1]
      H.wait_until("the event at " .. pos, 11, function() return handled("t_live_wake", pos) == 1 end, 0.005)
      local dt = pup.now() - t0
      print(("# wake-up %d: %.3f s"):format(i, dt))
      assert.is_true(dt < 1, ("event %d handled %.2f s after the append (poll interval 10 s)"):format(i, dt))
      pup.sleep(0.3)
    end
    assert.is_nil(H.exit_code(p), H.stderr_of(p))
  end)

  it("after its session is killed it reconnects, listens and holds its partition again", function()
    local file = projection_file("live_reconn", "t_live_reconn")
    local a = start { "--poll-interval", "10000", file }
    append(db, "first")
    H.wait_until("the first event", 10, function() return handled("t_live_reconn", 1) == 1 end)
    local pid = one("SELECT pid FROM t_live_reconn").pid
    assert.is_true(one("SELECT pg_terminate_backend($1) AS t", pid).t)
    -- the next event makes it notice (its batch fails), reconnect and handle it
    local second = append(db, "second").global_positions[1]
    H.wait_until(function() return "a reconnect: " .. H.stderr_of(a) end, 15, function()
      return handled("t_live_reconn", second) == 1
    end, 0.01)
    assert.truthy(H.stderr_of(a):find("reconnected", 1, true), H.stderr_of(a))
    pup.sleep(0.5) -- idle again: woken by LISTEN on the new session, or only by the 10 s poll
    local t0 = pup.now()
    local pos = append(db, "third").global_positions[1]
    H.wait_until("the event at " .. pos, 11, function() return handled("t_live_reconn", pos) == 1 end, 0.005)
    local dt = pup.now() - t0
    assert.is_true(dt < 1, ("after the reconnect an event was handled %.2f s after its append"):format(dt))
    -- and its lock is back: a second processor of the partition is a standby
    local b = start { file }
    H.wait_until(function() return "the second processor to stand by: " .. H.stderr_of(b) end, 10, function()
      return H.stderr_of(b):find("standby", 1, true)
    end, 0.05)
    assert.is_nil(H.exit_code(a), H.stderr_of(a))
  end)

  it("a standby handles a new event within 2.5 s of the live processor's SIGKILL", function()
    local file = projection_file("live_standby", "t_live_standby")
    local a = start { file }
    append(db, "first")
    H.wait_until("the first event", 10, function() return handled("t_live_standby", 1) == 1 end)
    local b = start { file }
    -- The standby logs once, right after its first refused attempt: kill just after an
    -- attempt, so the measure is a whole retry interval.
    H.wait_until("the standby message", 10, function() return H.stderr_of(b):find("standby", 1, true) ~= nil end, 0.005)
    pup.sleep(0.1)
    local t0 = pup.now()
    H.signal(a, "KILL")
    assert.equal(128 + 9, H.wait_exit(a, 5))
    local pos = append(db, "after-kill").global_positions[1]
    H.wait_until(function() return "the standby to handle the new event: " .. H.stderr_of(b) end, 15, function()
      return handled("t_live_standby", pos) == 1
    end, 0.01)
    local dt = pup.now() - t0
    print(("# standby takeover: %.2f s"):format(dt))
    assert.is_true(dt <= 2.5, ("takeover: the new event was handled %.2f s after SIGKILL (bound 2.5 s)"):format(dt))
    assert.truthy(H.stderr_of(b):find("took over", 1, true), H.stderr_of(b))
    assert.same({ n = 2, d = 2 }, one("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_live_standby"))
  end)

  it("two projections whose names differ only at the end both run (their locks differ)", function()
    -- The longest names (200 bytes) with the longest checkpoints table name the store
    -- takes: a key cut to a fixed buffer would lose the names' ends.
    local schema = string.rep("s", 39)
    assert(db:exec(('DROP SCHEMA IF EXISTS "%s" CASCADE; CREATE SCHEMA "%s"'):format(schema, schema)))
    local long = {}
    for k, v in pairs(T) do long[k] = v end
    long.checkpoints_table = schema .. "." .. string.rep("c", 39)
    assert(pup.store(long):migrate(db))
    local prefix = string.rep("p", 198)
    local fa = projection_file(prefix .. "_a", "t_live_long_a")
    local fb = projection_file(prefix .. "_b", "t_live_long_b")
    local function start_long(file)
      local words = { H.bin, "run", "--database-url", H.url(), file }
      for _, a in ipairs(H.table_flags(long)) do words[#words + 1] = a end
      local p = H.spawn(words)
      procs[#procs + 1] = p
      return p
    end
    finally(function() db:exec(('DROP SCHEMA IF EXISTS "%s" CASCADE'):format(schema)) end)
    local pa, pb = start_long(fa), start_long(fb)
    append(db, "x", 5)
    H.wait_until(function() return "both projections to handle 5 events:\n" .. H.stderr_of(pa) .. H.stderr_of(pb) end,
      15,
      function()
        for _, tbl in ipairs { "t_live_long_a", "t_live_long_b" } do
          if one(("SELECT count(*) AS n FROM %s"):format(tbl)).n ~= 5 then return false end
        end
        return true
      end, 0.05)
    assert.is_nil(H.stderr_of(pa):find("standby", 1, true), H.stderr_of(pa))
    assert.is_nil(H.stderr_of(pb):find("standby", 1, true), H.stderr_of(pb))
  end)
end)
