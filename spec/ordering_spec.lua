-- The gap rule of docs/ordering.md, driven deterministically with several connections:
-- a processor never steps over a position that a running transaction may still fill.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("gap-safe reading", function()
  local store, db, names, seen
  local conns = H.connections()
  local connect = conns.connect

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

  after_each(function()
    conns.close_all()
    db:close()
  end)

  it("does not pass an append that commits after a later one", function()
    local a, b = connect(), connect()
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
    local a, b = connect(), connect()
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

  -- The bound of a hole must be above its writer's xid even when that xid is above every
  -- completed one. Three or more transactions: B and D take xids, A takes a higher one and
  -- draws the hole's position, B appends above it and commits. When the hole is seen, the
  -- latest completed xid is B's (below D's and A's), so "latest completed + 1" (a snapshot's
  -- xmax) is at or below D. Once D ends, every snapshot's xmin is above that while A still
  -- runs: a bound taken from a snapshot's xmax steps over A's position for ever.
  local function xid(tx)
    return assert(tx:query("SELECT pg_current_xact_id()::text AS x"))[1].x
  end

  local function assert_waits(p, times)
    for _ = 1, times or 5 do
      assert.equal(0, p:run_once())
      pup.sleep(0.01)
    end
    assert.same({}, positions())
  end

  it("does not pass a hole whose writer's xid is above every completed one, after older transactions end", function()
    local a, b, d = connect(), connect(), connect()
    local p = pup.processor(db, projection(), { store = store })
    -- a first run takes the partition (registry and checkpoint rows: transactions that
    -- would complete above A's xid if they ran inside the scenario)
    assert.equal(0, p:run_once())
    local txb = assert(b:begin())
    local xb = xid(txb)
    local txd = assert(d:begin())
    local xd = xid(txd)
    local txa = assert(a:begin())
    local ra = append(txa, "a")
    local xa = xid(txa)
    assert.is_true(tonumber(xb) < tonumber(xd) and tonumber(xd) < tonumber(xa))
    -- B writes as plain SQL (another tool, which sends no NOTIFY): pupsourcing's own
    -- wake-up after a commit is a transaction of its own that would complete above A.
    local rb = { global_positions = { assert(txb:query(('INSERT INTO "%s" (aggregate_type, aggregate_id,'
      .. " aggregate_version, event_id, event_type, payload) VALUES ('T', 'b', 1, gen_random_uuid(), 'E',"
      .. " '\\x7b7d') RETURNING global_position"):format(names.events_table)))[1].global_position } }
    assert(txb:commit())                 -- latest completed: B, below D and A
    assert_waits(p, 1)                   -- the hole is seen and given its bound
    assert(txd:commit())                 -- D ends after the bound: xmin moves to A
    assert_waits(p)
    local st = assert(pup.status(db, store))
    assert.equal(ra.global_positions[1], st[1].waiting_position)
    assert(txa:commit())
    assert.equal(2, run_until_handled(p))
    assert.same({ ra.global_positions[1], rb.global_positions[1] }, positions())
    a:close() b:close() d:close()
  end)

  it("does not pass such a hole when the older transactions roll back, one during the batch that saw it", function()
    -- C holds an event below the hole (so the batch runs a handler between its read and
    -- its bound); E ends inside that handler, D after the batch: both roll back.
    local a, b, d, e = connect(), connect(), connect(), connect()
    local first = append(db, "first")
    local txe = assert(e:begin())
    xid(txe)
    local txb = assert(b:begin())
    xid(txb)
    local txd = assert(d:begin())
    xid(txd)
    local txa = assert(a:begin())
    local ra = append(txa, "a")
    local rb = append(txb, "b")
    assert(txb:commit())
    local rolled = false
    local p = pup.processor(db, {
      name = "ordering",
      handle = function(_, ev)
        seen[#seen + 1] = ev
        if not rolled then rolled = true; assert(txe:rollback()) end
      end,
    }, { store = store })
    assert.equal(1, p:run_once())        -- handles `first`, then stops at A's hole
    assert.is_true(rolled)
    assert(txd:rollback())
    for _ = 1, 5 do
      assert.equal(0, p:run_once())
      pup.sleep(0.01)
    end
    assert.same({ first.global_positions[1] }, positions())
    assert(txa:commit())
    assert.equal(2, run_until_handled(p))
    assert.same({ first.global_positions[1], ra.global_positions[1], rb.global_positions[1] }, positions())
    a:close() b:close() d:close() e:close()
  end)

  it("passes neither of two such holes while one of their writers runs", function()
    -- Four writers: B and D below, A1 and A2 above every completed xid, each holding a
    -- hole between B's events. A1 rolls back, D commits, A2 still runs.
    local a1, a2, b, d = connect(), connect(), connect(), connect()
    local p = pup.processor(db, projection(), { store = store })
    local txb = assert(b:begin())
    xid(txb)
    local txd = assert(d:begin())
    xid(txd)
    local tx1 = assert(a1:begin())
    local r1 = append(tx1, "a1")
    local rb1 = append(txb, "b")
    local tx2 = assert(a2:begin())
    local r2 = append(tx2, "a2")
    local rb2 = append(txb, "b")
    assert(txb:commit())
    assert_waits(p, 1)
    assert(txd:commit())
    assert(tx1:rollback())
    assert_waits(p)
    local st = assert(pup.status(db, store))
    assert.equal(r1.global_positions[1], st[1].waiting_position)
    assert(tx2:commit())
    assert.equal(3, run_until_handled(p))
    assert.same({ rb1.global_positions[1], r2.global_positions[1], rb2.global_positions[1] }, positions())
    a1:close() a2:close() b:close() d:close()
  end)

  it("does not decide a hole seen later by the bound of an older one", function()
    -- A1's hole is noted with a bound; A2 starts after that bound was drawn and holds a
    -- hole further up. Once A1 rolls back, A1's hole is dead (xmin is above its bound),
    -- but that bound says nothing about A2, which still runs.
    local a1, a2, b = connect(), connect(), connect()
    local p = pup.processor(db, projection(), { store = store })
    local tx1 = assert(a1:begin())
    local r1 = append(tx1, "a1")
    local rb1 = append(b, "b")
    assert_waits(p, 1)                   -- notes A1's hole, with a bound
    local tx2 = assert(a2:begin())
    local r2 = append(tx2, "a2")
    local rb2 = append(b, "b")
    assert(tx1:rollback())
    assert.equal(1, run_until_handled(p)) -- steps over A1's hole, stops at A2's
    assert.same({ rb1.global_positions[1] }, positions())
    for _ = 1, 5 do
      assert.equal(0, p:run_once())
      pup.sleep(0.01)
    end
    assert.equal(r2.global_positions[1], assert(pup.status(db, store))[1].waiting_position)
    assert(tx2:commit())
    assert.equal(2, run_until_handled(p))
    assert.same({ rb1.global_positions[1], r2.global_positions[1], rb2.global_positions[1] }, positions())
    assert.is_true(r1.global_positions[1] < rb1.global_positions[1])
  end)

  it("steps over a rolled-back append without a timer", function()
    local a, b = connect(), connect()
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
    local a, b, c = connect(), connect(), connect()
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
    local writers = { connect(), connect(), connect() }
    local p = pup.processor(db, projection(), { store = store, batch_size = 1000 })
    for round = 1, 20 do
      -- three writers on four aggregates (distinct within a round: one thread cannot wait
      -- for itself); some commit, some roll back, in random order
      local txs = {}
      for i, conn in ipairs(writers) do
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
  end)
end)
