-- Issue 10: COPY through the library spun at 100% CPU for ever inside a handler and
-- returned `connection`, "unknown database error" outside one. It is refused with a clear
-- error, and the connection stays usable.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local function refused(res, err)
  assert.is_nil(res)
  assert.is_not_nil(err, "expected an error")
  assert.are.equal("invalid_argument", err.code, tostring(err))
  assert.is_truthy(err.message:find("COPY is not supported", 1, true), err.message)
end

describe("COPY", function()
  local db

  before_each(function()
    db = H.connect()
    assert(db:exec("DROP TABLE IF EXISTS t_copy_rm"))
    assert(db:exec("CREATE TABLE t_copy_rm (n int)"))
  end)

  after_each(function()
    db:close()
  end)

  local function usable(d)
    assert.are.equal(7, assert((d or db):query("SELECT 7 AS x"))[1].x)
  end

  it("db:exec / db:query refuse COPY FROM STDIN and TO STDOUT; the connection stays usable", function()
    refused(db:exec("COPY t_copy_rm FROM STDIN"))
    usable()
    refused(db:query("COPY (SELECT generate_series(1, 100000)) TO STDOUT"))
    usable()
    refused(db:query("copy t_copy_rm to stdout"))
    usable()
    -- several statements in one string: the ones after the COPY do not run
    refused(db:exec("COPY t_copy_rm FROM STDIN; INSERT INTO t_copy_rm VALUES (1)"))
    usable()
    refused(db:exec("COPY (SELECT 1) TO STDOUT; COPY (SELECT 2) TO STDOUT"))
    usable()
    -- with parameters (the extended protocol): refused before anything is sent
    refused(db:exec("/* a comment */ -- another\n  COPY t_copy_rm FROM STDIN WHERE n = $1", 1))
    usable()
    assert.are.equal(0, assert(db:query("SELECT count(*) AS n FROM t_copy_rm"))[1].n)
  end)

  it("inside a transaction: refused, then the transaction rolls back cleanly", function()
    local tx = assert(db:begin())
    assert(tx:exec("INSERT INTO t_copy_rm VALUES ($1)", 1))
    refused(tx:exec("COPY t_copy_rm FROM STDIN"))
    assert(tx:rollback())
    usable()
    tx = assert(db:begin())
    refused(tx:query("COPY t_copy_rm TO STDOUT"))
    assert(tx:rollback())
    usable()
    assert.are.equal(0, assert(db:query("SELECT count(*) AS n FROM t_copy_rm"))[1].n)
  end)

  it("words that only start with copy are not COPY", function()
    assert(db:exec("DROP TABLE IF EXISTS copy_t_copy"))
    assert(db:exec("CREATE TABLE copy_t_copy (n int)"))
    assert.are.equal(0, #assert(db:query("SELECT * FROM copy_t_copy WHERE n = $1", 1)))
    assert(db:exec("DROP TABLE copy_t_copy"))
  end)

  describe("inside a handler (host binary)", function()
    local T = H.tables("copy")
    local store, dir

    before_each(function()
      store = H.fresh_store("copy", db)
      assert(store:append(db, pup.any(), H.events(3, { aggregate_id = H.uid("copy") })))
      dir = H.tmpdir()
    end)

    after_each(function()
      H.rmdir(dir)
    end)

    -- Runs `run --once` on a projection whose handler body is `body`, under a time bound.
    local function run_handler(body, setup)
      local path = dir .. "/copy_proj.lua"
      H.write_file(path, ([[
        return {
          name = "copy_proj",
          setup = function(tx) %s end,
          handle = function(tx, e) %s end,
        }]]):format(setup or "", body))
      local words = { "timeout", "-k", "5", "30", H.shquote(H.bin) }
      for _, a in ipairs(H.with_tables(T, { "run", "--once", path })) do words[#words + 1] = H.shquote(a) end
      local t0 = pup.now()
      local r = H.sh(table.concat(words, " "))
      r.seconds = pup.now() - t0
      return r
    end

    local function fails_fast(r)
      assert.is_true(r.code ~= 124 and r.code ~= 137, "run hung on COPY (killed by timeout)")
      assert.are_not.equal(0, r.code, r.output)
      assert.is_true(r.seconds < 20, "took " .. r.seconds .. " s")
      assert.is_truthy(r.stderr:find("COPY is not supported", 1, true), r.stderr)
    end

    it("tx:exec COPY FROM STDIN (pipelined) fails the batch at once", function()
      fails_fast(run_handler([[assert(tx:exec("COPY t_copy_rm FROM STDIN"))]]))
    end)

    it("tx:query COPY TO STDOUT fails the batch at once", function()
      fails_fast(run_handler([[assert(tx:query("COPY t_copy_rm TO STDOUT"))]]))
    end)

    it("an ignored COPY error still fails the batch, and nothing is committed", function()
      fails_fast(run_handler([[
        tx:exec("INSERT INTO t_copy_rm VALUES ($1)", e.global_position)
        tx:exec("COPY t_copy_rm FROM STDIN")]]))
      assert.are.equal(0, assert(db:query("SELECT count(*) AS n FROM t_copy_rm"))[1].n)
    end)

    it("COPY in setup (not pipelined) fails at once too", function()
      fails_fast(run_handler("", [[assert(tx:exec("COPY t_copy_rm FROM STDIN"))]]))
    end)
  end)
end)
