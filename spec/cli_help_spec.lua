-- Issue 16: the CLI on lua-argparse. Per-command --help (`run -h` once said "cannot open
-- -h"), `help CMD`, unknown flags refused with a suggestion (`status --jsn` once said "flag
-- --jsn needs a value"), short flags, and durations with units on the command line.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local NO_DB = "postgresql://nobody@127.0.0.1:1/nowhere" -- refused at once if anything connects

describe("pupsourcing CLI (argparse)", function()
  it("every command has its own --help, -h and `help CMD`, all the same text, exit 0", function()
    local seen = {}
    for _, cmd in ipairs { "run", "migrate", "migrate-gen", "status", "reset", "repartition" } do
      local long = H.run { cmd, "--help" }
      assert.equal(0, long.code, long.output)
      assert.equal("", long.stderr)
      assert.is_truthy(long.stdout:find("Usage: pupsourcing " .. cmd .. " [", 1, true), long.stdout)
      assert.is_nil(seen[long.stdout], cmd .. " prints another command's help")
      seen[long.stdout] = true
      assert.equal(long.stdout, H.run({ cmd, "-h" }).stdout)
      assert.equal(long.stdout, H.run({ "help", cmd }).stdout)
      -- --help wins over everything else on the line, and touches no database
      local r = H.run({ cmd, "--database-url", NO_DB, "--help", "x.lua" })
      assert.equal(0, r.code, r.output)
      assert.equal(long.stdout, r.stdout)
    end
    assert.is_truthy(H.run({ "run", "--help" }).stdout:find("--handler-timeout DURATION", 1, true))
    assert.is_falsy(H.run({ "status", "--help" }).stdout:find("--group", 1, true))
  end)

  it("`help` and `--help` print the overview; no arguments print it on stderr, exit 2", function()
    local r = H.run { "help" }
    assert.equal(0, r.code, r.output)
    assert.equal(H.run({ "--help" }).stdout, r.stdout)
    for _, cmd in ipairs { "run", "migrate-gen", "status", "repartition", "help" } do
      assert.is_truthy(r.stdout:find("\n   " .. cmd .. " ", 1, true), cmd .. " missing in:\n" .. r.stdout)
    end
    r = H.run {}
    assert.equal(2, r.code, r.output)
    assert.equal("", r.stdout)
    assert.is_truthy(r.stderr:find("Usage: pupsourcing", 1, true), r.stderr)
  end)

  it("--version and -V", function()
    for _, f in ipairs { "--version", "-V" } do
      local r = H.run { f }
      assert.equal(0, r.code, r.output)
      assert.equal("pupsourcing " .. pup.version .. "\n", r.stdout)
    end
  end)

  it("an unknown flag or command exits 2 with a suggestion, before touching the database", function()
    for _, case in ipairs {
      { { "status", "--jsn" }, "pupsourcing: status: unknown option '--jsn'; did you mean '--json'?"
        .. " (see pupsourcing status --help)\n" },
      { { "run", "--onse", "x.lua" }, "pupsourcing: run: unknown option '--onse'; did you mean '--once'?"
        .. " (see pupsourcing run --help)\n" },
      { { "sttus" }, "pupsourcing: unknown command 'sttus'; did you mean 'status'? (see pupsourcing --help)\n" },
      { { "help", "sttus" }, "pupsourcing: unknown command 'sttus'; did you mean 'status'? (see pupsourcing --help)\n" },
      { { "migrate", "--frobnicate" }, "pupsourcing: migrate: unknown option '--frobnicate' (see pupsourcing migrate --help)\n" },
      { { "reset" }, "pupsourcing: reset: missing argument 'FILE.lua' (see pupsourcing reset --help)\n" },
      { { "run", "--batch-size" }, "pupsourcing: run: option '--batch-size' requires an argument (see pupsourcing run --help)\n" },
      { { "status", "--json=1" }, "pupsourcing: status: option '--json' does not take arguments (see pupsourcing status --help)\n" },
    } do
      local all = {}
      for _, a in ipairs(case[1]) do all[#all + 1] = a end
      if case[1][1] ~= "help" and case[1][1] ~= "sttus" then
        all[#all + 1] = "--database-url=" .. NO_DB
      end
      local r = H.run(all)
      assert.equal(2, r.code, r.output)
      assert.equal("", r.stdout)
      assert.equal(case[2], r.stderr)
    end
  end)

  it("short flags: -d, -o, -f, -j, -w, -b", function()
    local dir = H.tmpdir()
    local r = H.run { "migrate-gen", "-o", dir, "-f", "x.sql" }
    assert.equal(0, r.code, r.output)
    assert.equal(pup.store():schema_sql(), H.read_file(dir .. "/x.sql"))
    H.rmdir(dir)
    r = H.run { "status", "-j", "-d", NO_DB }
    assert.equal(2, r.code, r.output)
    assert.is_truthy(r.stderr:find("cannot connect to", 1, true), r.stderr) -- -d was used
    -- -w and -b reach the same checks as --workers and --batch-size
    r = H.run { "run", "-d", NO_DB, "-w", "0", "x.lua" }
    assert.is_truthy(r.stderr:find('--workers must be an integer >= 1, got "0"', 1, true), r.stderr)
    r = H.run { "run", "-d", NO_DB, "-b0", "x.lua" }
    assert.is_truthy(r.stderr:find('--batch-size must be an integer >= 1, got "0"', 1, true), r.stderr)
  end)

  describe("durations", function()
    local T = H.tables("clidur")
    local store, db, dir

    before_each(function()
      store, db = H.fresh_store("clidur")
      dir = H.tmpdir()
      assert(store:append(db, pup.any(), { H.event() }))
      H.write_file(dir .. "/sleepy.lua", [[
        local pup = require "pupsourcing"
        return { name = "clidur_sleepy", handle = function() pup.sleep(30) end }
      ]])
    end)
    after_each(function()
      db:close()
      H.rmdir(dir)
    end)

    -- `run --once --handler-timeout V`: the limit the handler was stopped at, and stderr.
    local function limit_of(v)
      local r = H.run(H.with_tables(T, { "run", "--once", "--handler-timeout", v, dir .. "/sleepy.lua" }))
      assert.equal(1, r.code, r.output)
      return tonumber(r.stderr:match("handler exceeded its time limit of (%d+) ms")), r.stderr
    end

    it("take a unit: 300ms, 0.3s and 1.5s are what they say", function()
      local ms, err = limit_of("300ms")
      assert.equal(300, ms, err)
      assert.is_falsy(err:find("warning", 1, true), err)
      assert.equal(300, (limit_of("0.3s")))
      assert.equal(1500, (limit_of("1.5s")))
    end)

    it("a bare number is milliseconds, as before units, with a warning naming the spelling to use", function()
      local ms, err = limit_of("300")
      assert.equal(300, ms, err)
      assert.equal("pupsourcing: warning: --handler-timeout 300 has no unit: read as 300ms"
        .. " (deprecated: write 300ms or 0.3s)", err:match("^[^\n]*"))
    end)

    it("bad ones are refused up front, naming the flag, the range and the units", function()
      for _, v in ipairs { "0", "0ms", "5x", "1.5ms", "2 s", "", "-1s", "25h", "1e3" } do
        local r = H.run { "run", "--database-url", NO_DB, "--handler-timeout=" .. v, dir .. "/sleepy.lua" }
        assert.equal(2, r.code, v .. ": " .. r.output)
        assert.equal(('pupsourcing: --handler-timeout must be a duration from 1ms to 24h in whole milliseconds'
          .. ' (like 500ms, 2s, 1m), got %q\n'):format(v), r.stderr)
      end
      local r = H.run { "run", "--database-url", NO_DB, "--group", "--lease-ttl", "50ms", dir .. "/sleepy.lua" }
      assert.equal(2, r.code, r.output)
      assert.is_truthy(r.stderr:find("--lease-ttl must be a duration from 100ms to 1h", 1, true), r.stderr)
      assert.equal(0, assert(db:query(('SELECT count(*) AS n FROM "%s"'):format(T.checkpoints_table)))[1].n)
    end)
  end)
end)
