-- Issue 2: the error codes not_migrated, connection and database, and what they say.
local h = require "spec.helpers"
local pup = require "pupsourcing"

describe("errors", function()
  local db

  setup(function()
    db = h.connect()
    h.drop_tables(db, "errors_nm")
  end)

  teardown(function()
    if db then db:close() end
  end)

  local function check_error_object(err, code)
    assert.is_not_nil(err, "expected an error object")
    assert.are.equal(code, err.code, tostring(err))
    assert.are.equal("string", type(err.message))
    assert.is_true(#err.message > 0)
    local s = tostring(err)
    assert.are.equal("string", type(s))
    assert.is_truthy(s:find(err.message, 1, true), "tostring(err) should show the message: " .. s)
  end

  describe("not_migrated", function()
    local store

    setup(function()
      store = pup.store(h.tables("errors_nm"))
    end)

    local function check(res, err)
      assert.is_nil(res)
      check_error_object(err, "not_migrated")
      assert.is_truthy(err.message:find("pupsourcing migrate", 1, true),
                       "message should say to run `pupsourcing migrate`: " .. err.message)
    end

    it("append on missing tables", function()
      check(store:append(db, pup.any(), { h.event() }))
    end)

    it("read_events on missing tables", function()
      check(store:read_events(db, 0))
    end)

    it("read_aggregate_stream on missing tables", function()
      check(store:read_aggregate_stream(db, "User", "x"))
    end)

    it("the connection stays usable afterwards", function()
      check(store:read_events(db, 0))
      assert.are.equal(1, assert(db:query("SELECT 1 AS x"))[1].x)
    end)

    it("once migrated, the same store works", function()
      local s, d = h.fresh_store("errors_nm2")
      assert(s:append(d, pup.any(), { h.event() }))
      assert.are.equal(1, #assert(s:read_events(d, 0)))
      d:close()
    end)
  end)

  describe("connection", function()
    local secret = "s3cretPassw0rd"

    it("a refused URL connection returns code connection without the password", function()
      local d, err = pup.connect("postgresql://spec_user:" .. secret .. "@127.0.0.1:1/nodb?connect_timeout=5")
      assert.is_nil(d)
      check_error_object(err, "connection")
      assert.is_falsy(tostring(err):find(secret, 1, true), tostring(err))
      assert.is_falsy(err.message:find(secret, 1, true), err.message)
    end)

    it("a keyword/value conninfo never shows the password either", function()
      local d, err = pup.connect("host=127.0.0.1 port=1 user=spec_user password=" .. secret ..
                                 " dbname=nodb connect_timeout=5")
      assert.is_nil(d)
      check_error_object(err, "connection")
      assert.is_falsy(tostring(err):find(secret, 1, true), tostring(err))
    end)

    it("a malformed URL returns code connection without the password", function()
      local d, err = pup.connect("postgresql://spec_user:" .. secret .. "@127.0.0.1:notaport/x")
      assert.is_nil(d)
      check_error_object(err, "connection")
      assert.is_falsy(tostring(err):find(secret, 1, true), tostring(err))
    end)

    it("a server-side rejection (unknown database) is a connection error", function()
      local url = h.url():gsub("/[^/?]*$", "/pup_no_such_db_" .. math.random(1, 1e6))
      local d, err = pup.connect(url)
      assert.is_nil(d)
      check_error_object(err, "connection")
      assert.is_truthy(err.message:find("does not exist", 1, true), err.message)
    end)

    it("the host binary never prints the password", function()
      local r = h.run({ "migrate", "--database-url",
                        "postgresql://spec_user:" .. secret .. "@127.0.0.1:1/nodb?connect_timeout=5" })
      assert.are_not.equal(0, r.code)
      assert.is_true(#r.output > 0, "should say what failed")
      assert.is_falsy(r.output:find(secret, 1, true), r.output)
      r = h.run({ "migrate" }, { env = { DATABASE_URL = "postgresql://spec_user:" .. secret ..
                                                     "@127.0.0.1:1/nodb?connect_timeout=5" } })
      assert.are_not.equal(0, r.code)
      assert.is_falsy(r.output:find(secret, 1, true), r.output)
    end)
  end)

  describe("database", function()
    it("carries the SQLSTATE", function()
      local rows, err = db:query("SELECT * FROM pg_class WHERE nonsense_column = 1")
      assert.is_nil(rows)
      check_error_object(err, "database")
      assert.are.equal("42703", err.sqlstate)
    end)

    it("an undefined table in plain SQL is reported (sqlstate 42P01)", function()
      local rows, err = db:query("SELECT * FROM t_errors_no_such_table")
      assert.is_nil(rows)
      assert.is_not_nil(err)
      assert.are.equal("42P01", err.sqlstate)
    end)

    it("an error raised by a PL/pgSQL function keeps its SQLSTATE and text", function()
      local rows, err = db:query([[DO $$ BEGIN RAISE EXCEPTION 'custom failure'
                                   USING ERRCODE = 'P0042'; END $$]])
      assert.is_nil(rows)
      check_error_object(err, "database")
      assert.are.equal("P0042", err.sqlstate)
      assert.is_truthy(err.message:find("custom failure", 1, true), err.message)
    end)
  end)

  describe("invalid store names", function()
    it("raise, naming the option", function()
      local ok, msg = pcall(pup.store, { events_table = 'x"; DROP TABLE users; --' })
      assert.is_false(ok)
      assert.is_truthy(tostring(msg):find("events_table", 1, true), tostring(msg))
      ok, msg = pcall(pup.store, { aggregate_heads_table = "a.b.c" })
      assert.is_false(ok)
      assert.is_truthy(tostring(msg):find("aggregate_heads_table", 1, true), tostring(msg))
      ok = pcall(pup.store, { checkpoints_table = "" })
      assert.is_false(ok)
      ok = pcall(pup.store, "events")
      assert.is_false(ok)
    end)

    it("schema-qualified names work", function()
      assert(db:exec("DROP SCHEMA IF EXISTS pup_spec_errors CASCADE"))
      assert(db:exec("CREATE SCHEMA pup_spec_errors"))
      local s = pup.store { events_table = "pup_spec_errors.ev", aggregate_heads_table = "pup_spec_errors.heads",
                            checkpoints_table = "pup_spec_errors.cp" }
      assert(s:migrate(db))
      assert(s:append(db, pup.no_stream(), { h.event() }))
      assert.are.equal(1, assert(db:query("SELECT count(*) AS n FROM pup_spec_errors.ev"))[1].n)
      assert(db:exec("DROP SCHEMA pup_spec_errors CASCADE"))
    end)
  end)

  -- Out of memory is one code, returned like any expected failure, with nothing written:
  -- three events sharing one 150 MB payload fit Lua (one string) but not the C side's
  -- copy of all three (450 MB) under a 440 MB address-space limit.
  it("out of memory in append is nil, err with code out_of_memory, nothing written", function()
    if os.getenv("ASAN_OPTIONS") then
      pending("not under AddressSanitizer: it reserves more address space than any ulimit -v allows")
      return
    end
    local _, odb, T = h.fresh_store("oom")
    local id = pup.uuid()
    local dir = h.tmpdir()
    h.write_file(dir .. "/oom.lua", ([[
local pup = require "pupsourcing"
local db = assert(pup.connect())
local store = pup.store { events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q }
local big = string.rep("x", 150 * 1024 * 1024)
local ok, err = store:append(db, pup.any(), {
  { aggregate_type = "O", aggregate_id = %q, event_type = "Big", payload = big },
  { aggregate_type = "O", aggregate_id = %q, event_type = "Big", payload = big },
  { aggregate_type = "O", aggregate_id = %q, event_type = "Big", payload = big } })
print(tostring(ok), err and err.code, err and err.message)
]]):format(T.events_table, T.aggregate_heads_table, T.checkpoints_table, id, id, id))
    local r = h.sh("sh -c " .. h.shquote(("ulimit -v 450000 && exec %s %s"):format(h.shquote(h.bin),
      h.shquote(dir .. "/oom.lua"))))
    h.rmdir(dir)
    assert.are.equal(0, r.code, r.output)
    assert.are.equal("nil\tout_of_memory\tout of memory\n", r.stdout)
    assert.are.equal(0, assert(odb:query(("SELECT count(*) AS n FROM %s WHERE aggregate_id = $1")
      :format(T.events_table), id))[1].n)
    odb:close()
  end)
end)
