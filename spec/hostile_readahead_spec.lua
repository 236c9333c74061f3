-- Hostile tests of the read-ahead in catch-up (src/batch.c read_ahead/take_ahead), written
-- by a session that tried to break it: make a window read ahead double-apply, skip,
-- reorder or be stale. (The same session's process-level cases, SIGKILL, server restarts
-- and terminated backends during a catch-up, held too; spec/reliability covers those.) The read model logs one
-- row per handled event with a sequence number, so handling order is checked, and a
-- non-idempotent counter per aggregate. Everything is compared to the log at the end.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local ITER = tonumber(os.getenv("HOSTILE_ITER") or "1")

describe("hostile read-ahead", function()
  local store, db, names, T, C
  local conns = H.connections()
  local connect = conns.connect

  local function projection(over)
    local p = {
      name = "hra",
      batch_size = 5,
      setup = function(tx)
        assert(tx:exec("CREATE TABLE IF NOT EXISTS " .. T .. " (seq bigserial, pos bigint NOT NULL, agg text)"))
        assert(tx:exec("CREATE TABLE IF NOT EXISTS " .. C .. " (agg text PRIMARY KEY, n bigint NOT NULL)"))
      end,
      handle = function(tx, e)
        assert(tx:exec("INSERT INTO " .. T .. " (pos, agg) VALUES ($1, $2)", e.global_position, e.aggregate_id))
        assert(tx:exec("INSERT INTO " .. C .. " (agg, n) VALUES ($1, 1) ON CONFLICT (agg) DO UPDATE SET n = "
          .. C .. ".n + 1", e.aggregate_id))
      end,
      reset = function(tx)
        assert(tx:exec("CREATE TABLE IF NOT EXISTS " .. T .. " (seq bigserial, pos bigint NOT NULL, agg text)"))
        assert(tx:exec("CREATE TABLE IF NOT EXISTS " .. C .. " (agg text PRIMARY KEY, n bigint NOT NULL)"))
        assert(tx:exec("DELETE FROM " .. T))
        assert(tx:exec("DELETE FROM " .. C))
      end,
    }
    for k, v in pairs(over or {}) do p[k] = v end
    return p
  end

  local function append(conn, id, n, etype)
    local evs = H.events(n, { aggregate_id = id, event_type = etype })
    return assert(store:append(conn, pup.any(), evs)).global_positions
  end

  -- positions of the log (optionally only event types in `types`), in order
  local function log(types)
    local rows = assert(db:query(('SELECT global_position AS p, event_type AS t FROM "%s" ORDER BY 1')
      :format(names.events_table)))
    local out = {}
    for _, r in ipairs(rows) do
      if not types or types[r.t] then out[#out + 1] = r.p end
    end
    return out
  end

  -- positions in HANDLING order (seq); raises on a duplicate
  local function model()
    local rows = assert(db:query("SELECT pos FROM " .. T .. " ORDER BY seq"))
    local out, seen = {}, {}
    for _, r in ipairs(rows) do
      assert(not seen[r.pos], ("position %d handled twice"):format(r.pos))
      seen[r.pos] = true
      out[#out + 1] = r.pos
    end
    return out
  end

  -- the counter equals the log's count per aggregate (non-idempotent)
  local function counter_exact(types_sql)
    local bad = assert(db:query(("SELECT count(*) AS n FROM (SELECT aggregate_id, count(*) AS n FROM \"%s\" %s"
      .. " GROUP BY aggregate_id) e FULL JOIN %s c ON c.agg = e.aggregate_id WHERE c.n IS DISTINCT FROM e.n")
      :format(names.events_table, types_sql or "", C)))[1].n
    assert.equal(0, bad)
  end

  local function head()
    return assert(db:query(('SELECT COALESCE(max(global_position), 0)::bigint AS h FROM "%s"')
      :format(names.events_table)))[1].h
  end

  -- Runs batches until the processor's position is the head and two batches in a row
  -- handle nothing.
  local function catch_up(p, allow_errors)
    -- Time-bound: a hole is decided by a later snapshot's xmin, which any transaction of
    -- the cluster (other specs running beside) holds back.
    local idle, deadline = 0, pup.now() + 60
    repeat
      local n, err = p:run_once()
      if not n and not allow_errors then error(tostring(err)) end
      idle = (n == 0 and p:stats().position >= head()) and idle + 1 or 0
      if idle == 2 then return end
      if n == 0 or not n then pup.sleep(0.005) end
    until pup.now() > deadline
    error("no catch-up in 60 s; at " .. tostring(p:stats().position) .. ", head " .. head())
  end

  -- Catches up, then the read model is the log, in order, and the counter exact.
  local function exact_after(p, allow_errors)
    catch_up(p, allow_errors)
    assert.same(log(), model())
    counter_exact()
  end

  local function fresh()
    conns.close_all()
    if db then db:close() end
    store, db, names = H.fresh_store("hra")
    T = names.events_table .. "_model"
    C = names.events_table .. "_cnt"
    db:exec("DROP TABLE IF EXISTS " .. T)
    db:exec("DROP TABLE IF EXISTS " .. C)
  end

  after_each(function()
    conns.close_all()
    if db then
      db:exec("DROP TABLE IF EXISTS " .. T)
      db:exec("DROP TABLE IF EXISTS " .. C)
      db:close()
      db = nil
    end
  end)

  -- A hole drawn at every offset of the window read ahead, filled exactly between the
  -- batch that read ahead and the next one (or the one after); batch sizes 1, 2, 5. (A
  -- rolled-back hole passes once every older transaction of the cluster has ended:
  -- spec/ordering_spec.lua covers it; here it would wait on the specs running beside.)
  for _, bs in ipairs { 1, 2, 5 } do
    it(("hole at every offset of the read-ahead window, committed between batches, batch_size %d"):format(bs), function()
      for _ = 1, ITER do
        for off = 0, 2 * bs + 1 do
          for before = 1, 2 do -- fill after 1 or 2 batches
            fresh()
            local p = pup.processor(db, projection { batch_size = bs }, { store = store })
            append(db, "a", bs, "E1")               -- the first full window
            if off > 0 then append(db, "b", off, "E1") end
            local hold = connect()
            local tx = assert(hold:begin())
            append(tx, "h", 1, "E1")                 -- a position drawn, committed later
            append(db, "c", 3 * bs + 2, "E1")
            for _ = 1, before do assert(p:run_once()) end
            assert(tx:commit())
            exact_after(p)
          end
        end
      end
    end)
  end

  -- A hole whose position is the first of the next window, and a hole right after the
  -- last row of a full window; new appends between every batch.
  it("appends and late commits between every batch of a catch-up, batch sizes 1, 2, 5", function()
    for _ = 1, ITER do
      for _, bs in ipairs { 1, 2, 5 } do
        fresh()
        local p = pup.processor(db, projection { batch_size = bs }, { store = store })
        append(db, "a", 4 * bs, "E1")
        local held = {}
        for step = 1, 60 do
          local r = math.random(1, 6)
          if r == 1 then
            local c = connect()
            local tx = assert(c:begin())
            append(tx, "h" .. step, 1, "E1")
            held[#held + 1] = tx
          elseif r == 2 and #held > 0 then
            local i = math.random(1, #held)
            local tx = table.remove(held, i)
            assert(tx:commit())
          else
            append(db, "w" .. (step % 4), math.random(1, 2 * bs + 1), "E1")
          end
          local n, err = p:run_once()
          assert(n, tostring(err))
        end
        for _, tx in ipairs(held) do assert(tx:commit()) end
        exact_after(p)
      end
    end
  end)

  -- Resets between batches at every point of a catch-up, from another connection and
  -- from the processor's own connection (same session: take_ahead's session check cannot
  -- tell), then catch up: exact.
  for _, where in ipairs { "other", "same" } do
    it("reset after every batch count of a catch-up (" .. where .. " connection), batch sizes 1, 2, 5", function()
      for _ = 1, ITER do
        for _, bs in ipairs { 1, 2, 5 } do
          for k = 1, 7 do
            fresh()
            local p = pup.processor(db, projection { batch_size = bs }, { store = store })
            append(db, "a", 8 * bs + 1, "E1")
            for _ = 1, k do assert(p:run_once()) end
            local rc = where == "same" and db or connect()
            assert(pup.reset(rc, projection { batch_size = bs }, store))
            -- appends after the reset too: the stale window cannot know them
            append(db, "z", bs, "E1")
            exact_after(p, true)
            local st = assert(pup.status(db, store))
            assert.equal(log()[#log()], st[1].position)
          end
        end
      end
    end)
  end

  it("reset after the first batch of a three-window catch-up: nothing stale", function()
    for _ = 1, ITER do
      for _, bs in ipairs { 1, 2, 5 } do
        fresh()
        local p = pup.processor(db, projection { batch_size = bs }, { store = store })
        append(db, "a", 3 * bs, "E1")
        assert(p:run_once())
        assert(pup.reset(db, projection { batch_size = bs }, store))
        exact_after(p, true)
      end
    end
  end)

  -- A handler raising mid-batch (on_error skip, retry), at every offset of the windows.
  for _, policy in ipairs { "skip", "retry" } do
    it("a handler raising at every position under on_error " .. policy .. ", batch sizes 1, 2, 5", function()
      for _ = 1, ITER do
        for _, bs in ipairs { 1, 2, 5 } do
          for bad = 1, 3 * bs + 1 do
            fresh()
            local failed = 0
            local proj = projection { batch_size = bs, on_error = policy, max_attempts = policy == "retry" and 2 or nil }
            local inner = proj.handle
            local pos = append(db, "a", 4 * bs, "E1")
            proj.handle = function(tx, e)
              if e.global_position == pos[bad] and (policy == "skip" or failed < 1) then
                failed = failed + 1
                error("poison " .. e.global_position)
              end
              return inner(tx, e)
            end
            local p = pup.processor(db, proj, { store = store })
            for _ = 1, 50 do
              p:run_once()
            end
            catch_up(p, true)
            local want = log()
            if policy == "skip" then table.remove(want, bad) end
            assert.same(want, model())
            local dl = assert(pup.dead_letters.list(db, proj, { store = store }))
            assert.equal(policy == "skip" and 1 or 0, #dl)
          end
        end
      end
    end)
  end

  -- A handler that sends ROLLBACK (or ROLLBACK then BEGIN: a new transaction under the
  -- batch's pipeline, which the guard must still fail) on the processor's own connection,
  -- once, at every offset: the batch fails, is redone, exact.
  for _, sent in ipairs { { "ROLLBACK" }, { "ROLLBACK", "BEGIN" } } do
    it("a handler sending " .. table.concat(sent, " then ") .. " on the processor's connection, then recovering", function()
      for _, bs in ipairs { 1, 2, 5 } do
        for bad = 1, 3 * bs do
          fresh()
          local proj = projection { batch_size = bs }
          local inner = proj.handle
          local pos = append(db, "a", 4 * bs, "E1")
          local done = false
          proj.handle = function(tx, e)
            local r = inner(tx, e)
            if e.global_position == pos[bad] and not done then
              done = true
              for _, sql in ipairs(sent) do db:exec(sql) end
            end
            return r
          end
          local p = pup.processor(db, proj, { store = store })
          exact_after(p, true)
        end
      end
    end)
  end

  -- event_types scope: full windows with no in-scope event, in-scope events exactly at
  -- window boundaries.
  it("event_types scope where full windows hold no in-scope event, batch sizes 1, 2, 5", function()
    for _, bs in ipairs { 1, 2, 5 } do
      for gap = bs - 1, 3 * bs + 1 do
        fresh()
        local p = pup.processor(db, projection { batch_size = bs, event_types = { "IN" } }, { store = store })
        for k = 1, 6 do
          if gap > 0 then append(db, "o" .. k, gap, "OUT") end
          append(db, "i" .. k, 1, "IN")
        end
        append(db, "o", 3 * bs, "OUT")
        catch_up(p)
        -- between batches: more in-scope events, one held open across a batch
        local hold = connect()
        local tx = assert(hold:begin())
        append(tx, "late", 1, "IN")
        append(db, "o9", 2 * bs, "OUT")
        append(db, "i9", 1, "IN")
        assert(p:run_once())
        assert(tx:commit())
        catch_up(p)
        assert.same(log { IN = true }, model())
        counter_exact("WHERE event_type = 'IN'")
      end
    end
  end)

  -- Handlers that read (tx:query) and sync the pipeline (tx:savepoint) while the read
  -- ahead is in flight: their results must be theirs, not the kept window's.
  it("handlers that query and use savepoints while the window is read ahead", function()
    for _, bs in ipairs { 1, 2, 5 } do
      fresh()
      local proj = projection { batch_size = bs }
      local inner = proj.handle
      proj.handle = function(tx, e)
        local before = assert(tx:query("SELECT count(*) AS n FROM " .. T .. " WHERE pos = $1", e.global_position))
        assert(#before == 1 and before[1].n == 0, "query saw a wrong result at " .. e.global_position)
        assert(tx:savepoint(function(t2) return inner(t2, e) end))
        local after = assert(tx:query("SELECT count(*) AS n FROM " .. T .. " WHERE pos = $1", e.global_position))
        assert(#after == 1 and after[1].n == 1, "query after the write saw a wrong result at " .. e.global_position)
      end
      local p = pup.processor(db, proj, { store = store })
      append(db, "a", 10 * bs + 3, "E1")
      exact_after(p)
    end
  end)

  -- handle_batch (set-based): appends, held positions and resets between batches.
  it("handle_batch projection with appends, late commits and a reset between batches, batch sizes 1, 2, 5", function()
    for _ = 1, ITER do
      for _, bs in ipairs { 1, 2, 5 } do
        fresh()
        local proj = projection { batch_size = bs }
        local one = proj.handle
        proj.handle = nil
        proj.handle_batch = function(tx, evs)
          for _, e in ipairs(evs) do one(tx, e) end
        end
        local p = pup.processor(db, proj, { store = store })
        append(db, "a", 4 * bs, "E1")
        local held = {}
        for step = 1, 40 do
          local r = math.random(1, 8)
          if r == 1 then
            local tx = assert(connect():begin())
            append(tx, "h" .. step, 1, "E1")
            held[#held + 1] = tx
          elseif r == 2 and #held > 0 then
            local tx = table.remove(held, math.random(1, #held))
            assert(tx:commit())
          elseif r == 3 then
            assert(pup.reset(db, proj, store))
          else
            append(db, "w" .. (step % 4), math.random(1, 2 * bs + 1), "E1")
          end
          p:run_once()
        end
        for _, tx in ipairs(held) do assert(tx:commit()) end
        exact_after(p, true)
      end
    end
  end)

  -- A handler time limit hit once mid-batch under on_error skip: dead-lettered, the rest
  -- once, in order.
  it("handler_timeout hit by one event under on_error skip, batch sizes 1, 2, 5", function()
    for _, bs in ipairs { 1, 2, 5 } do
      fresh()
      local proj = projection { batch_size = bs, on_error = "skip" }
      local inner = proj.handle
      local pos = append(db, "a", 4 * bs + 1, "E1")
      local slow = pos[bs + 2] -- the second event of the window read ahead
      proj.handle = function(tx, e)
        if e.global_position == slow then assert(tx:exec("SELECT pg_sleep(1.5)")) end
        return inner(tx, e)
      end
      -- (the limit is every event's, whole handler and each statement: 0.5 s leaves the
      -- others room on a loaded machine)
      local p = pup.processor(db, proj, { store = store, handler_timeout = 0.5 })
      catch_up(p, true)
      local want = log()
      table.remove(want, bs + 2)
      assert.same(want, model())
    end
  end)

  -- Static partitions in one process, interleaved, with appends between batches.
  it("3 static partitions interleaved batch by batch with appends and holes between", function()
    for _, bs in ipairs { 1, 2, 5 } do
      fresh()
      local ps = {}
      for k = 0, 2 do
        ps[k] = pup.processor(connect(), projection { batch_size = bs },
          { store = store, partition_key = k, total_partitions = 3 })
      end
      local held = {}
      for step = 1, 40 do
        append(db, "agg" .. (step % 7), math.random(1, 3 * bs), "E1")
        if step % 5 == 0 then
          local tx = assert(connect():begin())
          append(tx, "held" .. step, 1, "E1") -- its own aggregate: no head-row lock wait
          held[#held + 1] = tx
        end
        if step % 7 == 0 and #held > 0 then
          local tx = table.remove(held, 1)
          assert(tx:commit())
        end
        local n, err = ps[step % 3]:run_once()
        assert(n, tostring(err))
      end
      for _, tx in ipairs(held) do assert(tx:commit()) end
      for k = 0, 2 do catch_up(ps[k]) end
      local got = model()
      table.sort(got)
      assert.same(log(), got)
      counter_exact()
    end
  end)
end)
