-- Issue 13: set-based projections. handle_batch(tx, events) gets a batch's events at once,
-- in order; the gap rule, exactly-once and the batch transaction hold as for handle; a
-- failure fails the whole batch and names its positions, or the event the handler names.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local RM = "t_hb_rm"

describe("handle_batch", function()
  local store, db, T, conns

  local function q(sql, ...) return assert(db:query(sql, ...)) end
  local function checkpoint(name)
    local rows = q(('SELECT last_global_position AS p FROM %s WHERE projection_name = $1')
      :format(T.checkpoints_table), name)
    return rows[1] and rows[1].p or 0
  end
  local function append(conn, id, n)
    return assert(store:append(conn, pup.any(), H.events(n, { aggregate_id = id }))).global_positions
  end

  -- One statement per batch: a row per event with the batch's number and its index in it.
  local function set_based(name, extra)
    local calls = 0
    local p = {
      name = name,
      handle_batch = function(tx, events)
        calls = calls + 1
        local pos, idx = {}, {}
        for i, e in ipairs(events) do pos[i], idx[i] = e.global_position, i end
        assert(tx:exec(("INSERT INTO %s (pos, batch, idx) SELECT p, $3, i FROM unnest($1::bigint[], $2::int[]) AS u(p, i)")
          :format(RM), "{" .. table.concat(pos, ",") .. "}", "{" .. table.concat(idx, ",") .. "}", calls))
      end,
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  before_each(function()
    store, db, T = H.fresh_store("hb")
    assert(db:exec("DROP TABLE IF EXISTS " .. RM))
    assert(db:exec("CREATE TABLE " .. RM .. " (pos bigint NOT NULL, batch int NOT NULL, idx int NOT NULL)"))
    conns = {}
  end)

  after_each(function()
    for _, c in ipairs(conns) do pcall(c.close, c) end
    db:close()
  end)

  it("gets every event once, in order, batch by batch, in the batch transaction", function()
    local all = {}
    for i = 1, 5 do
      for _, p in ipairs(append(db, "hb-" .. i, 5)) do all[#all + 1] = p end
    end
    table.sort(all)
    local p = pup.processor(db, set_based("hb_order"), { store = store, batch_size = 7 })
    local total = 0
    repeat
      local n = assert(p:run_once())
      total = total + n
    until n == 0
    assert.equal(25, total)
    local rows = q("SELECT pos, batch, idx FROM " .. RM .. " ORDER BY pos")
    assert.equal(25, #rows)
    for i, r in ipairs(rows) do
      assert.equal(all[i], r.pos)
      assert.equal((i - 1) // 7 + 1, r.batch, "batch of position " .. r.pos)
      assert.equal((i - 1) % 7 + 1, r.idx, "order within the batch")
    end
    assert.equal(all[#all], checkpoint("hb_order"))
    p:close()
  end)

  it("stops at a hole an open writer holds and takes it once committed (gap rule)", function()
    local before = append(db, "hb-a", 3)
    local w = H.connect()
    conns[#conns + 1] = w
    local tx = assert(w:begin())
    local hole = append(tx, "hb-hole", 1)[1]
    local after = append(db, "hb-b", 3)
    local p = pup.processor(db, set_based("hb_gap"), { store = store, batch_size = 100 })
    assert.equal(3, assert(p:run_once()))
    assert.equal(before[3], checkpoint("hb_gap"))
    assert(tx:commit())
    assert.equal(4, assert(p:run_once()))
    local rows = q("SELECT pos FROM " .. RM .. " ORDER BY pos")
    local want = { before[1], before[2], before[3], hole, after[1], after[2], after[3] }
    assert.equal(#want, #rows)
    for i, r in ipairs(rows) do assert.equal(want[i], r.pos) end
    p:close()
  end)

  it("a failure rolls back the whole batch and names its positions, or the event the handler names", function()
    local pos = append(db, "hb-f", 6)
    -- returned error naming an event
    local p = pup.processor(db, set_based("hb_fail", {
      handle_batch = function(tx, events)
        assert(tx:exec("INSERT INTO " .. RM .. " (pos, batch, idx) VALUES (1, 1, 1)"))
        return nil, { position = events[4].global_position, message = "no user for this one" }
      end,
    }), { store = store, batch_size = 100 })
    local n, err = p:run_once()
    assert.is_nil(n)
    assert.equal("handler", err.code)
    assert.matches("global position " .. pos[4], err.message, 1, true)
    assert.matches("no user for this one", err.message, 1, true)
    assert.matches(("positions %d..%d"):format(pos[1], pos[6]), err.message, 1, true)
    p:close()
    -- a raise names the batch
    p = pup.processor(db, set_based("hb_fail", {
      handle_batch = function(tx)
        assert(tx:exec("INSERT INTO " .. RM .. " (pos, batch, idx) VALUES (1, 1, 1)"))
        error("set-based write failed")
      end,
    }), { store = store, batch_size = 100 })
    n, err = p:run_once()
    assert.is_nil(n)
    assert.equal("handler", err.code)
    assert.matches(("handle_batch failed on the batch of 6 event(s) at global positions %d..%d"):format(pos[1], pos[6]),
      err.message, 1, true)
    assert.matches("set-based write failed", err.message, 1, true)
    p:close()
    -- a failed statement (seen at the end of the pipeline) names the batch too
    p = pup.processor(db, set_based("hb_fail", {
      handle_batch = function(tx) tx:exec("INSERT INTO no_such_table_hb VALUES (1)") end,
    }), { store = store, batch_size = 100 })
    n, err = p:run_once()
    assert.is_nil(n)
    assert.matches("handle_batch failed on the batch of 6 event(s)", err.message, 1, true)
    assert.matches("no_such_table_hb", err.message, 1, true)
    p:close()
    assert.equal(0, q("SELECT count(*) AS n FROM " .. RM)[1].n, "the batch's writes rolled back")
    assert.equal(0, checkpoint("hb_fail"))
    -- and a working handler then takes all six, once
    p = pup.processor(db, set_based("hb_fail"), { store = store, batch_size = 100 })
    assert.equal(6, assert(p:run_once()))
    assert.equal(6, q("SELECT count(DISTINCT pos) AS n FROM " .. RM)[1].n)
    p:close()
  end)

  it("under on_error = skip the event the handler names is dead-lettered; the rest applied once", function()
    local pos = append(db, "hb-s", 6)
    local bad = pos[4]
    local p = pup.processor(db, set_based("hb_skip", {
      on_error = "skip",
      handle_batch = function(tx, events)
        for _, e in ipairs(events) do
          if e.global_position == bad then return nil, { position = bad, message = "cannot take this one" } end
        end
        local list = {}
        for i, e in ipairs(events) do list[i] = e.global_position end
        assert(tx:exec(("INSERT INTO %s (pos, batch, idx) SELECT p, 1, 1 FROM unnest($1::bigint[]) AS p"):format(RM),
          "{" .. table.concat(list, ",") .. "}"))
      end,
    }), { store = store, batch_size = 100 })
    local total = 0
    for _ = 1, 3 do total = total + assert(p:run_once()) end
    p:close()
    local rows = q("SELECT pos FROM " .. RM .. " ORDER BY pos")
    local got = {}
    for i, r in ipairs(rows) do got[i] = r.pos end
    assert.same({ pos[1], pos[2], pos[3], pos[5], pos[6] }, got)
    local dead = q(('SELECT global_position, error FROM "%s_dead_letters" WHERE projection_name = $1')
      :format(T.checkpoints_table), "hb_skip")
    assert.equal(1, #dead)
    assert.equal(bad, dead[1].global_position)
    assert.matches("cannot take this one", dead[1].error, 1, true)
    assert.equal(pos[6], checkpoint("hb_skip"))
  end)

  it("is refused on a reactor (it gets no transaction)", function()
    local ok, err = pcall(pup.check_projection, { name = "r", kind = "reactor", handle_batch = function() end })
    assert.is_false(ok)
    assert.matches("takes handle(event), not handle_batch", err, 1, true)
  end)

  it("is validated: a function, and not together with handle", function()
    local ok, err = pcall(pup.check_projection, { name = "x", handle = function() end, handle_batch = function() end })
    assert.is_false(ok)
    assert.matches("has both `handle` and `handle_batch`", err, 1, true)
    ok, err = pcall(pup.check_projection, { name = "x", handle_batch = 5 })
    assert.is_false(ok)
    assert.matches("`handle_batch` must be a function, got number", err, 1, true)
    ok, err = pcall(pup.check_projection, { name = "x" })
    assert.is_false(ok)
    assert.matches("`handle` must be a function, got nil", err, 1, true)
    assert.equal("y", pup.check_projection({ name = "y", handle_batch = function() end }).name)
  end)
end)
