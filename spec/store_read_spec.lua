-- Issue 2: store:read_events and store:read_aggregate_stream.
local h = require "spec.helpers"
local pup = require "pupsourcing"

describe("reading", function()
  local store, db
  local ids, positions = {}, {}

  setup(function()
    store, db = h.fresh_store("read")
    -- a log of 10 events: 4 of user A, 3 of order A, 3 of user B, interleaved
    ids.a, ids.b = h.uid("ua"), h.uid("ub")
    local function put(typ, id, expected, n)
      local evs = h.events(n, { aggregate_type = typ, aggregate_id = id })
      local res = assert(store:append(db, expected, evs))
      for _, p in ipairs(res.global_positions) do positions[#positions + 1] = p end
    end
    put("User", ids.a, pup.no_stream(), 2)
    put("Order", ids.a, pup.no_stream(), 3)
    put("User", ids.b, pup.no_stream(), 3)
    put("User", ids.a, pup.exact(2), 2)
  end)

  teardown(function()
    if db then db:close() end
  end)

  describe("read_events", function()
    it("returns every event after the position, ascending", function()
      local evs = assert(store:read_events(db, 0))
      assert.are.equal(10, #evs)
      for i, ev in ipairs(evs) do
        assert.are.equal(positions[i], ev.global_position)
        assert.are.equal("integer", math.type(ev.global_position))
        if i > 1 then assert.is_true(ev.global_position > evs[i - 1].global_position) end
      end
      assert.are.equal("User", evs[1].aggregate_type)
      assert.are.equal(ids.a, evs[1].aggregate_id)
      assert.are.equal("Order", evs[3].aggregate_type)
      assert.are.equal(ids.b, evs[6].aggregate_id)
      assert.are.equal(4, evs[10].aggregate_version)
    end)

    it("returns only positions greater than from_position", function()
      local from = positions[4]
      local evs = assert(store:read_events(db, from))
      assert.are.equal(6, #evs)
      assert.are.equal(positions[5], evs[1].global_position)
      for _, ev in ipairs(evs) do assert.is_true(ev.global_position > from) end
      assert.are.same({}, assert(store:read_events(db, positions[10])))
    end)

    it("honours limit", function()
      local evs = assert(store:read_events(db, 0, { limit = 3 }))
      assert.are.equal(3, #evs)
      assert.are.equal(positions[3], evs[3].global_position)
      evs = assert(store:read_events(db, positions[3], { limit = 4 }))
      assert.are.equal(4, #evs)
      assert.are.equal(positions[4], evs[1].global_position)
      assert.are.equal(positions[7], evs[4].global_position)
      evs = assert(store:read_events(db, positions[8], { limit = 100 }))
      assert.are.equal(2, #evs)
    end)

    it("pages through the whole log", function()
      local seen, from = {}, 0
      while true do
        local evs = assert(store:read_events(db, from, { limit = 3 }))
        if #evs == 0 then break end
        for _, ev in ipairs(evs) do seen[#seen + 1] = ev.global_position end
        from = evs[#evs].global_position
      end
      assert.are.same(positions, seen)
    end)

    it("works inside a transaction and sees its uncommitted appends", function()
      local tx = assert(db:begin())
      local id = h.uid("txr")
      local res = assert(store:append(tx, pup.no_stream(), { h.event { aggregate_id = id } }))
      local evs = assert(store:read_events(tx, positions[10]))
      assert.are.equal(1, #evs)
      assert.are.equal(res.global_positions[1], evs[1].global_position)
      assert(tx:rollback())
      assert.are.same({}, assert(store:read_events(db, positions[10])))
    end)

    it("gives every field of a persisted event", function()
      local ev = assert(store:read_events(db, 0, { limit = 1 }))[1]
      assert.are.equal("integer", math.type(ev.global_position))
      assert.are.equal("integer", math.type(ev.aggregate_version))
      assert.are.equal("integer", math.type(ev.event_version))
      assert.are.equal(1, ev.aggregate_version)
      assert.are.equal(1, ev.event_version)
      assert.are.equal("E1", ev.event_type)
      assert.are.equal("string", type(ev.event_id))
      assert.are.equal("string", type(ev.payload))
      assert.are.equal(1, ev.data.i)
      assert.is_nil(ev.metadata)
      assert.is_nil(ev.causation_id)
    end)

    it("raises on wrong argument types", function()
      assert.has_error(function() store:read_events(db, "zero") end)
      assert.has_error(function() store:read_events(nil, 0) end)
      assert.has_error(function() store:read_events(db, 0, "ten") end)
      assert.has_error(function() store:read_events(db, 0, 10) end)
      assert.has_error(function() store:read_events(db, 0, { limit = 0 }) end)
      assert.has_error(function() store:read_events(db, 0, { lmit = 10 }) end)
      assert.has_error(function() store:read_events(db, -1) end)
      assert.has_error(function() store:read_events(db, 0, { event_types = {} }) end)
      assert.has_error(function() store:read_events(db, 0, { event_types = { "" } }) end)
    end)
  end)

  describe("read_aggregate_stream", function()
    it("returns one aggregate's events in version order with stream.version", function()
      local stream = assert(store:read_aggregate_stream(db, "User", ids.a))
      assert.are.equal(4, #stream)
      for i, ev in ipairs(stream) do
        assert.are.equal(i, ev.aggregate_version)
        assert.are.equal("User", ev.aggregate_type)
        assert.are.equal(ids.a, ev.aggregate_id)
      end
      assert.are.equal(4, stream.version)
      assert.are.equal("integer", math.type(stream.version))
      local orders = assert(store:read_aggregate_stream(db, "Order", ids.a))
      assert.are.equal(3, #orders)
      assert.are.equal(3, orders.version)
    end)

    it("is empty with version 0 for an unknown aggregate", function()
      local stream = assert(store:read_aggregate_stream(db, "User", "nobody"))
      assert.are.equal(0, #stream)
      assert.are.equal(0, stream.version)
    end)

    it("from_version and to_version are inclusive bounds", function()
      local s = assert(store:read_aggregate_stream(db, "User", ids.a, { from_version = 2 }))
      assert.are.equal(3, #s)
      assert.are.equal(2, s[1].aggregate_version)
      assert.are.equal(4, s[3].aggregate_version)
      s = assert(store:read_aggregate_stream(db, "User", ids.a, { to_version = 2 }))
      assert.are.equal(2, #s)
      assert.are.equal(1, s[1].aggregate_version)
      assert.are.equal(2, s[2].aggregate_version)
      assert.are.equal(2, s.version)
      s = assert(store:read_aggregate_stream(db, "User", ids.a, { from_version = 2, to_version = 3 }))
      assert.are.equal(2, #s)
      assert.are.equal(2, s[1].aggregate_version)
      assert.are.equal(3, s[2].aggregate_version)
      s = assert(store:read_aggregate_stream(db, "User", ids.a, { from_version = 3, to_version = 3 }))
      assert.are.equal(1, #s)
      s = assert(store:read_aggregate_stream(db, "User", ids.a, { from_version = 5 }))
      assert.are.equal(0, #s)
      s = assert(store:read_aggregate_stream(db, "User", ids.a, {}))
      assert.are.equal(4, #s)
    end)

    it("events carry created_at as ISO 8601 in UTC", function()
      local s = assert(store:read_aggregate_stream(db, "User", ids.b))
      for _, ev in ipairs(s) do
        assert.are.equal("string", type(ev.created_at))
        assert.is_truthy(ev.created_at:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d[%.%d]*Z$"),
                         ev.created_at)
      end
      -- close to now (the server's clock is this machine's)
      local y, mo, d, hh, mi, ss = s[1].created_at:match("^(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+)")
      local utc_now = os.time(os.date("!*t"))
      local t = os.time { year = tonumber(y), month = tonumber(mo), day = tonumber(d),
                          hour = tonumber(hh), min = tonumber(mi), sec = tonumber(ss) }
      assert.is_true(math.abs(t - utc_now) < 600, s[1].created_at)
    end)

    it("raises on wrong argument types", function()
      assert.has_error(function() store:read_aggregate_stream(db, nil, ids.a) end)
      assert.has_error(function() store:read_aggregate_stream(db, "User", {}) end)
      assert.has_error(function() store:read_aggregate_stream(db, "User", ids.a, "opts") end)
    end)
  end)
end)
