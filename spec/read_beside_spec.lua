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

  it("killed in the middle of a catch-up: opened again, nothing lost or doubled; closed with the processor", function()
    g = H.group("rb_kill", { batch_size = 10 })
    g:append("a", 10, 100) -- 1,000 events: a hundred windows
    local app = H.uid("rb_kill"):gsub("[^%w_]", "_")
    db = assert(pup.connect(url_named(app)))
    local first = g:one(('SELECT min(global_position) AS p FROM "%s"'):format(g.names.events_table)).p
    local killed = {}
    local proj = pup.load_projection(g.file)
    local handle = proj.handle
    proj.handle = function(tx, e)
      handle(tx, e)
      if e.global_position == first + 300 or e.global_position == first + 700 then
        -- every session of this test but the processor's own: the read-ahead's
        local r = assert(tx:query("SELECT count(*)::int AS n FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
          .. " WHERE application_name = $1 AND pid <> pg_backend_pid()) k", app))
        killed[#killed + 1] = r[1].n
      end
    end
    p = pup.processor(db, proj, { store = g.store, batch_size = 10, poll_interval = 0.05 })
    assert.equal(1000, assert(p:run { once = true }))
    assert.same({ 1, 1 }, killed) -- there was one to kill both times: it was opened again
    local ok, why = g:exact()
    assert(ok, why)
    -- the processor's connection renamed itself (the fixture's setup): this is its reader
    assert.equal(1, sessions(app))
    p:close()
    p = nil
    H.wait_until("the read-ahead session closed", 10, function() return sessions(app) == 0 end)
  end)

  it("a live processor (windows not full) opens no second session", function()
    g = H.group("rb_live", { batch_size = 100 })
    g:append("a", 2, 20)
    local app = H.uid("rb_live"):gsub("[^%w_]", "_")
    db = assert(pup.connect(url_named(app)))
    p = pup.processor(db, pup.load_projection(g.file), { store = g.store, batch_size = 100, poll_interval = 0.05 })
    assert.equal(40, assert(p:run { once = true }))
    assert.equal(0, sessions(app)) -- the processor's connection renamed itself: none else
  end)
end)
