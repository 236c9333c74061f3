-- Issue 13: in catch-up, while the handlers' writes run, the next window is read on a
-- session of the processor's own (src/batch.c, read_ahead; src/processor.c,
-- pup_proc_resolve_reader). That session must read the tables the processor's connection
-- reads, survive being killed, and go with the processor.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("the read-ahead session", function()
  local g, db, p

  after_each(function()
    if p then p:close() end
    if db then db:close() end
    if g then
      g.db:exec("DROP SCHEMA IF EXISTS t_rb_other CASCADE")
      g.db:exec(('DROP TABLE IF EXISTS "%s" CASCADE'):format(g.names.events_table)) -- its policies
      g:close()
    end
    g, db, p = nil, nil, nil
  end)

  -- The test's URL with its own application_name, which the second session inherits.
  local function url_named(name)
    local url = H.url()
    return url .. (url:find("?", 1, true) and "&" or "?") .. "application_name=" .. name
  end

  local function sessions(name)
    return g:one("SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1", name).n
  end

  -- p: a processor of g's log on a connection named apart (returned), whose read-ahead
  -- session inherits the name; handle = wrap(the counter's handle, the first position).
  -- The fixture's setup renames the processor's own connection: only the other counts.
  local function named_processor(wrap)
    local app = H.uid(g.prefix):gsub("[^%w_]", "_")
    db = assert(pup.connect(url_named(app)))
    local first = g:one(('SELECT min(global_position) AS p FROM "%s"'):format(g.names.events_table)).p
    local proj = pup.load_projection(g.file)
    proj.handle = wrap and wrap(proj.handle, first) or proj.handle
    p = pup.processor(db, proj, { store = g.store, batch_size = proj.batch_size, poll_interval = 0.05 })
    return app
  end

  it("reads the tables the processor's connection resolves (search_path), not the default ones", function()
    g = H.group("rb_sp", { batch_size = 10 })
    g:append("pub", 4, 50) -- 200 events in the tables search_path does not reach
    -- the same table names in another schema, with other events, reached by search_path
    assert(g.db:exec("DROP SCHEMA IF EXISTS t_rb_other CASCADE"))
    assert(g.db:exec("CREATE SCHEMA t_rb_other"))
    db = H.connect()
    assert(db:exec("SET search_path TO t_rb_other"))
    local T = H.tables("rb_sp")
    local other = pup.store(T)
    assert(other:migrate(db))
    for a = 1, 4 do
      local evs = {}
      for i = 1, 60 do evs[i] = { aggregate_type = "User", aggregate_id = "oth" .. a, event_type = "S", payload = { i = i } } end
      assert(other:append(db, pup.any(), evs))
    end
    assert(db:exec(("CREATE TABLE t_rb_other.%s (agg text PRIMARY KEY, n bigint NOT NULL)"):format(g.counter)))
    assert(db:exec(("CREATE TABLE t_rb_other.%s (pos bigint NOT NULL, agg text NOT NULL, xid text NOT NULL, pid int NOT NULL)")
      :format(g.seen)))
    local proj = pup.load_projection(g.file)
    p = pup.processor(db, proj, { store = other, batch_size = 10, poll_interval = 0.05 })
    assert.equal(240, assert(p:run { once = true }))
    local c = assert(db:query(("SELECT agg, n FROM t_rb_other.%s ORDER BY agg"):format(g.counter)))
    assert.same({ { agg = "oth1", n = 60 }, { agg = "oth2", n = 60 }, { agg = "oth3", n = 60 }, { agg = "oth4", n = 60 } }, c)
    local s = assert(db:query(("SELECT count(*)::int AS n, count(DISTINCT pos)::int AS d FROM t_rb_other.%s"):format(g.seen)))[1]
    assert.same({ n = 240, d = 240 }, s)
    assert.equal(0, g:one(("SELECT count(*)::int AS n FROM public.%s"):format(g.counter)).n)
  end)

  it("killed in the middle of a catch-up: opened again, nothing lost or doubled; closed once caught up", function()
    g = H.group("rb_kill", { batch_size = 10 })
    g:append("a", 10, 100) -- 1,000 events: a hundred windows
    local killed, app = {}, nil
    app = named_processor(function(handle, first)
      return function(tx, e)
        handle(tx, e)
        if e.global_position == first + 300 or e.global_position == first + 700 then
          -- every session of this test but the processor's own: the read-ahead's
          local r = assert(tx:query("SELECT count(*)::int AS n FROM (SELECT pg_terminate_backend(pid)"
            .. " FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()) k", app))
          killed[#killed + 1] = r[1].n
        end
      end
    end)
    assert.equal(1000, assert(p:run { once = true }))
    assert.same({ 1, 1 }, killed) -- there was one to kill both times: it was opened again
    local ok, why = g:exact()
    assert(ok, why)
    -- caught up: closed
    H.wait_until("the read-ahead session closed", 10, function() return sessions(app) == 0 end)
  end)

  it("a live processor (windows not full) opens no second session", function()
    g = H.group("rb_live", { batch_size = 100 })
    g:append("a", 2, 20)
    local app = named_processor()
    assert.equal(40, assert(p:run { once = true }))
    assert.equal(0, sessions(app))
  end)

  it("a processor closed in the middle of a catch-up closes its read-ahead session", function()
    g = H.group("rb_close", { batch_size = 10 })
    g:append("a", 4, 50)
    local app = named_processor(function(handle, first)
      return function(tx, e)
        handle(tx, e)
        -- more events after the head seen at start, at most 1,000 a second: run{once}
        -- returns after its first second, past that head, with its read-ahead session open
        if e.global_position == first + 100 then g:append("b", 4, 500) end
        if e.global_position > first + 100 then pup.sleep(0.001) end
      end
    end)
    local n = assert(p:run { once = true })
    assert.is_true(n >= 200 and n < 2200, "handled " .. n)
    assert.equal(1, sessions(app))
    p:close()
    p = nil
    H.wait_until("the read-ahead session closed", 10, function() return sessions(app) == 0 end)
  end)

  -- Windows of 500 events of ~20 KB: more than the socket buffers hold, so the read-ahead
  -- session's backend blocks sending a window until the client reads it.
  local function big_log(prefix, naggs, per)
    local big = string.rep("x", 20000)
    for a = 1, naggs do
      local evs = {}
      for i = 1, per do
        evs[i] = { aggregate_type = "User", aggregate_id = prefix .. a, event_type = "S", payload = { i = i, big = big } }
      end
      assert(g.store:append(g.db, pup.any(), evs))
    end
  end

  it("a batch fails while its session still sends the next window: closed (no snapshot held), a reset not blocked", function()
    g = H.group("rb_fail", { batch_size = 500 })
    big_log("a", 3, 500)
    local app = named_processor(function(handle, first)
      return function(tx, e)
        if e.global_position == first + 700 then error("boom in batch 2") end -- window 3 is being read
        handle(tx, e)
      end
    end)
    local n, err = p:run { once = true }
    assert.is_nil(n)
    assert.is_truthy(tostring(err):find("boom in batch 2", 1, true), tostring(err))
    H.wait_until("the read-ahead session closed", 5, function() return sessions(app) == 0 end)
    local c = H.connect()
    assert(c:exec("BEGIN"))
    assert(c:exec("SET LOCAL lock_timeout = '3s'"))
    local ok, lerr = c:query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))::text AS x",
      "pupsourcing.generation/" .. g.names.checkpoints_table .. "/grp_counter")
    c:exec("ROLLBACK")
    c:close()
    assert(ok, "a reset would wait: " .. tostring(lerr))
  end)

  it("a reset during the retry backoff of a catch-up: no deadlock through the read-ahead, exact after", function()
    g = H.group("rb_rst", { batch_size = 500 })
    big_log("a", 3, 500)
    assert(g.db:exec("DROP SEQUENCE IF EXISTS t_rb_rst_once"))
    assert(g.db:exec("CREATE SEQUENCE t_rb_rst_once"))
    local first = g:one(('SELECT min(global_position) AS p FROM "%s"'):format(g.names.events_table)).p
    -- the fixture fails once at an event of batch 2, and retries 2 s later
    local src = H.read_file(g.file)
    src = src:gsub("handle = function%(tx, e%)\n", ("handle = function(tx, e)\n    if e.global_position == %d"
      .. " and assert(tx:query(\"SELECT nextval('t_rb_rst_once') AS n\"))[1].n == 1 then error('fail once') end\n")
      :format(first + 700), 1)
    src = src:gsub("batch_size = 500,", "batch_size = 500, on_error = 'retry', max_attempts = 5, retry_backoff = 2,", 1)
    H.write_file(g.file, src)
    local run = H.spawn(g:args { H.bin, "run", "--once", g.file })
    g.procs[#g.procs + 1] = run
    -- (nextval is not rolled back with the batch)
    H.wait_until("the first failure", 60, function() return g:one("SELECT is_called FROM t_rb_rst_once").is_called end, 0.05)
    local reset = H.spawn(g:args { H.bin, "reset", g.file })
    g.procs[#g.procs + 1] = reset
    assert.equal(0, H.wait_exit(reset, 30), H.stderr_of(reset))
    assert.equal(0, H.wait_exit(run, 60), H.stderr_of(run))
    local ok, why = g:exact()
    assert(ok, why)
  end)
  it("DDL on the events table during a catch-up, a handler reading that table: no deadlock through the client", function()
    g = H.group("rb_ddl", { batch_size = 500 })
    big_log("a", 3, 500) -- windows larger than the socket buffers
    local E = '"' .. g.names.events_table .. '"'
    local script = g.dir .. "/ddl.lua"
    H.write_file(script, [[
local pup = require "pupsourcing"
local db = assert(pup.connect(arg[1]))
assert(db:exec("SET lock_timeout = '5s'"))
assert(db:exec(arg[2]))
print("ddl done")
]])
    local ddl
    named_processor(function(handle, first)
      return function(tx, e)
        handle(tx, e)
        if e.global_position == first + 700 then -- batch 2, while window 3 is read beside it
          ddl = H.spawn { H.bin, script, H.url(), "ALTER TABLE " .. E .. " ADD COLUMN rb_ddl int" }
          g.procs[#g.procs + 1] = ddl
          -- done, or waiting for the table's locks (then this read waits behind it)
          H.wait_until("the ALTER to run or wait", 10, function()
            return H.stdout_of(ddl) ~= "" or g:one("SELECT count(*)::int AS n FROM pg_locks WHERE"
              .. " relation = $1::regclass AND NOT granted AND mode = 'AccessExclusiveLock'", g.names.events_table).n > 0
          end, 0.02)
          assert(tx:query("SELECT count(*) AS n FROM " .. E .. " WHERE global_position = $1", e.global_position))
        end
      end
    end)
    local t0 = pup.now()
    assert.equal(1500, assert(p:run { once = true }))
    assert.is_true(pup.now() - t0 < 60, ("took %.1f s"):format(pup.now() - t0))
    -- it did not time out waiting (a deadlock through the client ends only that way)
    assert.equal(0, H.wait_exit(ddl, 10), H.stderr_of(ddl))
    assert.equal("ddl done\n", H.stdout_of(ddl))
    local ok, why = g:exact()
    assert(ok, why)
  end)

  -- g with a role rb_rls_reader that may do what the fixture does; hide_a2() then hides
  -- aggregate a2 from it by a row-level security policy on the events table.
  local function rls_group(prefix)
    g = H.group(prefix, { batch_size = 10 })
    assert(g.db:exec("DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rb_rls_reader') THEN"
      .. " CREATE ROLE rb_rls_reader NOLOGIN; END IF; END$$"))
    assert(g.db:exec("GRANT pg_read_all_data, pg_write_all_data TO rb_rls_reader"))
    -- this area's sequence only: a grant on every sequence of the schema would race the
    -- DROPs of other specs running beside (tuple concurrently updated)
    assert(g.db:exec(('GRANT USAGE, SELECT ON SEQUENCE "%s_global_position_seq" TO rb_rls_reader')
      :format(g.names.events_table)))
    assert(g.db:exec("GRANT CREATE ON SCHEMA public TO rb_rls_reader")) -- the fixture's setup
    local E = '"' .. g.names.events_table .. '"'
    local function hide_a2()
      assert(g.db:exec(("ALTER TABLE %s ENABLE ROW LEVEL SECURITY"):format(E)))
      assert(g.db:exec(("CREATE POLICY rb_rls ON %s TO rb_rls_reader USING (aggregate_id <> 'a2')"):format(E)))
    end
    local function a2() return g:one(("SELECT coalesce(sum(n), 0)::int AS n FROM %s WHERE agg = 'a2'"):format(g.counter)).n end
    return hide_a2, a2
  end

  it("not used where a session's view depends on more than its login (SET ROLE, row-level security)", function()
    local hide_a2, a2 = rls_group("rb_rls")
    g:append("a", 4, 50)
    hide_a2()
    local app = named_processor()
    assert(db:exec("SET ROLE rb_rls_reader"))
    assert.equal(150, assert(p:run { once = true })) -- a2's 50 events are not this role's
    assert.equal(0, a2())
    assert.equal(0, sessions(app))
  end)

  it("a role and row-level security set between two runs of one processor: not used from then on", function()
    local hide_a2, a2 = rls_group("rb_rls2")
    g:append("a", 4, 50)
    named_processor()
    assert.equal(200, assert(p:run { once = true })) -- read ahead beside, a2 included
    assert.equal(50, a2())
    hide_a2()
    assert(db:exec("SET ROLE rb_rls_reader"))
    g:append("a", 4, 50)
    assert.equal(150, assert(p:run { once = true }))
    assert.equal(50, a2())
  end)
end)
