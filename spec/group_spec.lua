-- Issue 7: worker groups (`pupsourcing run --group`): leases, fair shares, takeover after
-- SIGTERM / SIGKILL / SIGSTOP, the lease fence, repartition mid-stream. Every case ends
-- with an exact read model of a NON-idempotent counter (see M.group in spec/helpers.lua).
--
-- The cases are independent (own tables t_grp_<case>_*). PUP_GROUP_CASES=a,b runs only
-- those (spec/group.cmake runs the long ones as ctest tests of their own); unset = all.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local CASES = os.getenv("PUP_GROUP_CASES")
local function case(name, title, fn)
  if CASES and CASES ~= "" and not ("," .. CASES .. ","):find("," .. name .. ",", 1, true) then return end
  it("[" .. name .. "] " .. title, fn)
end

-- Who waits on a lock, for failure messages.
local function lock_waits(g)
  local out = {}
  for _, r in ipairs(g:q("SELECT application_name AS a, wait_event_type AS t, wait_event AS e, state AS s, left(query, 60) AS q"
    .. " FROM pg_stat_activity WHERE application_name LIKE 'grp-%' ORDER BY application_name")) do
    out[#out + 1] = ("%s %s/%s %s %q"):format(r.a, tostring(r.t), tostring(r.e), tostring(r.s), tostring(r.q))
  end
  return table.concat(out, "; ")
end

-- SIGSTOPs a worker inside a transaction that wrote to the read model and is not
-- committing (retrying with SIGCONT until it is caught in one); returns that transaction's xid.
local function freeze_in_tx(g, proc)
  H.wait_until("worker " .. proc.pid .. " to be handling events", 10, function() return g:open_xid(proc) ~= nil end, 0.005)
  for _ = 1, 100 do
    H.signal(proc, "STOP")
    pup.sleep(0.05)
    local xid = g:halted_xid(proc)
    if xid then return xid end
    H.signal(proc, "CONT")
    pup.sleep(0.01 + math.random() * 0.05)
  end
  error("could not freeze worker " .. proc.pid .. " inside a transaction")
end

local function assert_exact(g)
  local ok, why = g:exact()
  assert(ok, why)
end

-- Stops every worker with SIGTERM (each must exit 0 within 10 s).
local function stop_all(workers)
  for _, w in ipairs(workers) do H.signal(w, "TERM") end
  for _, w in ipairs(workers) do
    local rc = H.wait_exit(w, 10)
    assert.equal(0, rc, "worker " .. w.pid .. " exit code (nil = still running):\n" .. H.stderr_of(w))
  end
end

describe("worker groups", function()
  local g

  after_each(function()
    if g then g:close() end
    g = nil
  end)

  case("scale", "1 -> 4 -> 2 -> 5 workers over a 50,000-event run with writers: SIGTERM, SIGKILL, SIGSTOP/SIGCONT, fair shares, exact", function()
    local TTL = 2000
    g = H.group("grp_scale", { ttl = TTL, partitions = 8, batch_size = 100 })
    g:append("s-", 200, 50) -- 10,000 events before the first worker
    -- two writers, 20,000 events each, paced until the end of the membership changes
    g:writer("wa-", 100, 200, 50, 0.06)
    g:writer("wb-", 100, 200, 50, 0.06)
    local ENV = { env = { FX_SLEEP = "0.0003" } }
    local function alive(...) return { ... } end

    -- 1 worker: everything
    local w1 = g:worker(ENV)
    g:wait_settled(alive(w1), 10, "one worker to lease all 8 partitions")
    H.wait_until("the first worker to make progress", 10, function() return g:leases().pos[0] > 0 end)

    -- 4 workers: 2 partitions each, within seconds
    local w2, w3, w4 = g:worker(ENV), g:worker(ENV), g:worker(ENV)
    g:wait_settled(alive(w1, w2, w3, w4), 10, "four workers to share 8 partitions")
    assert.is_true(g:leases().pos[0] < g:head(), "mid-stream")

    -- 2 workers: SIGTERM w2 (handed over at once), SIGKILL w3 (after the lease TTL)
    local l = g:leases()
    local p2 = l.by[w2.pid]
    local t0 = pup.now()
    H.signal(w2, "TERM")
    H.wait_until(function() return "w2's partitions to be taken over after SIGTERM: " .. g:describe() end, 10, function()
      local ll = g:leases()
      for _, k in ipairs(p2) do
        if not ll.owner[k] or ll.owner[k] == w2.pid then return false end
      end
      return true
    end, 0.02)
    local term_dt = pup.now() - t0
    assert.equal(0, H.wait_exit(w2, 10), H.stderr_of(w2))
    assert.is_true(term_dt < TTL / 1000 * 0.75,
      ("SIGTERM handover took %.2f s, not well below the lease TTL of %d ms"):format(term_dt, TTL))

    g:wait_settled(alive(w1, w3, w4), 10, "three workers to share 8 partitions")
    local p3 = g:leases().by[w3.pid]
    local t1 = pup.now()
    H.signal(w3, "KILL")
    assert.equal(128 + 9, H.wait_exit(w3, 5))
    local kill_dt
    H.wait_until(function() return "w3's partitions to be taken over after SIGKILL: " .. g:describe() end, TTL / 1000 + 5, function()
      local ll = g:leases()
      for _, k in ipairs(p3) do
        if not ll.owner[k] then return false end
        if ll.owner[k] == w3.pid then
          assert.is_true(pup.now() - t1 < TTL / 1000 + 0.5, "a killed worker's lease outlived its TTL")
          return false
        end
      end
      kill_dt = pup.now() - t1
      return true
    end, 0.02)
    -- its lease was renewed at most TTL/5 before the kill
    assert.is_true(kill_dt > TTL / 1000 * 0.3, -- renewed up to TTL/5 plus a batch before; never taken before expiry
      ("a killed worker's partitions were taken after %.2f s, before its lease (TTL %d ms) expired"):format(kill_dt, TTL))
    g:wait_settled(alive(w1, w4), TTL / 1000 + 5, "two workers to hold 4 partitions each")

    -- 5 workers
    local w5, w6, w7 = g:worker(ENV), g:worker(ENV), g:worker(ENV)
    g:wait_settled(alive(w1, w4, w5, w6, w7), 10, "five workers to share 8 partitions")
    assert.is_true(g:head() < 50000, "the writers are still writing")

    -- SIGSTOP w1: after the TTL the others hold its partitions and move them on. A
    -- failure here is recorded and the case goes on (SIGCONT, exact read model).
    local problems = {}
    local function soft(fn)
      local ok, err = pcall(fn)
      if not ok then problems[#problems + 1] = tostring(err) end
    end
    local t2 = pup.now()
    local xid = freeze_in_tx(g, w1) -- the worst moment: inside a batch, holding row locks
    l = g:leases()
    local p1, before = l.by[w1.pid], {}
    for _, k in ipairs(p1) do before[k] = l.pos[k] end
    soft(function()
      H.wait_until(function() return "the frozen worker's partitions to be taken over and to advance: "
        .. g:describe() .. "; " .. lock_waits(g) end, TTL / 1000 + 8, function()
        local ll = g:leases()
        for _, k in ipairs(p1) do
          if not ll.owner[k] or ll.owner[k] == w1.pid or ll.pos[k] <= before[k] then return false end
        end
        return true
      end, 0.05)
      assert(pup.now() - t2 > TTL / 1000 * 0.3, "a frozen worker lost its partitions before its lease expired") -- leases are renewed TTL/5 apart between batches; never taken before expiry
    end)
    soft(function()
      g:wait_settled(alive(w4, w5, w6, w7), 6, "four workers to share 8 partitions while w1 is frozen")
      H.wait_until(function() return "the group to move on while w1 is frozen: " .. g:describe() .. "; " .. lock_waits(g) end,
        8, function()
          local ll = g:leases()
          for k = 0, 7 do if ll.pos[k] < g:head() then return false end end
          return true
        end, 0.1)
    end)

    -- SIGCONT: it comes back as the fifth worker
    H.signal(w1, "CONT")
    g:wait_settled(alive(w1, w4, w5, w6, w7), 10, "five workers again after SIGCONT")

    -- the rest of the stream, then an exact read model
    g:finish_writers(30)
    assert.equal(50000, g:head())
    H.wait_until(function() return "the group to catch up: " .. g:describe() end, 30, function() return g:caught_up() end, 0.1)
    g:wait_settled(alive(w1, w4, w5, w6, w7), 5)
    stop_all { w1, w4, w5, w6, w7 }
    assert.equal(0, g:rows_of_xid(xid), "the frozen worker's transaction " .. xid .. " committed after it lost its lease")
    assert_exact(g)
    assert.same({}, problems)
    -- every worker handled events
    for _, w in ipairs { w1, w2, w3, w4, w5, w6, w7 } do
      assert.is_true(g:one(("SELECT count(*) AS n FROM %s WHERE pid = $1"):format(g.seen), w.pid).n > 0,
        "worker " .. w.pid .. " handled nothing")
    end
    -- the group forgot the stopped workers; no lease is left
    assert.equal(0, g:one(('SELECT count(*) AS n FROM "%s"'):format(g.workers_table)).n)
    assert.equal(0, g:one(('SELECT count(*) AS n FROM "%s" WHERE owner IS NOT NULL'):format(g.names.checkpoints_table)).n)
  end)

  case("handover", "SIGTERM hands the partitions over at once, well below the lease TTL", function()
    local TTL = 6000
    g = H.group("grp_handover", { ttl = TTL, partitions = 4 })
    g:append("s-", 40, 50)
    g:writer("w-", 20, 100, 20, 0.02)
    local a, b = g:worker(), g:worker()
    g:wait_settled({ a, b }, 10)
    local pa = g:leases().by[a.pid]
    local t0 = pup.now()
    H.signal(a, "TERM")
    H.wait_until(function() return "b to hold a's partitions: " .. g:describe() end, 10, function()
      local l = g:leases()
      for _, k in ipairs(pa) do if l.owner[k] ~= b.pid then return false end end
      return true
    end, 0.02)
    local dt = pup.now() - t0
    assert.equal(0, H.wait_exit(a, 10), H.stderr_of(a))
    assert.is_true(dt < TTL / 1000 / 2, ("SIGTERM handover took %.2f s (lease TTL %d ms)"):format(dt, TTL))
    -- a released its row in the group at once as well
    assert.equal(0, g:one(('SELECT count(*) AS n FROM "%s" WHERE worker_id LIKE $1'):format(g.workers_table),
      "%/" .. a.pid .. "/%").n)
    g:finish_writers(30)
    H.wait_until(function() return "b to catch up: " .. g:describe() end, 30, function() return g:caught_up() end, 0.1)
    stop_all { b }
    assert_exact(g)
  end)

  case("fence", "a frozen worker resumed after losing its lease never commits for those partitions", function()
    local TTL = 2000
    g = H.group("grp_fence", { ttl = TTL, partitions = 4, batch_size = 50 })
    g:append("s-", 80, 50)
    g:writer("w-", 40, 100, 10, 0.02)
    -- slow handlers: a batch takes about 0.1 s, so a worker is nearly always inside one
    local ENV = { env = { FX_SLEEP = "0.002" } }
    local a, b = g:worker(ENV), g:worker(ENV)
    g:wait_settled({ a, b }, 10)
    -- freeze a inside a transaction that wrote to the read model
    local xid = freeze_in_tx(g, a)
    local l = g:leases()
    local pa, before = l.by[a.pid], {}
    for _, k in ipairs(pa) do before[k] = l.pos[k] end
    local frozen_at = pup.now()

    -- the lease expires and b takes over; the partitions move on while a is frozen
    local problems = {}
    local ok, err = pcall(H.wait_until, function() return "b to take over a's partitions and move them on while a is frozen: "
      .. g:describe() .. "; " .. lock_waits(g) end, TTL / 1000 + 8, function()
      local ll = g:leases()
      for _, k in ipairs(pa) do
        if ll.owner[k] ~= b.pid or ll.pos[k] <= before[k] then return false end
      end
      return true
    end, 0.05)
    if not ok then problems[#problems + 1] = tostring(err) end
    assert.is_true(pup.now() - frozen_at > TTL / 1000 * 0.3, "the frozen worker lost its lease before the TTL") -- leases are renewed TTL/5 apart between batches; never taken before expiry

    -- resumed: its open transaction must not commit, it rejoins with a fair share. (b ends
    -- a's session when it takes over, a's heartbeat having stopped, so here that termination
    -- stops a; spec/fence_spec.lua shows the lease fence of the checkpoint write itself,
    -- with the old worker's session alive.)
    H.signal(a, "CONT")
    g:wait_settled({ a, b }, 15, "a to rejoin after SIGCONT")
    g:finish_writers(30)
    H.wait_until(function() return "the group to catch up: " .. g:describe() end, 40, function() return g:caught_up() end, 0.1)
    stop_all { a, b }
    assert.equal(0, g:rows_of_xid(xid), "the frozen worker's transaction " .. xid .. " committed after it lost its lease")
    assert_exact(g)
    assert.same({}, problems)
  end)

  case("resize", "repartition 4 -> 7 mid-stream: nothing skipped or applied twice", function()
    g = H.group("grp_resize", { ttl = 2000, partitions = 4, batch_size = 50 })
    g:append("s-", 200, 50) -- 10,000
    g:writer("w-", 100, 100, 25, 0.02) -- 10,000 more
    local ENV = { env = { FX_SLEEP = "0.0005" } }
    local ws = { g:worker(ENV), g:worker(ENV), g:worker(ENV) }
    g:wait_settled(ws, 10)
    assert.equal(4, g:total())
    H.wait_until(function() return "the group to pass position 3000: " .. g:describe() end, 30, function()
      local l = g:leases()
      for k = 0, 3 do if (l.pos[k] or 0) < 3000 then return false end end
      return true
    end, 0.05)
    local l = g:leases()
    local lo, hi = math.huge, 0
    for k = 0, 3 do lo, hi = math.min(lo, l.pos[k]), math.max(hi, l.pos[k]) end
    assert.is_true(hi < g:head(), "mid-stream")

    local r = g:cli { "repartition", g.file, "7" }
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stdout:find("4 -> 7", 1, true), r.stdout)
    local t, prev = g:total()
    assert.same({ 7, 4 }, { t, prev })
    -- a second change is refused while the first one settles
    r = g:cli { "repartition", g.file, "5" }
    if g:total() == 7 and select(2, g:total()) then
      assert.are_not.equal(0, r.code, r.output)
      assert.is_truthy(r.stderr:find("still settling", 1, true), r.stderr)
    end

    g:wait_settled(ws, 15, "three workers to share the 7 new partitions")
    H.wait_until(function() return "the repartition to settle: " .. g:describe() end, 30, function()
      return select(2, g:total()) == nil
    end, 0.05)
    g:finish_writers(30)
    assert.equal(20000, g:head())
    H.wait_until(function() return "the group to catch up: " .. g:describe() end, 40, function() return g:caught_up() end, 0.1)
    stop_all(ws)
    assert_exact(g)
    local rows = g:q(('SELECT total_partitions AS t, last_global_position AS p FROM "%s" WHERE projection_name = $1 ORDER BY partition_key')
      :format(g.names.checkpoints_table), "grp_counter")
    assert.equal(7, #rows)
    for _, row in ipairs(rows) do assert.same({ t = 7, p = 20000 }, row) end
    -- status shows the group's checkpoints of the new count
    r = g:cli { "status" }
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stdout:find("6/7", 1, true), r.stdout)
  end)
end)
