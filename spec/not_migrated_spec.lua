-- Issue 12: `not_migrated` ("run `pupsourcing migrate`") only when the store's own tables
-- are missing. A missing table of the user's read model is a plain database error that
-- names the table, from a handler, its setup, the CLI and application code alike.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("not_migrated", function()
  local store, db, names

  before_each(function()
    store, db, names = H.fresh_store("nmig")
    assert(store:append(db, pup.any(), { H.event { aggregate_id = "u1" } }))
    db:exec("DROP TABLE IF EXISTS nmig_no_such_read_model")
  end)

  after_each(function()
    db:close()
  end)

  local function plain(err)
    assert.is_not_nil(err)
    assert.is_not.equal("not_migrated", err.code)
    assert.matches('relation "nmig_no_such_read_model" does not exist', tostring(err), 1, true)
    assert.matches("42P01", tostring(err), 1, true)
    assert.is_nil(tostring(err):find("pupsourcing migrate", 1, true), tostring(err))
  end

  it("a query of application code on a missing table is database, naming it", function()
    local res, err = db:query("SELECT * FROM nmig_no_such_read_model")
    assert.is_nil(res)
    assert.equal("database", err.code)
    plain(err)
  end)

  it("a handler writing to a missing read-model table fails as a handler, not not_migrated", function()
    local p = pup.processor(db, {
      name = "nmig_proj",
      handle = function(tx, e)
        assert(tx:query("INSERT INTO nmig_no_such_read_model VALUES ($1) RETURNING 1", e.global_position))
      end,
    }, { store = store })
    local res, err = p:run_once()
    assert.is_nil(res)
    assert.equal("handler", err.code, tostring(err))
    plain(err)
    p:close()
  end)

  it("a projection's setup reading a missing table is not not_migrated", function()
    local p = pup.processor(db, {
      name = "nmig_setup",
      setup = function(tx) assert(tx:query("SELECT * FROM nmig_no_such_read_model")) end,
      handle = function() end,
    }, { store = store })
    local res, err = p:run_once()
    assert.is_nil(res)
    assert.is_not.equal("not_migrated", err.code, tostring(err))
    plain(err)
    p:close()
  end)

  it("`pupsourcing run` says which table is missing and not to migrate", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/p.lua", [[
      return { name = "nmig_cli", handle = function(tx, e)
        assert(tx:query("SELECT * FROM nmig_no_such_read_model"))
      end }
    ]])
    local r = H.run(H.with_tables(names, { "run", "--once", dir .. "/p.lua" }))
    assert.equal(1, r.code, r.stderr)
    assert.matches('relation "nmig_no_such_read_model" does not exist', r.stderr, 1, true)
    assert.matches("42P01", r.stderr, 1, true)
    assert.is_nil(r.stderr:find("not_migrated", 1, true), r.stderr)
    assert.is_nil(r.stderr:find("pupsourcing migrate", 1, true), r.stderr)
    H.rmdir(dir)
  end)

  it("the store's own tables missing are still not_migrated, from C and from Lua", function()
    H.drop_tables(db, "nmig")
    local function nm(res, err)
      assert.is_nil(res)
      assert.equal("not_migrated", err.code, tostring(err))
      assert.matches("pupsourcing migrate", err.message, 1, true)
    end
    nm(store:append(db, pup.any(), { H.event() }))
    nm(store:read_events(db, 0))
    nm(store:read_events_raw(db, 0))
    nm(store:read_aggregate_stream(db, "User", "u1"))
    nm(store:head(db))
    nm(pup.status(db, store))
    local p = pup.processor(db, { name = "nmig_gone", handle = function() end }, { store = store })
    nm(p:run_once())
    p:close()
  end)
end)
