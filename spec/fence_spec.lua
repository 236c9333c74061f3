-- The checkpoint write is the fence (docs/reliability.md): a batch whose checkpoint moved
-- under it (static partition) or whose lease lapsed or went to another worker (group)
-- rolls back, although its own session stays alive and nobody terminates it. A second
-- processor really applies the same events in the middle of the first one's batch; a
-- NON-idempotent counter (n = n + 1) shows that nothing is applied twice.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local N = 20

describe("checkpoint fences, the fenced session alive", function()
  local store, db, names, ctl
  local conns = {} -- closed after each case, also when it fails (no transaction left open)
  local function connect()
    local c = H.connect()
    conns[#conns + 1] = c
    return c
  end

  local function q(sql, ...) return assert(ctl:query(sql, ...)) end
  local function counter() return q("SELECT n FROM t_fence_cnt")[1].n end

  -- Counts every event into the counter. `hook(tx)` runs once, inside the first event's
  -- handler, before its own update (so it holds no lock another processor would wait on).
  local function projection(hook)
    return {
      name = "fence",
      handle = function(tx, _)
        if hook then
          local h = hook
          hook = nil
          h(tx)
        end
        assert(tx:exec("UPDATE t_fence_cnt SET n = n + 1"))
      end,
    }
  end

  -- The second processor runs in a process of its own (a handler may not run another
  -- processor of its VM); it applies every event once and prints how many.
  local function other_processor(opts)
    local r = H.run_script(([[
local pup = require "pupsourcing"
local url, ev, hd, ck = ...
local db = assert(pup.connect(url))
local store = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
local opts = %s
opts.store = store
local p = pup.processor(db, { name = "fence", handle = function(tx)
  assert(tx:exec("UPDATE t_fence_cnt SET n = n + 1"))
end }, opts)
print("applied", assert(p:run_once()))
]]):format(opts), { H.url(), names.events_table, names.aggregate_heads_table, names.checkpoints_table })
    assert.equal(0, r.code, r.stderr)
    assert.equal("applied\t" .. N .. "\n", r.stdout)
  end

  local function backend_pid(conn) return assert(conn:query("SELECT pg_backend_pid() AS p"))[1].p end

  local function alive(pid)
    return q("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid)[1].n == 1
  end

  local function checkpoint_rows()
    return q(('SELECT last_global_position AS pos, owner FROM "%s" WHERE projection_name = \'fence\''
      .. ' ORDER BY partition_key'):format(names.checkpoints_table))
  end

  before_each(function()
    ctl = connect()
    local t = H.tables("fence")
    for _, x in ipairs { "_workers", "_groups" } do
      assert(ctl:exec(('DROP TABLE IF EXISTS "%s%s"'):format(t.checkpoints_table, x)))
    end
    store, db, names = H.fresh_store("fence")
    assert(ctl:exec("DROP TABLE IF EXISTS t_fence_cnt"))
    assert(ctl:exec("CREATE TABLE t_fence_cnt (n bigint NOT NULL)"))
    assert(ctl:exec("INSERT INTO t_fence_cnt VALUES (0)"))
    for i = 1, N do
      assert(store:append(ctl, pup.any(), H.events(1, { aggregate_id = "f" .. i })))
    end
  end)

  after_each(function()
    for _, c in ipairs(conns) do c:close() end
    conns = {}
    db:close()
  end)

  it("static: a batch whose checkpoint another processor moved rolls back, nothing applied twice", function()
    local p1 = pup.processor(db, projection(function(tx)
      -- A second processor of the same partition with the session lock bypassed: p1 gives
      -- its lock up (its session stays), p2 applies every event and moves the checkpoint.
      assert(tx:query("SELECT pg_advisory_unlock_all()"))
      other_processor("{}")
    end), { store = store })
    local pid = backend_pid(db)
    local n, err = p1:run_once()
    assert.is_nil(n)
    assert.matches("checkpoint moved from 0", tostring(err))
    assert.equal(N, counter())
    assert.equal(N, checkpoint_rows()[1].pos)
    assert.is_true(alive(pid))
  end)

  it("group: a batch whose lease went to another live worker rolls back, its session alive", function()
    local W = names.checkpoints_table .. "_workers"
    local w1 = pup.processor(db, projection(function()
      -- w1 freezes mid-batch for longer than its lease: the lease lapses and its heartbeat
      -- row goes; its session stays (nobody terminates it). w2 takes the partition over
      -- and applies every event.
      assert(ctl:exec(('UPDATE "%s" SET lease_expires_at = clock_timestamp() - interval \'1 second\''
        .. ' WHERE projection_name = \'fence\''):format(names.checkpoints_table)))
      assert(ctl:exec(('DELETE FROM "%s" WHERE projection_name = \'fence\''):format(W)))
      other_processor("{ group = true, total_partitions = 1, lease_ttl = 30 }")
    end), { store = store, group = true, total_partitions = 1, lease_ttl = 30 })
    local pid = backend_pid(db)
    local n, err = w1:run_once()
    assert.is_nil(n)
    assert.matches("lost the lease on 1 partition", tostring(err))
    assert.equal(N, counter())
    local rows = checkpoint_rows()
    assert.equal(1, #rows)
    assert.equal(N, rows[1].pos)
    assert.is_true(alive(pid))
    -- w2's lease is still live (its process has exited): w1 takes nothing back
    local again, why = w1:run_once()
    assert.is_nil(again)
    assert.matches("another processor holds this partition", tostring(why))
    assert.equal(N, counter())
  end)

  it("group: a batch whose lease lapsed commits nothing, though nobody took the partition over", function()
    local w1 = pup.processor(db, projection(function()
      assert(ctl:exec(('UPDATE "%s" SET lease_expires_at = clock_timestamp() - interval \'1 second\''
        .. ' WHERE projection_name = \'fence\''):format(names.checkpoints_table)))
    end), { store = store, group = true, total_partitions = 1, lease_ttl = 30 })
    local n, err = w1:run_once()
    assert.is_nil(n)
    assert.matches("lost the lease on 1 partition", tostring(err))
    assert.equal(0, counter())
    assert.equal(0, checkpoint_rows()[1].pos)
    -- the next heartbeat takes the lease again and the events are applied once
    assert.equal(N, w1:run_once())
    assert.equal(N, counter())
  end)
end)
