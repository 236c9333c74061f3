-- Issue 10: the library's connections do not depend on the client's encoding. A writer
-- whose environment says PGCLIENTENCODING=LATIN1 used to store ids converted from LATIN1
-- beside a hash of the original bytes, so partitioned readers skipped the payloads
-- (payload = nil for 40 of 40 events with 4 partitions).
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("client encoding", function()
  local store, db, names

  before_each(function()
    store, db, names = H.fresh_store("cenc")
  end)

  after_each(function()
    db:close()
  end)

  it("a LATIN1 writer environment: ids stored as UTF-8, every partition gets every payload", function()
    local writer = ([[
      local pup = require "pupsourcing"
      local db = assert(pup.connect())
      local enc = assert(db:query("SHOW client_encoding"))[1].client_encoding
      local store = pup.store{events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q}
      for i = 1, 40 do
        local id = "caf\u{e9}-\u{fc}ber-\u{65e5}\u{672c}-" .. i
        assert(store:append(db, pup.no_stream(), {{aggregate_type = "Caf\u{e9}", aggregate_id = id,
          event_type = "Cr\u{e9}\u{e9}", payload = {n = i, id = id}}}))
      end
      print("client_encoding=" .. enc)
    ]]):format(names.events_table, names.aggregate_heads_table, names.checkpoints_table)
    local r = H.run_script(writer, {}, { env = { PGCLIENTENCODING = "LATIN1" } })
    assert.are.equal(0, r.code, r.output)

    -- stored bytes are the UTF-8 the writer gave, and the hash is over them
    local rows = assert(db:query(('SELECT aggregate_id, aggregate_type, aggregate_id_hash FROM "%s"'
      .. " ORDER BY global_position"):format(names.events_table)))
    assert.are.equal(40, #rows)
    local seen, missing = {}, 0
    for key = 0, 3 do
      local p = pup.processor(db, {
        name = "cenc",
        handle = function(_, e)
          assert.are.equal(key, pup.partition_of(e.aggregate_id, 4))
          if e.payload == nil then missing = missing + 1 return end
          assert.are.equal(e.aggregate_id, e.data.id)
          assert.is_nil(seen[e.aggregate_id])
          seen[e.aggregate_id] = math.tointeger(e.data.n)
        end,
      }, { store = store, partition_key = key, total_partitions = 4, batch_size = 1000 })
      assert(p:run_once())
      p:close()
    end
    assert.are.equal(0, missing, "handlers got payload = nil")
    for i, row in ipairs(rows) do
      assert.are.equal("caf\u{e9}-\u{fc}ber-\u{65e5}\u{672c}-" .. i, row.aggregate_id, H.hex(row.aggregate_id))
      assert.are.equal("Caf\u{e9}", row.aggregate_type)
      assert.are.equal(pup.fnv1a32(row.aggregate_id), row.aggregate_id_hash)
    end

    local n = 0
    for id, i in pairs(seen) do
      n = n + 1
      assert.are.equal("caf\u{e9}-\u{fc}ber-\u{65e5}\u{672c}-" .. i, id)
    end
    assert.are.equal(40, n)
    assert.is_truthy(r.stdout:find("client_encoding=UTF8", 1, true), r.output)
  end)

  it("client_encoding in the connection string is overridden too", function()
    local url = H.url()
    url = url .. (url:find("?", 1, true) and "&" or "?") .. "client_encoding=LATIN1"
    local d = H.connect(url)
    assert.are.equal("UTF8", assert(d:query("SHOW client_encoding"))[1].client_encoding)
    d:close()
  end)
end)
