-- Issue 13: an append's wake-up (NOTIFY) is sent after its commit, in a transaction of its
-- own, so notifying writers' commits are not serialised by PostgreSQL's notify lock. A
-- waiting processor (--poll-interval 60 s, so only a NOTIFY can wake it in time) must still
-- be woken at once by every way of committing an append, and never by a rolled-back one.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("wake-ups after the commit", function()
  local f, store, db, T, dir, w

  before_each(function()
    f = H.processor_fixture("nc", "notify_commit")
    store, db, T, dir = f.store, f.db, f.T, f.dir
    w = H.connect() -- the writer
  end)

  after_each(function()
    pcall(w.close, w)
    f:close()
  end)

  local function seen() return f:seen() end
  local function ev(id) return { H.event { aggregate_id = id } } end

  -- The sessions holding projection `name`'s partition 0/1 (its processor's): {qs, state}.
  local function holders(name)
    return assert(db:query([[SELECT a.query_start::text AS qs, a.state FROM pg_stat_activity a
        JOIN pg_locks l USING (pid) WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
        AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)]],
      "pupsourcing/" .. T.checkpoints_table .. "/" .. name .. "/0/1"))
  end

  -- The processor's backend: every statement it sends has a new query_start.
  local function backend_query_start()
    local rows = holders("notify_commit")
    assert.equal(1, #rows, "the processor's backend")
    return rows[1].qs
  end

  -- Asserts that the processor sends no statement for `seconds` (it was not woken) after
  -- act() (optional) ran: the processor's last statement is taken before act, so a wake-up
  -- handled before the first look is seen too.
  local function assert_not_woken(seconds, what, act)
    local qs = backend_query_start()
    if act then act() end
    local t0 = pup.now()
    while pup.now() - t0 < seconds do
      assert.equal(qs, backend_query_start(), what .. " woke the processor")
      pup.sleep(0.01)
    end
  end

  -- Runs commit() (which commits one append) and asserts the processor is woken (sends a
  -- statement) within 1 s of the start, far below the 60 s poll interval. Not that the event
  -- is handled by then: see the append after the rolled-back ones.
  local function assert_woken(what, commit)
    local qs = backend_query_start()
    local t0 = pup.now()
    commit()
    while backend_query_start() == qs do
      assert.is_true(pup.now() - t0 < 1, what .. ": the processor not woken within 1 s (no NOTIFY)")
      pup.sleep(0.005)
    end
  end

  -- Runs commit() (which commits one append) and asserts the event is handled within 1 s of
  -- its return, far below the 60 s poll interval.
  local function assert_wakes(what, commit)
    local n = seen()
    local t0 = pup.now()
    commit()
    H.wait_until(what .. ": the event handled", 10, function() return seen() > n end, 0.005)
    local dt = pup.now() - t0
    io.stderr:write(("notify_commit: %s handled %.1f ms after the commit\n"):format(what, dt * 1000))
    assert.is_true(dt < 1, ("%s: handled %.2f s after the commit (not woken by a NOTIFY)"):format(what, dt))
  end

  it("every committed append wakes a waiting processor at once; rolled-back ones never do", function()
    assert(store:append(w, pup.any(), ev("nc-0")))
    local p = f:run(60000)
    H.wait_until("the first event handled", 20, function()
      assert.is_nil(H.exit_code(p), H.stderr_of(p))
      return seen() == 1
    end, 0.02)
    pup.sleep(0.3) -- past the batch that found nothing more

    assert_wakes("an append on its own", function() assert(store:append(w, pup.any(), ev("nc-1"))) end)
    pup.sleep(0.2)
    assert_wakes("db:transaction", function()
      assert(w:transaction(function(tx)
        assert(store:append(tx, pup.any(), ev("nc-2")))
        pup.sleep(0.2) -- nothing is handled before the commit
        assert.equal(2, seen())
        assert(tx:exec("SELECT 1"))
      end))
    end)
    pup.sleep(0.2)
    assert_wakes("db:begin and tx:commit", function()
      local tx = assert(w:begin())
      assert(store:append(tx, pup.any(), ev("nc-3")))
      assert(tx:commit())
    end)
    pup.sleep(0.2)
    assert_wakes("BEGIN and COMMIT through db:exec", function()
      assert(w:exec("BEGIN"))
      assert(store:append(w, pup.any(), ev("nc-4")))
      assert(w:exec("COMMIT"))
    end)
    pup.sleep(0.2)
    assert_wakes("two appends in one db:transaction", function()
      assert(w:transaction(function(tx)
        assert(store:append(tx, pup.any(), ev("nc-5")))
        assert(store:append(tx, pup.any(), ev("nc-5")))
      end))
    end)
    H.wait_until("both events of the last transaction", 5, function() return seen() == 7 end, 0.005)
    pup.sleep(0.3)

    -- Rolled back, by every way: no wake-up, neither then nor at the connection's next commit.
    local before = seen()
    local tx
    assert_not_woken(0.5, "a rolled-back append", function()
      assert.is_nil(w:transaction(function(t)
        assert(store:append(t, pup.any(), ev("nc-r1")))
        return nil, "undo"
      end))
      assert.is_nil(w:transaction(function(t)
        assert(store:append(t, pup.any(), ev("nc-r2")))
        error("raised")
      end))
      tx = assert(w:begin())
      assert(store:append(tx, pup.any(), ev("nc-r3")))
      assert(tx:rollback())
      assert(w:exec("BEGIN"))
      assert(store:append(w, pup.any(), ev("nc-r4")))
      assert(w:exec("ROLLBACK"))
      do -- closed by going out of scope
        local t <close> = assert(w:begin())
        assert(store:append(t, pup.any(), ev("nc-r5")))
      end
    end)
    -- the next commits on that connection append nothing: no wake-up owed any more
    assert_not_woken(0.5, "a commit after rolled-back appends", function()
      assert(w:transaction(function(t) assert(t:exec("SELECT 1")) end))
      tx = assert(w:begin())
      assert(tx:commit())
    end)
    assert.equal(before, seen())
    assert.equal(0, assert(db:query(("SELECT count(*) AS n FROM %s WHERE aggregate_id LIKE 'nc-r%%'")
      :format(T.events_table)))[1].n)

    -- The rolled-back appends drew positions: the next append leaves a hole below it. Its
    -- wake-up is due at once, but the processor passes that hole only by the gap rule, once
    -- every transaction that held an xid when it saw the hole has ended (docs/ordering.md):
    -- any other writer on the server (another spec's, when the suite runs in parallel) can
    -- hold that up for seconds. So here the wake-up is asserted, and the handling waited for.
    local t0 = pup.now()
    assert_woken("the first append after rolled-back ones", function()
      assert(store:append(w, pup.any(), ev("nc-7")))
    end)
    H.wait_until("the event above the rolled-back positions", 60, function() return seen() == before + 1 end, 0.005)
    io.stderr:write(("notify_commit: the append above rolled-back positions handled %.1f ms after the commit"
      .. " (woken at once; the hole waits for older transactions)\n"):format((pup.now() - t0) * 1000))

    -- a failed append on its own changes nothing; the next one still wakes
    local ok, err = store:append(w, pup.exact(99), ev("nc-1"))
    assert.is_nil(ok)
    assert.equal("optimistic_concurrency", err.code)
    assert_wakes("an append after a conflict", function() assert(store:append(w, pup.any(), ev("nc-6"))) end)
    H.signal(p, "TERM")
    assert.equal(0, H.wait_exit(p, 5), H.stderr_of(p))
  end)

  it("an append inside a processor's batch (a reactor) wakes another processor when the batch commits", function()
    -- the reactor appends a MailQueued per Ordered in its batch; the mailer only sees MailQueued
    H.write_file(dir .. "/react.lua", ([[
local pup = require "pupsourcing"
local store = pup.store { events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q }
return { name = "nc_reactor", event_types = { "Ordered" }, handle = function(tx, e)
  assert(store:append(tx, pup.any(), { { aggregate_type = "Mail", aggregate_id = e.aggregate_id,
    event_type = "MailQueued", payload = "{}" } }))
end }
]]):format(T.events_table, T.aggregate_heads_table, T.checkpoints_table))
    H.write_file(dir .. "/mailer.lua", [[
return { name = "nc_mailer", event_types = { "MailQueued" }, handle = function(tx, e)
  assert(tx:exec("INSERT INTO t_nc_seen (pos) VALUES ($1)", e.global_position)) end }
]])
    for _, file in ipairs { "react.lua", "mailer.lua" } do f:run(60000, dir .. "/" .. file) end
    -- both started (each holds its partition: the rest of its start is milliseconds) and idle
    H.wait_until("both processors to hold their partition, idle", 30, function()
      for _, name in ipairs { "nc_reactor", "nc_mailer" } do
        local rows = holders(name)
        if #rows ~= 1 or rows[1].state ~= "idle" then return false end
      end
      return true
    end, 0.05)
    pup.sleep(0.2) -- (and past its first batch, which finds nothing)
    for i = 1, 3 do
      local t0 = pup.now()
      assert(store:append(w, pup.any(), { H.event { aggregate_id = "order-" .. i, event_type = "Ordered" } }))
      H.wait_until("the mail of order " .. i, 10, function()
        for _, p in ipairs(f.procs) do assert.is_nil(H.exit_code(p), H.stderr_of(p)) end
        return seen() == i
      end, 0.005)
      local dt = pup.now() - t0
      io.stderr:write(("notify_commit: reactor's append handled %.1f ms after the order\n"):format(dt * 1000))
      assert.is_true(dt < 2, ("the mailer saw the reactor's append after %.2f s (no NOTIFY at the batch's commit)"):format(dt))
    end
    for _, p in ipairs(f.procs) do
      H.signal(p, "TERM")
      assert.equal(0, H.wait_exit(p, 5), H.stderr_of(p))
    end
  end)
end)
