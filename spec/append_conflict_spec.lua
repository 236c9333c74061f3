-- Issue 10, append: a lost race is optimistic_concurrency whatever the names contain (it
-- was `database` when "event_id" appeared in the aggregate id, type or table name), and
-- an aggregate written without a head row (plain SQL, another tool) can be appended to.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("append", function()
  local dir

  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rmdir(dir) end)

  -- Holds version 1 of the aggregate in an open transaction, starts `n` writer processes
  -- that append version 1 too (they block on the unique key), then commits: each writer
  -- must lose with optimistic_concurrency.
  local function race(area, opts, atype, aid, n)
    local store, db, names = H.fresh_store(area)
    for k, v in pairs(opts or {}) do names[k] = v end
    if opts then
      store = pup.store(names)
      for _, t in ipairs { names.events_table, names.aggregate_heads_table, names.checkpoints_table } do
        assert(db:exec('DROP TABLE IF EXISTS "' .. t .. '" CASCADE'))
      end
      assert(db:exec('DROP SEQUENCE IF EXISTS "' .. names.events_table .. '_global_position_seq" CASCADE'))
      assert(store:migrate(db))
    end
    local app = "pup_race_" .. area
    local script = dir .. "/writer.lua"
    H.write_file(script, ([[
      local pup = require "pupsourcing"
      local db = assert(pup.connect())
      assert(db:exec("SET application_name = '%s'"))
      local store = pup.store{events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q}
      local res, err = store:append(db, pup.exact(0), {{aggregate_type = %q, aggregate_id = %q,
        event_type = "Raced", payload = "x"}})
      print(res and "appended" or err.code)
      print(err and tostring(err) or "")
    ]]):format(app, names.events_table, names.aggregate_heads_table, names.checkpoints_table, atype, aid))
    local holder = H.connect()
    local tx = assert(holder:begin())
    assert(store:append(tx, pup.exact(0), { H.event { aggregate_type = atype, aggregate_id = aid } }))
    local procs = {}
    for i = 1, n do procs[i] = H.spawn { H.bin, script } end
    H.wait_until(n .. " writers blocked on the unique key", 20, function()
      return assert(db:query("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1"
        .. " AND wait_event_type = 'Lock'", app))[1].n == n
    end)
    assert(tx:commit())
    for _, p in ipairs(procs) do
      assert.are.equal(0, H.wait_exit(p, 20), H.stderr_of(p))
      local out = H.stdout_of(p)
      assert.are.equal("optimistic_concurrency", out:match("^[^\n]*"), out)
      H.reap(p)
    end
    -- nothing of the losers was written
    local rows = assert(db:query(('SELECT count(*) AS n FROM "%s"'):format(names.events_table)))
    assert.are.equal(1, rows[1].n)
    holder:close()
    db:close()
  end

  it("a lost race with event_id in the aggregate type and id is optimistic_concurrency", function()
    race("race_a", nil, "event_id_Type", "event_id-" .. H.uid("x"), 3)
  end)

  it("a lost race on tables named with event_id is optimistic_concurrency", function()
    race("race_b", { events_table = "t_event_id_events", aggregate_heads_table = "t_event_id_heads",
                     checkpoints_table = "t_event_id_checkpoints" }, "Order", H.uid("o"), 2)
  end)

  it("a duplicate event_id of another aggregate is duplicate_event, not a conflict", function()
    local store, db = H.fresh_store("race_dup")
    local eid = pup.uuid()
    assert(store:append(db, pup.any(), { H.event { aggregate_id = "event_id-1", event_id = eid } }))
    local res, err = store:append(db, pup.any(), { H.event { aggregate_id = "event_id-2", event_id = eid } })
    assert.is_nil(res)
    assert.are.equal("duplicate_event", err.code, tostring(err))
    db:close()
  end)

  describe("an aggregate written without a head row", function()
    local store, db, names

    before_each(function()
      store, db, names = H.fresh_store("headless")
      for v = 1, 3 do
        assert(db:exec(('INSERT INTO "%s" (aggregate_type, aggregate_id, aggregate_version, event_id,'
          .. " event_type, payload) VALUES ('User', 'plain-1', $1, gen_random_uuid(), 'Imported', '\\x7b7d')")
          :format(names.events_table), v))
      end
    end)

    after_each(function() db:close() end)

    local function head()
      local rows = assert(db:query(('SELECT aggregate_version AS v FROM "%s" WHERE aggregate_id = $1')
        :format(names.aggregate_heads_table), "plain-1"))
      return rows[1] and rows[1].v
    end

    it("is at its highest event version: exact(n) appends after it and creates the head", function()
      assert.is_nil(head())
      local res = assert(store:append(db, pup.exact(3), { H.event { aggregate_id = "plain-1" } }))
      assert.are.equal(4, res.from_version)
      assert.are.equal(4, res.to_version)
      assert.are.equal(4, head())
      res = assert(store:append(db, pup.exact(4), H.events(2, { aggregate_id = "plain-1" })))
      assert.are.same({ 5, 6 }, { res.from_version, res.to_version })
      local stream = assert(store:read_aggregate_stream(db, "User", "plain-1"))
      assert.are.equal(6, #stream)
      for i, e in ipairs(stream) do assert.are.equal(i, e.aggregate_version) end
    end)

    it("a wrong expectation is a conflict naming the real version", function()
      local res, err = store:append(db, pup.no_stream(), { H.event { aggregate_id = "plain-1" } })
      assert.is_nil(res)
      assert.are.equal("optimistic_concurrency", err.code)
      assert.is_truthy(err.message:find("version 3", 1, true), err.message)
      res, err = store:append(db, pup.exact(1), { H.event { aggregate_id = "plain-1" } })
      assert.is_nil(res)
      assert.are.equal("optimistic_concurrency", err.code)
      assert.is_nil(head())
    end)

    it("any() appends after the highest version", function()
      local res = assert(store:append(db, pup.any(), { H.event { aggregate_id = "plain-1" } }))
      assert.are.equal(4, res.from_version)
    end)

    it("a head row left behind by another writer does not block the aggregate", function()
      assert(store:append(db, pup.exact(3), { H.event { aggregate_id = "plain-1" } })) -- head = 4
      assert(db:exec(('INSERT INTO "%s" (aggregate_type, aggregate_id, aggregate_version, event_id,'
        .. " event_type, payload) VALUES ('User', 'plain-1', 5, gen_random_uuid(), 'Imported', '\\x7b7d')")
        :format(names.events_table)))
      assert.are.equal(4, head())
      local res, err = store:append(db, pup.exact(4), { H.event { aggregate_id = "plain-1" } })
      assert.is_nil(res)
      assert.are.equal("optimistic_concurrency", err.code)
      assert.is_truthy(err.message:find("version 5", 1, true), err.message)
      res = assert(store:append(db, pup.exact(5), { H.event { aggregate_id = "plain-1" } }))
      assert.are.same({ 6, 6 }, { res.from_version, res.to_version })
      res = assert(store:append(db, pup.any(), { H.event { aggregate_id = "plain-1" } }))
      assert.are.equal(7, res.from_version)
      assert.are.equal(7, head())
    end)
  end)
end)
