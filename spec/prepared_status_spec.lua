-- Issue 10: a prepared transaction holds every projection at a hole it may fill (and
-- makes `run --once` wait) until it is committed or rolled back; `pupsourcing status`
-- names it. Needs a server with max_prepared_transactions > 0 (scripts/pg.sh sets 10).
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("status and prepared transactions", function()
  local db, T, gid

  before_each(function()
    T = H.tables("prep")
    local store
    store, db = H.fresh_store("prep")
    assert(store)
    assert(db:exec("CREATE TABLE IF NOT EXISTS t_prep_x (v int)"))
  end)

  after_each(function()
    if gid then db:exec("ROLLBACK PREPARED '" .. gid .. "'") end
    gid = nil
    db:close()
  end)

  it("warns with the gid and since when, in text and (on stderr) with --json", function()
    local max = assert(db:query("SELECT current_setting('max_prepared_transactions')::int AS n"))[1].n
    if max == 0 then
      pending("the server has max_prepared_transactions = 0 (scripts/pg.sh starts it with 10)")
      return
    end
    local r = H.run(H.with_tables(T, { "status" }))
    assert.equal(0, r.code, r.output)
    assert.is_nil(r.output:find("prepared transaction", 1, true), r.output)

    gid = H.uid("pupspec-gid")
    local x = H.connect()
    assert(x:exec("BEGIN"))
    assert(x:exec("INSERT INTO t_prep_x VALUES (1)"))
    assert(x:exec("PREPARE TRANSACTION '" .. gid .. "'"))
    x:close()
    local p = assert(db:query("SELECT to_char(prepared, 'YYYY-MM-DD\"T\"HH24:MI:SS') AS s, database AS d"
      .. " FROM pg_prepared_xacts WHERE gid = $1", gid))[1]

    r = H.run(H.with_tables(T, { "status" }))
    assert.equal(0, r.code, r.output)
    local line = r.stdout:match("[^\n]*prepared transaction[^\n]*")
    assert.is_truthy(line, r.output)
    assert.matches('^warning: prepared transaction "' .. gid:gsub("%-", "%%-") .. '" %(xid %d+, database ' .. p.d .. '%) open since '
      .. p.s:gsub("%-", "%%-") .. "%.%d+", line)
    assert.matches("COMMIT PREPARED or ROLLBACK PREPARED", line)

    r = H.run(H.with_tables(T, { "status", "--json" }))
    assert.equal(0, r.code, r.output)
    assert.same({}, pup.json.decode(r.stdout))
    assert.matches('warning: prepared transaction "' .. gid:gsub("%-", "%%-") .. '"', r.stderr)
  end)
end)
