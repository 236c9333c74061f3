-- Issue 10: re-running migrate on an up-to-date schema took an exclusive lock on the events
-- table (ALTER TABLE ... IF NOT EXISTS locks even when it does nothing), so it queued
-- behind one open reader and every append queued behind it. An up-to-date migrate takes no
-- strong lock; a schema missing a piece still gets it.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("migrate on an up-to-date schema", function()
  local store, db, names, reader

  before_each(function()
    store, db, names = H.fresh_store("miglock")
    assert(store:append(db, pup.any(), { H.event { aggregate_id = H.uid("m") } }))
    reader = H.connect()
  end)

  after_each(function()
    reader:close()
    db:close()
  end)

  -- An open transaction that has read every table (ACCESS SHARE until it ends).
  local function open_reader()
    local tx = assert(reader:begin())
    for _, t in ipairs { names.events_table, names.aggregate_heads_table, names.checkpoints_table,
                         names.checkpoints_table .. "_workers", names.checkpoints_table .. "_groups" } do
      assert(tx:query(('SELECT count(*) AS n FROM "%s"'):format(t)))
    end
    return tx
  end

  it("finishes at once beside an open reader, and appends go on", function()
    local tx = open_reader()
    -- a strong lock would wait for the reader until lock_timeout; the margin is for
    -- other specs' migrations, which take the migrate lock in turn
    assert(db:exec("SET lock_timeout = '10s'"))
    local t0 = pup.now()
    local ok, err = store:migrate(db)
    assert.is_true(ok, tostring(err))
    assert.is_true(pup.now() - t0 < 8, "migrate waited " .. (pup.now() - t0) .. " s")
    assert(db:exec("RESET lock_timeout"))
    -- an append from a third connection is not queued behind anything
    local writer = H.connect()
    assert(writer:exec("SET lock_timeout = '3s'"))
    assert(store:append(writer, pup.any(), { H.event { aggregate_id = H.uid("m") } }))
    writer:close()
    assert(tx:commit())
    assert.are.equal(2, #assert(store:read_events(db, 0)))
  end)

  it("the host binary's migrate as well", function()
    local tx = open_reader()
    local r = H.sh("timeout -k 5 30 " .. table.concat((function()
      local w = {}
      for _, a in ipairs(H.with_tables(names, { H.bin, "migrate" })) do w[#w + 1] = H.shquote(a) end
      return w
    end)(), " "), { env = { PGOPTIONS = "-c lock_timeout=10s" } })
    assert.are.equal(0, r.code, r.output)
    assert(tx:commit())
  end)

  it("a missing column or sequence ownership is still added", function()
    assert(db:exec(('ALTER TABLE "%s" DROP COLUMN aggregate_id_hash'):format(names.events_table)))
    assert(db:exec(('ALTER SEQUENCE "%s_global_position_seq" OWNED BY NONE'):format(names.events_table)))
    assert(store:migrate(db))
    local rows = assert(db:query("SELECT count(*) AS n FROM pg_attribute WHERE attrelid = $1::regclass"
      .. " AND attname = 'aggregate_id_hash' AND NOT attisdropped", names.events_table))
    assert.are.equal(1, rows[1].n)
    rows = assert(db:query("SELECT count(*) AS n FROM pg_depend WHERE objid = $1::regclass"
      .. " AND refobjid = $2::regclass AND deptype = 'a'", names.events_table .. "_global_position_seq",
      names.events_table))
    assert.are.equal(1, rows[1].n)
    assert(store:append(db, pup.any(), { H.event { aggregate_id = H.uid("m") } }))
  end)
end)
