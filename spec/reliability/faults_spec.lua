-- Issue 5, faults: SIGKILL of a processor at random moments of a catch-up, lost
-- connections mid-batch, and a standby taking over a SIGKILLed worker's partition.
local pup = require "pupsourcing"
local H = require "spec.helpers"
local R = require "spec.reliability.common"

-- A NON-idempotent counter plus a log of handled positions (H.COUNTER_TEMPLATE).
local COUNTER = H.COUNTER_TEMPLATE

describe("reliability: faults", function()
  local store, db, T, tmp
  local CNT, SEEN = "t_rel_faults_cnt", "t_rel_faults_seen"

  before_each(function() store, db, T, tmp = H.fresh_area("rel_faults", { CNT, SEEN }) end)

  after_each(function()
    R.cleanup()
    H.close_area(db, tmp)
  end)

  local function counter_file(name)
    return R.template(tmp, name .. ".lua", COUNTER, { NAME = name, CNT = CNT, SEEN = SEEN })
  end

  local function run_args(extra, file)
    local args = { "run" }
    for _, x in ipairs(extra or {}) do args[#args + 1] = x end
    for _, x in ipairs(R.table_flags(T)) do args[#args + 1] = x end
    args[#args + 1] = file
    return R.pup_argv(args)
  end

  local function table_exists(name)
    return R.one(db, "SELECT to_regclass($1)::text AS t", name).t ~= pup.null
  end

  -- Single partition, everything in scope: the committed read model matches the checkpoint.
  local function assert_matches_checkpoint(name)
    local cp = R.checkpoint(db, T, name)
    if not table_exists(CNT) then
      assert.equal(0, cp)
      return cp
    end
    local c = R.one(db, ("SELECT COALESCE(sum(n), 0)::bigint AS total FROM %s"):format(CNT))
    local s = R.one(db, ("SELECT count(*) AS n, count(DISTINCT pos) AS d, COALESCE(max(pos), 0) AS hi FROM %s"):format(SEEN))
    assert.same({ total = cp, n = cp, d = cp, hi = cp }, { total = c.total, n = s.n, d = s.d, hi = s.hi })
    return cp
  end

  -- Every aggregate counted exactly as often as it has events; each position once.
  local function assert_exact(where)
    local wrong = R.one(db, ([[SELECT count(*) AS n FROM (SELECT aggregate_id AS agg, count(*) AS n FROM "%s"
        %s GROUP BY aggregate_id) e FULL JOIN %s c USING (agg) WHERE e.n IS DISTINCT FROM c.n]]):format(
        T.events_table, where or "", CNT)).n
    assert.equal(0, wrong, "aggregates with a wrong count")
    local s = R.one(db, ("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM %s"):format(SEEN))
    assert.equal(s.n, s.d, "positions handled twice")
  end

  -- The counter of H.COUNTER_TEMPLATE with a gate: at global position REL_GATE, after that
  -- event's writes, the handler waits for the advisory lock (REL_GATE_KEY, REL_GATE) that
  -- the spec holds. So the batch is open, has written, and cannot commit until released.
  local GATED = [[
local pup = require "pupsourcing"
local gate, gate_key = math.tointeger(tonumber(os.getenv("REL_GATE") or "")), math.tointeger(tonumber(os.getenv("REL_GATE_KEY") or ""))
return {
  name = "%{NAME}",
  batch_size = 100,
  setup = function(tx)
    assert(tx:exec("CREATE TABLE IF NOT EXISTS %{CNT} (agg text PRIMARY KEY, n bigint NOT NULL)"))
    assert(tx:exec("CREATE TABLE IF NOT EXISTS %{SEEN} (pos bigint NOT NULL, agg text NOT NULL)"))
  end,
  handle = function(tx, e)
    assert(tx:exec("INSERT INTO %{CNT} AS c (agg, n) VALUES ($1, 1) ON CONFLICT (agg) DO UPDATE SET n = c.n + 1",
      e.aggregate_id))
    assert(tx:exec("INSERT INTO %{SEEN} (pos, agg) VALUES ($1, $2)", e.global_position, e.aggregate_id))
    if e.global_position == gate then assert(tx:query("SELECT pg_advisory_xact_lock($1::int, $2::int)", gate_key, gate)) end
  end,
}
]]

  it("SIGKILL mid-batch at 10 random positions of a 50,000-event catch-up, each after progress: exact counts", function()
    local t0 = pup.now()
    local head = R.populate(store, db, 50000, 250, 200)
    assert.equal(50000, head)
    local file = R.template(tmp, "rel_kill.lua", GATED, { NAME = "rel_kill", CNT = CNT, SEEN = SEEN })
    local gate_key = math.random(1, 1 << 30)
    -- one gate in each tenth of 1..45,000, at least 300 positions into it: every restart has
    -- whole batches to commit before it reaches the next gate
    local gates = {}
    for i = 1, 10 do gates[i] = math.random((i - 1) * 4500 + 301, i * 4500) end
    local kills, cps, restart_cp = 0, {}, 0
    for i, gate in ipairs(gates) do
      assert.is_true(R.one(db, "SELECT pg_try_advisory_lock($1::int, $2::int) AS ok", gate_key, gate).ok)
      local p = R.spawn(run_args({ "--batch-size", "100" }, file), { REL_GATE = tostring(gate), REL_GATE_KEY = tostring(gate_key) })
      -- the run's backend waits at the gate inside its batch, which has written (it has an xid)
      local blocked = R.wait_until(function() return "the run to reach position " .. gate .. "; stderr:\n" .. p:stderr() end, 60, function()
        assert.is_nil(p:code(), "the processor exited early: " .. p:stderr())
        local rows = assert(db:query([[SELECT a.pid, a.backend_xid::text AS xid FROM pg_locks l JOIN pg_stat_activity a USING (pid)
            WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objsubid = 2 AND l.classid = $1::int::oid AND l.objid = $2::int::oid]],
          gate_key, gate))
        return rows[1]
      end, 0.01)
      assert.is_string(blocked.xid, "the gated batch has written nothing")
      local cp_at_kill = R.checkpoint(db, T, "rel_kill")
      assert.is_true(cp_at_kill > restart_cp, ("kill %d: no batch committed since the restart (checkpoint %d)"):format(i, cp_at_kill))
      assert.is_true(cp_at_kill < gate and gate - cp_at_kill <= 100, ("kill %d: checkpoint %d, gate %d"):format(i, cp_at_kill, gate))
      p:kill("KILL")
      assert.equal(128 + 9, p:wait(5), "not killed by SIGKILL: " .. p:stderr())
      kills = kills + 1
      -- release the gate: the orphaned backend finds its client gone and rolls the batch back
      assert.is_true(R.one(db, "SELECT pg_advisory_unlock($1::int, $2::int) AS ok", gate_key, gate).ok)
      R.wait_until("the killed run's backend to end", 30, function()
        return R.one(db, "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", blocked.pid).n == 0
      end)
      -- the open batch was rolled back, not committed (its xid, widened with the current epoch)
      assert.equal("aborted", R.one(db, [[SELECT pg_xact_status(((pg_current_xact_id()::text::bigint >> 32 << 32)
          | $1::bigint)::text::xid8) AS s]], blocked.xid).s)
      assert.equal(cp_at_kill, assert_matches_checkpoint("rel_kill"))
      cps[#cps + 1] = cp_at_kill
      restart_cp = cp_at_kill
    end
    local p = R.spawn(run_args({ "--once", "--batch-size", "100" }, file))
    assert.equal(0, p:wait(120), p:stderr())
    assert.equal(head, R.checkpoint(db, T, "rel_kill"))
    assert_exact()
    assert.equal(50000, R.one(db, ("SELECT sum(n)::bigint AS n FROM %s"):format(CNT)).n)
    R.report("faults: %d SIGKILLs of `run` mid-batch during a 50000-event catch-up (checkpoints at the kills: %s),"
      .. " each after a commit since its restart, each open batch aborted; read model = checkpoint after every kill;"
      .. " final counts exact (50000 over 250 aggregates), %.1f s", kills, table.concat(cps, " "), pup.now() - t0)
  end)

  it("connections killed mid-batch (pg_terminate_backend, 5 times): no partial batch, reconnects, exact", function()
    local head = R.populate(store, db, 3000, 30, 100)
    local file = counter_file("rel_term")
    local p = R.spawn(run_args({ "--batch-size", "100", "--poll-interval", "100" }, file), { REL_SLEEP = "0.001" })
    local key = "pupsourcing/" .. T.checkpoints_table .. "/rel_term/0/1"
    local terminated = 0
    R.wait_until("setup and a first batch", 30, function() return R.checkpoint(db, T, "rel_term") > 0 end)
    for i = 1, 5 do
      -- the backend holding the partition, while it is inside a batch (handler running)
      local victim = R.wait_until("the run's backend to be mid-batch (" .. i .. ")", 30, function()
        assert.is_nil(p:code(), p:stderr())
        local rows = assert(db:query([[SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)
              AND a.xact_start IS NOT NULL]], key))
        return rows[1] and rows[1].pid
      end, 0.005)
      assert.is_true(R.one(db, "SELECT pg_terminate_backend($1) AS ok", victim).ok, "backend " .. victim .. " not terminated")
      terminated = terminated + 1
      assert_matches_checkpoint("rel_term")
      R.wait_until(function() return "the run to reconnect (" .. i .. "); stderr:\n" .. p:stderr() end, 30, function()
        local _, n = p:stderr():gsub("reconnected", "")
        return n >= i
      end, 0.05)
    end
    R.wait_until("the catch-up", 60, function()
      assert.is_nil(p:code(), p:stderr())
      return R.checkpoint(db, T, "rel_term") == head
    end, 0.05)
    p:kill("TERM")
    assert.equal(0, p:wait(10), p:stderr())
    assert_matches_checkpoint("rel_term")
    assert_exact()
    R.report("faults: %d backends of a running `run` terminated mid-batch; each time read model = checkpoint,"
      .. " reconnected, final counts exact (%d events)", terminated, head)
  end)

  it("a connection killed during setup is retried like any lost connection", function()
    local head = R.populate(store, db, 500, 5, 100)
    local file = counter_file("rel_setup")
    local p = R.spawn(run_args({ "--poll-interval", "100" }, file), { REL_SETUP_SLEEP = "1" })
    local key = "pupsourcing/" .. T.checkpoints_table .. "/rel_setup/0/1"
    local victim = R.wait_until("the run's backend to be in setup", 30, function()
      assert.is_nil(p:code(), p:stderr())
      local rows = assert(db:query([[SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)
          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
            AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)
            AND a.query LIKE '%rel_setup_sleep%' AND a.state = 'active']], key))
      return rows[1] and rows[1].pid
    end, 0.01)
    assert.is_true(R.one(db, "SELECT pg_terminate_backend($1) AS ok", victim).ok, "backend " .. victim .. " not terminated")
    R.wait_until(function() return "the catch-up after the lost setup connection; stderr:\n" .. p:stderr() end, 30, function()
      return p:code() ~= nil or R.checkpoint(db, T, "rel_setup") == head
    end, 0.05)
    assert.is_nil(p:code(), "run exited after a lost connection in setup (not retried):\n" .. p:stderr())
    p:kill("TERM")
    assert.equal(0, p:wait(10), p:stderr())
    assert_exact()
  end)

  it("a standby takes over the partition of a SIGKILLed worker within seconds, exact", function()
    local head = R.populate(store, db, 4000, 40, 50)
    local file = counter_file("rel_standby")
    local flags = { "--partition-key", "1", "--total-partitions", "2", "--poll-interval", "100" }
    local a = R.spawn(run_args(flags, file), { REL_SLEEP = "0.002" })
    R.wait_until("the first worker to start", 20, function() return R.checkpoint(db, T, "rel_standby", 1, 2) > 0 end)
    local b = R.spawn(run_args(flags, file), { REL_SLEEP = "0.002" })
    R.wait_until("the standby message", 10, function()
      return b:stderr():find("standby", 1, true) ~= nil
    end)
    pup.sleep(0.3)
    a:kill("KILL")
    local killed_at = pup.now()
    assert.equal(128 + 9, a:wait(5))
    local cp_at_kill = R.checkpoint(db, T, "rel_standby", 1, 2)
    assert.is_true(cp_at_kill < head, "killed after the catch-up")
    R.wait_until("the takeover", 15, function()
      assert.is_nil(b:code(), b:stderr())
      return b:stderr():find("took over", 1, true) ~= nil
    end, 0.01)
    local took = pup.now() - killed_at
    -- a standby tries the lock once a second; its holder's backend ends with the client
    assert.is_true(took < 2.0, ("the takeover took %.2f s"):format(took))
    R.wait_until("the standby to finish the catch-up", 60, function()
      return R.checkpoint(db, T, "rel_standby", 1, 2) == head
    end, 0.05)
    b:kill("TERM")
    assert.equal(0, b:wait(10), b:stderr())
    -- partition 1 of 2 only: exact counts for its aggregates, nothing of partition 0
    for _, row in ipairs(assert(db:query(("SELECT agg FROM %s"):format(CNT)))) do
      assert.equal(1, pup.partition_of(row.agg, 2), row.agg)
    end
    local expected = 0
    for _, row in ipairs(assert(db:query(('SELECT aggregate_id AS agg, count(*) AS n FROM "%s" GROUP BY 1'):format(T.events_table)))) do
      if pup.partition_of(row.agg, 2) == 1 then
        expected = expected + row.n
        assert.equal(row.n, R.one(db, ("SELECT n FROM %s WHERE agg = $1"):format(CNT), row.agg).n, row.agg)
      end
    end
    local s = R.one(db, ("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM %s"):format(SEEN))
    assert.same({ n = expected, d = expected }, s)
    R.report("faults: standby took over a SIGKILLed worker's partition 1/2 in %.2f s (killed at checkpoint %d of %d);"
      .. " %d events of the partition counted exactly once", took, cp_at_kill, head, expected)
  end)
end)
