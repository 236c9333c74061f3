-- Issue 10, transactions: nested db:transaction runs in a savepoint, a second db:begin is
-- misuse, a stale tx cannot touch a later transaction, transaction control is refused on a
-- tx, tx:savepoint(fn) (plain and pipelined inside handlers), and a db in use refuses to
-- close. Every case checks what is committed, from another connection.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local RM = "t_txn_rm"

describe("transactions", function()
  local store, db, T, other

  local function q(sql, ...) return assert(other:query(sql, ...)) end
  local function rows()
    local out = {}
    for _, r in ipairs(q("SELECT id FROM " .. RM .. " ORDER BY id")) do out[#out + 1] = r.id end
    return out
  end
  local function events() return q(('SELECT count(*) AS n FROM "%s"'):format(T.events_table))[1].n end
  local function ins(tx, id) return tx:exec("INSERT INTO " .. RM .. " (id) VALUES ($1)", id) end

  before_each(function()
    store, db, T = H.fresh_store("txn")
    other = H.connect()
    assert(db:exec("DROP TABLE IF EXISTS " .. RM))
    assert(db:exec("CREATE TABLE " .. RM .. " (id int PRIMARY KEY)"))
  end)

  after_each(function()
    other:close()
    db:close()
  end)

  describe("nested db:transaction", function()
    it("commits nothing when the outer function raises after the inner one succeeded", function()
      local inner
      local res, err = db:transaction(function(tx)
        assert(ins(tx, 1))
        inner = table.pack(db:transaction(function(tx2)
          assert(ins(tx2, 2))
          assert(store:append(tx2, pup.no_stream(), H.events(3, { aggregate_id = "nested" })))
          return "inner result"
        end))
        assert(ins(tx, 3))
        error("outer fails")
      end)
      assert.same({ "inner result", n = 1 }, inner)
      assert.is_nil(res)
      assert.equal("error", err.code)
      assert.matches("outer fails", err.message)
      assert.same({}, rows())
      assert.equal(0, events())
      -- the connection is out of any transaction and usable
      assert(ins(db, 9))
      assert.same({ 9 }, rows())
    end)

    it("rolls back only the inner work when the inner function fails and the outer catches it", function()
      local e1, e2, e3
      assert(db:transaction(function(tx)
        assert(ins(tx, 1))
        local r1
        r1, e1 = db:transaction(function(tx2) -- raises
          assert(ins(tx2, 2))
          assert(store:append(tx2, pup.no_stream(), H.events(2, { aggregate_id = "inner" })))
          error("inner fails")
        end)
        assert.is_nil(r1)
        local r2
        r2, e2 = db:transaction(function(tx2) -- a failed statement, returned as nil, err
          assert(ins(tx2, 4))
          return ins(tx2, 1) -- duplicate key
        end)
        assert.is_nil(r2)
        local r3
        r3, e3 = db:transaction(function(tx2) -- a failed statement, ignored
          assert(ins(tx2, 5))
          ins(tx2, 1)
          return "ignored the failure"
        end)
        assert.is_nil(r3)
        assert(ins(tx, 3))
        assert(store:append(tx, pup.no_stream(), H.events(1, { aggregate_id = "outer" })))
      end))
      assert.matches("inner fails", e1.message)
      assert.equal("23505", e2.sqlstate)
      assert.equal("23505", e3.sqlstate)
      assert.same({ 1, 3 }, rows())
      assert.equal(1, events())
    end)

    it("nests more than one level", function()
      assert(db:transaction(function(tx)
        assert(ins(tx, 1))
        assert(db:transaction(function(tx2)
          assert(ins(tx2, 2))
          local r, e = db:transaction(function(tx3)
            assert(ins(tx3, 3))
            error("level 3 fails")
          end)
          assert.is_nil(r)
          assert.matches("level 3 fails", e.message)
          assert(db:transaction(function(tx3) assert(ins(tx3, 4)) end))
        end))
      end))
      assert.same({ 1, 2, 4 }, rows())
    end)

    it("runs in a savepoint of a db:begin transaction too", function()
      local tx = assert(db:begin())
      assert(ins(tx, 1))
      assert.is_nil((db:transaction(function(tx2)
        assert(ins(tx2, 2))
        error("inner")
      end)))
      assert(db:transaction(function(tx2) assert(ins(tx2, 3)) end))
      assert.same({}, rows()) -- nothing visible before the outer commit
      assert(tx:commit())
      assert.same({ 1, 3 }, rows())
    end)

    it("a nested or scoped tx cannot commit or roll back; its owner does", function()
      assert(db:transaction(function(tx)
        assert.has_error(function() tx:commit() end)
        assert.has_error(function() tx:rollback() end)
        assert(db:transaction(function(tx2)
          assert.has_error(function() tx2:commit() end)
          assert(ins(tx2, 1))
        end))
      end))
      assert.same({ 1 }, rows())
      local tx = assert(db:begin())
      assert(tx:savepoint(function()
        local ok, err = pcall(tx.commit, tx)
        assert.is_false(ok)
        assert.matches("savepoint", tostring(err))
        assert(ins(tx, 2))
      end))
      assert(tx:commit())
      assert.same({ 1, 2 }, rows())
    end)
  end)

  describe("db:begin", function()
    it("raises when a transaction is already open on the connection, and the first one goes on", function()
      local tx = assert(db:begin())
      assert(ins(tx, 1))
      local ok, err = pcall(db.begin, db)
      assert.is_false(ok)
      assert.matches("already open", tostring(err))
      assert(ins(tx, 2))
      assert.same({}, rows())
      assert(tx:commit())
      assert.same({ 1, 2 }, rows())
      -- inside db:transaction db:begin raises; the transaction function sees it as an error
      local res, e = db:transaction(function(tx2)
        assert(ins(tx2, 3))
        db:begin()
      end)
      assert.is_nil(res)
      assert.matches("already open", e.message)
      assert.same({ 1, 2 }, rows())
    end)
  end)

  describe("stale tx objects", function()
    it("a collected stale tx does not roll back a later transaction", function()
      local tx1 = assert(db:begin())
      assert(ins(tx1, 1))
      assert(db:exec("COMMIT")) -- ends tx1's transaction behind its back
      local tx2 = assert(db:begin())
      assert(ins(tx2, 2))
      local ok, err = pcall(tx1.exec, tx1, "SELECT 1")
      assert.is_false(ok)
      assert.matches("transaction is closed", tostring(err))
      assert.has_error(function() tx1:commit() end, nil)
      tx1 = nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
      assert.is_true(assert(tx2:commit()))
      assert.same({ 1, 2 }, rows())
    end)

    it("a tx kept from a finished db:transaction is closed and is collected harmlessly", function()
      local kept
      assert(db:transaction(function(tx)
        kept = tx
        assert(ins(tx, 1))
      end))
      local tx2 = assert(db:begin())
      assert(ins(tx2, 2))
      assert.has_error(function() kept:exec("SELECT 1") end, nil)
      kept = nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
      assert.is_true(assert(tx2:commit()))
      assert.same({ 1, 2 }, rows())
    end)

    it("commit reports a transaction that was ended another way", function()
      local tx = assert(db:begin())
      assert(ins(tx, 1))
      assert(db:exec("ROLLBACK"))
      local ok, err = tx:commit()
      assert.is_nil(ok)
      assert.matches("already ended", err.message)
      assert.same({}, rows())
    end)
  end)

  describe("transaction control on a tx", function()
    local refused = {
      "ROLLBACK", "rollback", "  COMMIT", "\n\tcommit work", "/* note */ begin", "/* a /* nested */ one */ END",
      "-- comment\nABORT", "savepoint s1", "RELEASE SAVEPOINT s1", "release s1", "ROLLBACK TO SAVEPOINT s1",
      "rollback to s1", "PREPARE TRANSACTION 'x'", "prepare  /* c */ transaction 'x'", "START TRANSACTION",
      "start transaction isolation level serializable", "COMMIT PREPARED 'x'", "SELECT 1; COMMIT",
      "SELECT ';'; rollback", "SELECT $$;$$; END", "select 1;\n-- x\n  begin",
    }
    local allowed = {
      "SELECT 'COMMIT' AS c", 'SELECT 1 AS "begin"', "SELECT $$ROLLBACK$$ AS r", "SELECT $t$ ; COMMIT $t$ AS r",
      "-- COMMIT\nSELECT 1 AS one", "/* ROLLBACK */ SELECT 1 AS one", "SELECT E'\\'; commit' AS r",
      "SELECT 1 AS one; SELECT 2 AS two",
      "CREATE OR REPLACE FUNCTION pg_temp.txn_f() RETURNS int LANGUAGE sql"
        .. " BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END",
    }

    it("refuses it on a db:begin and a db:transaction tx (exec and query), pointing at tx:savepoint", function()
      local tx = assert(db:begin())
      assert(ins(tx, 1))
      for _, sql in ipairs(refused) do
        for _, m in ipairs { "exec", "query" } do
          local ok, err = pcall(tx[m], tx, sql)
          assert.is_false(ok, sql)
          assert.matches("not allowed on a tx", tostring(err), nil, true)
          assert.matches("tx:savepoint", tostring(err), nil, true)
        end
      end
      for _, sql in ipairs(allowed) do assert(tx:exec(sql), sql) end
      assert(ins(tx, 2))
      assert(tx:commit())
      assert.same({ 1, 2 }, rows())

      local res, err = db:transaction(function(t)
        assert(ins(t, 3))
        t:exec("rollback")
      end)
      assert.is_nil(res)
      assert.matches("ROLLBACK is not allowed", err.message, nil, true)
      assert.same({ 1, 2 }, rows())
      -- db itself may run them: the connection is its own
      assert(db:exec("BEGIN"))
      assert(ins(db, 4))
      assert(db:exec("ROLLBACK"))
      assert.same({ 1, 2 }, rows())
    end)
  end)

  describe("tx:savepoint on a db:begin tx", function()
    it("releases on return, rolls back to on a raise, a failed statement or nil, err; the tx goes on", function()
      local tx = assert(db:begin())
      assert(ins(tx, 1))
      assert.same({ "a", 2, n = 2 }, table.pack(tx:savepoint(function(t)
        assert(rawequal(t, tx))
        assert(ins(t, 2))
        return "a", 2
      end)))
      assert.is_true(tx:savepoint(function() assert(ins(tx, 3)) end))
      local r, e = tx:savepoint(function() assert(ins(tx, 4)) error("raised") end)
      assert.is_nil(r)
      assert.equal("error", e.code)
      assert.matches("raised", e.message)
      r, e = tx:savepoint(function() assert(ins(tx, 5)) ins(tx, 1) end)
      assert.is_nil(r)
      assert.equal("23505", e.sqlstate)
      r, e = tx:savepoint(function() assert(ins(tx, 6)) return nil, "mine" end)
      assert.is_nil(r)
      assert.equal("mine", e)
      -- nested: the inner one fails, the outer one goes on
      assert(tx:savepoint(function()
        assert(ins(tx, 7))
        local r2, e2 = tx:savepoint(function() assert(ins(tx, 8)) return ins(tx, 7) end)
        assert.is_nil(r2)
        assert.equal("23505", e2.sqlstate)
        assert(ins(tx, 9))
      end))
      assert(tx:commit())
      assert.same({ 1, 2, 3, 7, 9 }, rows())
    end)

    it("does not undo a failure from before it", function()
      local tx = assert(db:begin())
      assert(ins(tx, 1))
      assert.is_nil((ins(tx, 1)))
      local r, e = tx:savepoint(function() assert(ins(tx, 2)) end)
      assert.is_nil(r)
      assert.matches("failed before it", e.message)
      local ok = tx:commit()
      assert.is_nil(ok)
      assert.same({}, rows())
    end)
  end)

  describe("a db in use refuses to close", function()
    it("db:close() inside db:transaction raises and the transaction still commits", function()
      local d = H.connect()
      local ok, err
      assert(d:transaction(function(tx)
        assert(ins(tx, 1))
        ok, err = pcall(d.close, d)
        assert(ins(tx, 2))
        assert(tx:savepoint(function()
          assert.has_error(function() d:close() end)
          assert(ins(tx, 3))
        end))
      end))
      assert.is_false(ok)
      assert.matches("in use", tostring(err))
      assert.same({ 1, 2, 3 }, rows())
      d:close() -- free again once the transaction returned
      assert.has_error(function() d:exec("SELECT 1") end)
    end)

    it("db:close() inside tx:savepoint of a db:begin tx raises; the tx commits", function()
      local d = H.connect()
      local tx = assert(d:begin())
      assert(ins(tx, 1))
      local r, e = tx:savepoint(function()
        assert(ins(tx, 2))
        d:close()
      end)
      assert.is_nil(r)
      assert.matches("in use", e.message)
      assert(ins(tx, 3))
      assert(tx:commit())
      assert.same({ 1, 3 }, rows())
      d:close()
    end)
  end)
end)
