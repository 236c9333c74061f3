-- Issue 15: pupsourcing.testing (given / when / then without a database): each
-- expectation passes when it holds and fails, naming the difference, when it does not.
local pup = require "pupsourcing"
local testing = require "pupsourcing.testing"

local def = {
  initial = function() return { n = 0, items = {} } end,
  evolve = function(s, e)
    if e.event_type == "Added" then
      s.n = s.n + e.data.qty
      s.items[#s.items + 1] = e.data.sku
    elseif e.event_type == "Cleared" then
      s.n, s.items = 0, {}
    end
    return s
  end,
}

local function add(sku, qty)
  return function(s, version)
    if s.n + qty > 10 then return nil, { code = "too_many", message = "at most 10 items", have = s.n } end
    if qty <= 0 then error("add: qty must be positive") end
    return { { event_type = "Added", payload = { sku = sku, qty = qty }, metadata = { v = version } } }
  end
end

local function fails(fn, pattern)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected the expectation to fail")
  assert.matches(pattern, tostring(err))
end

describe("pupsourcing.testing", function()
  local spec = testing.decider(def)
  local added = { event_type = "Added", payload = { sku = "a", qty = 4 } }

  it("then_events and then_state pass when they hold", function()
    spec:given({ added, added })
        :when(add("b", 1))
        :then_events { { event_type = "Added", payload = { sku = "b", qty = 1 }, metadata = { v = 2 } } }
        :then_state { n = 9, items = { "a", "a", "b" } }
    spec:given({}):when(add("c", 2)):then_events { { event_type = "Added" } }
  end)

  it("then_events fails on another count, type, payload or field", function()
    local case = spec:given({}):when(add("b", 1))
    fails(function() case:then_events {} end, "expected 0 event%(s%), got 1")
    fails(function() case:then_events { { event_type = "Removed" } } end, 'event 1: event_type is "Added", expected "Removed"')
    fails(function() case:then_events { { payload = { sku = "b", qty = 2 } } } end, "event 1: payload is")
    fails(function() case:then_events { { event_version = 2 } } end, "event 1: event_version is 1, expected 2")
    -- integers and floats are not the same value
    fails(function() case:then_events { { payload = { sku = "b", qty = 1.0 } } } end, "payload")
    fails(function() case:then_state { n = 2, items = { "b" } } end, "state is")
  end)

  it("then_rejected checks the message or the reason's fields", function()
    local case = spec:given({ added, added }):when(add("x", 5))
    case:then_rejected():then_rejected("at most 10 items"):then_rejected { code = "too_many", have = 8 }
    fails(function() case:then_rejected("other") end, 'rejected with "at most 10 items", expected "other"')
    fails(function() case:then_rejected { have = 7 } end, "expected have = 7")
    fails(function() case:then_events {} end, "expected events, but it was rejected: at most 10 items")
    fails(function() spec:given({}):when(add("x", 1)):then_rejected() end, "expected a rejection, but it decided")
  end)

  it("then_raises and then_nothing", function()
    spec:given({}):when(add("x", 0)):then_raises("qty must be positive")
    fails(function() spec:given({}):when(add("x", 0)):then_raises("other") end, "does not match")
    fails(function() spec:given({}):when(add("x", 1)):then_raises() end, "expected decide to raise")
    spec:given({}):when(function() return {} end):then_nothing()
    fails(function() spec:given({}):when(add("x", 1)):then_nothing() end, "expected no events")
    fails(function() spec:given({}):then_events {} end, "call :when%(decide%) first")
  end)

  it("the upcasters registered with pup.upcast apply to given events", function()
    pup.upcast("Added", 1, function(d) return { sku = d.sku, qty = d.count } end)
    finally(function() pup.remove_upcaster("Added", 1) end)
    local up = testing.decider { initial = def.initial, evolve = def.evolve, aggregate_type = "Cart", aggregate_id = "c-1" }
    up:given({ { event_type = "Added", payload = { sku = "old", count = 3 } } })
      :when(function(s, version)
        assert.equal(1, version)
        assert.same({ n = 3, items = { "old" } }, s)
        return {}
      end)
      :then_nothing()
  end)

  it("misuse raises", function()
    assert.has_error(function() testing.decider { initial = def.initial } end)
    assert.has_error(function() testing.decider { initial = def.initial, evolve = def.evolve, decide = 1 } end,
      "testing.decider: unknown option decide")
    assert.has_error(function() spec:given("x") end)
    assert.has_error(function() spec:given({}):when("x") end)
    assert.has_error(function() spec:given({ { event_type = "Added", payload = { qty = 0 / 0 } } }) end)
  end)
end)
