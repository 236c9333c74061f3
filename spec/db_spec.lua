-- Issue 2: connections, transactions, parameters and result values.
local h = require "spec.helpers"
local pup = require "pupsourcing"

describe("db", function()
  local db
  local T = "t_db_items"

  setup(function()
    db = h.connect()
    assert(db:exec("DROP TABLE IF EXISTS " .. T))
    assert(db:exec("CREATE TABLE " .. T .. " (id int PRIMARY KEY, name text)"))
  end)

  teardown(function()
    if db then
      db:exec("DROP TABLE IF EXISTS " .. T)
      db:close()
    end
  end)

  before_each(function()
    assert(db:exec("DELETE FROM " .. T))
  end)

  local function names()
    local out = {}
    for _, r in ipairs(assert(db:query("SELECT name FROM " .. T .. " ORDER BY id"))) do
      out[#out + 1] = r.name
    end
    return out
  end

  describe("exec and query", function()
    it("pup.connect() without a url uses DATABASE_URL", function()
      local d = assert(pup.connect())
      assert.are.equal(1, assert(d:query("SELECT 1 AS one"))[1].one)
      d:close()
    end)

    it("exec returns the number of affected rows", function()
      local n = assert(db:exec("INSERT INTO " .. T .. " VALUES (1,'a'),(2,'b'),(3,'c')"))
      assert.are.equal(3, n)
      assert.are.equal("integer", math.type(n))
      assert.are.equal(2, assert(db:exec("UPDATE " .. T .. " SET name = name || 'x' WHERE id > $1", 1)))
      assert.are.equal(0, assert(db:exec("DELETE FROM " .. T .. " WHERE id > 100")))
      assert.are.equal(1, assert(db:exec("DELETE FROM " .. T .. " WHERE id = $1", 1)))
      assert.are.same({ "bx", "cx" }, names())
    end)

    it("query returns an array of rows keyed by column name", function()
      assert(db:exec("INSERT INTO " .. T .. " VALUES (1,'a'),(2,'b')"))
      local rows = assert(db:query("SELECT id, name AS label FROM " .. T .. " ORDER BY id"))
      assert.are.equal(2, #rows)
      assert.are.same({ id = 1, label = "a" }, rows[1])
      assert.are.same({ id = 2, label = "b" }, rows[2])
      assert.are.same({}, assert(db:query("SELECT id FROM " .. T .. " WHERE id < 0")))
    end)

    it("converts result types", function()
      local r = assert(db:query([[SELECT 7::int2 AS i2, -8::int4 AS i4, 9007199254740993::int8 AS i8,
        12.50::numeric AS num, 1.5::float8 AS f8, 0.25::float4 AS f4, true AS t, false AS f,
        '\x00ff41'::bytea AS b, NULL::text AS n, NULL::int AS ni, 'héllo'::text AS s,
        '2020-01-02'::date AS d, '{"a": 1}'::jsonb AS j, ''::text AS empty]]))[1]
      assert.are.equal(7, r.i2); assert.are.equal("integer", math.type(r.i2))
      assert.are.equal(-8, r.i4); assert.are.equal("integer", math.type(r.i4))
      assert.are.equal(9007199254740993, r.i8); assert.are.equal("integer", math.type(r.i8))
      assert.are.equal("12.50", r.num)
      assert.are.equal(1.5, r.f8); assert.are.equal("float", math.type(r.f8))
      assert.are.equal(0.25, r.f4); assert.are.equal("float", math.type(r.f4))
      assert.are.equal(true, r.t)
      assert.are.equal(false, r.f)
      assert.are.equal("\0\255A", r.b)
      assert.are.equal(pup.null, r.n)
      assert.are.equal(pup.null, r.ni)
      assert.are.equal("héllo", r.s)
      assert.are.equal("2020-01-02", r.d)
      assert.are.same({ a = 1 }, pup.json.decode(r.j))
      assert.are.equal("", r.empty)
    end)

    it("pup.null is a distinct sentinel, not nil or false", function()
      assert.is_not_nil(pup.null)
      assert.are_not.equal(false, pup.null)
      assert.are.equal(pup.null, pup.null)
    end)

    it("binds parameters of every type", function()
      local r = assert(db:query([[SELECT $1::text IS NULL AS a, $2::text IS NULL AS b,
        $3::bool AS c, $4::bigint AS d, $5::float8 AS e, $6::text AS f, $7::jsonb->>'k' AS g,
        jsonb_array_length($8::jsonb) AS h, $9::int AS i, $10::bool AS j]],
        nil, pup.null, true, 4611686018427387904, 2.75, "text", { k = "v" }, { 1, 2, 3 }, -5, false))[1]
      assert.are.equal(true, r.a)
      assert.are.equal(true, r.b)
      assert.are.equal(true, r.c)
      assert.are.equal(4611686018427387904, r.d)
      assert.are.equal("integer", math.type(r.d))
      assert.are.equal(2.75, r.e)
      assert.are.equal("text", r.f)
      assert.are.equal("v", r.g)
      assert.are.equal(3, r.h)
      assert.are.equal(-5, r.i)
      assert.are.equal(false, r.j)
    end)

    it("a nil parameter between others is NULL and keeps the positions", function()
      local r = assert(db:query("SELECT $1::int AS a, $2::int IS NULL AS b, $3::int AS c", 1, nil, 3))[1]
      assert.are.same({ a = 1, b = true, c = 3 }, r)
      assert(db:exec("INSERT INTO " .. T .. " VALUES ($1, $2)", 10, nil))
      assert.are.equal(pup.null, assert(db:query("SELECT name FROM " .. T .. " WHERE id = 10"))[1].name)
    end)

    it("binds strings with NUL bytes to bytea exactly", function()
      local bytes = "\0a\0\255\0"
      local r = assert(db:query("SELECT $1::bytea AS b, length($1::bytea) AS n", bytes))[1]
      assert.are.equal(5, r.n)
      assert.are.equal(h.hex(bytes), h.hex(r.b))
    end)

    it("float parameters keep their value", function()
      local r = assert(db:query("SELECT $1::float8 = 0.1 AS eq, $2::float8 AS big", 0.1, 1e300))[1]
      assert.is_true(r.eq)
      assert.are.equal(1e300, r.big)
    end)

    it("raises on wrong argument types", function()
      assert.has_error(function() db:exec({}) end)
      assert.has_error(function() db:query(nil) end)
      assert.has_error(function() db:query("SELECT $1::text", function() end) end)
      assert.has_error(function() db:query("SELECT $1::text", coroutine.create(function() end)) end)
      assert.has_error(function() db:transaction("not a function") end)
      assert.has_error(function() db.query({}, "SELECT 1") end)
      assert.has_error(function() pup.connect({}) end)
    end)

    it("a closed connection raises", function()
      local d = h.connect()
      d:close()
      assert.has_error(function() d:query("SELECT 1") end)
      assert.has_error(function() d:exec("SELECT 1") end)
      assert.has_error(function() d:begin() end)
    end)

    it("<close> closes a connection", function()
      local pid
      do
        local d <close> = h.connect()
        pid = assert(d:query("SELECT pg_backend_pid() AS p"))[1].p
      end
      local t0 = pup.now()
      local alive
      repeat
        alive = assert(db:query("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid))[1].n
        if alive > 0 then pup.sleep(0.05) end
      until alive == 0 or pup.now() - t0 > 5
      assert.are.equal(0, alive)
    end)
  end)

  describe("errors", function()
    it("a failed statement returns nil, err with code, message, sqlstate", function()
      local rows, err = db:query("SELEC 1")
      assert.is_nil(rows)
      assert.are.equal("database", err.code)
      assert.are.equal("42601", err.sqlstate)
      assert.are.equal("string", type(err.message))
      assert.is_truthy(err.message:find("syntax", 1, true), err.message)
      local s = tostring(err)
      assert.are.equal("string", type(s))
      assert.is_truthy(s:find("syntax", 1, true), s)
    end)

    it("exec reports constraint violations with their sqlstate", function()
      assert(db:exec("INSERT INTO " .. T .. " VALUES (1, 'a')"))
      local n, err = db:exec("INSERT INTO " .. T .. " VALUES (1, 'b')")
      assert.is_nil(n)
      assert.are.equal("database", err.code)
      assert.are.equal("23505", err.sqlstate)
    end)

    it("assert(nil, err) re-raises the error object intact", function()
      local rows, err = db:query("SELECT 1/0")
      assert.is_nil(rows)
      assert.are.equal("22012", err.sqlstate)
      local ok, raised = pcall(error, err)
      assert.is_false(ok)
      assert.is_true(rawequal(err, raised))
      -- busted replaces the global assert with luassert, so check Lua's own assert in a
      -- plain interpreter state: the host binary.
      local r = h.run_script([[
        local pup = require "pupsourcing"
        local db = assert(pup.connect())
        local rows, err = db:query("SELECT 1/0")
        local ok, raised = pcall(assert, rows, err)
        print(ok, rawequal(raised, err), raised.code, raised.sqlstate, tostring(raised))
        ok, raised = pcall(function() return assert(db:query("SELECT 1/0")) end)
        print(ok, raised.code, raised.sqlstate)
      ]])
      assert.are.equal(0, r.code, r.output)
      local lines = {}
      for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.is_truthy(lines[1] and lines[1]:find("^false\ttrue\tdatabase\t22012\t.*division by zero"),
                       r.output)
      assert.are.equal("false\tdatabase\t22012", lines[2], r.output)
    end)

    it("the connection stays usable after an error", function()
      assert.is_nil((db:query("SELECT * FROM no_such_table_here")))
      assert.are.equal(1, assert(db:query("SELECT 1 AS x"))[1].x)
    end)
  end)

  describe("transactions", function()
    it("db:transaction commits when fn returns and passes its results through", function()
      local a, b = db:transaction(function(tx)
        assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
        assert.are.equal(1, #assert(tx:query("SELECT * FROM " .. T)))
        return "r1", 2
      end)
      assert.are.equal("r1", a)
      assert.are.equal(2, b)
      assert.are.same({ "one" }, names())
    end)

    it("db:transaction rolls back and returns nil, err when fn raises", function()
      local res, err = db:transaction(function(tx)
        assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
        error("boom in fn")
      end)
      assert.is_nil(res)
      assert.is_not_nil(err)
      assert.is_truthy(tostring(err):find("boom in fn", 1, true), tostring(err))
      assert.are.same({}, names())
    end)

    it("db:transaction rolls back when fn raises an error object", function()
      local res, err = db:transaction(function(tx)
        assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
        -- error(), not assert(): busted's luassert does not re-raise objects intact
        local n, e = tx:exec("INSERT INTO " .. T .. " VALUES (1, 'dup')")
        if not n then error(e) end
      end)
      assert.is_nil(res)
      assert.are.equal("23505", err.sqlstate)
      assert.are.same({}, names())
    end)

    it("db:transaction returns fn's own error object when fn returns nil, err", function()
      local got
      local res, err = db:transaction(function(tx)
        assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
        local rows, e = tx:query("SELECT 1/0")
        got = e
        return rows, e
      end)
      assert.is_nil(res)
      assert.is_true(rawequal(got, err))
      assert.are.equal("22012", err.sqlstate)
      assert.are.same({}, names())
    end)

    it("db:transaction rolls back and returns nil, err when fn returns nil, err", function()
      local myerr = { code = "mine", message = "my failure" }
      local res, err = db:transaction(function(tx)
        assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
        return nil, myerr
      end)
      assert.is_nil(res)
      assert.are.equal(myerr, err)
      assert.are.same({}, names())
    end)

    it("begin / commit / rollback", function()
      local tx = assert(db:begin())
      assert.are.equal(1, assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')")))
      assert.is_true(assert(tx:commit()))
      tx = assert(db:begin())
      assert(tx:exec("INSERT INTO " .. T .. " VALUES (2, 'two')"))
      assert.is_true(assert(tx:rollback()))
      assert.are.same({ "one" }, names())
    end)

    it("an uncommitted tx rolls back when closed by <close>", function()
      do
        local tx <close> = assert(db:begin())
        assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
      end
      assert.are.same({}, names())
      do
        local tx <close> = assert(db:begin())
        assert(tx:exec("INSERT INTO " .. T .. " VALUES (2, 'two')"))
        assert(tx:commit())
      end
      assert.are.same({ "two" }, names())
    end)

    it("<close> rolls back when the block raises", function()
      local ok = pcall(function()
        local tx <close> = assert(db:begin())
        assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
        error("fail in block")
      end)
      assert.is_false(ok)
      assert.are.same({}, names())
      -- the connection is usable (not left inside a transaction)
      assert(db:exec("INSERT INTO " .. T .. " VALUES (3, 'three')"))
      assert.are.same({ "three" }, names())
    end)

    it("committing twice raises or returns an error; a finished tx cannot be used", function()
      local tx = assert(db:begin())
      assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
      assert(tx:commit())
      local ok, res, err = pcall(tx.commit, tx)
      if ok then
        assert.is_nil(res)
        assert.is_not_nil(err)
      end
      assert.has_error(function() tx:exec("INSERT INTO " .. T .. " VALUES (2, 'two')") end)
      assert.has_error(function() tx:query("SELECT 1") end)
      assert.are.same({ "one" }, names())
    end)

    it("a statement error inside a tx returns nil, err and the tx can roll back", function()
      local tx = assert(db:begin())
      assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
      local n, err = tx:exec("INSERT INTO " .. T .. " VALUES (1, 'dup')")
      assert.is_nil(n)
      assert.are.equal("23505", err.sqlstate)
      assert(tx:rollback())
      assert.are.same({}, names())
      assert.are.equal(1, assert(db:exec("INSERT INTO " .. T .. " VALUES (1, 'again')")))
    end)

    it("commit after a failed statement does not report success and writes nothing", function()
      local tx = assert(db:begin())
      assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
      assert.is_nil((tx:exec("INSERT INTO " .. T .. " VALUES (1, 'dup')")))
      local ok, res, err = pcall(tx.commit, tx)
      if ok then
        assert.is_nil(res)
        assert.is_not_nil(err)
      end
      assert.are.same({}, names())
      assert.are.equal(1, assert(db:exec("INSERT INTO " .. T .. " VALUES (1, 'again')")))
    end)

    it("two connections see each other's commits only", function()
      local other = h.connect()
      local tx = assert(db:begin())
      assert(tx:exec("INSERT INTO " .. T .. " VALUES (1, 'one')"))
      assert.are.equal(0, assert(other:query("SELECT count(*) AS n FROM " .. T))[1].n)
      assert(tx:commit())
      assert.are.equal(1, assert(other:query("SELECT count(*) AS n FROM " .. T))[1].n)
      other:close()
    end)
  end)
end)
