-- Issue 12: appending an event whose event_id exists. The same append again (a retry after
-- a timeout hid its success) returns the positions it had; anything else is
-- duplicate_event. Nothing is written either way, and a caller's transaction goes on.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("append with an existing event_id", function()
  local store, db

  before_each(function()
    store, db = H.fresh_store("idem")
  end)

  after_each(function()
    db:close()
  end)

  local function rows()
    return assert(db:query(("SELECT count(*)::int AS n FROM %s"):format(store:names().events_quoted)))[1].n
  end

  local function ev(id, over)
    local e = { aggregate_type = "Order", aggregate_id = id, event_type = "Placed", payload = '{"n":1}',
                event_id = pup.uuid() }
    for k, v in pairs(over or {}) do e[k] = v end
    return e
  end

  it("a retry of the same event returns its original positions and versions, whatever it expected", function()
    local e = ev("o1")
    local first = assert(store:append(db, pup.no_stream(), { e }))
    assert(store:append(db, pup.any(), { ev("o1") })) -- the aggregate moves on meanwhile
    for _, expected in ipairs { pup.no_stream(), pup.any(), pup.exact(0), pup.exact(7) } do
      local again, err = store:append(db, expected, { e })
      assert.is_nil(err)
      assert.same(first.global_positions, again.global_positions)
      assert.equal(1, again.from_version)
      assert.equal(1, again.to_version)
    end
    assert.equal(2, rows())
  end)

  it("a retried batch append returns every original position, in order", function()
    local batch = { ev("b1"), ev("b1", { event_type = "Paid" }), ev("b1", { event_type = "Shipped" }) }
    local first = assert(store:append(db, pup.exact(0), batch))
    local again = assert(store:append(db, pup.exact(0), batch))
    assert.same(first.global_positions, again.global_positions)
    assert.equal(1, again.from_version)
    assert.equal(3, again.to_version)
    -- the same retry with upper-case ids (a UUID is case-insensitive)
    local upper = {}
    for i, e in ipairs(batch) do
      upper[i] = ev("b1", { event_type = e.event_type, event_id = e.event_id:upper() })
    end
    assert.same(first.global_positions, assert(store:append(db, pup.any(), upper)).global_positions)
    assert.equal(3, rows())
  end)

  it("another event under an existing id is duplicate_event, and nothing is written", function()
    local e = ev("d1")
    assert(store:append(db, pup.any(), { e }))
    local cases = {
      { aggregate_id = "d2" }, { aggregate_type = "Invoice" }, { event_type = "Cancelled" },
      { payload = '{"n":2}' }, { event_version = 2 },
    }
    for _, over in ipairs(cases) do
      local other = ev("d1", over)
      other.event_id = e.event_id
      local res, err = store:append(db, pup.any(), { other })
      assert.is_nil(res)
      assert.equal("duplicate_event", err.code, tostring(err))
      assert.matches(e.event_id, err.message, 1, true)
    end
    -- a batch of which one id exists and one is new: not a retry of one append
    local new = ev("d1")
    local res, err = store:append(db, pup.any(), { new, e })
    assert.is_nil(res)
    assert.equal("duplicate_event", err.code)
    assert.matches("event 1 (event_id " .. new.event_id .. ") is new", err.message, 1, true)
    res, err = store:append(db, pup.any(), { e, ev("d1") })
    assert.is_nil(res)
    assert.equal("duplicate_event", err.code)
    assert.equal(1, rows())
  end)

  it("a payload is the same JSON value whatever its key order (a retry from another process)", function()
    local e = ev("j1", { payload = '{"a":1,"b":{"c":[1,2.5,"x"],"d":null}}' })
    local first = assert(store:append(db, pup.any(), { e }))
    local again = assert(store:append(db, pup.any(), { ev("j1", { event_id = e.event_id,
      payload = '{ "b": {"d": null, "c": [1, 2.5, "x"]}, "a": 1 }' }) }))
    assert.same(first.global_positions, again.global_positions)
    -- a table payload, in whatever order this process encodes it
    local t = ev("j2", { payload = { z = 1, y = { 1, 2 }, x = "s", w = pup.null } })
    local tfirst = assert(store:append(db, pup.any(), { t }))
    local copy = ev("j2", { event_id = t.event_id, payload = '{"w":null,"x":"s","y":[1,2],"z":1}' })
    assert.same(tfirst.global_positions, assert(store:append(db, pup.any(), { copy })).global_positions)
    -- other values are other events: a changed value, an integer for a float, [] for {}
    for _, other in ipairs { '{"a":2,"b":{"c":[1,2.5,"x"],"d":null}}', '{"a":1.0,"b":{"c":[1,2.5,"x"],"d":null}}',
                             '{"a":1,"b":{"c":[1,2.5,"x"],"d":null},"e":1}', '{"a":1,"b":{"c":[1,2.5],"d":null}}',
                             '{"a":1,"b":[]}', 'not json' } do
      local res, err = store:append(db, pup.any(), { ev("j1", { event_id = e.event_id, payload = other }) })
      assert.is_nil(res, other)
      assert.equal("duplicate_event", err.code, other)
    end
    local e2 = ev("j3", { payload = "{}" })
    assert(store:append(db, pup.any(), { e2 }))
    assert.is_nil((store:append(db, pup.any(), { ev("j3", { event_id = e2.event_id, payload = "[]" }) })))
    assert.equal(3, rows())
  end)

  it("inside a caller's transaction: a retry or a duplicate leaves the transaction usable", function()
    local e = ev("t1")
    local first = assert(store:append(db, pup.any(), { e }))
    local tx = assert(db:begin())
    local again = assert(store:append(tx, pup.any(), { e }))
    assert.same(first.global_positions, again.global_positions)
    local other = ev("t2")
    other.event_id = e.event_id
    local res, err = store:append(tx, pup.any(), { other })
    assert.is_nil(res)
    assert.equal("duplicate_event", err.code)
    assert(store:append(tx, pup.any(), { ev("t3") })) -- the transaction goes on
    assert(tx:commit())
    assert.equal(2, rows())
  end)

  it("an event_id given twice in one append is invalid_event", function()
    local e = ev("x1")
    local res, err = store:append(db, pup.any(), { e, ev("x1", { event_id = e.event_id }) })
    assert.is_nil(res)
    assert.equal("invalid_event", err.code, tostring(err))
    assert.equal(0, rows())
  end)

  it("a retry racing the append it retries is optimistic_concurrency; retried, it gets the positions", function()
    local e = ev("r1")
    local tx = assert(db:begin())
    local first = assert(store:append(tx, pup.any(), { e }))
    -- another process retries while the first append is still in flight
    local dir = H.tmpdir()
    H.write_file(dir .. "/retry.lua", ([[
      local pup = require "pupsourcing"
      local db = assert(pup.connect())
      local store = pup.store(%s)
      local e = { aggregate_type = "Order", aggregate_id = "r1", event_type = "Placed", payload = '{"n":1}', event_id = %q }
      local res, err = store:append(db, pup.any(), { e })
      print(res and "ok" or err.code)
      res, err = store:append(db, pup.any(), { e })
      print(res and table.concat(res.global_positions, ",") or err.code)
    ]]):format(("{events_table=%q, aggregate_heads_table=%q, checkpoints_table=%q}"):format(
      H.tables("idem").events_table, H.tables("idem").aggregate_heads_table, H.tables("idem").checkpoints_table),
      e.event_id))
    local proc = H.spawn({ H.bin, dir .. "/retry.lua" })
    local watch = H.connect() -- pg_stat_activity is read once per transaction: not from tx's
    -- wait until it blocks on our uncommitted row, then commit
    H.wait_until(function() return "the retry to wait on the first append: " .. H.stderr_of(proc) .. H.stdout_of(proc) end, 20, function()
      return #assert(watch:query("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        .. " AND query LIKE '%t_idem_events%' AND pid <> pg_backend_pid()")) > 0
    end)
    watch:close()
    assert(tx:commit())
    assert.equal(0, H.wait_exit(proc, 20))
    assert.equal("optimistic_concurrency\n" .. first.global_positions[1] .. "\n", H.stdout_of(proc))
    assert.equal(1, rows())
    H.rmdir(dir)
  end)
end)
