-- Issue 13: a catching-up processor commits behind its next batch (src/batch.c, chain).
-- A batch that read the next window ahead queues its checkpoint write and its COMMIT, and
-- the next batch walks that window while the server commits; their results are read with
-- the next batch's. These cases make that COMMIT fail, or a reset fence its checkpoint,
-- while the next batch is already under way: no batch's writes may stay without its
-- checkpoint, none may be applied twice. The read model is NON-idempotent (a counter per
-- aggregate and one row per handled event: spec/helpers.lua, M.group).
local pup = require "pupsourcing"
local H = require "spec.helpers"

-- A deferred constraint trigger on g.seen that fails the COMMIT of the transaction that
-- inserted position `pos`, once (40001: retried as transient), or with `code`.
local function fail_commit_once(g, name, pos, code)
  assert(g.db:exec("DROP SEQUENCE IF EXISTS t_" .. name .. "_fails"))
  assert(g.db:exec("CREATE SEQUENCE t_" .. name .. "_fails"))
  assert(g.db:exec(([[CREATE OR REPLACE FUNCTION t_%s_check() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.pos = %d AND nextval('t_%s_fails') = 1 THEN
        RAISE EXCEPTION 'deferred check failed at commit' USING ERRCODE = '%s';
      END IF;
      RETURN NULL;
    END $$]]):format(name, pos, name, code or "40001")))
  assert(g.db:exec(("CREATE CONSTRAINT TRIGGER t_%s_check AFTER INSERT ON %s DEFERRABLE INITIALLY DEFERRED"
    .. " FOR EACH ROW EXECUTE FUNCTION t_%s_check()"):format(name, g.seen, name)))
end

local function nth_pos(g, n)
  return g:one(('SELECT global_position AS p FROM "%s" ORDER BY global_position OFFSET %d LIMIT 1')
    :format(g.names.events_table, n)).p
end

