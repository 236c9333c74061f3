-- Issue 13: an append outside a transaction is its own wake-up, coalesced: it notifies only
-- if no other append's wake-up is under way (src/schema.c, APPEND_WAKE_UP). A reader woken
-- by that other append can read before this one commits, so it looks again at positions
-- drawn above what it saw (src/run_loop.c, drawn_wait; cursor.in_flight of
-- store:read_events, used by pup.subscribe). Processors and subscribers here poll every
-- 60 s: only a wake-up, or that second look, brings an event in time.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("coalesced wake-ups", function()
  local f, store, db, T, dir

  before_each(function()
    f = H.processor_fixture("wu", "wake_up")
    store, db, T, dir = f.store, f.db, f.T, f.dir
    -- A slow commit: an event of type Slow with aggregate_id "<name>-<ms>" sleeps that long in
    -- a deferred trigger, after its append statement (and its try for the wake-up's turn)
    -- and before the commit.
    assert(db:exec([[CREATE OR REPLACE FUNCTION t_wu_slow() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN PERFORM pg_sleep(split_part(NEW.aggregate_id, '-', 2)::int / 1000.0); RETURN NULL; END $$]]))
    assert(db:exec(([[CREATE CONSTRAINT TRIGGER t_wu_slow AFTER INSERT ON %s DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW WHEN (NEW.aggregate_type = 'Slow') EXECUTE FUNCTION t_wu_slow()]]):format(T.events_table)))
  end)

  after_each(function() f:close() end)

  local function seen(pos) return f:seen(pos) end
  local function start(words) return f:spawn(words) end

  -- A processor and a subscriber, both polling every 60 s, caught up with the log's first
  -- event. The subscriber prints each position it gets.
  local function start_readers()
    local events = T.events_table
    H.write_file(dir .. "/sub.lua", ([[
local pup = require "pupsourcing"
local db = assert(pup.connect())
local store = pup.store { events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q }
io.stdout:setvbuf("line")
print(assert(pup.subscribe(db, { from = 0, store = store, poll_interval = 60, idle_timeout = 30 }, function(e)
  print("event " .. e.global_position)
end)))
]]):format(events, T.aggregate_heads_table, T.checkpoints_table))
    local sub = start { H.bin, dir .. "/sub.lua" }
    local run = f:run(60000)
    local first = assert(store:append(db, pup.any(), { H.event { aggregate_id = "wu-0" } })).global_positions[1]
    H.wait_until("both readers have the first event", 20, function()
      assert.is_nil(H.exit_code(run), H.stderr_of(run))
      assert.is_nil(H.exit_code(sub), H.stderr_of(sub))
      return seen(first) == 1 and H.stdout_of(sub):find("event " .. first .. "\n", 1, true) ~= nil
    end, 0.02)
    pup.sleep(0.3) -- past their reads that found nothing more: both wait for a wake-up
    return run, sub
  end

  -- An append outside a transaction in a process of its own (application_name app) of an
  -- event of type Slow (see the trigger); returns the process once the append sleeps in
  -- its commit, or nil when it ended before it was seen there (a starved spec missed the
  -- window: the caller tries again). position_of(proc) is the position it printed.
  local function slow_append(app, id)
    H.write_file(dir .. "/" .. app .. ".lua", ([[
local pup = require "pupsourcing"
local db = assert(pup.connect())
assert(db:exec("SET application_name = '%s'"))
local store = pup.store { events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q }
print(assert(store:append(db, pup.any(), { { aggregate_type = "Slow", aggregate_id = %q,
  event_type = "Slowed", payload = "{}" } })).global_positions[1])
]]):format(app, T.events_table, T.aggregate_heads_table, T.checkpoints_table, id))
    local p = start { H.bin, dir .. "/" .. app .. ".lua" }
    local seen_in = H.wait_until(app .. " in its commit", 20, function()
      local code = H.exit_code(p)
      if code ~= nil then
        assert.equal(0, code, H.stderr_of(p))
        return "ended"
      end
      return assert(db:query("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1"
        .. " AND wait_event = 'PgSleep'", app))[1].n == 1 and "commit"
    end, 0.002)
    return seen_in == "commit" and p or nil
  end

  local function position_of(p)
    assert.equal(0, H.wait_exit(p, 20), H.stderr_of(p))
    return math.tointeger(tonumber(H.stdout_of(p):match("^(%d+)")))
  end

  it("an append that left its wake-up to another's, committing after it, is still read at once", function()
    local run, sub = start_readers()
    local hold, tx, h, slow
    for try = 1, 3 do
      -- Another append, in a transaction that holds the wake-up's turn (as an append outside a
      -- transaction does from its statement to its end).
      hold = H.connect()
      tx = assert(hold:begin())
      h = assert(store:append(tx, pup.any(), { H.event { aggregate_id = "wu-h" } })).global_positions[1]
      assert.is_true(assert(tx:query("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0)) AS got",
        "pupsourcing.wake-up/" .. T.events_table))[1].got)
      -- An append on its own, which finds the turn taken: it draws its position, skips its
      -- NOTIFY and commits 0.1 s later (the trigger), after the other one's wake-up; it is
      -- faster than WAKE_UP_SLOW_SECONDS (append.c), so it does not notify after its commit.
      slow = slow_append("wu_slow" .. try, "s-100")
      if slow then break end
      assert(tx:rollback())
      hold:close()
    end
    assert(slow, "the slow append was never seen inside its commit, in 3 tries")
    local t0 = pup.now()
    assert(tx:commit()) -- the other append's wake-up: the slow one is drawn, not committed
    hold:close()
    local s = position_of(slow)
    assert.is_true(s > h, "the slow append drew its position after the other one")
    H.wait_until("the processor has both events", 10, function() return seen(h) == 1 and seen(s) == 1 end, 0.005)
    local dt = pup.now() - t0
    H.wait_until("the subscriber has both events", 10, function()
      local out = H.stdout_of(sub)
      return out:find("event " .. h .. "\n", 1, true) and out:find("event " .. s .. "\n", 1, true)
    end, 0.005)
    local dt_sub = pup.now() - t0
    io.stderr:write(("wake_up: the slow append read %.0f ms (processor) and %.0f ms (subscriber) after the"
      .. " other's commit\n"):format(dt * 1000, dt_sub * 1000))
    assert.is_true(dt < 3, ("the processor read the slow append %.2f s after the wake-up"):format(dt))
    assert.is_true(dt_sub < 3, ("the subscriber read the slow append %.2f s after the wake-up"):format(dt_sub))
    assert.is_nil(H.exit_code(run), H.stderr_of(run))
  end)

  it("an append that left its wake-up to another's and commits long after it notifies after its commit", function()
    local run, sub = start_readers()
    local a, b
    for try = 1, 3 do
      a = slow_append("wu_a" .. try, "a-200") -- takes the turn, commits 0.2 s later
      if a then
        b = slow_append("wu_b" .. try, "b-1700") -- finds it taken, commits 1.7 s later: past the readers' look
        assert(b, "wu_b ended before it was seen inside its commit of 1.7 s")
        break
      end
    end
    assert(a, "wu_a was never seen inside its commit, in 3 tries")
    local pa = position_of(a)
    local pb = position_of(b)
    local t0 = pup.now() -- b has committed
    assert.is_true(pb > pa)
    H.wait_until("both readers have the slow append", 10, function()
      return seen(pb) == 1 and H.stdout_of(sub):find("event " .. pb .. "\n", 1, true) ~= nil
    end, 0.005)
    local dt = pup.now() - t0
    io.stderr:write(("wake_up: an append 1.5 s slower than the wake-up it left its own to was read %.0f ms"
      .. " after its commit\n"):format(dt * 1000))
    assert.is_true(dt < 1, ("read %.2f s after its commit"):format(dt))
    assert.is_nil(H.exit_code(run), H.stderr_of(run))
  end)

  it("store:wait on a db that is not listening starts and returns at once: what committed since the last read is not left to the poll", function()
    local reader = H.connect()
    local function positions(evs)
      local out = {}
      for i, e in ipairs(evs) do out[i] = e.global_position end
      return out
    end
    local _, cursor = assert(store:read_events(reader, 0, { limit = 1000 }))
    -- committed between the reader's read and its first wait: its NOTIFY had no listener
    local p1 = assert(store:append(db, pup.any(), { H.event { aggregate_id = "wu-first" } })).global_positions[1]
    local t = pup.now()
    assert.is_true(assert(store:wait(reader, 5)))
    assert.is_true(pup.now() - t < 1, ("the first wait took %.2f s"):format(pup.now() - t))
    local evs
    evs, cursor = assert(store:read_events(reader, cursor, { limit = 1000 }))
    assert.same({ p1 }, positions(evs))
    -- listening now: with nothing appended the wait runs its time
    t = pup.now()
    local heard, err = store:wait(reader, 0.3)
    assert.is_nil(err)
    assert.is_false(heard)
    assert.is_true(pup.now() - t >= 0.25, ("a wait with nothing to hear took %.2f s"):format(pup.now() - t))
    -- and an append's NOTIFY wakes it
    local p2 = assert(store:append(db, pup.any(), { H.event { aggregate_id = "wu-second" } })).global_positions[1]
    t = pup.now()
    assert.is_true(assert(store:wait(reader, 5)))
    assert.is_true(pup.now() - t < 1)
    evs, cursor = assert(store:read_events(reader, cursor, { limit = 1000 }))
    assert.same({ p2 }, positions(evs))
    -- after an UNLISTEN (pup.subscribe's, when it returns) it is not listening again
    assert(reader:exec("UNLISTEN *"))
    local p3 = assert(store:append(db, pup.any(), { H.event { aggregate_id = "wu-third" } })).global_positions[1]
    t = pup.now()
    assert.is_true(assert(store:wait(reader, 5)))
    assert.is_true(pup.now() - t < 1, ("the wait after UNLISTEN took %.2f s"):format(pup.now() - t))
    evs = assert(store:read_events(reader, cursor, { limit = 1000 }))
    assert.same({ p3 }, positions(evs))
    reader:close()
  end)

  it("a role that may read the events table only (not its sequence) reads the log", function()
    local url = H.url()
    url = url:find("://[^/]*@") and url:gsub("://[^@/]*@", "://pup_wu_ro@", 1) or url:gsub("://", "://pup_wu_ro@", 1)
    pcall(db.exec, db, "DROP ROLE IF EXISTS pup_wu_ro")
    assert(db:exec("CREATE ROLE pup_wu_ro LOGIN"))
    assert(db:exec("GRANT SELECT ON " .. T.events_table .. " TO pup_wu_ro"))
    local ok, err = pcall(function()
      local p1 = assert(store:append(db, pup.any(), { H.event { aggregate_id = "wu-ro" } })).global_positions[1]
      local tx = assert(db:begin()) -- drawn above the head, not committed
      assert(store:append(tx, pup.any(), { H.event { aggregate_id = "wu-ro2" } }))
      local ro = assert(pup.connect(url))
      local events, cursor = store:read_events(ro, 0)
      ro:close()
      assert(tx:rollback())
      assert(events, tostring(cursor))
      assert.equal(1, #events)
      assert.equal(p1, events[1].global_position)
      assert.is_nil(cursor.in_flight) -- unknown without the sequence: wake-ups and polls only
      events = store:read_events(db, 0) -- the owner reads the same
      assert.equal(1, #events)
    end)
    assert(db:exec("REVOKE ALL ON " .. T.events_table .. " FROM pup_wu_ro"))
    assert(db:exec("DROP ROLE pup_wu_ro"))
    assert(ok, err)
  end)

  it("8 writers appending at once: every event read once, at once, by a processor and a subscriber", function()
    local run, sub = start_readers()
    H.write_file(dir .. "/writer.lua", ([[
local pup = require "pupsourcing"
local db = assert(pup.connect())
local store = pup.store { events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q }
local me, at = arg[1], tonumber(arg[2])
pup.sleep(math.max(0, at - pup.now()))
for i = 1, 150 do
  assert(store:append(db, pup.any(), { { aggregate_type = "Burst", aggregate_id = me .. "-" .. i,
    event_type = "Burst", payload = "{}" } }))
  if i %% 30 == 0 then pup.sleep(0.05) end -- quiet moments: a wake-up lost there shows
end
]]):format(T.events_table, T.aggregate_heads_table, T.checkpoints_table))
    local at = pup.now() + 1
    local writers = {}
    for i = 1, 8 do writers[i] = start { H.bin, dir .. "/writer.lua", "w" .. i, tostring(at) } end
    for _, w in ipairs(writers) do assert.equal(0, H.wait_exit(w, 60), H.stderr_of(w)) end
    local t0 = pup.now()
    local total = assert(db:query("SELECT count(*) AS n FROM " .. T.events_table))[1].n
    assert.equal(1 + 8 * 150, total)
    H.wait_until("the processor has every event", 10, function() return seen() == total end, 0.01)
    H.wait_until("the subscriber has every event", 10, function()
      local _, n = H.stdout_of(sub):gsub("event %d+\n", "")
      return n == total
    end, 0.01)
    local dt = pup.now() - t0
    io.stderr:write(("wake_up: caught up %.0f ms after the last writer ended\n"):format(dt * 1000))
    assert.is_true(dt < 3, ("caught up %.2f s after the last writer ended"):format(dt))
    -- once each
    assert.equal(0, assert(db:query("SELECT count(*) AS n FROM (SELECT pos FROM t_wu_seen GROUP BY pos"
      .. " HAVING count(*) > 1) d"))[1].n)
    local got = {}
    for p in H.stdout_of(sub):gmatch("event (%d+)\n") do
      assert.is_nil(got[p], "the subscriber got position " .. p .. " twice")
      got[p] = true
    end
    assert.is_nil(H.exit_code(run), H.stderr_of(run))
  end)
end)
