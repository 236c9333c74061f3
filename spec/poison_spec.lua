-- Issue 12, poison events: on_error = "stop" | "skip" | "retry", the dead-letter table,
-- `pupsourcing dead-letters list|retry|discard`, one failing projection does not stop the
-- others (unless --fail-fast), and `status` shows failed partitions and dead letters.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local T = H.tables("poison")
local DL, FAILURES = T.checkpoints_table .. "_dead_letters", T.checkpoints_table .. "_failures"

-- A non-idempotent counter that never fails: it must keep going next to a failing one.
local COUNTER = [[
return {
  name = "poison_counter",
  batch_size = 10,
  setup = function(tx)
    assert(tx:exec("CREATE TABLE IF NOT EXISTS t_poison_counter (agg text PRIMARY KEY, n bigint NOT NULL)"))
  end,
  handle = function(tx, e)
    assert(tx:exec("INSERT INTO t_poison_counter AS c (agg, n) VALUES ($1, 1)"
      .. " ON CONFLICT (agg) DO UPDATE SET n = c.n + 1", e.aggregate_id))
  end,
}
]]

-- The failing projection: every event it applies is one row of t_poison_seen (no key:
-- an event applied twice shows as two rows); "Poison" events raise until FIXED. With
-- SLOW set, applying the poison event then sleeps (a retry to kill half-way).
local FAILING = [[
local FIXED = @FIXED@
local pup = require "pupsourcing"
local first_try = true
return {
  name = "poison_bad",
  batch_size = 8, -- the poison event (31) is the 7th of its batch (25..32)
  @POLICY@
  setup = function(tx)
    assert(tx:exec("CREATE TABLE IF NOT EXISTS t_poison_seen (pos bigint NOT NULL, agg text NOT NULL)"))
  end,
  handle = function(tx, e)
    if os.getenv("TRANSIENT_AT") == tostring(e.global_position) and first_try then
      first_try = false -- transient: retried, never dead-lettered
      if os.getenv("TRANSIENT") == "connection" then
        tx:query("SELECT pg_terminate_backend(pg_backend_pid())")
      else
        assert(tx:query("DO $$ BEGIN RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001'; END $$"))
      end
    end
    if os.getenv("SLEEP_EACH") then pup.sleep(tonumber(os.getenv("SLEEP_EACH"))) end
    if e.event_type == "Poison" and not FIXED then error("poisoned event " .. e.aggregate_id) end
    assert(tx:exec("INSERT INTO t_poison_seen (pos, agg) VALUES ($1, $2)", e.global_position, e.aggregate_id))
    if e.event_type == "Poison" and os.getenv("SLOW") then
      assert(tx:query("SELECT pg_sleep(4) AS poison_retry_sleep"))
    end
  end,
}
]]