describe("commit behind the next batch", function()
  local g, db, p

  after_each(function()
    if p then p:close() end
    if db then db:close() end
    if g then
      for _, name in ipairs { "chn_cf", "chh_np", "chh_cp", "chh_sp" } do
        g.db:exec("DROP FUNCTION IF EXISTS t_" .. name .. "_check() CASCADE")
        g.db:exec("DROP SEQUENCE IF EXISTS t_" .. name .. "_fails")
      end
      g.db:exec("DROP TABLE IF EXISTS t_chh_np_extra")
      g:close()
    end
    g, db, p = nil, nil, nil
  end)

  it("a COMMIT that fails behind the next batch: both roll back, retried from the first, exact", function()
    g = H.group("chn_cf", { batch_size = 10 })
    g:append("a", 4, 50) -- 200 events, 20 full windows: catch-up chains them
    -- The third batch's COMMIT fails once (a deferred check, as a serialization failure:
    -- retried) while the fourth is walked.
    fail_commit_once(g, "chn_cf", nth_pos(g, 24))
    local r = g:cli { "run", "--once", g.file }
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stderr:find("deferred check failed at commit", 1, true), r.output)
    assert.is_truthy(r.stderr:find("grp_counter: 200 event(s) handled by 1 partition worker(s)", 1, true), r.output)
    assert.equal(2, g:one("SELECT last_value AS v FROM t_chn_cf_fails").v) -- failed once, then passed
    local ok, why = g:exact()
    assert(ok, why)
    local cp = g:one(('SELECT last_global_position AS p FROM "%s"'):format(g.names.checkpoints_table)).p
    assert.equal(g:head(), cp)
  end)

  it("a reset during a chained catch-up fences the batch behind: started over, exact", function()
    g = H.group("chn_rs", { batch_size = 10 })
    g:append("a", 10, 300) -- 3,000 events: hundreds of windows, chained
    db = H.connect()
    local proj = pup.load_projection(g.file)
    local handle, reset = proj.handle, nil
    local first = g:one(('SELECT min(global_position) AS p FROM "%s"'):format(g.names.events_table)).p
    proj.handle = function(tx, e)
      handle(tx, e)
      -- a hundred events in, the reset starts in a process of its own, racing the batches
      if e.global_position == first + 100 and not reset then
        reset = H.spawn(g:args { H.bin, "reset", g.file })
        g.procs[#g.procs + 1] = reset
      end
    end
    p = pup.processor(db, proj, { store = g.store, batch_size = 10, poll_interval = 0.05 })
    local n = assert(p:run { once = true })
    assert.is_truthy(reset, "the reset was started")
    assert.equal(0, H.wait_exit(reset, 30), H.stderr_of(reset))
    assert.is_truthy(H.stdout_of(reset):find("^reset grp_counter: 1 checkpoint row%(s%) deleted\n"), H.stdout_of(reset))
    -- everything again after the reset (what came before it was emptied by it): at least
    -- the whole log once, and the read model exact
    assert.is_true(n >= 3000, "handled " .. n)
    local ok, why = g:exact()
    assert(ok, why)
    assert.equal(2, g:one(('SELECT generation AS n FROM "%s" WHERE projection_name = $1'):format(g.groups_table),
      "grp_counter").n)
  end)

  it("chained batches plan their window reads generically; handlers see the session's plan_cache_mode", function()
    g = H.group("chn_pl", { batch_size = 10 })
    g:append("a", 4, 50)
    db = H.connect()
    assert(db:exec("SET plan_cache_mode = force_custom_plan")) -- the session's, as an application may set it
    local first, last = nth_pos(g, 0), nth_pos(g, 199)
    local modes, plans = {}, nil
    -- Statements at the first and the last event only: the batches between send none, so
    -- they read ahead on the processor's connection (a read-ahead session is used only
    -- while the handlers write), in chained transactions.
    local proj = {
      name = "chn_plans",
      handle = function(tx, e)
        if e.global_position ~= first and e.global_position ~= last then return end
        local m = assert(tx:query("SELECT current_setting('plan_cache_mode') AS m"))[1].m
        modes[m] = (modes[m] or 0) + 1
        plans = assert(tx:query("SELECT sum(generic_plans)::int AS g, sum(custom_plans)::int AS c"
          .. " FROM pg_prepared_statements WHERE statement LIKE '%pg_snapshot_xmin(pg_current_snapshot())%'"))[1]
      end,
    }
    p = pup.processor(db, proj, { store = g.store, batch_size = 10, poll_interval = 0.05 })
    assert.equal(200, assert(p:run { once = true }))
    assert.same({ force_custom_plan = 2 }, modes) -- the first batch's handler, and a chained one's
    -- one chain: its first batch reads (and reads ahead) as a live batch does, planned anew
    assert.is_true(plans.c <= 2, "custom plans: " .. tostring(plans.c))
    assert.is_true(plans.g >= 10, "generic plans: " .. tostring(plans.g))
  end)

  -- What a handler of the batch in hand may do while the COMMIT behind it fails: the
  -- session is then outside any transaction until the next Sync, and nothing of this
  -- batch may run (or commit) there.
  -- 200 events in windows of 10; the third batch's COMMIT fails once (retried) while the
  -- fourth is walked by handle = wrap(the counter's handle, the fourth's first position).
  -- Runs to the head; returns p:run's results.
  local function behind_a_failed_commit(prefix, wrap, opts)
    g = H.group(prefix, { batch_size = 10 })
    g:append("a", 4, 50)
    fail_commit_once(g, prefix, nth_pos(g, 24))
    db = H.connect()
    local proj = pup.load_projection(g.file)
    proj.handle = wrap(proj.handle, nth_pos(g, 30))
    for k, v in pairs(opts or {}) do proj[k] = v end
    p = pup.processor(db, proj, { store = g.store, batch_size = 10, poll_interval = 0.05 })
    return p:run { once = true }
  end

  local function assert_exact(n)
    local ok, why = g:exact()
    assert(ok, tostring(why) .. " (handled " .. tostring(n) .. ")")
  end

  it("failed COMMIT behind, next window's handler prepares a new statement: nothing doubled", function()
    local c = H.connect()
    assert(c:exec("DROP TABLE IF EXISTS t_chh_np_extra"))
    assert(c:exec("CREATE TABLE t_chh_np_extra (pos bigint NOT NULL)"))
    c:close()
    local n = assert(behind_a_failed_commit("chh_np", function(handle, fourth)
      return function(tx, e)
        handle(tx, e)
        if e.global_position >= fourth then
          -- SQL text not seen before on this connection: prepared (the pipeline settles)
          assert(tx:exec(("INSERT INTO t_chh_np_extra (pos) VALUES ($1) /* %d */"):format(e.global_position),
            e.global_position))
        end
      end
    end))
    assert_exact(n)
    local x = g:one("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_chh_np_extra")
    assert.equal(x.d, x.n, "extra rows doubled: " .. x.n .. " rows for " .. x.d .. " positions")
  end)

  it("failed COMMIT behind, next window's handler has a COPY refused (retried): exact, no false fence", function()
    local tried = false
    local n, err = behind_a_failed_commit("chh_cp", function(handle, fourth)
      return function(tx, e)
        if e.global_position == fourth and not tried then
          tried = true
          local _, copy_err = pcall(tx.exec, tx, "COPY t_chh_cp_x FROM STDIN")
          error("copy attempted: " .. tostring(copy_err))
        end
        handle(tx, e)
      end
    end, { on_error = "retry", max_attempts = 5, retry_backoff = 0.01 })
    assert(n, tostring(err))
    assert_exact(n)
  end)

  it("failed COMMIT behind, next window's handler uses tx:savepoint (pcall'd) then writes: nothing doubled", function()
    local n, err = behind_a_failed_commit("chh_sp", function(handle, fourth)
      return function(tx, e)
        if e.global_position == fourth then
          pcall(tx.savepoint, tx, function(t) assert(t:exec("SELECT 1")) end) -- optional part, may fail
        end
        handle(tx, e)
      end
    end)
    assert(n, tostring(err))
    assert_exact(n)
  end)
  -- A batch's own results are read during the next batch (src/batch.c, end_ahead): these
  -- make a statement of batch 4 (positions 31..40 of 200, windows of 10) fail at the
  -- server, found while batch 5 is walked. The failure must be batch 4's, batch 5 must
  -- not commit, and the skip policy must dead-letter the event that failed.
  local function fail_insert_at(pos)
    assert(g.db:exec(("ALTER TABLE %s ADD CONSTRAINT t_%s_pos CHECK (pos <> %d)"):format(g.seen, g.prefix, pos)))
  end

  -- Positions handled (rows of g.seen) and how often; the checkpoint.
  local function handled()
    local rows = g:q(("SELECT pos, count(*)::int AS n FROM %s GROUP BY pos ORDER BY pos"):format(g.seen))
    local cp = g:one(('SELECT last_global_position AS p FROM "%s"'):format(g.names.checkpoints_table))
    return rows, cp and cp.p or 0
  end

  it("handle_batch's write of one batch fails while the next is walked: named for its batch, none committed", function()
    g = H.group("chn_hb", { batch_size = 10 })
    g:append("a", 4, 50)
    local bad = nth_pos(g, 34) -- in batch 4 (31..40)
    fail_insert_at(bad)
    db = H.connect()
    local walked = {}
    local proj = {
      name = "grp_counter",
      handle_batch = function(tx, events)
        local pos, agg = {}, {}
        for i, e in ipairs(events) do pos[i], agg[i] = e.global_position, e.aggregate_id end
        walked[#walked + 1] = pos[1]
        -- queued in the pipeline: its failure is read after this call returns
        assert(tx:exec(("INSERT INTO %s (pos, agg, xid, pid) SELECT p, a, pg_current_xact_id()::text, 0"
          .. " FROM unnest($1::bigint[], $2::text[]) AS u(p, a)"):format(g.seen),
          "{" .. table.concat(pos, ",") .. "}", "{" .. table.concat(agg, ",") .. "}"))
      end,
    }
    p = pup.processor(db, proj, { store = g.store, batch_size = 10, poll_interval = 0.05 })
    local n, err = p:run { once = true }
    assert.is_nil(n)
    assert.equal("handler", err.code)
    -- batch 4's positions, not batch 5's (which was walked, so the failure was read late)
    local want = ("handle_batch failed on the batch of 10 event(s) at global positions %d..%d")
      :format(nth_pos(g, 30), nth_pos(g, 39))
    assert.is_truthy(err.message:find(want, 1, true), err.message)
    assert.is_truthy(err.message:find("t_chn_hb_pos", 1, true), err.message)
    assert.is_true(#walked >= 5 and walked[5] == nth_pos(g, 40), "batch 5 was walked: " .. table.concat(walked, ","))
    local rows, cp = handled()
    assert.equal(nth_pos(g, 29), cp) -- batches 1-3
    assert.equal(30, #rows)
    for i, r in ipairs(rows) do
      assert.equal(nth_pos(g, i - 1), r.pos)
      assert.equal(1, r.n)
    end
  end)

  -- Batch 4's insert at `bad` (its fifth event) fails and is found while batch 5 is
  -- walked, whose first position is `fifth`: handle = wrap(the counter's handle, fifth);
  -- opts go to the projection. Returns p:run's results and bad.
  local function failed_write_behind(prefix, wrap, opts)
    g = H.group(prefix, { batch_size = 10 })
    g:append("a", 4, 50)
    local bad = nth_pos(g, 34)
    fail_insert_at(bad)
    db = H.connect()
    local proj = pup.load_projection(g.file)
    proj.handle = wrap(proj.handle, nth_pos(g, 40))
    for k, v in pairs(opts or {}) do proj[k] = v end
    p = pup.processor(db, proj, { store = g.store, batch_size = 10, poll_interval = 0.05 })
    local n, err = p:run { once = true }
    return n, err, bad
  end

  -- The run stopped on the failed insert, named by its event: checkpoint after batch 3,
  -- its 30 events once each.
  local function stopped_at(n, err, bad)
    assert.is_nil(n)
    assert.is_truthy(err.message:find(("handler failed at global position %d "):format(bad), 1, true), err.message)
    assert.is_truthy(err.message:find("t_" .. g.prefix .. "_pos", 1, true), err.message)
    local rows, cp = handled()
    assert.equal(nth_pos(g, 29), cp)
    assert.equal(30, #rows)
  end

  for _, sync_read in ipairs { false, true } do
    it(("a handler's write fails while the next batch is walked%s: that event dead-lettered, the rest once")
      :format(sync_read and " (whose handler reads, so it sees the failure first)" or ""), function()
      local n, err, bad = failed_write_behind(sync_read and "chn_sr" or "chn_pe", function(handle, fifth)
        return function(tx, e)
          if sync_read and e.global_position >= fifth then
            assert(tx:query("SELECT 1 AS one")) -- reads every result before it, batch 4's failure among them
          end
          handle(tx, e)
        end
      end, { on_error = "skip" })
      assert.equal(199, n, tostring(err))
      local dl = g:q(('SELECT global_position AS p, error FROM "%s_dead_letters"'):format(g.names.checkpoints_table))
      assert.equal(1, #dl)
      assert.equal(bad, dl[1].p)
      assert.is_truthy(dl[1].error:find("t_" .. g.prefix .. "_pos", 1, true), dl[1].error)
      local rows, cp = handled()
      assert.equal(g:head(), cp)
      assert.equal(199, #rows)
      for _, r in ipairs(rows) do
        assert.are_not.equal(bad, r.pos)
        assert.equal(1, r.n)
      end
      assert.equal(199, g:one(("SELECT sum(n)::int AS n FROM %s"):format(g.counter)).n)
    end)
  end

  it("a handler raises while the batch behind's failed write is unread: the failure reported is that batch's", function()
    local n, err, bad = failed_write_behind("chn_lr", function(handle, fifth)
      return function(tx, e)
        if e.global_position == fifth then error("raised in batch 5") end
        handle(tx, e)
      end
    end)
    stopped_at(n, err, bad)
    assert.is_falsy(err.message:find("raised in batch 5", 1, true), err.message)
  end)

  it("a COPY refused in the next batch while the batch behind's failed write is unread: the write's event named", function()
    stopped_at(failed_write_behind("chn_cr", function(handle, fifth)
      return function(tx, e)
        if e.global_position == fifth + 1 then pcall(tx.exec, tx, "COPY t_chn_cr_x FROM STDIN") end
        handle(tx, e)
      end
    end))
  end)
end)
