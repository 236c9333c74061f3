-- Issue 16: an unknown key in an option table raises, naming the function and the key
-- (`{batchsize = 10}` was once accepted and ignored). pup.store, read_aggregate_stream's
-- range and processor:run accepted anything before; the others are guarded here too.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("option tables", function()
  local store, db
  local T = H.tables("optkeys")
  local proj = { name = "optkeys", handle = function() end }

  before_each(function() store, db = H.fresh_store("optkeys") end)
  after_each(function() db:close() end)

  local function raises(fragment, f, ...)
    local ok, err = pcall(f, ...)
    assert.is_false(ok, "accepted; expected " .. fragment)
    assert.is_truthy(tostring(err):find(fragment, 1, true), "expected " .. fragment .. " in: " .. tostring(err))
  end

  it("pup.store", function()
    raises("pup.store: unknown option events_tabel", pup.store, { events_tabel = "x" })
    raises("pup.store: unknown option 1", pup.store, { "events" })
    assert.equal(T.events_table, pup.store(T):names().events_table)
  end)

  it("store:read_aggregate_stream", function()
    local id = H.uid("a")
    assert(store:append(db, pup.any(), H.events(3, { aggregate_id = id })))
    local agg = H.event().aggregate_type
    raises("read_aggregate_stream: unknown option from_versoin",
      store.read_aggregate_stream, store, db, agg, id, { from_versoin = 2 })
    assert.equal(2, #assert(store:read_aggregate_stream(db, agg, id, { from_version = 2 })))
  end)

  it("processor:run, pup.processor, pup.runner", function()
    local p = pup.processor(db, proj, { store = store })
    raises("processor:run: unknown option onse", p.run, p, { onse = true })
    assert.equal(0, p:run { once = true }) -- and the processor is still usable
    p:close()
    raises("pup.processor: unknown option batchsize", pup.processor, db, proj, { store = store, batchsize = 10 })
    raises("pup.processor: unknown option handler_timeout_ms", pup.processor, db, proj,
      { store = store, handler_timeout_ms = 500 })
    raises("pup.runner: unknown option onse", pup.runner, { files = { "x.lua" }, onse = true })
  end)

  it("store:load and store:handle definitions", function()
    raises("load: unknown option initl", store.load, store, db, "A", "1", { initl = {} })
    raises("unknown option initl", store.handle, store, db, "A", "1", function() end, { initl = {} })
  end)
end)
