-- Issue 10: schema-qualified table names the validator accepted (schema + table over 50
-- characters) made every append fail with "channel name too long". Every name derived
-- from a table option (the NOTIFY channel, sequence, function, constraints, the worker
-- tables) is checked against PostgreSQL's 63-byte limit by pup.store(), and the error
-- names the option and the derived name.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local function refused(opts, option, derived)
  local ok, msg = pcall(pup.store, opts)
  assert.is_false(ok, "pup.store accepted " .. pup.json.encode(opts))
  msg = tostring(msg)
  assert.is_truthy(msg:find(option, 1, true), msg)
  assert.is_truthy(msg:find(derived, 1, true), msg)
  assert.is_truthy(msg:find("63", 1, true), msg)
end

describe("table names", function()
  it("a schema-qualified events table whose channel would be too long is refused up front", function()
    local schema, tbl = ("s"):rep(30), ("e"):rep(30) -- each part was accepted before
    refused({ events_table = schema .. "." .. tbl }, "events_table", "pupsourcing." .. schema .. "." .. tbl)
  end)

  it("names whose sequence, constraint or worker table would be too long are refused", function()
    local long = ("e"):rep(42)
    refused({ events_table = long }, "events_table", long .. "_aggregate_version_key")
    refused({ events_table = "public." .. long }, "events_table", long .. "_aggregate_version_key")
    refused({ aggregate_heads_table = ("h"):rep(60) }, "aggregate_heads_table", ("h"):rep(60) .. "_pkey")
    refused({ checkpoints_table = ("c"):rep(51) }, "checkpoints_table", ("c"):rep(51) .. "_workers_pkey")
    refused({ events_table = ("e"):rep(64) }, "events_table", "63")
  end)

  it("the longest accepted names work end to end: migrate, append, notify, process", function()
    local db = H.connect()
    assert(db:exec("CREATE SCHEMA IF NOT EXISTS pup_long"))
    local names = {
      events_table = "pup_long." .. ("e"):rep(41),          -- 41 + "_aggregate_version_key" = 63
      aggregate_heads_table = "pup_long." .. ("h"):rep(58), -- 58 + "_pkey" = 63
      checkpoints_table = "pup_long." .. ("c"):rep(50),     -- 50 + "_workers_pkey" = 63
    }
    assert.are.equal(63, #("pupsourcing." .. names.events_table) + 1) -- the channel: 62 bytes
    local store = pup.store(names)
    assert(db:exec("DROP SCHEMA pup_long CASCADE"))
    assert(db:exec("CREATE SCHEMA pup_long"))
    assert(store:migrate(db))
    assert(store:migrate(db))
    local res = assert(store:append(db, pup.no_stream(), H.events(3, { aggregate_id = "long-1" })))
    assert.are.equal(3, res.to_version)
    local _, err = store:append(db, pup.exact(1), { H.event { aggregate_id = "long-1" } })
    assert.are.equal("optimistic_concurrency", err.code)
    local seen = 0
    local p = pup.processor(db, { name = "long_names", handle = function() seen = seen + 1 end },
                            { store = store })
    assert(p:run_once())
    p:close()
    assert.are.equal(3, seen)
    assert(db:exec("DROP SCHEMA pup_long CASCADE"))
    db:close()
  end)
end)
