-- Issue 2: store:append -- expected versions, errors, what is stored.
local h = require "spec.helpers"
local pup = require "pupsourcing"

describe("store:append", function()
  local store, db, names

  setup(function()
    store, db, names = h.fresh_store("append")
  end)

  teardown(function()
    if db then db:close() end
  end)

  local function count(id, typ)
    local rows = assert(db:query('SELECT count(*) AS n FROM "' .. names.events_table ..
                                 '" WHERE aggregate_type = $1 AND aggregate_id = $2',
                                 typ or "User", id))
    return rows[1].n
  end

  local function head(id, typ)
    local rows = assert(db:query('SELECT aggregate_version AS v FROM "' ..
                                 names.aggregate_heads_table ..
                                 '" WHERE aggregate_type = $1 AND aggregate_id = $2',
                                 typ or "User", id))
    return rows[1] and rows[1].v or 0
  end

  local function append(expected, id, n)
    return store:append(db, expected, h.events(n or 1, { aggregate_id = id }))
  end

  local function assert_conflict(res, err)
    assert.is_nil(res)
    assert.is_not_nil(err, "expected an error object")
    assert.are.equal("optimistic_concurrency", err.code)
    assert.are.equal("string", type(err.message))
    assert.are.equal("string", type(tostring(err)))
  end

  describe("expected version", function()
    it("no_stream appends to a new aggregate, starting at version 1", function()
      local id = h.uid("ns")
      local res = assert(append(pup.no_stream(), id, 3))
      assert.are.equal(1, res.from_version)
      assert.are.equal(3, res.to_version)
      assert.are.equal(3, count(id))
      assert.are.equal(3, head(id))
    end)

    it("no_stream fails on an aggregate that has events, writing nothing", function()
      local id = h.uid("ns2")
      assert(append(pup.no_stream(), id, 2))
      assert_conflict(append(pup.no_stream(), id, 2))
      assert.are.equal(2, count(id))
      assert.are.equal(2, head(id))
    end)

    it("exact(0) behaves as no_stream", function()
      local id = h.uid("e0")
      local res = assert(append(pup.exact(0), id, 1))
      assert.are.equal(1, res.from_version)
      assert.are.equal(1, res.to_version)
      assert_conflict(append(pup.exact(0), id, 1))
      assert.are.equal(1, count(id))
    end)

    it("exact(n) appends when the aggregate is at version n", function()
      local id = h.uid("en")
      assert(append(pup.no_stream(), id, 2))
      local res = assert(append(pup.exact(2), id, 3))
      assert.are.equal(3, res.from_version)
      assert.are.equal(5, res.to_version)
      res = assert(append(pup.exact(5), id, 1))
      assert.are.equal(6, res.from_version)
      assert.are.equal(6, res.to_version)
      assert.are.equal(6, count(id))
      assert.are.equal(6, head(id))
    end)

    it("exact(n) fails when the aggregate is behind or ahead of n, writing nothing", function()
      local id = h.uid("enx")
      assert(append(pup.no_stream(), id, 3))
      assert_conflict(append(pup.exact(2), id, 1))
      assert_conflict(append(pup.exact(4), id, 1))
      assert_conflict(append(pup.exact(1), id, 2))
      assert.are.equal(3, count(id))
      assert.are.equal(3, head(id))
    end)

    it("exact(n > 0) fails on an aggregate with no events", function()
      local id = h.uid("enew")
      assert_conflict(append(pup.exact(1), id, 1))
      assert.are.equal(0, count(id))
      assert.are.equal(0, head(id))
    end)

    it("exact() of a negative, fractional or unrepresentable version raises and appends nothing", function()
      local id = h.uid("ebad")
      assert(append(pup.no_stream(), id, 2))
      for _, v in ipairs { -1, -2, math.mininteger, 1.5, -0.5, 2.0000001, 2 ^ 63, -(2 ^ 63) - 2 ^ 11,
                           math.huge, -math.huge, 0 / 0 } do
        local ok, msg = pcall(pup.exact, v)
        assert.is_false(ok, "pup.exact(" .. tostring(v) .. ") did not raise")
        assert.matches("bad argument #1", tostring(msg))
        -- built in the argument list of an append: the append never runs
        ok = pcall(function() return append(pup.exact(v), id, 1) end)
        assert.is_false(ok)
      end
      assert.matches("version must be >= 0", select(2, pcall(pup.exact, -1)))
      assert.are.equal(2, count(id))
      assert.are.equal(2, head(id))
    end)

    it("an expected-version table changed afterwards, or forged without a version, raises", function()
      local id = h.uid("eforged")
      assert(append(pup.no_stream(), id, 2))
      local forged = {}
      for _, change in ipairs {
        function(e) e.version = -1 end, function(e) e.version = 2.5 end, function(e) e.version = nil end,
        function(e) e.version = "2" end, function(e) e.kind = "any" end, function(e) e.kind = nil end,
      } do
        local e = pup.exact(2)
        change(e)
        forged[#forged + 1] = e
      end
      local any = pup.any()
      any.version = 5
      forged[#forged + 1] = any
      forged[#forged + 1] = setmetatable({}, getmetatable(pup.any()))
      for i, e in ipairs(forged) do
        local ok, err = pcall(append, e, id, 1)
        assert.is_false(ok, "case " .. i)
        assert.matches("expected version was changed after it was made", err, 1, false, "case " .. i)
      end
      assert.are.equal(2, count(id))
      assert.are.equal(2, head(id))
    end)

    it("exact() of a huge version is a conflict, never an append", function()
      local id = h.uid("ehuge")
      assert(append(pup.no_stream(), id, 2))
      for _, v in ipairs { math.maxinteger, 1 << 31, (1 << 32) + 2, 2.0 ^ 62 } do
        assert_conflict(append(pup.exact(v), id, 1))
      end
      assert.are.equal(2, count(id))
      assert.are.equal(2, head(id))
      -- and the exact version still works
      assert(append(pup.exact(2.0), id, 1))
      assert.are.equal(3, count(id))
    end)

    it("any appends to new and existing aggregates", function()
      local id = h.uid("any")
      local res = assert(append(pup.any(), id, 2))
      assert.are.equal(1, res.from_version)
      assert.are.equal(2, res.to_version)
      res = assert(append(pup.any(), id, 2))
      assert.are.equal(3, res.from_version)
      assert.are.equal(4, res.to_version)
      assert.are.equal(4, count(id))
    end)

    it("aggregates are keyed by type and id together", function()
      local id = h.uid("typed")
      assert(store:append(db, pup.no_stream(), { h.event { aggregate_type = "User", aggregate_id = id } }))
      local res = assert(store:append(db, pup.no_stream(),
                                      { h.event { aggregate_type = "Order", aggregate_id = id } }))
      assert.are.equal(1, res.from_version)
      assert.are.equal(1, count(id, "Order"))
    end)

    it("a conflict inside a transaction leaves nothing of that append", function()
      local id = h.uid("txc")
      assert(append(pup.no_stream(), id, 1))
      local ok, err = db:transaction(function(tx)
        return store:append(tx, pup.exact(7), h.events(2, { aggregate_id = id }))
      end)
      assert_conflict(ok, err)
      assert.are.equal(1, count(id))
    end)

    it("any still fails with optimistic_concurrency when a concurrent writer wins", function()
      local id = h.uid("race")
      local dir = h.tmpdir()
      local marker = dir .. "/appended"
      -- Another process appends version 1 in a transaction it keeps open until our append
      -- waits on it.
      local script = dir .. "/writer.lua"
      h.write_file(script, string.format([[
        local pup = require "pupsourcing"
        local db = assert(pup.connect())
        local store = pup.store{events_table=%q, aggregate_heads_table=%q, checkpoints_table=%q}
        local tx = assert(db:begin())
        assert(store:append(tx, pup.any(), {{aggregate_type="User", aggregate_id=%q,
                                             event_type="Racer", payload="w"}}))
        local f = assert(io.open(%q, "w")); f:close()
        local watch = assert(pup.connect()) -- (pg_stat_activity is read once per transaction)
        local t0 = pup.now()
        repeat
          local waiting = #assert(watch:query("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            .. " AND query LIKE '%%' || $1 || '%%' AND pid <> pg_backend_pid()", %q)) > 0
          if not waiting then pup.sleep(0.01) end
        until waiting or pup.now() - t0 > 30
        assert(tx:commit())
      ]], names.events_table, names.aggregate_heads_table, names.checkpoints_table, id, marker, names.events_table))
      local bg = io.popen("env -u LD_PRELOAD " .. h.shquote(h.bin) .. " " .. h.shquote(script) .. " 2>&1")
      local t0 = os.time()
      while not io.open(marker) do
        assert(os.time() - t0 < 30, "the writer never appended")
        os.execute("sleep 0.05")
      end
      local res, err = append(pup.any(), id, 1)
      local out = bg:read("a")
      local ok = bg:close()
      h.rmdir(dir)
      assert.is_true(ok, "writer failed: " .. out)
      assert_conflict(res, err)
      assert.are.equal(1, count(id))
      local stream = assert(store:read_aggregate_stream(db, "User", id))
      assert.are.equal("Racer", stream[1].event_type)
    end)
  end)

  describe("results", function()
    it("returns the global positions, ascending integers, one per event", function()
      local id = h.uid("pos")
      local res = assert(append(pup.no_stream(), id, 4))
      assert.are.equal(4, #res.global_positions)
      for i, p in ipairs(res.global_positions) do
        assert.are.equal("integer", math.type(p))
        if i > 1 then assert.is_true(p > res.global_positions[i - 1]) end
      end
      assert.are.equal("integer", math.type(res.from_version))
      assert.are.equal("integer", math.type(res.to_version))
      local stream = assert(store:read_aggregate_stream(db, "User", id))
      for i, ev in ipairs(stream) do
        assert.are.equal(res.global_positions[i], ev.global_position)
        assert.are.equal(i, ev.aggregate_version)
        assert.are.equal("E" .. i, ev.event_type)
      end
    end)
  end)

  describe("errors", function()
    it("returns no_events for an empty list", function()
      local res, err = store:append(db, pup.any(), {})
      assert.is_nil(res)
      assert.are.equal("no_events", err.code)
    end)

    local function assert_invalid(events, index, field)
      local before = assert(db:query('SELECT count(*) AS n FROM "' .. names.events_table .. '"'))[1].n
      local res, err = store:append(db, pup.any(), events)
      assert.is_nil(res)
      assert.is_not_nil(err)
      assert.are.equal("invalid_event", err.code)
      local msg = tostring(err.message)
      assert.is_truthy(msg:find("%f[%d]" .. index .. "%f[%D]"),
                       "message should name index " .. index .. ": " .. msg)
      assert.is_truthy(msg:find(field, 1, true), "message should name field " .. field .. ": " .. msg)
      local after = assert(db:query('SELECT count(*) AS n FROM "' .. names.events_table .. '"'))[1].n
      assert.are.equal(before, after)
    end

    it("invalid_event names the index and a missing field", function()
      local id = h.uid("inv")
      local evs = h.events(3, { aggregate_id = id })
      evs[2].event_type = nil
      assert_invalid(evs, 2, "event_type")
      evs = h.events(3, { aggregate_id = id })
      evs[3].aggregate_id = nil
      assert_invalid(evs, 3, "aggregate_id")
      evs = h.events(1, { aggregate_id = id })
      evs[1].aggregate_type = nil
      assert_invalid(evs, 1, "aggregate_type")
    end)

    it("invalid_event names the index and a wrong-typed field", function()
      local id = h.uid("inv2")
      local evs = h.events(2, { aggregate_id = id })
      evs[2].event_type = {}
      assert_invalid(evs, 2, "event_type")
      evs = h.events(2, { aggregate_id = id })
      evs[1].payload = true
      assert_invalid(evs, 1, "payload")
      evs = h.events(2, { aggregate_id = id })
      evs[2].metadata = 12
      assert_invalid(evs, 2, "metadata")
      evs = h.events(2, { aggregate_id = id })
      evs[2].causation_id = {}
      assert_invalid(evs, 2, "causation_id")
    end)

    it("invalid_event names an unknown (misspelt) field instead of dropping it", function()
      local id = h.uid("inv3")
      local evs = h.events(2, { aggregate_id = id })
      evs[2].payloadd = { amount = 1 }
      assert_invalid(evs, 2, "unknown field payloadd")
      evs = h.events(1, { aggregate_id = id })
      evs[1][1] = "x"
      assert_invalid(evs, 1, "unknown field (a key that is not a string)")
    end)

    it("invalid_event for events of different aggregates in one append", function()
      local id = h.uid("mix")
      local evs = h.events(3, { aggregate_id = id })
      evs[3].aggregate_id = id .. "-other"
      assert_invalid(evs, 3, "aggregate_id")
      evs = h.events(2, { aggregate_id = id })
      evs[2].aggregate_type = "Order"
      assert_invalid(evs, 2, "aggregate_type")
      assert.are.equal(0, count(id))
    end)

    it("a duplicate event_id of another aggregate is duplicate_event, not a conflict", function()
      local id = h.uid("dup")
      local eid = pup.uuid()
      assert(store:append(db, pup.any(), { h.event { aggregate_id = id, event_id = eid } }))
      local res, err = store:append(db, pup.any(),
                                    { h.event { aggregate_id = id .. "-2", event_id = eid } })
      assert.is_nil(res)
      assert.are.equal("duplicate_event", err.code)
      assert.are.equal(0, count(id .. "-2"))
    end)

    it("raises on wrong argument types", function()
      assert.has_error(function() store:append(db, pup.any(), "nope") end)
      assert.has_error(function() store:append(db, pup.any()) end)
      assert.has_error(function() store:append("db", pup.any(), { h.event() }) end)
      assert.has_error(function() store:append(db, "any", { h.event() }) end)
      assert.has_error(function() store.append(nil, db, pup.any(), { h.event() }) end)
      assert.has_error(function() pup.exact("x") end)
    end)
  end)

  describe("stored values", function()
    it("payload bytes with NULs and high bytes round-trip exactly", function()
      local id = h.uid("bytes")
      local bytes = "\0\1\2\255abc\0\0xyz\128\0"
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      local allbytes = table.concat(all)
      assert(store:append(db, pup.no_stream(), {
        h.event { aggregate_id = id, payload = bytes },
        h.event { aggregate_id = id, payload = allbytes },
        h.event { aggregate_id = id, payload = "" },
      }))
      local stream = assert(store:read_aggregate_stream(db, "User", id))
      assert.are.equal(h.hex(bytes), h.hex(stream[1].payload))
      assert.are.equal(h.hex(allbytes), h.hex(stream[2].payload))
      assert.are.equal("", stream[3].payload)
      local rows = assert(db:query('SELECT payload, length(payload) AS n FROM "' ..
                                   names.events_table .. '" WHERE aggregate_id = $1' ..
                                   ' ORDER BY aggregate_version', id))
      assert.are.equal(#bytes, rows[1].n)
      assert.are.equal(h.hex(bytes), h.hex(rows[1].payload))
      assert.are.equal(256, rows[2].n)
      -- and through read_events
      local evs = assert(store:read_events(db, stream[1].global_position - 1, { limit = 1 }))
      assert.are.equal(h.hex(bytes), h.hex(evs[1].payload))
    end)

    it("a table payload is stored as JSON and event.data decodes it", function()
      local id = h.uid("json")
      assert(store:append(db, pup.no_stream(), {
        h.event { aggregate_id = id, payload = { email = "a@x.io", n = 3, tags = { "x", "y" } } },
      }))
      local rows = assert(db:query("SELECT convert_from(payload, 'UTF8')::jsonb AS j FROM \"" ..
                                   names.events_table .. "\" WHERE aggregate_id = $1", id))
      local j = pup.json.decode(rows[1].j)
      assert.are.equal("a@x.io", j.email)
      local ev = assert(store:read_aggregate_stream(db, "User", id))[1]
      assert.are.equal("string", type(ev.payload))
      assert.are.same({ email = "a@x.io", n = 3, tags = { "x", "y" } }, pup.json.decode(ev.payload))
      assert.are.equal("a@x.io", ev.data.email)
      assert.are.equal(3, ev.data.n)
      assert.are.same({ "x", "y" }, ev.data.tags)
      assert.are.equal(ev.data, ev.data, "event.data is decoded once and kept")
    end)

    it("a string payload that is JSON text also decodes through event.data", function()
      local id = h.uid("jsonstr")
      assert(store:append(db, pup.no_stream(), { h.event { aggregate_id = id, payload = '{"k":"v"}' } }))
      local ev = assert(store:read_aggregate_stream(db, "User", id))[1]
      assert.are.equal('{"k":"v"}', ev.payload)
      assert.are.equal("v", ev.data.k)
    end)

    it("metadata may be a table or a JSON string, and is nil when absent", function()
      local id = h.uid("meta")
      assert(store:append(db, pup.no_stream(), {
        h.event { aggregate_id = id, metadata = { source = "signup", n = 1 } },
        h.event { aggregate_id = id, metadata = '{"source": "import"}' },
        h.event { aggregate_id = id },
      }))
      local stream = assert(store:read_aggregate_stream(db, "User", id))
      assert.are.equal("string", type(stream[1].metadata))
      assert.are.same({ source = "signup", n = 1 }, pup.json.decode(stream[1].metadata))
      assert.are.same({ source = "import" }, pup.json.decode(stream[2].metadata))
      assert.is_nil(stream[3].metadata)
      local rows = assert(db:query('SELECT metadata->>\'source\' AS s, jsonb_typeof(metadata) AS t FROM "' ..
                                   names.events_table .. '" WHERE aggregate_id = $1 ORDER BY aggregate_version', id))
      assert.are.equal("signup", rows[1].s)
      assert.are.equal("object", rows[1].t)
      assert.are.equal("import", rows[2].s)
      assert.are.equal(pup.null, rows[3].s)
    end)

    it("invalid metadata JSON text is rejected and nothing is written", function()
      local id = h.uid("badmeta")
      local res, err = store:append(db, pup.no_stream(), { h.event { aggregate_id = id, metadata = "{not json" } })
      assert.is_nil(res)
      assert.is_truthy(err.code == "invalid_event" or err.code == "database", tostring(err))
      assert.are.equal(0, count(id))
    end)

    it("event_id defaults to a new UUID; a given one is kept", function()
      local id = h.uid("eid")
      local given = pup.uuid()
      assert(store:append(db, pup.no_stream(), {
        h.event { aggregate_id = id }, h.event { aggregate_id = id },
        h.event { aggregate_id = id, event_id = given },
      }))
      local stream = assert(store:read_aggregate_stream(db, "User", id))
      local pat = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"
      assert.is_truthy(stream[1].event_id:match(pat), stream[1].event_id)
      assert.is_truthy(stream[2].event_id:match(pat), stream[2].event_id)
      assert.are_not.equal(stream[1].event_id, stream[2].event_id)
      assert.are.equal(given:lower(), stream[3].event_id:lower())
    end)

    it("optional fields are stored; absent ones read back as nil / defaults", function()
      local id = h.uid("opt")
      assert(store:append(db, pup.no_stream(), {
        h.event { aggregate_id = id, event_version = 3, causation_id = "cause-1",
                  correlation_id = "corr-1", trace_id = "trace-1",
                  created_at = "2021-06-01 12:00:00+02" },
        h.event { aggregate_id = id },
      }))
      local stream = assert(store:read_aggregate_stream(db, "User", id))
      local a, b = stream[1], stream[2]
      assert.are.equal(3, a.event_version)
      assert.are.equal("integer", math.type(a.event_version))
      assert.are.equal("cause-1", a.causation_id)
      assert.are.equal("corr-1", a.correlation_id)
      assert.are.equal("trace-1", a.trace_id)
      assert.is_truthy(a.created_at:match("^2021%-06%-01T10:00:00"), a.created_at)
      assert.is_truthy(a.created_at:match("Z$"), a.created_at)
      assert.are.equal(1, b.event_version)
      assert.is_nil(b.causation_id)
      assert.is_nil(b.correlation_id)
      assert.is_nil(b.trace_id)
      assert.are.equal("User", b.aggregate_type)
      assert.are.equal(id, b.aggregate_id)
    end)

    it("UUID aggregate ids work", function()
      local id = pup.uuid()
      local res = assert(store:append(db, pup.no_stream(), { h.event { aggregate_id = id } }))
      assert.are.equal(1, res.to_version)
      assert.are.equal(id, assert(store:read_aggregate_stream(db, "User", id))[1].aggregate_id)
    end)

    it("appends inside a transaction commit or roll back with it", function()
      local id = h.uid("tx")
      local tx = assert(db:begin())
      assert(store:append(tx, pup.no_stream(), h.events(2, { aggregate_id = id })))
      assert(tx:rollback())
      assert.are.equal(0, count(id))
      assert.are.equal(0, head(id))
      tx = assert(db:begin())
      assert(store:append(tx, pup.no_stream(), h.events(2, { aggregate_id = id })))
      assert(tx:commit())
      assert.are.equal(2, count(id))
      assert.are.equal(2, head(id))
    end)

    it("appends 500 events in one call", function()
      local id = h.uid("many")
      local res = assert(store:append(db, pup.no_stream(), h.events(500, { aggregate_id = id })))
      assert.are.equal(500, #res.global_positions)
      assert.are.equal(500, res.to_version)
      assert.are.equal(500, count(id))
    end)
  end)
end)
