-- Issue 3, host binary: `pupsourcing run`, `status`, `reset`, signals, crashes, bad input.
-- Projections are the fixtures in spec/fixtures/ (read-model tables t_run_*).
local pup = require "pupsourcing"
local H = require "spec.helpers"

local FIX = H.source_dir .. "/spec/fixtures/"
local COUNTER, TYPES, FAIL = FIX .. "run_counter.lua", FIX .. "run_types.lua", FIX .. "run_fail.lua"
local BAD = FIX .. "bad/"
local NO_DB = "postgresql://nobody@127.0.0.1:1/nowhere" -- refused at once if anything connects

describe("pupsourcing run", function()
  local T = H.tables("run")
  local store, db

  local function with_tables(args) return H.with_tables(T, args) end

  local function pupsourcing(args, opts) return H.run(with_tables(args), opts) end

  local function q(sql, ...) return assert(db:query(sql, ...)) end
  local function one(sql, ...) return q(sql, ...)[1] end

  local function checkpoint(name, key, total)
    local r = one(('SELECT last_global_position AS p FROM "%s" WHERE projection_name = $1'
      .. ' AND partition_key = $2 AND total_partitions = $3'):format(T.checkpoints_table), name, key or 0, total or 1)
    return r and r.p or 0
  end

  local function table_exists(name)
    return one("SELECT to_regclass($1)::text AS t", name).t ~= pup.null
  end

  -- naggs aggregates "agg-i" with per events each; event types cycle Created, Renamed, Other.
  local TYPES_CYCLE = { "Created", "Renamed", "Other" }
  local function populate(naggs, per, prefix)
    for a = 1, naggs do
      local evs = {}
      for i = 1, per do
        evs[i] = H.event { aggregate_id = (prefix or "agg-") .. a, event_type = TYPES_CYCLE[(i - 1) % 3 + 1], payload = { i = i } }
      end
      assert(store:append(db, pup.any(), evs))
    end
    return assert(store:head(db))
  end

  -- The counter's read model is exact: every aggregate counted `per` times, each position once.
  local function assert_counter_exact(naggs, per)
    local c = one("SELECT count(*) AS aggs, COALESCE(sum(n), 0)::bigint AS total, COALESCE(min(n), 0) AS lo, COALESCE(max(n), 0) AS hi FROM t_run_counter")
    assert.same({ aggs = naggs, total = naggs * per, lo = per, hi = per }, c)
    local s = one("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_run_seen")
    assert.same({ n = naggs * per, d = naggs * per }, s)
  end

  -- The counter's read model matches its checkpoint (single partition, everything in scope).
  local function assert_counter_matches_checkpoint()
    local cp = checkpoint("run_counter")
    if not table_exists("t_run_counter") then -- stopped before its setup ran
      assert.equal(0, cp)
      return cp
    end
    local c = one("SELECT COALESCE(sum(n), 0)::bigint AS total FROM t_run_counter")
    local s = one("SELECT count(*) AS n, count(DISTINCT pos) AS d, COALESCE(max(pos), 0) AS hi FROM t_run_seen")
    assert.same({ total = cp, n = cp, d = cp, hi = cp }, { total = c.total, n = s.n, d = s.d, hi = s.hi })
    return cp
  end

  -- The largest number of events one transaction handled, from a t_run_* log table.
  local function max_batch(tbl)
    return one(("SELECT COALESCE(max(n), 0) AS m FROM (SELECT count(*) AS n FROM %s GROUP BY xid) b"):format(tbl)).m
  end

  local function wait_until(what, seconds, fn) return H.wait_until(what, seconds, fn, 0.02) end

  -- Starts `pupsourcing run ...` in the background (H.spawn). Returns {pid=, dir=}; see
  -- wait_exit / stderr_of.
  local function spawn(args, env)
    local words = { H.bin }
    for _, a in ipairs(with_tables(args)) do words[#words + 1] = a end
    return H.spawn(words, { env = env })
  end

  local stderr_of, exit_code, wait_exit = H.stderr_of, H.exit_code, H.wait_exit

  local spawned = {}
  local function start(args, env)
    local p = spawn(args, env)
    spawned[#spawned + 1] = p
    return p
  end

  before_each(function()
    store, db = H.fresh_store("run")
    for _, t in ipairs { "t_run_counter", "t_run_seen", "t_run_types" } do
      assert(db:exec("DROP TABLE IF EXISTS " .. t))
    end
    spawned = {}
  end)

  after_each(function()
    for _, p in ipairs(spawned) do H.reap(p) end
    db:close()
  end)

  describe("--once", function()
    it("catches up, exits 0 and leaves an exact read model", function()
      local head = populate(20, 50)
      local r = pupsourcing { "run", "--once", COUNTER }
      assert.equal(0, r.code, r.output)
      assert_counter_exact(20, 50)
      assert.equal(head, checkpoint("run_counter"))
      assert.is_truthy(r.stderr:find("run_counter", 1, true), r.stderr)
      -- nothing new: a second run handles nothing and changes nothing
      r = pupsourcing { "run", "--once", COUNTER }
      assert.equal(0, r.code, r.output)
      assert_counter_exact(20, 50)
    end)

    it("runs several files concurrently, each with its own checkpoint and batch size", function()
      local head = populate(30, 12)
      local r = pupsourcing { "run", "--once", COUNTER, TYPES }
      assert.equal(0, r.code, r.output)
      assert_counter_exact(30, 12)
      assert.equal(head, checkpoint("run_counter"))
      assert.equal(head, checkpoint("run_types"))
      assert.same({ n = head, d = head }, one("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_run_types"))
      -- batch sizes of the files: 100 and 7 events per transaction
      assert.equal(100, max_batch("t_run_seen"))
      assert.equal(7, max_batch("t_run_types"))
    end)

    it("--batch-size overrides the files' batch sizes", function()
      populate(10, 30)
      local r = pupsourcing { "run", "--once", "--batch-size", "13", COUNTER, TYPES }
      assert.equal(0, r.code, r.output)
      assert_counter_exact(10, 30)
      assert.equal(13, max_batch("t_run_seen"))
      assert.equal(13, max_batch("t_run_types"))
    end)

    it("--workers 4 runs partitions 0..3 in one process, exactly once each", function()
      local head = populate(40, 100)
      local r = pupsourcing { "run", "--once", "--workers", "4", COUNTER }
      assert.equal(0, r.code, r.output)
      assert_counter_exact(40, 100)
      local cps = q(('SELECT partition_key, total_partitions, last_global_position FROM "%s"'
        .. ' WHERE projection_name = $1 ORDER BY partition_key'):format(T.checkpoints_table), "run_counter")
      assert.equal(4, #cps)
      for i, c in ipairs(cps) do
        assert.same({ partition_key = i - 1, total_partitions = 4, last_global_position = head }, c)
      end
    end)

    it("PARTITION_KEY / TOTAL_PARTITIONS from the environment select the partition", function()
      local head = populate(24, 5)
      for k = 0, 3 do
        local r = pupsourcing({ "run", "--once", COUNTER }, { env = { PARTITION_KEY = tostring(k), TOTAL_PARTITIONS = "4" } })
        assert.equal(0, r.code, r.output)
        assert.equal(head, checkpoint("run_counter", k, 4))
        -- exactly the aggregates of partitions 0..k are counted
        for _, row in ipairs(q("SELECT agg FROM t_run_counter")) do
          assert.is_true(pup.partition_of(row.agg, 4) <= k, row.agg)
        end
        local expect = 0
        for a = 1, 24 do if pup.partition_of("agg-" .. a, 4) <= k then expect = expect + 1 end end
        assert.equal(expect, one("SELECT count(*) AS n FROM t_run_counter").n)
      end
      assert_counter_exact(24, 5)
    end)

    it("flags win over the environment", function()
      local head = populate(8, 2)
      local r = pupsourcing({ "run", "--once", "--partition-key", "1", "--total-partitions", "2", COUNTER },
        { env = { PARTITION_KEY = "0", TOTAL_PARTITIONS = "3" } })
      assert.equal(0, r.code, r.output)
      assert.equal(head, checkpoint("run_counter", 1, 2))
      assert.equal(0, checkpoint("run_counter", 0, 3))
    end)
  end)

  describe("signals", function()
    for _, sig in ipairs { "TERM", "INT" } do
      it("SIG" .. sig .. " mid catch-up: exits 0 within seconds with a consistent checkpoint", function()
        local head = populate(30, 100)
        local p = start({ "run", COUNTER }, { FX_SLEEP = "0.002" })
        wait_until("the checkpoint to move", 15, function() return checkpoint("run_counter") > 0 end)
        local status = H.read_file("/proc/" .. p.pid .. "/status")
        local ign = tonumber(status:match("SigIgn:%s*(%x+)"), 16)
        assert.equal(0, ign & 2, "test setup: SIGINT is ignored by the spawned process")
        os.execute("kill -" .. sig .. " " .. p.pid)
        local t0 = pup.now()
        local rc = wait_exit(p, 5)
        assert.equal(0, rc, "exit code after SIG" .. sig .. " (nil = still running after 5 s); stderr:\n" .. stderr_of(p))
        assert.is_true(pup.now() - t0 < 5)
        assert.is_truthy(stderr_of(p):find("SIG" .. sig, 1, true), stderr_of(p))
        local cp = assert_counter_matches_checkpoint()
        assert.is_true(cp > 0 and cp < head, "stopped mid catch-up (checkpoint " .. cp .. " of " .. head .. ")")
        -- and a restart finishes exactly
        local r = pupsourcing { "run", "--once", COUNTER }
        assert.equal(0, r.code, r.output)
        assert_counter_exact(30, 100)
      end)
    end

    it("SIGTERM while idle exits 0", function()
      populate(2, 2)
      local p = start({ "run", "--poll-interval", "200", COUNTER })
      wait_until("catch-up", 15, function() return checkpoint("run_counter") == 4 end)
      os.execute("kill -TERM " .. p.pid)
      assert.equal(0, wait_exit(p, 5), stderr_of(p))
    end)

    it("SIGKILL of a non-idempotent counter mid catch-up, then a restart: exact counts", function()
      local head = populate(200, 100)
      assert.equal(20000, head)
      local p = start({ "run", "--batch-size", "100", COUNTER }, { FX_SLEEP = "0.0002" })
      wait_until("the checkpoint to pass 1000", 20, function() return checkpoint("run_counter") >= 1000 end)
      os.execute("kill -KILL " .. p.pid)
      assert.equal(128 + 9, wait_exit(p, 5))
      local cp = assert_counter_matches_checkpoint()
      assert.is_true(cp < head, "killed mid catch-up (checkpoint " .. cp .. ")")
      local r = pupsourcing { "run", "--once", "--batch-size", "100", COUNTER }
      assert.equal(0, r.code, r.output)
      assert_counter_exact(200, 100)
      assert.equal(head, checkpoint("run_counter"))
    end)
  end)

  describe("a handler error", function()
    it("with --fail-fast stops the other projections and makes run exit non-zero, naming projection and position", function()
      populate(25, 100)
      local poison = assert(store:append(db, pup.any(), { H.event { aggregate_id = "poison-1", event_type = "Poison" } }))
      local ppos = poison.global_positions[1]
      local head = populate(5, 10, "late-")
      -- the counter is slow (about 5 s to catch up): it is mid-run when run_fail fails
      local p = start({ "run", "--fail-fast", "--poll-interval", "200", COUNTER, FAIL }, { FX_SLEEP = "0.002" })
      local rc = wait_exit(p, 20)
      local err = stderr_of(p)
      assert.is_number(rc, "run did not exit after a handler error; stderr:\n" .. err)
      assert.equal(1, rc, "exit code (a signal is 128 + its number); stderr:\n" .. err)
      assert.is_truthy(err:find("run_fail", 1, true), err)
      assert.is_truthy(err:find("global position " .. ppos, 1, true), err)
      assert.is_truthy(err:find("Poison", 1, true), err)
      assert.is_truthy(err:find("poisoned event poison-1", 1, true), err)
      assert.is_true(checkpoint("run_fail") < ppos) -- its batch rolled back
      -- the counter was stopped (before catching up), cleanly: its read model matches its checkpoint
      local cp = assert_counter_matches_checkpoint()
      assert.is_true(cp < head, "the counter was not stopped: checkpoint " .. cp .. " = head")
    end)

    it("with --once as well", function()
      populate(2, 3)
      assert(store:append(db, pup.any(), { H.event { aggregate_id = "poison-2", event_type = "Poison" } }))
      local r = pupsourcing { "run", "--once", FAIL }
      assert.equal(1, r.code, r.output)
      assert.is_truthy(r.stderr:find("run_fail", 1, true), r.stderr)
      assert.is_truthy(r.stderr:find("global position 7", 1, true), r.stderr)
    end)
  end)

  describe("invalid input fails before touching the database", function()
    local function bad(args, fragment, env)
      local all = { "run", "--database-url", NO_DB }
      for _, a in ipairs(args) do all[#all + 1] = a end
      local r = H.run(all, { env = env })
      assert.equal(2, r.code, r.output) -- a usage error, never a crash or signal
      assert.is_truthy(r.stderr:find(fragment, 1, true), "expected " .. fragment .. " in:\n" .. r.stderr)
      assert.is_falsy(r.stderr:lower():find("connect", 1, true), r.stderr)
      return r
    end

    it("partition key >= total partitions", function()
      bad({ "--partition-key", "4", "--total-partitions", "4", COUNTER }, "--partition-key 4 must be below --total-partitions 4")
      bad({ COUNTER }, "PARTITION_KEY 5 must be below TOTAL_PARTITIONS 2", { PARTITION_KEY = "5", TOTAL_PARTITIONS = "2" })
    end)

    it("partition key >= total partitions: the message names the flag or variable", function()
      bad({ "--partition-key", "4", "--total-partitions", "4", COUNTER }, "--partition-key")
      bad({ COUNTER }, "PARTITION_KEY", { PARTITION_KEY = "5", TOTAL_PARTITIONS = "2" })
    end)

    it("total partitions < 1", function()
      bad({ "--partition-key", "0", "--total-partitions", "0", COUNTER }, "--total-partitions must be an integer >= 1")
      bad({ COUNTER }, "TOTAL_PARTITIONS must be an integer >= 1", { PARTITION_KEY = "0", TOTAL_PARTITIONS = "0" })
    end)

    it("--workers with --partition-key, and --workers < 1", function()
      bad({ "--workers", "2", "--partition-key", "0", COUNTER }, "--workers and --partition-key")
      bad({ "--workers", "0", COUNTER }, "--workers must be an integer >= 1")
    end)

    it("a projection without a name", function()
      bad({ COUNTER, BAD .. "no_name.lua" }, "no_name.lua: missing `name`")
    end)

    it("a projection without handle", function()
      bad({ BAD .. "no_handle.lua" }, 'no_handle.lua: projection "no_handle": `handle` must be a function, got nil')
    end)

    it("handle that is not a function", function()
      bad({ BAD .. "handle_not_function.lua" }, "handle_not_function.lua: projection \"handle_not_function\": `handle` must be a function, got string")
    end)

    it("a syntax error in a file", function()
      bad({ COUNTER, BAD .. "syntax_error.lua" }, "syntax_error.lua:1:")
    end)

    it("duplicate projection names across files", function()
      bad({ COUNTER, BAD .. "dup_counter.lua" }, 'dup_counter.lua: projection name "run_counter" is also used by ' .. COUNTER)
    end)

    it("an unknown flag", function()
      local r = bad({ "--bogus", COUNTER }, "run: unknown option '--bogus' (see pupsourcing run --help)")
      assert.equal("", r.stdout)
      bad({ "--onse", COUNTER }, "run: unknown option '--onse'; did you mean '--once'?")
    end)

    it("a missing file, and no file at all", function()
      bad({ FIX .. "no_such_file.lua" }, "no_such_file.lua")
      bad({}, "run: missing argument 'FILE.lua'")
    end)

    it("creates nothing on a real database either", function()
      local r = pupsourcing { "run", "--partition-key", "0", "--total-partitions", "0", COUNTER }
      assert.equal(2, r.code, r.output)
      assert.is_truthy(r.stderr:find("--total-partitions must be an integer >= 1", 1, true), r.stderr)
      assert.is_false(table_exists("t_run_counter"))
      assert.equal(0, one(('SELECT count(*) AS n FROM "%s"'):format(T.checkpoints_table)).n)
    end)
  end)

  describe("transient failures", function()
    it("a lost connection is retried: run reconnects and goes on", function()
      populate(3, 3)
      local p = start({ "run", "--poll-interval", "100", COUNTER })
      wait_until("catch-up", 15, function() return checkpoint("run_counter") == 9 end)
      -- the backend holding the partition's advisory lock
      local victims = q("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        .. " AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
        "pupsourcing/" .. T.checkpoints_table .. "/run_counter/0/1")
      assert.is_true(#victims >= 1, "no backend of the run found")
      for _, v in ipairs(victims) do
        assert.is_true(one("SELECT pg_terminate_backend($1) AS ok", v.pid).ok, "backend " .. v.pid .. " not terminated")
      end
      local head = populate(2, 4, "after-")
      wait_until(function()
        return ("the run to reconnect and catch up (checkpoint %s, head %d, exit %s):\n%s"):format(
          checkpoint("run_counter"), head, exit_code(p), stderr_of(p))
      end, 45, function() return checkpoint("run_counter") == head end)
      assert.is_nil(exit_code(p), stderr_of(p))
      assert.is_truthy(stderr_of(p):find("reconnected", 1, true), stderr_of(p))
      os.execute("kill -TERM " .. p.pid)
      assert.equal(0, wait_exit(p, 5), stderr_of(p))
      assert.equal(9 + 8, one("SELECT sum(n)::bigint AS n FROM t_run_counter").n)
    end)
  end)

  describe("standby", function()
    it("a second `run` of a held partition waits as standby, then takes over within seconds", function()
      populate(4, 5)
      local db1 = H.connect()
      local proj = pup.load_projection(COUNTER)
      local p1 = pup.processor(db1, proj, { store = store, batch_size = 5 })
      assert.equal(5, p1:run_once())
      local p = start({ "run", "--poll-interval", "100", COUNTER })
      wait_until("the standby message", 10, function() return stderr_of(p):find("standby", 1, true) ~= nil end)
      pup.sleep(0.5)
      assert.is_nil(exit_code(p), "the standby exited: " .. stderr_of(p))
      assert.equal(5, checkpoint("run_counter")) -- not a second writer
      p1:close()
      db1:close()
      wait_until("the takeover", 10, function() return checkpoint("run_counter") == 20 end)
      assert.is_truthy(stderr_of(p):find("took over", 1, true), stderr_of(p))
      os.execute("kill -TERM " .. p.pid)
      assert.equal(0, wait_exit(p, 5), stderr_of(p))
      assert_counter_exact(4, 5)
    end)
  end)

  describe("status", function()
    it("shows checkpoint, head and lag per projection partition, as text and --json", function()
      populate(10, 10)
      local r = pupsourcing { "run", "--once", "--workers", "2", COUNTER }
      assert.equal(0, r.code, r.output)
      populate(1, 7, "more-")
      r = pupsourcing { "status" }
      assert.equal(0, r.code, r.output)
      local lines = {}
      for line in r.stdout:gmatch("[^\n]+") do
        if line:find("run_counter", 1, true) then lines[#lines + 1] = line end
      end
      assert.equal(2, #lines, r.stdout)
      for k = 0, 1 do
        local line = lines[k + 1]
        assert.is_truthy(line:find(k .. "/2", 1, true), line)
        local nums = {}
        for n in line:gmatch("%s(%d+)%f[%s]") do nums[#nums + 1] = tonumber(n) end
        assert.same({ 100, 107, 7 }, { nums[1], nums[2], nums[3] }, line)
      end
      r = pupsourcing { "status", "--json" }
      assert.equal(0, r.code, r.output)
      local rows = pup.json.decode(r.stdout)
      assert.equal(2, #rows)
      for k = 0, 1 do
        local row = rows[k + 1]
        assert.equal("run_counter", row.projection)
        assert.equal(k, row.partition_key)
        assert.equal(2, row.total_partitions)
        assert.equal(100, row.position)
        assert.equal(107, row.head)
        assert.equal(7, row.lag)
        assert.is_string(row.updated_at)
        assert.is_nil(row.waiting_position)
      end
    end)

    it("reports what a partition waits on at a hole", function()
      local a = H.connect()
      local txa = assert(a:begin())
      local held = assert(store:append(txa, pup.any(), { H.event { aggregate_id = "slow" } })).global_positions[1]
      populate(1, 1, "fast-")
      local p = pup.processor(db, { name = "run_wait", handle = function() end }, { store = store })
      assert.equal(0, p:run_once())
      local r = pupsourcing { "status" }
      assert.equal(0, r.code, r.output)
      assert.is_truthy(r.stdout:find("waiting for position " .. held, 1, true), r.stdout)
      r = pupsourcing { "status", "--json" }
      local rows = pup.json.decode(r.stdout)
      assert.equal(held, rows[1].waiting_position)
      assert.is_string(rows[1].waiting_since)
      assert(txa:rollback())
      a:close()
    end)

    it("with no checkpoints yet says so", function()
      local r = pupsourcing { "status" }
      assert.equal(0, r.code, r.output)
      r = pupsourcing { "status", "--json" }
      assert.equal(0, r.code, r.output)
      assert.same({}, pup.json.decode(r.stdout))
    end)
  end)

  describe("reset", function()
    it("deletes the projection's checkpoints and runs its reset; a new run counts exactly again", function()
      populate(6, 10)
      local r = pupsourcing { "run", "--once", "--workers", "2", COUNTER, TYPES }
      assert.equal(0, r.code, r.output)
      assert_counter_exact(6, 10)
      r = pupsourcing { "reset", COUNTER }
      assert.equal(0, r.code, r.output)
      assert.is_truthy(r.stdout:find("reset run_counter: 2 checkpoint row(s) deleted", 1, true), r.output)
      assert.equal(0, one("SELECT count(*) AS n FROM t_run_counter").n)
      assert.equal(0, one("SELECT count(*) AS n FROM t_run_seen").n)
      assert.equal(0, checkpoint("run_counter", 0, 2))
      assert.equal(60, checkpoint("run_types", 0, 2)) -- the other projection is untouched
      r = pupsourcing { "run", "--once", COUNTER }
      assert.equal(0, r.code, r.output)
      assert_counter_exact(6, 10)
    end)

    it("rejects a bad file before touching the database", function()
      local r = H.run { "reset", "--database-url", NO_DB, BAD .. "no_name.lua" }
      assert.equal(2, r.code, r.output)
      assert.is_truthy(r.stderr:find("no_name.lua: missing `name`", 1, true), r.stderr)
      r = H.run { "reset", "--database-url", NO_DB }
      assert.equal(2, r.code, r.output)
      assert.is_truthy(r.stderr:find("reset: missing argument 'FILE.lua'", 1, true), r.stderr)
    end)
  end)
end)
