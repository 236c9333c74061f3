-- Issue 12: one live layout per projection. A NON-idempotent counter (M.group in
-- spec/helpers.lua) goes through static 4 -> 2 -> 1 -> a group of 16 -> 3 workers with
-- writers appending all along: every event is counted exactly once (the new layout
-- honours the old one's checkpoints event by event). A second layout started while the
-- first is live is refused, names the live processors and changes nothing.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local function assert_exact(g)
  local ok, why = g:exact()
  assert(ok, why)
end

-- The registry row and every checkpoint row of the counter, as one comparable text.
local function snapshot(g)
  local out = {}
  for _, r in ipairs(g:q(('SELECT mode, total_partitions, previous_total, generation FROM "%s" WHERE projection_name = $1')
    :format(g.groups_table), "grp_counter")) do
    out[#out + 1] = ("layout %s %d prev %s gen %d"):format(r.mode, r.total_partitions, tostring(r.previous_total), r.generation)
  end
  for _, r in ipairs(g:q(('SELECT total_partitions AS t, partition_key AS k, last_global_position AS p FROM "%s"'
    .. ' WHERE projection_name = $1 ORDER BY 1, 2'):format(g.names.checkpoints_table), "grp_counter")) do
    out[#out + 1] = ("%d/%d@%d"):format(r.k, r.t, r.p)
  end
  return table.concat(out, " ")
end

local function totals_left(g)
  local t = {}
  for _, r in ipairs(g:q(('SELECT DISTINCT total_partitions AS t FROM "%s" WHERE projection_name = $1 ORDER BY 1')
    :format(g.names.checkpoints_table), "grp_counter")) do
    t[#t + 1] = r.t
  end
  return t
end

describe("one live layout per projection", function()
  local g
  after_each(function()
    if g then g:close() end
    g = nil
  end)

  it("4 -> 2 -> 1 -> group of 16 -> 3 workers with writers appending: the counter is exact", function()
    g = H.group("lay_chg", { partitions = 16, ttl = 2000, batch_size = 7 })
    g:append("a", 8, 25)
    -- two writers append between and during every step
    g:writer("w", 6, 120, 2, 0.03)
    g:writer("v", 3, 120, 3, 0.05)
    local function once(args)
      local all = { "run", "--once", "--poll-interval", "100" }
      for _, a in ipairs(args) do all[#all + 1] = a end
      all[#all + 1] = g.file
      local r = g:cli(all)
      assert.equal(0, r.code, r.output)
      assert.is_nil(r.stderr:find("error", 1, true), r.stderr)
      return r
    end
    once { "--workers", "4" }
    assert.equal("static", g:one(('SELECT mode FROM "%s"'):format(g.groups_table)).mode)
    once { "--workers", "2" }
    once {} -- partition 0 of 1
    -- a group of 16: runs until its partitions pass the head seen now, then stops cleanly
    local target = g:head()
    local w = g:worker()
    H.wait_until(function() return "the group to pass " .. target .. ": " .. g:describe() .. "\n  " .. g:procs_text() end,
      60, function()
        local t = g:total()
        if t ~= 16 then return false end
        local r = g:one(('SELECT count(*) AS n, min(last_global_position) AS lo FROM "%s" WHERE projection_name = $1'
          .. ' AND total_partitions = 16'):format(g.names.checkpoints_table), "grp_counter")
        return r.n == 16 and r.lo >= target
      end, 0.1)
    H.signal(w, "TERM")
    assert.equal(0, H.wait_exit(w, 15), g:procs_text())
    once { "--workers", "3" }
    g:finish_writers(60)
    once { "--workers", "3" } -- the rest
    assert_exact(g)
    -- the old layouts' rows are gone, the registry says static 3, settled
    assert.same({ 3 }, totals_left(g))
    local l = g:one(('SELECT mode, total_partitions, previous_total FROM "%s" WHERE projection_name = $1')
      :format(g.groups_table), "grp_counter")
    assert.same({ mode = "static", total_partitions = 3, previous_total = pup.null }, l)
    -- status shows the live layout
    local st = g:cli { "status" }
    assert.equal(0, st.code, st.output)
    for k = 0, 2 do
      assert.is_truthy(st.stdout:find("\ngrp_counter%s+" .. k .. "/3%s+%d+%s+%d+%s+0%s+static%s+%d"), st.stdout)
    end
    local js = g:cli { "status", "--json" }
    local rows = pup.json.decode(js.stdout)
    assert.equal(3, #rows)
    for _, r in ipairs(rows) do
      assert.equal("static 3", r.layout)
      assert.is_true(r.live_layout)
    end
  end)

  it("a second layout while the first is live is refused, names the live processors and changes nothing", function()
    g = H.group("lay_ref", { partitions = 16, ttl = 2000 })
    g:append("a", 6, 10)
    local first = H.spawn(g:args { H.bin, "run", "--workers", "2", "--poll-interval", "100", g.file })
    g.procs[#g.procs + 1] = first
    H.wait_until(function() return "the first layout to catch up: " .. g:procs_text() end, 30, function()
      return g:one(("SELECT COALESCE(sum(n), 0)::bigint AS n FROM %s"):format(g.counter)).n == 60
    end, 0.05)
    local before = snapshot(g)
    -- static 3, static 0 of 1, and a group: each refused, naming both live partitions
    for _, args in ipairs { { "run", "--workers", "3", "--once" }, { "run", "--once" },
                            { "run", "--partition-key", "1", "--total-partitions", "4" } } do
      args[#args + 1] = g.file
      local r = g:cli(args)
      assert.equal(1, r.code, r.output)
      assert.is_truthy(r.stderr:find("its live layout is static 2, run by partition 0/2 %(backend pid %d+%), partition 1/2 %(backend pid %d+%)"), r.stderr)
    end
    local grp = H.spawn(g:args { H.bin, "run", "--group", "--partitions", "16", "--lease-ttl", "2000", g.file })
    g.procs[#g.procs + 1] = grp
    assert.equal(1, H.wait_exit(grp, 20))
    assert.is_truthy(H.stderr_of(grp):find("cannot run as group 16: its live layout is static 2, run by partition 0/2", 1, true),
      H.stderr_of(grp))
    -- the Lua API: nil, err with code layout_conflict
    local db2 = H.connect(g.url)
    local p = pup.processor(db2, pup.load_projection(g.file), { store = g.store, partition_key = 0, total_partitions = 5 })
    local n, err = p:run_once()
    assert.is_nil(n)
    assert.equal("layout_conflict", err.code)
    assert.is_truthy(err.message:find("partition 1/2", 1, true), err.message)
    p:close()
    -- `repartition` is one way to make it a group: refused too while static 2 lives
    local rp = g:cli { "repartition", g.file, "8" }
    assert.equal(2, rp.code, rp.output)
    assert.is_truthy(rp.stderr:find("live layout is static 2", 1, true), rp.stderr)
    assert.equal(before, snapshot(g))
    -- the first layout still runs and counts exactly
    g:append("b", 3, 5)
    H.wait_until("the first layout to handle the new events", 30, function()
      return g:one(("SELECT COALESCE(sum(n), 0)::bigint AS n FROM %s"):format(g.counter)).n == 75
    end, 0.05)
    assert.is_nil(H.exit_code(first))
    assert_exact(g)
    -- once it has stopped, a Lua processor of static 1 takes over
    H.signal(first, "TERM")
    assert.equal(0, H.wait_exit(first, 15))
    n, err = pup.processor(db2, pup.load_projection(g.file), { store = g.store, partition_key = 0, total_partitions = 1 })
      :run_once()
    assert(n, err)
    db2:close()
    assert.equal("static", g:one(('SELECT mode FROM "%s"'):format(g.groups_table)).mode)
    assert_exact(g)
  end)

  it("a change settles only when every new partition has passed: status shows superseded rows until then", function()
    g = H.group("lay_set", { partitions = 16 })
    g:append("a", 6, 10)
    local function run(args)
      local all = { "run", "--once" }
      for _, x in ipairs(args) do all[#all + 1] = x end
      all[#all + 1] = g.file
      return g:cli(all)
    end
    -- partition 0 of 4 only: its row is ahead of the other three
    assert.equal(0, run({ "--partition-key", "0", "--total-partitions", "4" }).code)
    g:append("b", 6, 5)
    -- only partition 0 of 2 runs: the rows of 4 stay, marked superseded
    local r = run { "--partition-key", "0", "--total-partitions", "2" }
    assert.equal(0, r.code, r.output)
    assert.same({ 2, 4 }, totals_left(g))
    local st = g:cli { "status" }
    assert.is_truthy(st.stdout:find("\ngrp_counter%s+3/4%s+%d+%s+%d+%s+%d+%s+superseded%s"), st.stdout)
    assert.is_truthy(st.stdout:find("\ngrp_counter%s+1/2%s+%d+%s+%d+%s+%d+%s+static%s"), st.stdout)
    -- another change now would need two old layouts: refused until this one settles
    r = run { "--workers", "3" }
    assert.equal(1, r.code, r.output)
    assert.is_truthy(r.stderr:find("its change from 4 to 2 partitions (static) has not settled yet", 1, true), r.stderr)
    r = run { "--partition-key", "1", "--total-partitions", "2" }
    assert.equal(0, r.code, r.output)
    assert.same({ 2 }, totals_left(g))
    assert_exact(g)
    assert.equal(0, run({ "--workers", "3" }).code)
    assert_exact(g)
  end)

  it("checkpoints written before the registry existed are honoured (upgrade)", function()
    g = H.group("lay_old", { partitions = 16 })
    g:append("a", 6, 10)
    assert.equal(0, g:cli({ "run", "--once", "--workers", "4", g.file }).code)
    -- as a database from before the registry: checkpoint rows, no registry row
    assert(g.db:exec(('DELETE FROM "%s"'):format(g.groups_table)))
    g:append("b", 6, 5)
    local r = g:cli { "run", "--once", "--workers", "2", g.file }
    assert.equal(0, r.code, r.output)
    assert_exact(g)
    assert.same({ 2 }, totals_left(g))
    -- and `repartition` of such a database honours them too
    assert(g.db:exec(('DELETE FROM "%s"'):format(g.groups_table)))
    g:append("c", 6, 5)
    r = g:cli { "repartition", g.file, "3" }
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stdout:find("2 -> 3 partitions", 1, true), r.stdout)
    assert.same({ mode = "group", total_partitions = 3, previous_total = 2, previous_mode = "static" },
      g:one(('SELECT mode, total_partitions, previous_total, previous_mode FROM "%s"'):format(g.groups_table)))
    r = g:cli { "run", "--once", "--workers", "3", g.file }
    assert.equal(0, r.code, r.output)
    assert_exact(g)
    assert.same({ 3 }, totals_left(g))
  end)

  it("two layouts started at the same moment: exactly one runs, the other is refused", function()
    g = H.group("lay_race", { partitions = 4 })
    g:append("a", 6, 20)
    local w = g:writer("w", 4, 60, 2, 0.02)
    local pairs_ = { { { "--workers", "3" }, { "--workers", "2" } },
                     { { "--workers", "2" }, { "--group", "--partitions", "4", "--lease-ttl", "2000" } },
                     { { "--group", "--partitions", "4", "--lease-ttl", "2000" }, { "--workers", "4" } } }
    for round, pair in ipairs(pairs_) do
      local procs = {}
      for i, flags in ipairs(pair) do
        local words = { H.bin, "run", "--poll-interval", "100" }
        for _, f in ipairs(flags) do words[#words + 1] = f end
        words[#words + 1] = g.file
        procs[i] = H.spawn(g:args(words))
        g.procs[#g.procs + 1] = procs[i]
      end
      -- the loser exits 1 naming the winner's processors; the winner keeps running
      local loser = H.wait_until(function() return "one of round " .. round .. " to be refused: " .. g:procs_text(procs) end,
        30, function()
          for i, p in ipairs(procs) do if H.exit_code(p) then return i end end
        end, 0.05)
      local winner = procs[3 - loser]
      assert.equal(1, H.exit_code(procs[loser]), g:procs_text(procs))
      assert.is_truthy(H.stderr_of(procs[loser]):find("its live layout is", 1, true), H.stderr_of(procs[loser]))
      pup.sleep(0.3)
      assert.is_nil(H.exit_code(winner), g:procs_text(procs))
      H.signal(winner, "TERM")
      assert.equal(0, H.wait_exit(winner, 15), g:procs_text(procs))
    end
    g:finish_writers(60)
    assert.equal(0, H.wait_exit(w, 30))
    assert.equal(0, g:cli({ "run", "--once", "--workers", "2", g.file }).code)
    assert_exact(g)
  end)
end)
