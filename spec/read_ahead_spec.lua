-- Read-ahead in catch-up (src/batch.c, read_ahead): while a batch walks a full window, the
-- server already reads the next one, inside that batch's transaction; the next batch uses
-- it only when it starts where the last one ended. These cases drive a processor batch by
-- batch with what can come between two batches: a hole, a reset, a poison event, events
-- of another scope. The read model is a table (one row per handled event), so what a
-- rolled-back batch wrote is gone, as it is for real projections.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("read-ahead", function()
  local store, db, names, T
  local conns = H.connections()
  local connect = conns.connect

  -- A NON-idempotent read model: one row per handled event, with its payload's i.
  local function projection(over)
    local p = {
      name = "ahead",
      batch_size = 5,
      setup = function(tx)
        assert(tx:exec("CREATE TABLE IF NOT EXISTS " .. T .. " (pos bigint NOT NULL, i bigint)"))
      end,
      handle = function(tx, e)
        assert(tx:exec("INSERT INTO " .. T .. " (pos, i) VALUES ($1, $2)", e.global_position, e.data.i))
      end,
      reset = function(tx)
        assert(tx:exec("CREATE TABLE IF NOT EXISTS " .. T .. " (pos bigint NOT NULL, i bigint)"))
        assert(tx:exec("DELETE FROM " .. T))
      end,
    }
    for k, v in pairs(over or {}) do p[k] = v end
    return p
  end

  -- n events to aggregate id, payload {i = first..}; returns their positions.
  local function append(conn, id, n, first, over)
    local evs = H.events(n, over)
    for k, e in ipairs(evs) do
      e.aggregate_id = id
      e.payload = { i = first + k - 1 }
    end
    return assert(store:append(conn, pup.any(), evs)).global_positions
  end

  -- The read model: positions in handling order, and how many rows each position has.
  local function model()
    local rows = assert(db:query("SELECT pos, i FROM " .. T .. " ORDER BY pos"))
    local out, dup = {}, {}
    for _, r in ipairs(rows) do
      out[#out + 1] = r.pos
      dup[r.pos] = (dup[r.pos] or 0) + 1
    end
    for pos, n in pairs(dup) do assert(n == 1, ("position %d handled %d times"):format(pos, n)) end
    return out
  end

  local function range(a, b)
    local out = {}
    for v = a, b do out[#out + 1] = v end
    return out
  end

  -- Runs batches until one handles nothing twice in a row (caught up).
  local function catch_up(p)
    local idle = 0
    for _ = 1, 200 do
      local n = assert(p:run_once())
      idle = n == 0 and idle + 1 or 0
      if idle == 2 then return end
    end
    error("no catch-up in 200 batches")
  end

  before_each(function()
    store, db, names = H.fresh_store("ahead")
    T = names.events_table .. "_model"
    db:exec("DROP TABLE IF EXISTS " .. T)
  end)

  after_each(function()
    conns.close_all()
    db:exec("DROP TABLE IF EXISTS " .. T)
    db:close()
  end)

  it("a hole inside the window read ahead: nothing passes it, nothing is lost once it fills", function()
    local p = pup.processor(db, projection(), { store = store })
    local first = append(db, "a", 10, 1)             -- 10 events
    local hold = connect()
    local tx = assert(hold:begin())
    local held = append(tx, "h", 1, 11)[1]           -- draws the next position, commits later
    append(db, "b", 29, 12)                          -- 29 more above the hole
    assert.equal(5, p:run_once())                    -- reads ahead the next 5
    assert.equal(5, p:run_once())                    -- from the read-ahead; reads ahead past the hole
    assert.equal(0, p:run_once())                    -- stops at the hole
    assert.equal(0, p:run_once())
    assert.same(range(first[1], first[1] + 9), model())
    assert(tx:commit())
    catch_up(p)
    local want = range(first[1], first[1] + 39)
    assert.equal(held, want[11])
    assert.same(want, model())
  end)

  it("an append after the last full window is handled by the next batch, not after a poll", function()
    local p = pup.processor(db, projection(), { store = store })
    local pos = append(db, "a", 10, 1)
    assert.equal(5, p:run_once())                    -- reads ahead the next 5
    assert.equal(5, p:run_once())                    -- reads ahead past the head: an empty window
    local late = append(db, "b", 1, 11)[1]
    assert.equal(1, p:run_once())                    -- a fresh read, not the empty one from before
    assert.same(range(pos[1], late), model())
  end)

  it("a reset between two batches of a catch-up starts over, exact", function()
    local p = pup.processor(db, projection(), { store = store })
    local pos = append(db, "a", 40, 1)
    assert.equal(5, p:run_once())                    -- has read the next window ahead
    local other = connect()
    assert(pup.reset(other, projection(), store))   -- the window read ahead belongs to the old generation
    local n, err = p:run_once()                      -- its batch is fenced: starts over
    assert.is_nil(n)
    assert.matches("was reset: starting over in generation 2", tostring(err))
    catch_up(p)
    assert.same(range(pos[1], pos[40]), model())
    local st = assert(pup.status(db, store))
    assert.equal(pos[40], st[1].position)
  end)

  it("a poison event in a window read ahead, skipped: every other event once, in order", function()
    local p = pup.processor(db, projection {
      on_error = "skip",
      handle = function(tx, e)
        local i = e.data.i
        if i == 13 then error("poison") end
        assert(tx:exec("INSERT INTO " .. T .. " (pos, i) VALUES ($1, $2)", e.global_position, i))
      end,
    }, { store = store })
    local pos = append(db, "a", 30, 1)
    catch_up(p)
    local want = range(pos[1], pos[30])
    table.remove(want, 13)
    assert.same(want, model())
    local dl = assert(pup.dead_letters.list(db, projection(), { store = store }))
    assert.equal(1, #dl)
    assert.equal(pos[13], dl[1].global_position)
  end)

  it("events of another scope between full windows: positions pass, payloads arrive", function()
    local p = pup.processor(db, projection { event_types = { "E1" } }, { store = store })
    -- H.events names its events E1, E2, ...: one in scope per 3-event append
    local pos = {}
    for k = 1, 20 do
      local ps = append(db, "s" .. k, 3, 3 * k)
      pos[#pos + 1] = ps[1]
    end
    catch_up(p)
    assert.same(pos, model())
    assert.equal(20, db:query("SELECT count(*) AS n FROM " .. T .. " WHERE i IS NOT NULL")[1].n)
  end)
end)
