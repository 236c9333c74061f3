-- Events written by another library (plain SQL, as the Go library does: no
-- global_position, no aggregate_id_hash) are read like our own, by every partition.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("events from other writers", function()
  it("are handled exactly once across partitions, with their payloads", function()
    local store, db, names = H.fresh_store("foreign")
    local ids = {}
    for i = 1, 40 do
      ids[i] = "foreign-" .. i
      assert(db:exec(('INSERT INTO "%s" (aggregate_type, aggregate_id, aggregate_version, event_id, event_type, payload)'
        .. " VALUES ('User', $1, 1, gen_random_uuid(), 'UserCreated', $2)"):format(names.events_table),
        ids[i], '{"n":' .. i .. '}'))
    end
    assert(store:append(db, pup.no_stream(), { H.event { aggregate_id = "ours-1", payload = { n = 0 } } }))
    local seen = {}
    for key = 0, 2 do
      local p = pup.processor(db, {
        name = "foreign",
        handle = function(_, e)
          assert.equal(key, pup.partition_of(e.aggregate_id, 3))
          assert.is_truthy(e.payload and e.data.n)
          assert.is_nil(seen[e.aggregate_id])
          seen[e.aggregate_id] = true
        end,
      }, { store = store, partition_key = key, total_partitions = 3, batch_size = 1000 })
      assert(p:run_once())
      p:close()
    end
    local n = 0
    for _ in pairs(seen) do n = n + 1 end
    assert.equal(41, n)
    db:close()
  end)
end)
