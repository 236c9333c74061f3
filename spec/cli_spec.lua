-- Issue 2: the host binary -- scripts, migrate, migrate-gen, --help, --version.
local h = require "spec.helpers"
local pup = require "pupsourcing"

local function ls(dir)
  local p = assert(io.popen("ls -A " .. h.shquote(dir)))
  local out = {}
  for line in p:lines() do out[#out + 1] = line end
  p:close()
  return out
end

describe("pupsourcing (host binary)", function()
  local tables = h.tables("cli")
  local function with_tables(args) return h.with_tables(tables, args) end

  it("--help prints usage naming the commands and exits 0", function()
    local r = h.run({ "--help" })
    assert.are.equal(0, r.code, r.output)
    assert.is_truthy(r.output:lower():find("usage", 1, true), r.output)
    assert.is_truthy(r.output:find("migrate-gen", 1, true), r.output)
    assert.is_truthy(r.output:find("migrate", 1, true), r.output)
    assert.is_truthy(r.output:find("--database-url", 1, true), r.output)
  end)

  it("--version prints the version and exits 0", function()
    local r = h.run({ "--version" })
    assert.are.equal(0, r.code, r.output)
    assert.is_truthy(r.output:match("%d+%.%d+%.%d+"), r.output)
  end)

  it("an unknown command fails with a message", function()
    local r = h.run({ "no-such-command" })
    assert.are.equal(2, r.code, r.output)
    assert.is_true(#r.stderr > 0)
  end)

  describe("migrate-gen", function()
    local dir
    before_each(function() dir = h.tmpdir() end)
    after_each(function() h.rmdir(dir) end)

    it("writes migrations/init.sql byte for byte", function()
      local r = h.run({ "migrate-gen", "--output", dir })
      assert.are.equal(0, r.code, r.output)
      local files = ls(dir)
      assert.are.equal(1, #files, "one file expected, got: " .. table.concat(files, ", "))
      assert.is_truthy(files[1]:match("%.sql$"), files[1])
      local expected = h.read_file(h.source_dir .. "/migrations/init.sql")
      local got = h.read_file(dir .. "/" .. files[1])
      assert.are.equal(expected, got)
    end)

    it("store:schema_sql() of the default store equals migrations/init.sql", function()
      local expected = h.read_file(h.source_dir .. "/migrations/init.sql")
      assert.are.equal(expected, pup.store():schema_sql())
    end)

    it("--filename names the file; table options change the names", function()
      local r = h.run(with_tables { "migrate-gen", "--output", dir, "--filename", "custom.sql" })
      assert.are.equal(0, r.code, r.output)
      assert.are.same({ "custom.sql" }, ls(dir))
      local sql = h.read_file(dir .. "/custom.sql")
      assert.is_truthy(sql:find(tables.events_table, 1, true))
      assert.is_truthy(sql:find(tables.aggregate_heads_table, 1, true))
      assert.is_truthy(sql:find(tables.checkpoints_table, 1, true))
      assert.is_falsy(sql:find('"events"', 1, true))
      assert.are.equal(pup.store(tables):schema_sql(), sql)
    end)

    it("does not need a database", function()
      local r = h.run({ "migrate-gen", "--output", dir },
                      { env = { DATABASE_URL = "postgresql://x:y@127.0.0.1:1/none" } })
      assert.are.equal(0, r.code, r.output)
    end)

    it("rejects an invalid table name, naming the flag", function()
      local r = h.run({ "migrate-gen", "--output", dir, "--events-table", "bad name" })
      assert.are.equal(2, r.code, r.output)
      assert.is_truthy(r.output:find("events", 1, true), r.output)
      assert.are.same({}, ls(dir))
    end)
  end)

  describe("migrate", function()
    local db
    setup(function()
      db = h.connect()
      h.drop_tables(db, "cli")
    end)
    teardown(function()
      if db then db:close() end
    end)

    local function exists(name)
      return assert(db:query("SELECT to_regclass($1) IS NOT NULL AS e", name))[1].e
    end

    it("creates the tables, and running it twice is fine", function()
      local r = h.run(with_tables { "migrate" })
      assert.are.equal(0, r.code, r.output)
      assert.is_true(exists(tables.events_table))
      assert.is_true(exists(tables.aggregate_heads_table))
      assert.is_true(exists(tables.checkpoints_table))
      local store = pup.store(tables)
      assert(store:append(db, pup.no_stream(), { h.event() }))
      r = h.run(with_tables { "migrate" })
      assert.are.equal(0, r.code, r.output)
      assert.are.equal(1, #assert(store:read_events(db, 0)), "a second migrate keeps the data")
    end)

    it("takes --database-url instead of DATABASE_URL", function()
      local r = h.run(with_tables { "migrate", "--database-url", h.url() },
                      { env = { DATABASE_URL = false } })
      assert.are.equal(0, r.code, r.output)
    end)

    it("accepts --flag=value spelling", function()
      local r = h.run({ "migrate", "--database-url=" .. h.url(),
                        "--events-table=" .. tables.events_table,
                        "--aggregate-heads-table=" .. tables.aggregate_heads_table,
                        "--checkpoints-table=" .. tables.checkpoints_table })
      assert.are.equal(0, r.code, r.output)
    end)

    it("the checked-in migrations/init.sql applies cleanly and idempotently with psql", function()
      if not os.execute("command -v psql >/dev/null 2>&1") then
        pending("psql is not installed")
        return
      end
      assert(db:exec("DROP SCHEMA IF EXISTS pup_spec_cli CASCADE"))
      assert(db:exec("CREATE SCHEMA pup_spec_cli"))
      local cmd = "psql -X -q -v ON_ERROR_STOP=1 -d " .. h.shquote(h.url()) .. " -f " ..
                  h.shquote(h.source_dir .. "/migrations/init.sql")
      local env = { PGOPTIONS = "-c search_path=pup_spec_cli" }
      local r = h.sh(cmd, { env = env })
      assert.are.equal(0, r.code, r.output)
      r = h.sh(cmd, { env = env })
      assert.are.equal(0, r.code, r.output)
      local store = pup.store { events_table = "pup_spec_cli.events",
                                aggregate_heads_table = "pup_spec_cli.aggregate_heads",
                                checkpoints_table = "pup_spec_cli.projection_checkpoints" }
      local res = assert(store:append(db, pup.no_stream(), { h.event() }))
      assert.are.equal(1, res.to_version)
      assert(db:exec("DROP SCHEMA pup_spec_cli CASCADE"))
    end)
  end)

  describe("repartition", function()
    -- No worker runs, so nothing settles a change: the refusal is deterministic.
    local rt = h.tables("cli_rep")
    local groups = rt.checkpoints_table .. "_groups"
    local file = h.source_dir .. "/spec/fixtures/run_counter.lua"
    local db
    setup(function()
      db = h.connect()
      h.drop_tables(db, "cli_rep")
      assert(db:exec('DROP TABLE IF EXISTS "' .. groups .. '", "' .. rt.checkpoints_table .. '_workers"'))
      local r = h.run(h.with_tables(rt, { "migrate" }))
      assert.are.equal(0, r.code, r.output)
    end)
    teardown(function()
      if db then db:close() end
    end)

    local function group_row()
      local rows = assert(db:query(('SELECT total_partitions AS t, previous_total AS p FROM "%s" WHERE projection_name = $1')
        :format(groups), "run_counter"))
      return rows[1] and { t = rows[1].t, p = rows[1].p ~= pup.null and rows[1].p or nil }
    end

    it("refuses a second change while the first one settles, and changes nothing", function()
      local r = h.run(h.with_tables(rt, { "repartition", file, "4" }))
      assert.are.equal(0, r.code, r.output)
      assert.are.equal("repartition run_counter: new group of 4 partitions; running --group workers switch at their next heartbeat\n", r.stdout)
      assert.are.same({ t = 4 }, group_row())
      r = h.run(h.with_tables(rt, { "repartition", file, "7" }))
      assert.are.equal(0, r.code, r.output)
      assert.are.equal("repartition run_counter: 4 -> 7 partitions; running --group workers switch at their next heartbeat\n", r.stdout)
      assert.are.same({ t = 7, p = 4 }, group_row())
      -- settling 4 -> 7 (no worker has switched): refused, whatever the new count
      for _, n in ipairs { "5", "4", "7" } do
        r = h.run(h.with_tables(rt, { "repartition", file, n }))
        assert.are.equal(2, r.code, r.output)
        assert.are.equal("", r.stdout)
        assert.are.equal("pupsourcing: invalid_argument: projection run_counter is still settling a repartition from 4 to 7"
          .. " partitions; try again when `pupsourcing status` shows no previous count\n", r.stderr)
        assert.are.same({ t = 7, p = 4 }, group_row())
      end
    end)
  end)

  describe("scripts", function()
    it("runs a script that requires pupsourcing and talks to the database", function()
      local r = h.run_script([[
        local pup = require "pupsourcing"
        local db = assert(pup.connect())
        local rows = assert(db:query("SELECT 40 + 2 AS answer"))
        print("answer", rows[1].answer)
      ]])
      assert.are.equal(0, r.code, r.output)
      assert.is_truthy(r.stdout:find("answer\t42", 1, true), r.output)
    end)

    it("sets arg and ... as lua5.4 does", function()
      local r = h.run_script([[
        print("0=" .. arg[0])
        print("n=" .. #arg)
        print("1=" .. arg[1])
        print("2=" .. arg[2])
        print("neg=" .. tostring(arg[-1] ~= nil))
        print("dots=" .. select("#", ...) .. ":" .. table.concat({...}, "|"))
      ]], { "one", "two words" })
      assert.are.equal(0, r.code, r.output)
      assert.is_truthy(r.stdout:find("0=" .. r.script, 1, true), r.output)
      assert.is_truthy(r.stdout:find("n=2\n", 1, true), r.output)
      assert.is_truthy(r.stdout:find("1=one\n", 1, true), r.output)
      assert.is_truthy(r.stdout:find("2=two words\n", 1, true), r.output)
      assert.is_truthy(r.stdout:find("neg=true\n", 1, true), r.output)
      assert.is_truthy(r.stdout:find("dots=2:one|two words\n", 1, true), r.output)
    end)

    it("a script error exits 1 with the message and a traceback", function()
      local r = h.run_script([[
        local function inner() error("kaboom from script") end
        local function outer() inner() end
        outer()
      ]])
      assert.are.equal(1, r.code, r.output)
      assert.is_truthy(r.stderr:find("kaboom from script", 1, true), r.output)
      assert.is_truthy(r.stderr:find("traceback", 1, true), r.output)
      assert.is_truthy(r.stderr:find("inner", 1, true), r.output)
    end)

    it("an error object raised by assert(nil, err) is printed via __tostring", function()
      local r = h.run_script([[
        local pup = require "pupsourcing"
        local db = assert(pup.connect())
        assert(db:query("SELECT 1/0"))
      ]])
      assert.are.equal(1, r.code, r.output)
      assert.is_truthy(r.stderr:find("division by zero", 1, true), r.output)
    end)

    it("a syntax error exits 1 naming the file", function()
      local r = h.run_script("local x = = 1\n")
      assert.are.equal(1, r.code, r.output)
      assert.is_truthy(r.stderr:find("script.lua", 1, true), r.output)
    end)

    it("a missing script exits 1", function()
      local r = h.run({ "/tmp/pupspec-no-such-dir/none.lua" })
      assert.are.equal(1, r.code, r.output)
      assert.is_true(#r.stderr > 0)
    end)

    it("os.exit(code) is the exit status", function()
      local r = h.run_script("io.stdout:write('bye\\n') os.exit(3)")
      assert.are.equal(3, r.code)
      assert.are.equal("bye\n", r.stdout)
    end)
  end)
end)
