-- Issue 10 (review): the client encoding can still be changed after connecting, by
-- db:exec("SET client_encoding ..."). Before the check, an append then stored the id
-- converted from LATIN1 beside a hash of the bytes given, and a processor on such a
-- connection read ids whose hash disagreed with the stored one: with 4 partitions every
-- handler got payload = nil (8 of 8). Both now refuse, naming client_encoding.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("client_encoding changed after connecting", function()
  local store, db, T

  before_each(function() store, db, T = H.fresh_store("cencset") end)
  after_each(function() db:close() end)

  local function count()
    return assert(db:query(('SELECT count(*) AS n FROM "%s"'):format(T.events_table)))[1].n
  end

  local function id(i) return "caf\u{e9}-\u{fc}ber-" .. i end

  it("append refuses with invalid_argument and stores nothing", function()
    local w = H.connect()
    assert(w:exec("SET client_encoding TO 'LATIN1'"))
    local res, err = store:append(w, pup.no_stream(), { H.event { aggregate_id = id(1) } })
    assert.is_nil(res)
    assert.equal("invalid_argument", err.code)
    assert.matches("client_encoding is LATIN1", err.message, nil, true)
    assert.equal(0, count())
    -- inside a transaction as well
    local ok, terr = w:transaction(function(tx)
      assert(store:append(tx, pup.no_stream(), { H.event { aggregate_id = id(2) } }))
    end)
    assert.is_nil(ok)
    assert.matches("client_encoding is LATIN1", tostring(terr), nil, true)
    assert.equal(0, count())
    -- back to UTF8: appends work again
    assert(w:exec("SET client_encoding TO 'UTF8'"))
    assert(store:append(w, pup.no_stream(), { H.event { aggregate_id = id(3) } }))
    assert.equal(1, count())
    w:close()
  end)

  it("a processor refuses to read, checkpoint unmoved; on UTF8 every partition gets every payload", function()
    for i = 1, 8 do
      assert(store:append(db, pup.no_stream(), { H.event { aggregate_id = id(i), payload = { i = i } } }))
    end
    local r = H.connect()
    local got, missing = {}, 0
    local function run_all()
      for key = 0, 3 do
        local p = pup.processor(r, {
          name = "cencset",
          handle = function(_, e)
            assert.equal(key, pup.partition_of(e.aggregate_id, 4))
            if e.payload == nil then missing = missing + 1 return end
            got[#got + 1] = math.tointeger(e.data.i)
          end,
        }, { store = store, partition_key = key, total_partitions = 4, batch_size = 100 })
        local n, err = p:run_once()
        p:close()
        if not n then return nil, err end
      end
      return true
    end
    assert(r:exec("SET client_encoding TO 'LATIN1'"))
    local ok, err = run_all()
    assert.is_nil(ok)
    assert.equal("invalid_argument", err.code)
    assert.matches("client_encoding is LATIN1", err.message, nil, true)
    assert.same({}, got)
    assert.equal(0, missing)
    local cps = assert(db:query(('SELECT count(*) AS n FROM "%s" WHERE last_global_position > 0')
      :format(T.checkpoints_table)))[1].n
    assert.equal(0, cps)

    assert(r:exec("SET client_encoding TO 'UTF8'"))
    assert(run_all())
    assert.equal(0, missing, "handlers got payload = nil")
    table.sort(got)
    assert.same({ 1, 2, 3, 4, 5, 6, 7, 8 }, got)
    r:close()
  end)
end)
