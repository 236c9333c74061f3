-- Issue 10, limits: projection names and scopes are validated (length, UTF-8, control
-- characters), `status` copes with long names, numbers on the command line and in the
-- Lua option tables are checked against their ranges (nothing truncated to a C int),
-- `repartition` above the partition limit is refused up front, `status --json` prints
-- [] when empty.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local RM = "t_lim_rm"

describe("limits", function()
  local store, db, T, dir

  local function one(sql, ...) return assert(db:query(sql, ...))[1] end
  local function checkpoint_rows()
    return one(('SELECT count(*) AS n FROM "%s"'):format(T.checkpoints_table)).n
  end
  local function rm_rows() return one("SELECT count(*) AS n FROM " .. RM).n end

  -- A projection file named `file` in dir whose name is the Lua expression `name_expr`.
  local function projection_file(file, name_expr, extra)
    local path = dir .. "/" .. file
    H.write_file(path, ([[
      return { name = %s, %s handle = function(tx, e)
        assert(tx:exec("INSERT INTO %s (pos) VALUES ($1)", e.global_position))
      end }
    ]]):format(name_expr, extra or "", RM))
    return path
  end

  local function cli(args, opts) return H.run(H.with_tables(T, args), opts) end

  before_each(function()
    T = H.tables("lim")
    store, db = H.fresh_store("lim")
    assert(db:exec(('DELETE FROM "%s_groups"'):format(T.checkpoints_table))) -- migrate keeps it
    dir = H.tmpdir()
    assert(db:exec("DROP TABLE IF EXISTS " .. RM))
    assert(db:exec("CREATE TABLE " .. RM .. " (pos bigint NOT NULL)"))
    assert(store:append(db, pup.any(), H.events(3, { aggregate_id = H.uid("a") })))
  end)

  after_each(function()
    db:close()
    H.rmdir(dir)
  end)

  describe("projection names and scopes", function()
    local function rejects(name_expr, fragment, extra)
      local path = projection_file("p.lua", name_expr, extra)
      local r = cli { "run", "--once", path }
      assert.equal(2, r.code, r.output)
      assert.is_truthy(r.stderr:find(fragment, 1, true), "expected " .. fragment .. " in:\n" .. r.stderr)
      assert.equal(0, checkpoint_rows()) -- nothing ran
      assert.equal(0, rm_rows())
      -- pup.processor checks the same
      local ok, err = pcall(pup.processor, db, dofile(path), { store = store })
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find(fragment, 1, true), tostring(err))
    end

    it("a name over 200 bytes", function()
      rejects(("%q"):format(("n"):rep(201)), "`name` must be at most 200 bytes, got 201")
    end)

    it("a name with a NUL (two such names used to share a checkpoint)", function()
      rejects([["lim\0a"]], "`name` must not contain control characters (byte 0x00 at 4)")
    end)

    it("a name with a newline, or not UTF-8", function()
      rejects([["lim\nx"]], "`name` must not contain control characters (byte 0x0a at 4)")
      rejects([["lim\xff"]], "`name` must be valid UTF-8")
    end)

    it("scope entries that are not UTF-8, empty or with a NUL (was: out of memory)", function()
      rejects([["lim_scope"]], "`event_types`[2] must be valid UTF-8", [[event_types = { "E1", "\xfe\xff" },]])
      rejects([["lim_scope"]], "`aggregate_types`[1] must not be empty", [[aggregate_types = { "" },]])
      rejects([["lim_scope"]], "`event_types`[1] must not contain a NUL byte", [[event_types = { "E\0x" },]])
    end)

    it("a name of 200 bytes (UTF-8) runs, and `status` shows long names (crashed at 100+)", function()
      local long = ("é"):rep(75) .. ("x"):rep(50) -- 200 bytes
      local path = projection_file("long.lua", ("%q"):format(long))
      local r = cli { "run", "--once", path }
      assert.equal(0, r.code, r.output)
      assert.equal(3, rm_rows())
      r = cli { "status" }
      assert.equal(0, r.code, r.output)
      assert.matches(long .. " +0/1 +3 +3 +0 ", r.stdout)
      local header = r.stdout:match("[^\n]*projection[^\n]*")
      assert.equal(#long + #" partition", #header:match("^(projection +partition)"), r.stdout)
      r = cli { "status", "--json" }
      assert.equal(0, r.code, r.output)
      assert.equal(long, pup.json.decode(r.stdout)[1].projection)
    end)
  end)

  describe("numbers on the command line", function()
    local function bad_run(args, fragment, env)
      local all = { "run", "--once" }
      for _, a in ipairs(args) do all[#all + 1] = a end
      all[#all + 1] = projection_file("good.lua", '"lim_good"')
      local r = cli(all, { env = env })
      assert.equal(2, r.code, r.output)
      assert.is_truthy(r.stderr:find(fragment, 1, true), "expected " .. fragment .. " in:\n" .. r.stderr)
      assert.equal(0, checkpoint_rows()) -- nothing ran
      assert.equal(0, rm_rows())
    end

    it("--batch-size 4294967297 (ran with batch size 1)", function()
      bad_run({ "--batch-size", "4294967297" }, '--batch-size must be an integer <= 100000, got "4294967297" (range 1..100000)')
    end)

    it("--handler-timeout 4294967796 (ran with 500 ms)", function()
      bad_run({ "--handler-timeout", "4294967796" },
        '--handler-timeout must be a duration from 1ms to 24h in whole milliseconds (like 500ms, 2s, 1m), got "4294967796"')
      bad_run({ "--handler-timeout", "4294967796ms" }, '--handler-timeout must be a duration from 1ms to 24h')
      bad_run({ "--handler-timeout", "25h" }, '--handler-timeout must be a duration from 1ms to 24h')
    end)

    it("every integer flag and variable has a range", function()
      bad_run({ "--workers", "4097" }, '--workers must be an integer <= 4096, got "4097" (range 1..4096)')
      bad_run({ "--partition-key", "4294967296", "--total-partitions", "2" }, "--partition-key must be an integer <= 4095")
      bad_run({ "--partition-key", "0", "--total-partitions", "4294967297" }, "--total-partitions must be an integer <= 4096")
      bad_run({}, "TOTAL_PARTITIONS must be an integer <= 4096", { PARTITION_KEY = "0", TOTAL_PARTITIONS = "4294967297" })
      bad_run({ "--poll-interval", "3600001" }, '--poll-interval must be a duration from 1ms to 1h')
      bad_run({ "--poll-interval", "61m" }, '--poll-interval must be a duration from 1ms to 1h')
      bad_run({ "--poll-interval", "0" }, '--poll-interval must be a duration from 1ms to 1h in whole milliseconds (like 500ms, 2s, 1m), got "0"')
      bad_run({ "--poll-interval", "0.5ms" }, '--poll-interval must be a duration from 1ms to 1h')
      bad_run({ "--poll-interval", "2 s" }, '--poll-interval must be a duration from 1ms to 1h')
      bad_run({ "--poll-interval", "2d" }, '--poll-interval must be a duration from 1ms to 1h')
      bad_run({ "--handler-timeout", "0s" }, "--handler-timeout must be a duration from 1ms to 24h")
    end)

    it("--partitions and --lease-ttl of a group", function()
      local path = projection_file("g.lua", '"lim_group"')
      for _, case in ipairs {
        { { "--partitions", "4097" }, "--partitions must be an integer <= 4096" },
        { { "--lease-ttl", "99ms" }, '--lease-ttl must be a duration from 100ms to 1h in whole milliseconds (like 500ms, 2s, 1m), got "99ms"' },
        { { "--lease-ttl", "4294967396" }, "--lease-ttl must be a duration from 100ms to 1h" },
      } do
        local args = { "run", "--group" }
        for _, a in ipairs(case[1]) do args[#args + 1] = a end
        args[#args + 1] = path
        local r = cli(args)
        assert.equal(2, r.code, r.output)
        assert.is_truthy(r.stderr:find(case[2], 1, true), "expected " .. case[2] .. " in:\n" .. r.stderr)
      end
      assert.equal(0, checkpoint_rows())
    end)

    it("repartition above 4096 partitions is refused up front, nothing changed", function()
      local path = projection_file("g.lua", '"lim_repart"')
      local groups = T.checkpoints_table .. "_groups"
      local r = cli { "repartition", path, "4" }
      assert.equal(0, r.code, r.output)
      for _, n in ipairs { "5000", "0", "4294967300", "x" } do
        r = cli { "repartition", path, n }
        assert.equal(2, r.code, r.output)
        assert.matches("repartition takes a projection file and a partition count from 1 to 4096, got \"" .. n .. "\"",
          r.stderr)
      end
      local g = one(('SELECT total_partitions, previous_total FROM "%s" WHERE projection_name = $1'):format(groups),
        "lim_repart")
      assert.same({ total_partitions = 4, previous_total = pup.null }, g)
    end)

    it("status --json prints [] when there is no checkpoint", function()
      local r = cli { "status", "--json" }
      assert.equal(0, r.code, r.output)
      assert.equal("[]\n", r.stdout)
    end)
  end)

  describe("numbers in the Lua option tables", function()
    local proj = { name = "lim_opts", handle = function() end }

    local function raises(fn, fragment)
      local ok, err = pcall(fn)
      assert.is_false(ok, "expected an error with " .. fragment)
      assert.is_truthy(tostring(err):find(fragment, 1, true), "expected " .. fragment .. " in: " .. tostring(err))
    end

    it("pup.processor", function()
      local function p(opts)
        return function() pup.processor(db, proj, opts) end
      end
      raises(p { batch_size = 4294967297 }, "option batch_size must be an integer from 1 to 100000, got 4294967297")
      raises(p { handler_timeout = 86401 }, "option handler_timeout must be a number of seconds above 0 and at most 86400")
      raises(p { handler_timeout_ms = 500 }, "pup.processor: unknown option handler_timeout_ms")
      raises(p { total_partitions = 4294967298 }, "option total_partitions must be an integer from 1 to 4096")
      raises(p { partition_key = -4294967296 }, "option partition_key must be an integer from 0 to 4095")
      raises(p { lease_ttl = 1e300 }, "option lease_ttl must be a number of seconds above 0 and at most 3600")
      raises(p { poll_interval = 0 }, "option poll_interval must be a number of seconds above 0 and at most 3600")
      raises(p { batchsize = 10 }, "pup.processor: unknown option batchsize")
      raises(function()
        pup.processor(db, { name = "x", handle = function() end, batch_size = 4294967297 })
      end, "`batch_size` must be at most 100000")
      -- in range still works
      assert(pup.processor(db, proj, { store = store, batch_size = 100000, handler_timeout = 86400 })):close()
    end)

    it("pup.runner", function()
      local files = { projection_file("r.lua", '"lim_runner"') }
      local function r(opts)
        opts.files = files
        return function() pup.runner(opts) end
      end
      raises(r { batch_size = 4294967297 }, "runner option batch_size must be an integer from 1 to 100000")
      raises(r { workers = 4294967298 }, "runner option workers must be an integer from 1 to 4096")
      raises(r { handler_timeout = 4294967.796 }, "option handler_timeout must be a number of seconds above 0 and at most 86400")
      raises(r { handler_timeout_ms = 500 }, "pup.runner: unknown option handler_timeout_ms")
      raises(r { total_partitions = 4294967297, partition_key = 0 }, "runner option total_partitions must be an integer from 1 to 4096")
      raises(r { lease_ttl = 1e300, group = true }, "option lease_ttl must be a number of seconds above 0 and at most 3600")
      raises(r { log_format = "xml" }, 'runner option log_format must be "text" or "json"')
      raises(r { batchsize = 10 }, "pup.runner: unknown option batchsize")
    end)
  end)
end)
