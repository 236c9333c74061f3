-- Issue 3, processing rules, through pup.processor against the real database:
-- transactional batches, handler errors, pipelined writes, scoping, batch size, setup,
-- partitions with their own checkpoints, standby, pup.status and pup.reset.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local RM = "t_proc_rm" -- the read model of these specs

describe("pup.processor", function()
  local store, db, names

  local function q(sql, ...) return assert(db:query(sql, ...)) end
  local function count(sql, ...) return q(sql, ...)[1].n end
  local function rm_count() return count(("SELECT count(*) AS n FROM %s"):format(RM)) end
  local function checkpoints(name)
    return q(('SELECT * FROM "%s" WHERE projection_name = $1 ORDER BY total_partitions, partition_key')
      :format(names.checkpoints_table), name)
  end
  local function checkpoint(name, key, total)
    local rows = q(('SELECT last_global_position AS p FROM "%s" WHERE projection_name = $1'
      .. ' AND partition_key = $2 AND total_partitions = $3'):format(names.checkpoints_table),
      name, key or 0, total or 1)
    return rows[1] and rows[1].p or 0
  end

  -- n events of one aggregate; returns the append result.
  local function append(id, n, over)
    local o = { aggregate_id = id }
    for k, v in pairs(over or {}) do o[k] = v end
    return assert(store:append(db, pup.any(), H.events(n, o)))
  end

  -- A projection writing one read-model row per event (pipelined, asserted).
  local function writer(name, extra)
    local p = {
      name = name,
      handle = function(tx, e)
        assert(tx:exec(("INSERT INTO %s (pos, agg, etype) VALUES ($1, $2, $3)"):format(RM),
          e.global_position, e.aggregate_id, e.event_type))
      end,
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  before_each(function()
    store, db, names = H.fresh_store("proc")
    assert(db:exec("DROP TABLE IF EXISTS " .. RM))
    assert(db:exec(("CREATE TABLE %s (pos bigint, agg text, etype text, xid text DEFAULT pg_current_xact_id()::text)"):format(RM)))
  end)

  after_each(function() db:close() end)

  describe("one batch = one transaction", function()
    it("commits the handler writes and the checkpoint together, invisible until commit", function()
      append("a", 5)
      local other = H.connect()
      local seen_outside
      local p = pup.processor(db, writer("tx1", {
        handle = function(tx, e)
          assert(tx:exec(("INSERT INTO %s (pos) VALUES ($1)"):format(RM), e.global_position))
          if e.global_position == 5 then
            -- another connection sees neither the rows nor a moved checkpoint yet
            local rows = assert(other:query(("SELECT count(*) AS n FROM %s"):format(RM)))
            local cp = assert(other:query(('SELECT count(*) AS n FROM "%s" WHERE last_global_position > 0')
              :format(names.checkpoints_table)))
            seen_outside = { rows[1].n, cp[1].n }
          end
        end,
      }), { store = store })
      assert.equal(5, p:run_once())
      assert.same({ 0, 0 }, seen_outside)
      -- every read-model row and the checkpoint row were written by one transaction
      local xids = q(("SELECT DISTINCT xmin::text AS x FROM %s"):format(RM))
      assert.equal(1, #xids)
      local cpx = q(('SELECT xmin::text AS x, last_global_position AS p FROM "%s" WHERE projection_name = $1')
        :format(names.checkpoints_table), "tx1")
      assert.equal(1, #cpx)
      assert.equal(xids[1].x, cpx[1].x)
      assert.equal(5, cpx[1].p)
      other:close()
    end)

    it("a batch boundary is a transaction boundary (batch_size 2 -> 3 transactions for 5 events)", function()
      append("a", 5)
      local p = pup.processor(db, writer("tx2"), { store = store, batch_size = 2 })
      assert.equal(2, p:run_once())
      assert.equal(2, p:run_once())
      assert.equal(1, p:run_once())
      assert.equal(0, p:run_once())
      local rows = q(("SELECT xid, count(*) AS n FROM %s GROUP BY xid ORDER BY min(pos)"):format(RM))
      assert.equal(3, #rows)
      assert.same({ 2, 2, 1 }, { rows[1].n, rows[2].n, rows[3].n })
    end)
  end)

  describe("handler errors", function()
    local function assert_handler_error(err, name, pos, etype, event_id)
      assert.is_table(err)
      assert.equal("handler", err.code)
      local m = tostring(err)
      assert.is_truthy(m:find(name, 1, true), m)
      assert.is_truthy(m:find("partition 0/1", 1, true), m)
      assert.is_truthy(m:find("global position " .. pos, 1, true), m)
      assert.is_truthy(m:find(etype, 1, true), m)
      assert.is_truthy(m:find(event_id, 1, true), m)
      return m
    end

    local function event_at(pos)
      return assert(store:read_events(db, pos - 1, { limit = 1 }))[1]
    end

    it("a raise rolls back the batch (earlier rows of the batch too), the checkpoint stays, the error names everything", function()
      append("a", 5)
      local fail = true
      local p = pup.processor(db, writer("raiser", {
        handle = function(tx, e)
          assert(tx:exec(("INSERT INTO %s (pos) VALUES ($1)"):format(RM), e.global_position))
          if fail and e.global_position == 3 then error("boom at three") end
        end,
      }), { store = store })
      local n, err = p:run_once()
      assert.is_nil(n)
      local ev = event_at(3)
      local m = assert_handler_error(err, "raiser", 3, ev.event_type, ev.event_id)
      assert.is_truthy(m:find("boom at three", 1, true), m)
      assert.is_truthy(m:find("stack traceback", 1, true), m)
      assert.is_truthy(m:find("processor_spec.lua", 1, true), m) -- the traceback shows the handler
      assert.equal(0, rm_count())                                -- rows of positions 1 and 2 are gone
      assert.equal(0, checkpoint("raiser"))
      -- the same processor goes on once the handler is fixed
      fail = false
      assert.equal(5, p:run_once())
      assert.equal(5, rm_count())
      assert.equal(5, checkpoint("raiser"))
    end)

    it("a failing later batch keeps the checkpoint of the earlier one", function()
      append("a", 5)
      local p = pup.processor(db, writer("raiser2", {
        handle = function(tx, e)
          assert(tx:exec(("INSERT INTO %s (pos) VALUES ($1)"):format(RM), e.global_position))
          if e.global_position == 4 then error("boom") end
        end,
      }), { store = store, batch_size = 2 })
      assert.equal(2, p:run_once())
      local n, err = p:run_once()
      assert.is_nil(n)
      assert.equal("handler", err.code)
      assert.equal(2, checkpoint("raiser2"))
      assert.same({ { pos = 1 }, { pos = 2 } }, q(("SELECT pos FROM %s ORDER BY pos"):format(RM)))
      -- and it fails again at the same place: nothing skipped
      n, err = p:run_once()
      assert.is_nil(n)
      assert.is_truthy(tostring(err):find("global position 4", 1, true), tostring(err))
    end)

    it("an ignored failed statement (tx:exec('bad sql') without assert) still fails the batch, at its event", function()
      append("a", 4)
      local p = pup.processor(db, writer("badsql", {
        handle = function(tx, e)
          assert(tx:exec(("INSERT INTO %s (pos) VALUES ($1)"):format(RM), e.global_position))
          if e.global_position == 2 then tx:exec("bad sql") end -- result ignored
        end,
      }), { store = store })
      local n, err = p:run_once()
      assert.is_nil(n)
      local ev = event_at(2)
      assert_handler_error(err, "badsql", 2, ev.event_type, ev.event_id)
      assert.equal("42601", err.sqlstate)
      assert.equal(0, rm_count())
      assert.equal(0, checkpoint("badsql"))
    end)

    it("an ignored pipelined statement that fails on the server fails the batch, attributed to the event that sent it", function()
      append("a", 700) -- more statements than the pipeline window: the error is read back later
      local returned = {}
      local p = pup.processor(db, writer("pipefail", {
        handle = function(tx, e)
          if e.global_position == 3 then
            returned[#returned + 1] = tx:exec(("INSERT INTO %s (pos) VALUES ($1::bigint / 0)"):format(RM), 1)
          else
            assert(tx:exec(("INSERT INTO %s (pos) VALUES ($1)"):format(RM), e.global_position))
          end
        end,
      }), { store = store, batch_size = 1000 })
      local n, err = p:run_once()
      assert.is_nil(n)
      assert.same({ true }, returned) -- pipelined: true at once, the error comes later
      local ev = event_at(3)
      local m = assert_handler_error(err, "pipefail", 3, ev.event_type, ev.event_id)
      assert.equal("22012", err.sqlstate, m)
      assert.equal(0, rm_count())
      assert.equal(0, checkpoint("pipefail"))
    end)

    it("`return nil, msg` fails the batch", function()
      append("a", 3)
      local p = pup.processor(db, writer("retnil", {
        handle = function(tx, e)
          assert(tx:exec(("INSERT INTO %s (pos) VALUES ($1)"):format(RM), e.global_position))
          if e.global_position == 2 then return nil, "refused by the handler" end
        end,
      }), { store = store })
      local n, err = p:run_once()
      assert.is_nil(n)
      local ev = event_at(2)
      local m = assert_handler_error(err, "retnil", 2, ev.event_type, ev.event_id)
      assert.is_truthy(m:find("refused by the handler", 1, true), m)
      assert.equal(0, rm_count())
      assert.equal(0, checkpoint("retnil"))
    end)

    it("tx:commit() and tx:rollback() inside a handler raise", function()
      append("a", 2)
      for _, method in ipairs { "commit", "rollback" } do
        local raised
        local p = pup.processor(db, writer("commit_" .. method, {
          handle = function(tx, e)
            assert(tx:exec(("INSERT INTO %s (pos) VALUES ($1)"):format(RM), e.global_position))
            local ok, e2 = pcall(tx[method], tx)
            raised = not ok and tostring(e2)
            tx[method](tx)
          end,
        }), { store = store })
        local n, err = p:run_once()
        assert.is_nil(n)
        assert.equal("handler", err.code)
        assert.is_string(raised)
        assert.is_truthy(tostring(err):find("global position 1", 1, true), tostring(err))
        assert.equal(0, rm_count())
        assert.equal(0, checkpoint("commit_" .. method))
      end
    end)
  end)

  describe("handler transaction", function()
    it("assert(tx:exec(...)) works and a pipelined exec returns true", function()
      append("a", 3)
      local got = {}
      local p = pup.processor(db, writer("execret", {
        handle = function(tx, e)
          local r = assert(tx:exec(("INSERT INTO %s (pos) VALUES ($1)"):format(RM), e.global_position))
          got[#got + 1] = r
        end,
      }), { store = store })
      assert.equal(3, p:run_once())
      assert.same({ true, true, true }, got)
      assert.equal(3, rm_count())
    end)

    it("tx:query returns rows, including rows written by earlier pipelined execs of the same batch", function()
      append("a", 5)
      local counts, mine = {}, {}
      local p = pup.processor(db, writer("query", {
        handle = function(tx, e)
          assert(tx:exec(("INSERT INTO %s (pos, agg) VALUES ($1, $2)"):format(RM), e.global_position, e.aggregate_id))
          local rows = assert(tx:query(("SELECT count(*) AS n FROM %s"):format(RM)))
          counts[#counts + 1] = rows[1].n
          local r2 = assert(tx:query(("SELECT pos, agg FROM %s WHERE pos = $1"):format(RM), e.global_position))
          mine[#mine + 1] = r2[1] and r2[1].agg
        end,
      }), { store = store })
      assert.equal(5, p:run_once())
      assert.same({ 1, 2, 3, 4, 5 }, counts)
      assert.same({ "a", "a", "a", "a", "a" }, mine)
    end)
  end)

  describe("scope", function()
    before_each(function()
      append("u1", 2, { aggregate_type = "User", event_type = "A" })
      append("o1", 2, { aggregate_type = "Order", event_type = "A" })
      append("u2", 1, { aggregate_type = "User", event_type = "B" })
      append("o2", 1, { aggregate_type = "Order", event_type = "C" })
      append("x1", 1, { aggregate_type = "Other", event_type = "A" }) -- last event: out of most scopes
    end)

    local function seen_by(extra)
      local seen = {}
      local proj = writer("scope_" .. H.uid("s"):gsub("%-", "_"), extra)
      proj.handle = function(_, e) seen[#seen + 1] = e.aggregate_type .. "/" .. e.event_type end
      local p = pup.processor(db, proj, { store = store })
      assert(p:run_once())
      assert.equal(0, p:run_once())
      assert.equal(7, checkpoint(proj.name)) -- the checkpoint moves past out-of-scope events
      return seen
    end

    it("aggregate_types", function()
      assert.same({ "User/A", "User/A", "User/B" }, seen_by { aggregate_types = { "User" } })
    end)

    it("event_types", function()
      assert.same({ "User/A", "User/A", "Order/A", "Order/A", "Order/C", "Other/A" },
        seen_by { event_types = { "A", "C" } })
    end)

    it("both together", function()
      assert.same({ "User/A", "User/A", "Order/A", "Order/A" },
        seen_by { aggregate_types = { "User", "Order" }, event_types = { "A" } })
    end)

    it("no scope sees everything", function()
      assert.equal(7, #seen_by {})
    end)
  end)

  describe("batch_size", function()
    it("limits the events of one batch; the option overrides the projection's field", function()
      append("a", 25)
      local p = pup.processor(db, writer("bs1"), { store = store, batch_size = 10 })
      assert.same({ 10, 10, 5, 0 }, { p:run_once(), p:run_once(), p:run_once(), p:run_once() })
      local p2 = pup.processor(db, writer("bs2", { batch_size = 7 }), { store = store })
      assert.equal(7, p2:run_once())
      assert.equal(7, checkpoint("bs2"))
      local p3 = pup.processor(db, writer("bs3", { batch_size = 7 }), { store = store, batch_size = 20 })
      assert.equal(20, p3:run_once())
      local p4 = pup.processor(db, writer("bs4"), { store = store })
      assert.equal(25, p4:run_once()) -- default 100
    end)
  end)

  describe("setup", function()
    it("runs once, before the first batch, even when there is nothing to handle", function()
      local log = {}
      local proj = writer("setup1", {
        setup = function(tx)
          log[#log + 1] = "setup"
          assert(tx:exec("DROP TABLE IF EXISTS t_proc_setup"))
          assert(tx:exec("CREATE TABLE t_proc_setup (pos bigint)"))
        end,
        handle = function(tx, e)
          log[#log + 1] = e.global_position
          assert(tx:exec("INSERT INTO t_proc_setup VALUES ($1)", e.global_position))
        end,
      })
      local p = pup.processor(db, proj, { store = store, batch_size = 2 })
      assert.equal(0, p:run_once())
      assert.same({ "setup" }, log)
      append("a", 3)
      assert.equal(2, p:run_once())
      assert.equal(1, p:run_once())
      assert.equal(0, p:run_once())
      assert.same({ "setup", 1, 2, 3 }, log)
      assert.equal(3, count("SELECT count(*) AS n FROM t_proc_setup"))
      assert(db:exec("DROP TABLE t_proc_setup"))
    end)

    it("a failing setup is an error and handles nothing", function()
      append("a", 2)
      local handled = 0
      local p = pup.processor(db, writer("setup2", {
        setup = function() error("no setup today") end,
        handle = function() handled = handled + 1 end,
      }), { store = store })
      local n, err = p:run_once()
      assert.is_nil(n)
      assert.is_truthy(tostring(err):find("no setup today", 1, true), tostring(err))
      assert.equal(0, handled)
      assert.equal(0, checkpoint("setup2"))
    end)
  end)

  describe("partitions", function()
    it("4 processors (0..3 of 4) over 20,000 events handle each event exactly once, with their own checkpoints", function()
      -- 200 aggregates x 100 events, appended in few statements
      for a = 1, 200 do
        assert(store:append(db, pup.any(), H.events(100, { aggregate_id = "agg-" .. a, event_type = "E" })))
      end
      local head = assert(store:head(db))
      assert.equal(20000, head)
      local seen, wrong = {}, {}
      local procs, conns = {}, {}
      for k = 0, 3 do
        conns[k] = H.connect()
        local proj = {
          name = "parts",
          handle = function(tx, e)
            if pup.partition_of(e.aggregate_id, 4) ~= k then wrong[#wrong + 1] = e.global_position end
            seen[e.global_position] = (seen[e.global_position] or 0) + 1
            assert(tx:exec(("INSERT INTO %s (pos, agg) VALUES ($1, $2)"):format(RM), e.global_position, e.aggregate_id))
          end,
        }
        procs[k] = pup.processor(conns[k], proj, { store = store, partition_key = k, total_partitions = 4, batch_size = 1000 })
      end
      local deadline = pup.now() + 30
      repeat
        local busy = false
        for k = 0, 3 do
          local n = assert(procs[k]:run_once())
          if n > 0 or procs[k]:stats().position < head then busy = true end
        end
      until not busy or pup.now() > deadline
      assert.same({}, wrong)
      local total, dups = 0, 0
      for pos = 1, head do
        local c = seen[pos] or 0
        total = total + (c > 0 and 1 or 0)
        if c > 1 then dups = dups + 1 end
      end
      assert.equal(20000, total)
      assert.equal(0, dups)
      local r = q(("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM %s"):format(RM))[1]
      assert.same({ 20000, 20000 }, { r.n, r.d })
      -- the read model of each partition holds exactly its aggregates
      local per = q(("SELECT agg, count(*) AS n FROM %s GROUP BY agg"):format(RM))
      assert.equal(200, #per)
      for _, row in ipairs(per) do assert.equal(100, row.n) end
      -- one checkpoint row per partition, with the documented columns
      local cps = q(('SELECT * FROM "%s" WHERE projection_name = $1 ORDER BY partition_key'):format(names.checkpoints_table), "parts")
      assert.equal(4, #cps)
      for i, row in ipairs(cps) do
        assert.equal("parts", row.projection_name)
        assert.equal(i - 1, row.partition_key)
        assert.equal(4, row.total_partitions)
        assert.equal(20000, row.last_global_position)
        assert.is_string(row.updated_at)
      end
      for k = 0, 3 do procs[k]:close() conns[k]:close() end
    end)

    it("a partition skips other partitions' events but its checkpoint passes them", function()
      local ids = { "a", "c", "user-1", "order-42" } -- partitions of 4: 0, 2, 0, 0
      for _, id in ipairs(ids) do append(id, 1) end
      local seen = {}
      local proj = { name = "p2", handle = function(_, e) seen[#seen + 1] = e.aggregate_id end }
      local p = pup.processor(db, proj, { store = store, partition_key = 2, total_partitions = 4 })
      assert.equal(1, p:run_once())
      assert.same({ "c" }, seen)
      assert.equal(4, checkpoint("p2", 2, 4))
    end)

    it("rejects a partition key outside 0..total-1 and total < 1", function()
      local proj = writer("badpart")
      assert.has_error(function() pup.processor(db, proj, { store = store, partition_key = 4, total_partitions = 4 }) end)
      assert.has_error(function() pup.processor(db, proj, { store = store, partition_key = 0, total_partitions = 0 }) end)
      assert.has_error(function() pup.processor(db, proj, { store = store, partition_key = -1, total_partitions = 2 }) end)
    end)
  end)

  describe("standby", function()
    it("a second processor of the same partition gets nil, err while the first holds it, and takes over after it closes", function()
      append("a", 3)
      local db1, db2 = H.connect(), H.connect()
      local handled = { 0, 0 }
      local function proj(i)
        return { name = "standby", handle = function(tx, e)
          handled[i] = handled[i] + 1
          assert(tx:exec(("INSERT INTO %s (pos) VALUES ($1)"):format(RM), e.global_position))
        end }
      end
      local p1 = pup.processor(db1, proj(1), { store = store, batch_size = 1 })
      local p2 = pup.processor(db2, proj(2), { store = store, batch_size = 1 })
      assert.equal(1, p1:run_once())
      local n, err = p2:run_once()
      assert.is_nil(n)
      assert.is_table(err)
      assert.is_string(err.code)
      assert.equal(1, p1:run_once())
      -- another layout of the same projection is refused while this one is live
      local other = pup.processor(db2, { name = "standby", handle = function() end },
        { store = store, partition_key = 1, total_partitions = 2 })
      local on, oerr = other:run_once()
      assert.is_nil(on)
      assert.equal("layout_conflict", oerr.code)
      other:close()
      -- the first dies (its connection closes); the second takes over where it stopped
      p1:close()
      db1:close()
      local deadline, got = pup.now() + 10
      repeat
        got = p2:run_once()
        if not got then pup.sleep(0.05) end
      until got or pup.now() > deadline
      assert.equal(1, got)
      assert.equal(0, p2:run_once())
      assert.same({ 2, 1 }, handled)
      assert.same({ { pos = 1 }, { pos = 2 }, { pos = 3 } }, q(("SELECT pos FROM %s ORDER BY pos"):format(RM)))
      assert.equal(3, checkpoint("standby"))
      p2:close()
      db2:close()
    end)
  end)

  describe("pup.status", function()
    it("lists projection, partition, position, head, lag, update time and waiting per partition", function()
      append("a", 10)
      local p = pup.processor(db, writer("st"), { store = store, batch_size = 4, partition_key = 1, total_partitions = 2 })
      assert(p:run_once())
      local rows = assert(pup.status(db, store))
      assert.equal(2, #rows) -- the layout's every partition has a row from the start
      assert.equal(0, rows[1].position)
      local r = rows[2]
      assert.equal("st", r.projection)
      assert.equal(1, r.partition_key)
      assert.equal(2, r.total_partitions)
      -- a batch reads batch_size x total_partitions positions (about batch_size of its own)
      assert.equal(8, r.position)
      assert.equal(10, r.head)
      assert.equal(2, r.lag)
      assert.is_string(r.updated_at)
      assert.equal(pup.null, r.waiting_position)
      assert.equal(pup.null, r.waiting_since)
    end)
  end)

  describe("pup.reset", function()
    local function resettable(name, reset)
      return writer(name, { reset = reset or function(tx) assert(tx:exec("DELETE FROM " .. RM)) end })
    end

    it("deletes every checkpoint of the projection and runs reset(tx) in one transaction", function()
      append("a", 6)
      for k = 0, 1 do
        local p = pup.processor(db, resettable("rs"), { store = store, partition_key = k, total_partitions = 2 })
        assert(p:run_once())
      end
      local keep = pup.processor(db, writer("rs_other"), { store = store })
      assert(keep:run_once())
      assert.equal(2, #checkpoints("rs"))
      local inside
      local proj = resettable("rs", function(tx)
        -- the checkpoints are already deleted in this very transaction
        inside = assert(tx:query(('SELECT count(*) AS n FROM "%s" WHERE projection_name = $1'):format(names.checkpoints_table), "rs"))[1].n
        assert(tx:exec(("DELETE FROM %s WHERE agg IS NOT NULL AND etype IS NOT NULL AND pos <= 6"):format(RM)))
      end)
      assert(pup.reset(db, proj, store))
      assert.equal(0, inside)
      assert.equal(0, #checkpoints("rs"))
      assert.equal(1, #checkpoints("rs_other"))
      assert.equal(0, rm_count())
      -- handled again from the start
      local p = pup.processor(db, resettable("rs"), { store = store })
      assert.equal(6, p:run_once())
    end)

    it("a failing reset deletes nothing", function()
      append("a", 3)
      local p = pup.processor(db, resettable("rs2"), { store = store })
      assert.equal(3, p:run_once())
      local ok, err = pup.reset(db, resettable("rs2", function(tx)
        assert(tx:exec("DELETE FROM " .. RM))
        error("reset refused")
      end), store)
      assert.is_nil(ok)
      assert.is_truthy(tostring(err):find("reset refused", 1, true), tostring(err))
      assert.equal(1, #checkpoints("rs2"))
      assert.equal(3, checkpoint("rs2"))
      assert.equal(3, rm_count())
    end)
  end)
end)
