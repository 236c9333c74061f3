-- The append statement stays an index-only affair under a generic plan made while the
-- events table was empty: PostgreSQL caches a prepared statement's generic plan, and an
-- event_id check written as `event_id = ANY(array)` was planned as a scan of the whole
-- table then, which kept growing with it (W2 went from 2.5 to 21 ms per 50-event append).
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("append plan", function()
  it("probes event_id by index, never scanning the events table, under a generic plan", function()
    local store, db, T = H.fresh_store("aplan")
    assert(db:exec("SET plan_cache_mode = force_generic_plan"))
    local id = pup.uuid()
    local evs = H.events(3, { aggregate_id = id })
    assert(store:append(db, pup.no_stream(), evs))
    assert(store:append(db, pup.any(), { H.event { aggregate_id = id } }))
    local plans = 0
    for _, r in ipairs(assert(db:query("SELECT name, statement FROM pg_prepared_statements"))) do
      if r.statement:find("AS dup", 1, true) then
        local many = r.statement:find("unnest($4::text[], $5::text[]", 1, true) ~= nil
        local function arr(v, n)
          if not many then return v end
          local t = {}
          for i = 1, n do t[i] = v end
          return "ARRAY[" .. table.concat(t, ",") .. "]"
        end
        local n = 5
        local q = ("EXPLAIN EXECUTE %s('T', 'x', NULL, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1, true)"):format(r.name,
          arr("NULL::text", n), arr("'E'", n), arr("'1'", n), arr("'\\x00'::bytea", n), arr("NULL::text", n),
          arr("NULL::text", n), arr("NULL::text", n), arr("NULL::text", n), arr("NULL::text", n))
        local text = {}
        for _, row in ipairs(assert(db:query(q))) do text[#text + 1] = row["QUERY PLAN"] end
        text = table.concat(text, "\n")
        assert.is_falsy(text:find("Seq Scan on " .. T.events_table, 1, true), text)
        assert.is_truthy(text:find(T.events_table .. "_event_id_key", 1, true), text)
        plans = plans + 1
      end
    end
    assert.equal(2, plans) -- the many-event and the one-event statements
    db:close()
  end)
end)