describe("poison events", function()
  local store, db, dir, bad_file, counter_file

  local function q(sql, ...) return assert(db:query(sql, ...)) end
  local function one(sql, ...) return q(sql, ...)[1] end
  local function pupsourcing(args, opts) return H.run(H.with_tables(T, args), opts) end

  local function write_failing(policy, fixed)
    H.write_file(bad_file, (FAILING:gsub("@FIXED@", fixed and "true" or "false"):gsub("@POLICY@", policy or "")))
  end

  local function checkpoint(name)
    local r = one(('SELECT max(last_global_position) AS p FROM "%s" WHERE projection_name = $1'):format(
      T.checkpoints_table), name)
    return r.p ~= pup.null and r.p or 0
  end

  -- 3 aggregates x 10 events, one Poison event, 3 x 5 more; returns the poison's position and the head.
  local function populate()
    for a = 1, 3 do assert(store:append(db, pup.any(), H.events(10, { aggregate_id = "a" .. a }))) end
    local p = assert(store:append(db, pup.any(), { H.event { aggregate_id = "p1", event_type = "Poison" } }))
    for a = 1, 3 do assert(store:append(db, pup.any(), H.events(5, { aggregate_id = "a" .. a }))) end
    return p.global_positions[1], assert(store:head(db))
  end

  -- The counter counted every event exactly once (45 + the poison event's aggregate once).
  local function assert_counter_exact()
    local rows = q("SELECT agg, n FROM t_poison_counter ORDER BY agg")
    assert.same({ { agg = "a1", n = 15 }, { agg = "a2", n = 15 }, { agg = "a3", n = 15 }, { agg = "p1", n = 1 } }, rows)
  end

  -- The failing projection applied exactly the positions 1..head, without `missing`.
  local function assert_seen(head, missing)
    local s = one("SELECT count(*) AS n, count(DISTINCT pos) AS d, COALESCE(sum(pos), 0)::bigint AS s,"
      .. " count(*) FILTER (WHERE pos = $1) AS p FROM t_poison_seen", missing or 0)
    local want = head * (head + 1) // 2 - (missing or 0)
    assert.same({ n = head - (missing and 1 or 0), d = head - (missing and 1 or 0), s = want, p = 0 },
      { n = s.n, d = s.d, s = s.s, p = missing and s.p or 0 })
  end

  local function dead_letters()
    return q(('SELECT global_position, event_type, aggregate_id, attempts, error, partition_key, total_partitions'
      .. ' FROM "%s" ORDER BY global_position'):format(DL))
  end

  before_each(function()
    db = H.connect()
    for _, t in ipairs { DL, FAILURES, "t_poison_counter", "t_poison_seen" } do
      assert(db:exec('DROP TABLE IF EXISTS "' .. t .. '"'))
    end
    store = H.fresh_store("poison", db)
    dir = H.tmpdir()
    bad_file, counter_file = dir .. "/bad.lua", dir .. "/counter.lua"
    H.write_file(counter_file, COUNTER)
  end)

  after_each(function()
    H.rmdir(dir)
    db:close()
  end)

  it("the example of docs/operations.md is a valid projection", function()
    local doc = H.read_file(H.source_dir .. "/docs/operations.md")
    local block = doc:match("\n## Poison events\n.-```lua\n(.-)```")
    local p = pup.check_projection(assert(load(block))(), "docs/operations.md")
    assert.same({ "billing", "retry", 5, 0.5 }, { p.name, p.on_error, p.max_attempts, p.retry_backoff })
  end)

  describe("the projection fields", function()
    local function problem(fields)
      local p = { name = "x", handle = function() end }
      for k, v in pairs(fields) do p[k] = v end
      local ok, err = pcall(pup.check_projection, p, "f.lua")
      assert.is_false(ok)
      return err
    end

    it("are checked, and unknown fields raise", function()
      assert.equal('f.lua: projection "x": `on_error` must be "stop", "skip" or "retry", got "ignore"',
        problem { on_error = "ignore" })
      assert.equal('f.lua: projection "x": `max_attempts` goes with on_error = "retry"',
        problem { on_error = "skip", max_attempts = 3 })
      assert.equal('f.lua: projection "x": `retry_backoff` goes with on_error = "retry"', problem { retry_backoff = 1 })
      assert.equal('f.lua: projection "x": `max_attempts` must be an integer from 1 to 1000',
        problem { on_error = "retry", max_attempts = 0 })
      assert.is_truthy(problem { on_error = "retry", retry_backoff = -1 }:find("`retry_backoff` must be a number", 1, true))
      local err = problem { on_eror = "skip" }
      assert.is_truthy(err:find('f.lua: projection "x": unknown field `on_eror` (known: ', 1, true), err)
      assert.is_truthy(err:find("on_error", 1, true), err)
      assert.is_table(pup.check_projection({ name = "x", handle = function() end, on_error = "retry", max_attempts = 2,
        retry_backoff = 0.5 }))
    end)
  end)

  it('on_error = "skip": dead-letters the event in the checkpoint\'s transaction; the other projection goes on', function()
    local ppos, head = populate()
    write_failing('on_error = "skip",')
    local r = pupsourcing { "run", "--once", counter_file, bad_file }
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stderr:find(("projection poison_bad partition 0/1: gave up on the event at global position %d"
      .. " after 1 attempt(s) (on_error = skip); dead-lettered in %s, moving on: "):format(ppos, DL), 1, true), r.stderr)
    assert_counter_exact()
    assert_seen(head, ppos)
    assert.equal(head, checkpoint("poison_bad"))
    local d = dead_letters()
    assert.equal(1, #d)
    assert.same({ ppos, "Poison", "p1", 1, 0, 1 },
      { d[1].global_position, d[1].event_type, d[1].aggregate_id, d[1].attempts, d[1].partition_key, d[1].total_partitions })
    assert.is_truthy(d[1].error:find("poisoned event p1", 1, true), d[1].error)
    assert.is_truthy(d[1].error:find("stack traceback", 1, true), d[1].error)

    -- status: the dead-letter count, in text and JSON; not failed
    local st = pupsourcing { "status" }
    assert.equal(0, st.code, st.output)
    local line = st.stdout:match("\n(poison_bad [^\n]*)")
    assert.equal("  1 dead letter(s)", line and line:sub(-#"  1 dead letter(s)"), st.stdout)
    assert.is_falsy(st.stdout:find("failed since", 1, true), st.stdout)
    local js = pupsourcing { "status", "--json" }
    local rows = pup.json.decode(js.stdout)
    for _, row in ipairs(rows) do
      assert.equal(row.projection == "poison_bad" and 1 or 0, row.dead_letters)
      assert.is_nil(row.failed_since)
    end
  end)

  it('on_error = "retry": tries max_attempts times with backoff, then dead-letters and moves on', function()
    local ppos, head = populate()
    write_failing('on_error = "retry", max_attempts = 3, retry_backoff = 0.1,')
    local t0 = pup.now()
    local r = pupsourcing { "run", "--once", counter_file, bad_file }
    local took = pup.now() - t0
    assert.equal(0, r.code, r.output)
    for a = 1, 2 do
      assert.is_truthy(r.stderr:find(("handler failed at global position %d (attempt %d of 3, on_error = retry);"
        .. " trying it again in %s s: "):format(ppos, a, a == 1 and "0.1" or "0.2"), 1, true), r.stderr)
    end
    assert.is_falsy(r.stderr:find("attempt 3 of 3", 1, true), r.stderr)
    assert.is_truthy(r.stderr:find("after 3 attempt(s) (on_error = retry); dead-lettered", 1, true), r.stderr)
    assert.is_true(took >= 0.3, "the backoff was not waited: " .. took)
    assert_counter_exact()
    assert_seen(head, ppos)
    local d = dead_letters()
    assert.equal(1, #d)
    assert.same({ ppos, 3 }, { d[1].global_position, d[1].attempts })
  end)

  it('on_error = "stop" (the default): stops that projection only (its batch rolled back) and status says failed', function()
    local ppos, head = populate()
    write_failing(nil)
    local r = pupsourcing { "run", "--once", counter_file, bad_file }
    assert.equal(1, r.code, r.output)
    assert.is_truthy(r.stderr:find("projection poison_bad stopped (the other projections go on): projection poison_bad"
      .. " partition 0/1: handler failed at global position " .. ppos, 1, true), r.stderr)
    assert_counter_exact() -- the counter ran to the end
    assert.equal(head, checkpoint("poison_counter"))
    local batch_start = (ppos - 1) // 8 * 8 -- its batch rolled back whole
    assert.equal(batch_start, checkpoint("poison_bad"))
    assert_seen(batch_start)
    assert.equal(0, #dead_letters())

    local st = pupsourcing { "status" }
    assert.equal(0, st.code, st.output)
    local failed = st.stdout:match("\n(poison_bad [^\n]*\n[^\n]*)")
    assert.is_truthy(failed, st.stdout)
    assert.is_truthy(failed:find("\n  failed since %d%d%d%d%-%d%d%-%d%dT[%d:.+-]+: projection poison_bad partition 0/1:"
      .. " handler failed at global position " .. ppos), failed)
    local rows = pup.json.decode(pupsourcing({ "status", "--json" }).stdout)
    local bad
    for _, row in ipairs(rows) do if row.projection == "poison_bad" then bad = row end end
    assert.equal(ppos, bad.failed_position)
    assert.is_string(bad.failed_since)
    assert.is_truthy(bad.error:find("poisoned event p1", 1, true), bad.error)
    assert.equal(0, bad.dead_letters)

    -- the same failure again keeps its first time
    local since = bad.failed_since
    assert.equal(1, pupsourcing({ "run", "--once", bad_file }).code)
    assert.equal(since, one(('SELECT to_char(failed_since, \'YYYY-MM-DD"T"HH24:MI:SS.MSOF\') AS s FROM "%s"'):format(FAILURES)).s)

    -- fixed: it goes on from the event, exactly, and is no longer failed
    write_failing(nil, true)
    r = pupsourcing { "run", "--once", bad_file }
    assert.equal(0, r.code, r.output)
    assert_seen(head)
    assert.equal(0, one(('SELECT count(*) AS n FROM "%s"'):format(FAILURES)).n)
    assert.is_falsy(pupsourcing({ "status" }).stdout:find("failed since", 1, true))
  end)

  it("transient failures are not poison events: retried, nothing dead-lettered, even under skip", function()
    local _, head = populate()
    write_failing('on_error = "skip",', true)
    local r = pupsourcing({ "run", "--once", bad_file }, { env = { TRANSIENT_AT = "28" } })
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stderr:find("could not serialize %(SQLSTATE 40001%)\n.-; retrying in %d+ ms\n"), r.stderr)
    assert.is_falsy(r.stderr:find("dead-lettered", 1, true), r.stderr)
    assert_seen(head)
    assert.equal(0, #dead_letters())
    -- a lost connection too
    assert(db:exec("TRUNCATE t_poison_seen"))
    assert(pup.reset(db, pup.load_projection(bad_file), store))
    r = pupsourcing({ "run", "--once", bad_file }, { env = { TRANSIENT_AT = "28", TRANSIENT = "connection" } })
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stderr:find("reconnected", 1, true), r.stderr)
    assert_seen(head)
    assert.equal(0, #dead_letters())
  end)

  it("per partition: under --workers 2 the other partition of the failing projection goes on", function()
    local ppos, head = populate()
    write_failing(nil)
    local r = pupsourcing { "run", "--once", "--workers", "2", counter_file, bad_file }
    assert.equal(1, r.code, r.output)
    local pk = pup.partition_of("p1", 2)
    assert.is_truthy(r.stderr:find(("partition %d/2: handler failed at global position %d"):format(pk, ppos), 1, true), r.stderr)
    assert_counter_exact()
    local rows = q(('SELECT partition_key, last_global_position AS p FROM "%s" WHERE projection_name = \'poison_bad\''
      .. ' ORDER BY partition_key'):format(T.checkpoints_table))
    assert.equal(head, rows[2 - pk].p) -- the healthy partition reached the head
    assert.is_true(rows[pk + 1].p < ppos)
    local f = q(('SELECT partition_key, total_partitions, global_position FROM "%s"'):format(FAILURES))
    assert.same({ { partition_key = pk, total_partitions = 2, global_position = ppos } }, f)
    local st = pupsourcing { "status" }
    local _, nfailed = st.stdout:gsub("\n  failed since ", "")
    assert.equal(1, nfailed, st.stdout)
    assert.is_truthy(st.stdout:find(("\npoison_bad +%d/2 [^\n]*\n  failed since "):format(pk)), st.stdout)
  end)

  it("killed at any moment under skip: every event is applied or dead-lettered, exactly once", function()
    assert(store:append(db, pup.any(), H.events(5, { aggregate_id = "a0" })))
    for i = 1, 12 do
      assert(store:append(db, pup.any(), { H.event { aggregate_id = "p" .. i, event_type = "Poison" } }))
      assert(store:append(db, pup.any(), H.events(9, { aggregate_id = "a" .. i })))
    end
    local head = assert(store:head(db))
    write_failing('on_error = "skip",')
    for round = 1, 3 do
      local p = H.spawn(H.with_tables(T, { H.bin, "run", bad_file }), { env = { SLEEP_EACH = "0.03" } })
      -- killed a moment after its round's dead letter: mid-batch, not before it started
      H.wait_until("dead letter " .. round, 20, function()
        assert.is_nil(H.exit_code(p), H.stderr_of(p))
        return #dead_letters() >= round
      end, 0.01)
      pup.sleep(math.random() * 0.2)
      os.execute("kill -KILL " .. p.pid)
      H.wait_exit(p, 10)
      H.reap(p)
    end
    local before = #dead_letters()
    assert.is_true(checkpoint("poison_bad") < head and before > 0,
      ("the kills came too early or too late (checkpoint %d of %d, %d dead letters)"):format(
        checkpoint("poison_bad"), head, before))
    local r = pupsourcing { "run", "--once", bad_file }
    assert.equal(0, r.code, r.output)
    local c = one(('SELECT (SELECT count(*) FROM t_poison_seen) AS seen, (SELECT count(DISTINCT pos) FROM t_poison_seen) AS d,'
      .. ' (SELECT count(*) FROM "%s") AS dead, (SELECT count(*) FROM t_poison_seen s JOIN "%s" x'
      .. ' ON x.global_position = s.pos) AS both_, (SELECT count(*) FROM "%s" WHERE event_type <> \'Poison\') AS wrong'):format(
      DL, DL, DL))
    assert.same({ seen = head - 12, d = head - 12, dead = 12, both_ = 0, wrong = 0 }, c)
  end)

  it("the Lua API: processor:run_once dead-letters under skip and returns what it handled", function()
    local ppos = populate()
    write_failing('on_error = "skip",')
    local proj = pup.load_projection(bad_file)
    local p <close> = pup.processor(db, proj, { store = store, batch_size = 100 })
    local n, err = p:run_once()
    assert.is_nil(err)
    assert.equal(ppos - 1, n) -- the redone batch: the events before the poison event
    assert.equal(ppos, checkpoint("poison_bad"))
    assert.equal(1, #dead_letters())
    local rows = assert(pup.dead_letters.list(db, proj, { store = store }))
    assert.same({ ppos, "Poison", 1 }, { rows[1].global_position, rows[1].event_type, rows[1].attempts })
    assert.has_error(function() pup.dead_letters.list(db, proj, { store = store, postion = 1 }) end,
      "pup.dead_letters.list: unknown option postion")
  end)

  it("a group worker dead-letters with the event's partition of the group", function()
    local ppos, head = populate()
    write_failing('on_error = "retry", max_attempts = 2, retry_backoff = 0.01,')
    local proj = pup.load_projection(bad_file)
    local p <close> = pup.processor(db, proj, { store = store, group = true, total_partitions = 4 })
    local errors = {}
    for _ = 1, 50 do
      local _, err = p:run_once()
      if err then errors[#errors + 1] = err.message end
      if checkpoint("poison_bad") >= head then break end
    end
    assert.equal(1, #errors) -- attempt 1; attempt 2 dead-lettered it
    assert.is_truthy(errors[1]:find("handler failed at global position " .. ppos, 1, true), errors[1])
    assert_seen(head, ppos)
    local d = dead_letters()
    assert.same({ { ppos, pup.partition_of("p1", 4), 4, 2 } },
      { { d[1].global_position, d[1].partition_key, d[1].total_partitions, d[1].attempts } })
  end)

  it("--fail-fast: a handler failure stops every projection", function()
    local ppos = populate()
    for a = 1, 20 do assert(store:append(db, pup.any(), H.events(50, { aggregate_id = "late" .. a }))) end
    write_failing(nil)
    -- the counter sleeps per event: it is mid-run when the poison event stops everything
    local slow = COUNTER:gsub("handle = function%(tx, e%)", "handle = function(tx, e) require('pupsourcing').sleep(0.002)")
    H.write_file(counter_file, slow)
    local r = pupsourcing { "run", "--once", "--fail-fast", counter_file, bad_file }
    assert.equal(1, r.code, r.output)
    assert.is_truthy(r.stderr:find("handler failed at global position " .. ppos, 1, true), r.stderr)
    assert.is_falsy(r.stderr:find("the other projections go on", 1, true), r.stderr)
    assert.is_true(checkpoint("poison_counter") < assert(store:head(db)))
  end)

  describe("pupsourcing dead-letters", function()
    local ppos, head
    before_each(function()
      ppos, head = populate()
      write_failing('on_error = "skip",')
      assert.equal(0, pupsourcing({ "run", "--once", bad_file }).code)
    end)

    it("list shows them; retry with the handler still broken keeps the dead letter with the new error", function()
      local l = pupsourcing { "dead-letters", "list", bad_file }
      assert.equal(0, l.code, l.output)
      assert.is_truthy(l.stdout:find(("^%d  partition 0/1  Poison  event_id [%%x-]+  User p1 v1  attempts 1  first [^\n]+\n"
        .. "  [^\n]*bad.lua:%%d+: poisoned event p1\n  stack traceback:\n"):format(ppos)), l.stdout)
      local r = pupsourcing { "dead-letters", "retry", bad_file }
      assert.equal(1, r.code, r.output)
      assert.is_truthy(r.stdout:find("poison_bad: 0 dead letter(s) retried, then:", 1, true), r.stdout)
      assert.is_truthy(r.stderr:find(("dead letter at global position %d (event_type Poison, event_id "):format(ppos), 1, true),
        r.stderr)
      assert_seen(head, ppos)
      local d = dead_letters()
      assert.equal(2, d[1].attempts)
      assert.is_truthy(d[1].error:find("^[^\n]*poisoned event p1"), d[1].error)
      assert.is_truthy(d[1].error:find("stack traceback", 1, true), d[1].error)
    end)

    it("retry after fixing the handler file applies the event once and removes the dead letter", function()
      write_failing('on_error = "skip",', true)
      local r = pupsourcing { "dead-letters", "retry", bad_file }
      assert.equal(0, r.code, r.output)
      assert.equal("poison_bad: 1 dead letter(s) retried\n", r.stdout)
      assert_seen(head)
      assert.equal(0, #dead_letters())
      assert.equal("poison_bad: no dead letters\n", pupsourcing({ "dead-letters", "list", bad_file }).stdout)
      r = pupsourcing { "dead-letters", "retry", bad_file }
      assert.equal("poison_bad: 0 dead letter(s) retried\n", r.stdout)
      assert_seen(head)
    end)

    it("a retry killed half-way applies nothing; the next one applies the event once", function()
      write_failing('on_error = "skip",', true)
      local p = H.spawn(H.with_tables(T, { H.bin, "dead-letters", "retry", bad_file }), { env = { SLOW = "1" } })
      local ok, err = pcall(H.wait_until, "the retry to apply the event", 20, function()
        return one("SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE '%poison_retry_sleep%'"
          .. " AND pid <> pg_backend_pid()").n > 0
      end)
      if ok then os.execute("kill -KILL " .. p.pid) end
      local rc = H.wait_exit(p, 10)
      local stderr = H.stderr_of(p)
      H.reap(p)
      assert(ok, tostring(err) .. "\n" .. stderr)
      assert.equal(128 + 9, rc)
      -- the server ends the killed session's transaction (once its sleep ends): nothing stays
      H.wait_until("the killed session to end", 20, function()
        return one("SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE '%poison_retry_sleep%'"
          .. " AND pid <> pg_backend_pid()").n == 0
      end)
      assert_seen(head, ppos)
      assert.equal(1, #dead_letters())
      local r = pupsourcing { "dead-letters", "retry", bad_file }
      assert.equal(0, r.code, r.output)
      assert_seen(head)
      assert.equal(0, #dead_letters())
    end)

    it("--position picks one; discard deletes without applying", function()
      local r = pupsourcing { "dead-letters", "list", "--position", tostring(ppos + 1), bad_file }
      assert.equal("poison_bad: no dead letters\n", r.stdout)
      r = pupsourcing { "dead-letters", "discard", "--position", tostring(ppos), bad_file }
      assert.equal(0, r.code, r.output)
      assert.equal("poison_bad: 1 dead letter(s) discarded\n", r.stdout)
      assert.equal(0, #dead_letters())
      assert_seen(head, ppos)
      r = pupsourcing { "dead-letters", "list", "--position", "x", bad_file }
      assert.equal(2, r.code)
      assert.is_truthy(r.stderr:find('--position must be a positive integer, got "x"', 1, true), r.stderr)
      r = pupsourcing { "dead-letters", "requeue", bad_file }
      assert.equal(2, r.code)
      assert.equal("pupsourcing: dead-letters: argument 'action' must be one of 'list', 'retry', 'discard'"
        .. " (see pupsourcing dead-letters --help)\n", r.stderr)
    end)

    it("reset clears the projection's dead letters", function()
      local r = pupsourcing { "reset", bad_file }
      assert.equal(0, r.code, r.output)
      assert.equal(0, #dead_letters())
    end)
  end)
end)
