-- Issue 12: store:read_events is gap-safe. A reader that follows the log with it, next to
-- appends that commit out of order and appends that roll back, gets every committed event
-- exactly once and in position order; the raw read (read_events_raw) is what skipped.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("read_events (gap-safe)", function()
  local store, db
  local conns = H.connections()
  local connect = conns.connect

  local function append(conn, id, over)
    local ev = H.event(over)
    ev.aggregate_id = id
    return assert(store:append(conn, pup.any(), { ev })).global_positions[1]
  end

  before_each(function()
    store, db = H.fresh_store("rdgap")
  end)

  after_each(function()
    conns.close_all()
    db:close()
  end)

  local function positions(evs)
    local out = {}
    for i, e in ipairs(evs) do out[i] = e.global_position end
    return out
  end

  it("stops below an append that commits after a later one, and resumes from the cursor", function()
    local a = connect()
    local txa = assert(a:begin())
    local p1 = append(txa, "a")        -- draws the lower position, still open
    local p2 = append(db, "b")         -- commits above it
    assert.is_true(p2 > p1)
    -- the raw read shows p2 alone: a reader resuming after it would never see p1
    assert.same({ p2 }, positions(assert(store:read_events_raw(db, 0))))
    local evs, cur = store:read_events(db, 0)
    assert.same({}, evs)
    assert.equal(0, cur.position)
    assert.equal(p1, cur.waiting)
    assert(txa:commit())
    evs, cur = store:read_events(db, cur)
    assert.same({ p1, p2 }, positions(evs))
    assert.equal(p2, cur.position)
    assert.is_nil(cur.waiting)
    assert.same({}, (store:read_events(db, cur)))
  end)

  it("does not pass a writer whose xid is at or above the snapshot's xmax", function()
    local a, b = connect(), connect()
    local txb = assert(b:begin())
    assert(txb:query("SELECT pg_current_xact_id()"))  -- B takes the lower xid
    local txa = assert(a:begin())
    local p1 = append(txa, "a")                       -- A: higher xid, lower position
    local p2 = append(txb, "b")
    assert(txb:commit())
    assert.is_true(p2 > p1)
    local evs, cur = store:read_events(db, 0)
    assert.same({}, evs)
    for _ = 1, 3 do -- however often it looks, the hole stays undecided while A runs
      evs, cur = store:read_events(db, cur)
      assert.same({}, evs)
    end
    assert(txa:commit())
    evs = store:read_events(db, cur)
    assert.same({ p1, p2 }, positions(evs))
  end)

  it("steps over a rolled-back append, once its writer has ended", function()
    local a = connect()
    local txa = assert(a:begin())
    local dead = append(txa, "a")
    local p2 = append(db, "b")
    local evs, cur = store:read_events(db, 0)
    assert.same({}, evs)
    assert.equal(dead, cur.waiting)
    assert(txa:rollback())
    -- decided by the first read whose snapshot's xmin is past the bound: at once, unless a
    -- transaction of a parallel test was open when the hole was seen (never by a timer)
    local deadline = pup.now() + 20
    repeat
      evs, cur = store:read_events(db, cur)
      if #evs == 0 then pup.sleep(0.01) end
    until #evs > 0 or pup.now() > deadline
    assert.same({ p2 }, positions(evs))
    assert.is_nil(cur.waiting)
  end)

  it("a read inside a transaction that has an xid gives its holes no bound (its xid is older)", function()
    local reader, a = connect(), connect()
    local rtx = assert(reader:begin())
    assert(rtx:query("SELECT pg_current_xact_id()"))  -- the reader's xid, below the writer's
    local txa = assert(a:begin())
    local p1 = append(txa, "a")
    local p2 = append(db, "b")
    local evs, cur = store:read_events(rtx, 0)
    assert.same({}, evs)
    assert.equal(p1, cur.waiting)
    assert(rtx:commit())
    -- the reader's transaction ended, the writer still runs: the hole must still hold
    for _ = 1, 3 do
      evs, cur = store:read_events(db, cur)
      assert.same({}, evs)
      assert.equal(p1, cur.waiting)
    end
    assert(txa:commit())
    assert.same({ p1, p2 }, positions((store:read_events(db, cur))))
  end)

  it("a reader started from a bare position (no noted holes) is safe too", function()
    local a = connect()
    local txa = assert(a:begin())
    local p1 = append(txa, "a")
    local p2 = append(db, "b")
    assert.same({}, (store:read_events(db, 0)))
    assert.same({}, (store:read_events(db, 0))) -- a fresh cursor notes the hole again
    assert(txa:commit())
    assert.same({ p1, p2 }, positions((store:read_events(db, 0))))
  end)

  it("scopes by aggregate and event type without taking other events for holes", function()
    local ps = {}
    for i = 1, 6 do
      ps[i] = append(db, "s" .. i, { aggregate_type = i % 2 == 0 and "Even" or "Odd", event_type = "T" .. i % 3 })
    end
    local evs, cur = store:read_events(db, 0, { aggregate_types = { "Even" } })
    assert.same({ ps[2], ps[4], ps[6] }, positions(evs))
    assert.equal(ps[6], cur.position)
    evs, cur = store:read_events(db, 0, { aggregate_types = { "Even" }, event_types = { "T1" } })
    assert.same({ ps[4] }, positions(evs))
    assert.equal(ps[6], cur.position)
    evs, cur = store:read_events(db, 0, { event_types = { "T0", "T2" }, limit = 2 })
    assert.same({ ps[2], ps[3] }, positions(evs))
    assert.equal(ps[3], cur.position)
    evs = store:read_events(db, cur, { event_types = { "T0", "T2" }, limit = 2 })
    assert.same({ ps[5], ps[6] }, positions(evs))
    -- an empty result means the end: every window of other events is read through
    local many = {}
    for i = 1, 30 do many[i] = H.event { aggregate_id = "bulk" } end
    assert(store:append(db, pup.any(), many))
    evs, cur = store:read_events(db, 0, { event_types = { "none" }, limit = 1 })
    assert.same({}, evs)
    assert.equal(assert(store:head(db)), cur.position)
  end)

  it("a cursor is immutable, of one events table, and options are checked", function()
    local p1 = append(db, "x")
    local evs, cur = store:read_events(db, 0)
    assert.same({ p1 }, positions(evs))
    assert.has_error(function() cur.position = 0 end)
    local other = pup.store(H.tables("rdgap_other"))
    assert.has_error(function() other:read_events(db, cur) end, nil)
    assert.has_error(function() store:read_events(db, 0, 10) end)
    assert.has_error(function() store:read_events(db, 0, { limit = 0 }) end)
    assert.has_error(function() store:read_events(db, 0, { from = 3 }) end)
    assert.has_error(function() store:read_events(db, 1.5) end)
    assert.has_error(function() store:read_events(db, "0") end)
    assert.matches("rdgap", tostring(cur))
  end)

  -- The hostile case: several writers whose transactions take positions in one order,
  -- commit or roll back in another, while a subscriber loop reads after every step.
  it("a subscriber loop next to random out-of-order commits and rollbacks: nothing skipped, nothing doubled", function()
    local seed = tonumber(os.getenv("PUP_SEED") or "") or os.time()
    math.randomseed(seed)
    local writers = {}
    for i = 1, 5 do writers[i] = connect() end
    local open = {}        -- writer index -> tx
    local committed = {}   -- positions that committed
    local pending = {}     -- writer -> positions drawn in its open tx
    local seen, count, cursor = {}, {}, 0
    local function read_some()
      local evs, nxt = store:read_events(db, cursor, { limit = math.random(1, 4) })
      assert(evs, nxt)
      for _, e in ipairs(evs) do
        local p = e.global_position
        assert.is_true(#seen == 0 or p > seen[#seen], "seed " .. seed .. ": out of order at " .. p)
        seen[#seen + 1] = p
        count[p] = (count[p] or 0) + 1
      end
      cursor = nxt
    end
    for step = 1, 400 do
      local w = math.random(#writers)
      local r = math.random()
      if not open[w] then
        open[w] = assert(writers[w]:begin())
        pending[w] = {}
      elseif r < 0.5 then
        local p = append(open[w], ("agg%d_%d"):format(w, step))
        pending[w][#pending[w] + 1] = p
      elseif r < 0.8 then
        assert(open[w]:commit())
        for _, p in ipairs(pending[w]) do committed[#committed + 1] = p end
        open[w] = nil
      else
        assert(open[w]:rollback())
        open[w] = nil
      end
      if math.random() < 0.3 then append(db, "auto" .. step) end -- autocommit writer too
      read_some()
    end
    for w, tx in pairs(open) do
      if math.random() < 0.5 then
        assert(tx:commit())
        for _, p in ipairs(pending[w]) do committed[#committed + 1] = p end
      else
        assert(tx:rollback())
      end
    end
    -- drain: read until nothing more and no hole holds the reader
    local deadline = pup.now() + 20
    local done
    repeat
      read_some()
      local evs, after = store:read_events(db, cursor)
      done = #evs == 0 and not after.waiting
      if not done then pup.sleep(0.005) end
    until done or pup.now() > deadline
    assert.is_true(done, "seed " .. seed .. ": the reader caught up")
    local all = assert(db:query(("SELECT global_position AS p FROM %s ORDER BY 1"):format(store:names().events_quoted)))
    local want = {}
    for i, row in ipairs(all) do want[i] = row.p end
    assert.same(want, seen, "seed " .. seed)
    for p, n in pairs(count) do assert.equal(1, n, ("seed %d: position %d read %d times"):format(seed, p, n)) end
    assert.is_true(#committed > 20, "the random walk committed enough to mean something")
  end)
end)
