-- Issue 13: a catching-up processor commits behind its next batch (src/batch.c, chain).
-- A batch that read the next window ahead queues its checkpoint write and its COMMIT, and
-- the next batch walks that window while the server commits; their results are read with
-- the next batch's. These cases make that COMMIT fail, or a reset fence its checkpoint,
-- while the next batch is already under way: no batch's writes may stay without its
-- checkpoint, none may be applied twice. The read model is NON-idempotent (a counter per
-- aggregate and one row per handled event: spec/helpers.lua, M.group).
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("commit behind the next batch", function()
  local g

  after_each(function()
    if g then g:close() end
    g = nil
  end)

  it("a COMMIT that fails behind the next batch: both roll back, retried from the first, exact", function()
    g = H.group("chn_cf", { batch_size = 10 })
    g:append("a", 4, 50) -- 200 events, 20 full windows: catch-up chains them
    local pos = g:one(('SELECT global_position AS p FROM "%s" ORDER BY global_position OFFSET 24 LIMIT 1')
      :format(g.names.events_table)).p
    -- The third batch's COMMIT fails once (a deferred check, as a serialization failure:
    -- retried). The sequence counts the failures: nextval is not rolled back.
    assert(g.db:exec("DROP SEQUENCE IF EXISTS t_chn_cf_fails"))
    assert(g.db:exec("CREATE SEQUENCE t_chn_cf_fails"))
    assert(g.db:exec(([[CREATE OR REPLACE FUNCTION t_chn_cf_check() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF NEW.pos = %d AND nextval('t_chn_cf_fails') = 1 THEN
          RAISE EXCEPTION 'deferred check failed at commit' USING ERRCODE = '40001';
        END IF;
        RETURN NULL;
      END $$]]):format(pos)))
    assert(g.db:exec(("CREATE CONSTRAINT TRIGGER t_chn_cf_check AFTER INSERT ON %s DEFERRABLE INITIALLY DEFERRED"
      .. " FOR EACH ROW EXECUTE FUNCTION t_chn_cf_check()"):format(g.seen)))
    local r = g:cli { "run", "--once", g.file }
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stderr:find("deferred check failed at commit", 1, true), r.output)
    assert.is_truthy(r.stderr:find("grp_counter: 200 event(s) handled by 1 partition worker(s)", 1, true), r.output)
    assert.equal(2, g:one("SELECT last_value AS v FROM t_chn_cf_fails").v) -- failed once, then passed
    local ok, why = g:exact()
    assert(ok, why)
    local cp = g:one(('SELECT last_global_position AS p FROM "%s"'):format(g.names.checkpoints_table)).p
    assert.equal(g:head(), cp)
    assert(g.db:exec("DROP FUNCTION t_chn_cf_check() CASCADE"))
    assert(g.db:exec("DROP SEQUENCE t_chn_cf_fails"))
  end)

  it("a reset during a chained catch-up fences the batch behind: started over, exact", function()
    g = H.group("chn_rs", { batch_size = 10 })
    g:append("a", 10, 300) -- 3,000 events: hundreds of windows, chained
    local db = H.connect()
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
    local p = pup.processor(db, proj, { store = g.store, batch_size = 10, poll_interval = 0.05 })
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
    p:close()
    db:close()
  end)
end)
