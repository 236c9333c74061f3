-- Issue 10, memory safety of store:append: events and the events list served by __index
-- functions (proxies, lazily built tables) that build fresh strings on every access and
-- collect garbage, or even append or close the connection, while append reads them.
-- Before the fix: a use-after-free under ASan, and the wrong event_type stored in 49 of
-- 50 events in the normal build.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("store:append with events built lazily", function()
  local store, db, T

  before_each(function() store, db, T = H.fresh_store("lazyev") end)
  after_each(function() db:close() end)

  -- Long strings (over 40 bytes) are not interned: each access builds a new object,
  -- and the previous one is garbage as soon as the caller drops it.
  local PAD = string.rep("x", 64)
  local function etype(i) return ("Type%03d-%s"):format(i, PAD) end
  local function payload(i) return ('{"i": %d, "pad": "%s"}'):format(i, PAD) end

  -- An event whose every field is computed on access, collecting garbage each time.
  local function proxy_event(id, i)
    return setmetatable({}, {
      __index = function(_, k)
        collectgarbage()
        if k == "aggregate_type" then return "Lazy" .. PAD end
        if k == "aggregate_id" then return id .. "-" .. PAD end
        if k == "event_type" then return etype(i) end
        if k == "payload" then return payload(i) end
        -- metadata: a fresh table (JSON-encoded by append) or a fresh JSON string
        if k == "metadata" then
          if i % 2 == 0 then return { i = i, pad = PAD } end
          return ('{"i": %d, "odd": "%s"}'):format(i, PAD)
        end
        if k == "causation_id" then return "cause-" .. i .. "-" .. PAD end
        return nil
      end,
    })
  end

  -- A list of n proxies, itself a proxy: __len and __index build every event anew.
  local function proxy_list(id, n)
    return setmetatable({}, {
      __len = function() collectgarbage() return n end,
      __index = function(_, i)
        collectgarbage()
        if math.type(i) == "integer" and i >= 1 and i <= n then return proxy_event(id, i) end
      end,
    })
  end

  local function check_stream(id, n)
    local evs = assert(store:read_aggregate_stream(db, "Lazy" .. PAD, id .. "-" .. PAD))
    assert.equal(n, #evs)
    for i, e in ipairs(evs) do
      assert.equal(i, e.aggregate_version)
      assert.equal(etype(i), e.event_type)
      assert.equal(payload(i), e.payload)
      local m = pup.json.decode(e.metadata)
      assert.equal(i, m.i)
      assert.equal(PAD, i % 2 == 0 and m.pad or m.odd)
      assert.equal("cause-" .. i .. "-" .. PAD, e.causation_id)
    end
  end

  it("stores every field of 50 proxy events exactly", function()
    local res = assert(store:append(db, pup.no_stream(), proxy_list("agg", 50)))
    assert.equal(1, res.from_version)
    assert.equal(50, res.to_version)
    check_stream("agg", 50)
    local rows = assert(db:query(('SELECT count(DISTINCT event_type) AS n FROM "%s"'):format(T.events_table)))
    assert.equal(50, rows[1].n)
  end)

  it("stores proxy events given in a plain list, and plain events in a proxy list", function()
    local list = {}
    for i = 1, 50 do list[i] = proxy_event("plainlist", i) end
    assert(store:append(db, pup.no_stream(), list))
    check_stream("plainlist", 50)

    local plain = {}
    for i = 1, 50 do
      plain[i] = { aggregate_type = "Lazy" .. PAD, aggregate_id = "proxylist-" .. PAD, event_type = etype(i),
                   payload = payload(i), metadata = { i = i, pad = PAD }, causation_id = "cause-" .. i .. "-" .. PAD }
      if i % 2 == 1 then plain[i].metadata = ('{"i": %d, "odd": "%s"}'):format(i, PAD) end
    end
    assert(store:append(db, pup.no_stream(), setmetatable({}, {
      __len = function() return 50 end,
      __index = function(_, i) collectgarbage() return plain[i] end,
    })))
    check_stream("proxylist", 50)
  end)

  it("an __index that appends with the same store in between does not mix the events", function()
    local inner_done = false
    local outer = {}
    for i = 1, 20 do outer[i] = proxy_event("outer", i) end
    -- event 7 appends 30 other events (same store, same scratch) while it is read
    local mt = getmetatable(outer[7])
    local base = mt.__index
    mt.__index = function(t, k)
      if k == "event_type" and not inner_done then
        inner_done = true
        assert(store:append(db, pup.no_stream(), proxy_list("inner", 30)))
      end
      return base(t, k)
    end
    assert(store:append(db, pup.no_stream(), outer))
    assert.is_true(inner_done)
    check_stream("outer", 20)
    check_stream("inner", 30)
  end)

  it("an __index that closes the connection makes append raise, not crash", function()
    local d = H.connect()
    local list = {}
    for i = 1, 5 do list[i] = proxy_event("closing", i) end
    local base = getmetatable(list[3]).__index
    getmetatable(list[3]).__index = function(t, k)
      d:close()
      return base(t, k)
    end
    local ok, err = pcall(store.append, store, d, pup.no_stream(), list)
    assert.is_false(ok)
    assert.matches("closed", tostring(err))
    local n = assert(db:query(('SELECT count(*) AS n FROM "%s" WHERE aggregate_id = $1'):format(T.events_table),
      "closing-" .. PAD))[1].n
    assert.equal(0, n)
  end)

  it("still reports a bad field of a proxy event by name", function()
    local list = {}
    for i = 1, 3 do list[i] = proxy_event("bad", i) end
    local base = getmetatable(list[2]).__index
    getmetatable(list[2]).__index = function(t, k)
      if k == "event_id" then return "not-a-uuid-" .. PAD end
      return base(t, k)
    end
    local res, err = store:append(db, pup.no_stream(), list)
    assert.is_nil(res)
    assert.equal("invalid_event", err.code)
    assert.equal("event 2: event_id is not a UUID", err.message)
  end)
end)
