-- The gap rule of docs/ordering.md, driven deterministically with several connections:
-- a processor never steps over a position that a running transaction may still fill.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("gap-safe reading", function()
  local store, db, names, seen

  local function projection()
    return {
      name = "ordering",
      handle = function(_, e) seen[#seen + 1] = e end,
    }
  end

  local function positions()
    local out = {}
    for i, e in ipairs(seen) do out[i] = e.global_position end
    return out
  end

  -- Runs batches until one handles something (a hole may wait for transactions of
  -- parallel tests that were open when it was seen; never for a timer).
  local function run_until_handled(p)
    local deadline, handled = pup.now() + 20, 0
    repeat
      handled = handled + assert(p:run_once())
      if handled == 0 then pup.sleep(0.01) end
    until handled > 0 or pup.now() > deadline
    return handled
  end

  local function append(conn, id, n)
    return assert(store:append(conn, pup.any(), H.events(n or 1, { aggregate_id = id })))
  end

  before_each(function()
    store, db, names = H.fresh_store("ordering")
    seen = {}
  end)

  after_each(function() db:close() end)

  it("does not pass an append that commits after a later one", function()
    local a, b = H.connect(), H.connect()
    local p = pup.processor(db, projection(), { store = store })
    local txa = assert(a:begin())
    local ra = append(txa, "a")            -- draws position 1 and holds it
    local rb = append(b, "b")              -- draws 2, commits
    assert.is_true(rb.global_positions[1] > ra.global_positions[1])
    assert.equal(0, p:run_once())          -- sees 2, must not pass 1
    assert.same({}, positions())
    local st = assert(pup.status(db, store))
    assert.equal(ra.global_positions[1], st[1].waiting_position)
    assert(txa:commit())
    assert.equal(2, p:run_once())
    assert.same({ ra.global_positions[1], rb.global_positions[1] }, positions())
    assert.equal(0, p:run_once())
    st = assert(pup.status(db, store))
    assert.equal(pup.null, st[1].waiting_position)
    assert.equal(rb.global_positions[1], st[1].position)
    a:close() b:close()
  end)

  it("does not pass an append whose xid is above the reader's snapshot xmax", function()
    -- PostgreSQL's snapshot xmax is the latest completed xid + 1, not the next xid: B takes
    -- its xid first, A draws a position (and a higher xid), B appends above it and commits.
    -- Now A's xid is at or above xmax, so it is in no snapshot's running list.
    local a, b = H.connect(), H.connect()
    local p = pup.processor(db, projection(), { store = store })
    local txb = assert(b:begin())
    assert(txb:query("SELECT pg_current_xact_id()"))
    local txa = assert(a:begin())
    local ra = append(txa, "a")
    local rb = append(txb, "b")
    assert(txb:commit())
    for _ = 1, 5 do
      assert.equal(0, p:run_once())
      pup.sleep(0.01)
    end
    assert.same({}, positions())
    assert(txa:commit())
    assert.equal(2, run_until_handled(p))
    assert.same({ ra.global_positions[1], rb.global_positions[1] }, positions())
    a:close() b:close()
  end)

  it("steps over a rolled-back append without a timer", function()
    local a, b = H.connect(), H.connect()
    local p = pup.processor(db, projection(), { store = store })
    local txa = assert(a:begin())
    local ra = append(txa, "a")
    local rb = append(b, "b")
    assert(txa:rollback())
    assert.equal(1, run_until_handled(p))
    assert.same({ rb.global_positions[1] }, positions())
    assert.is_true(rb.global_positions[1] > ra.global_positions[1])
    a:close() b:close()
  end)

  it("waits at a dead hole while an older transaction runs, reports it, resumes after", function()
    local a, b, c = H.connect(), H.connect(), H.connect()
    local p = pup.processor(db, projection(), { store = store })
    local txc = assert(c:begin())
    assert(txc:query("SELECT pg_current_xact_id()"))       -- an unrelated transaction with an xid
    local txa = assert(a:begin())
    append(txa, "a")
    local rb = append(b, "b")
    assert(txa:rollback())                                  -- the hole is dead, but c could be its writer
    assert.equal(0, p:run_once())
    local st = assert(pup.status(db, store))
    assert.is_number(st[1].waiting_position)
    assert.is_string(st[1].waiting_since)
    assert(txc:commit())
    assert.equal(1, run_until_handled(p))
    assert.same({ rb.global_positions[1] }, positions())
    a:close() b:close() c:close()
  end)

  it("hands an aggregate's events over in version order in every interleaving", function()
    local conns = { H.connect(), H.connect(), H.connect() }
    local p = pup.processor(db, projection(), { store = store, batch_size = 1000 })
    for round = 1, 20 do
      -- three writers on four aggregates (distinct within a round: one thread cannot wait
      -- for itself); some commit, some roll back, in random order
      local txs = {}
      for i, conn in ipairs(conns) do
        local tx = assert(conn:begin())
        local id = "agg" .. ((i + round) % 4)
        local ok = store:append(tx, pup.any(), H.events(math.random(1, 3), { aggregate_id = id }))
        txs[i] = { tx = tx, ok = ok }
        if math.random() < 0.5 then p:run_once() end
      end
      for i = #txs, 2, -1 do
        local j = math.random(1, i)
        txs[i], txs[j] = txs[j], txs[i]
      end
      for _, t in ipairs(txs) do
        if t.ok and math.random() < 0.8 then t.tx:commit() else t.tx:rollback() end
        if math.random() < 0.5 then p:run_once() end
      end
    end
    -- catch up; a dead hole may wait for unrelated transactions of parallel tests
    local head = assert(store:head(db))
    local deadline = pup.now() + 20
    repeat
      assert(p:run_once())
      if p:stats().position < head then pup.sleep(0.01) end
    until p:stats().position >= head or pup.now() > deadline
    local last = {}
    for _, e in ipairs(seen) do
      local v = last[e.aggregate_id] or 0
      assert.equal(v + 1, e.aggregate_version, "aggregate " .. e.aggregate_id .. " out of order")
      last[e.aggregate_id] = e.aggregate_version
    end
    local rows = assert(db:query(('SELECT count(*) AS n FROM "%s"'):format(names.events_table)))
    assert.equal(rows[1].n, #seen)
    for _, c in ipairs(conns) do c:close() end
  end)
end)
