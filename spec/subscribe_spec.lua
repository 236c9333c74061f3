-- Issue 15: pup.subscribe(db, opts, fn), gap-safe and at least once from the caller's
-- position. A subscriber in another process follows the log while this spec commits
-- appends out of order and rolls some back: it gets every committed event once, in order.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local T = H.tables("subs")

-- A subscriber process: records each delivered position in t_subs_delivered, stops at
-- the first "Stop" event and prints the cursor it returned and why.
local function subscriber_script(opts)
  return ([[
    local pup = require "pupsourcing"
    local db = assert(pup.connect())
    local rec = assert(pup.connect())
    local store = pup.store { events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q }
    local opts = %s
    opts.store = store
    local cursor, why = pup.subscribe(db, opts, function(e)
      if e.event_type == "Stop" then return false end
      assert(rec:exec("INSERT INTO t_subs_delivered (pos, at) VALUES ($1, clock_timestamp())", e.global_position))
    end)
    print(cursor.position, why)
  ]]):format(T.events_table, T.aggregate_heads_table, T.checkpoints_table, opts)
end

describe("pup.subscribe", function()
  local store, db, dir
  local conns = H.connections()
  local connect = conns.connect

  before_each(function()
    store, db = H.fresh_store("subs")
    assert(db:exec("DROP TABLE IF EXISTS t_subs_delivered"))
    assert(db:exec("CREATE TABLE t_subs_delivered (n bigserial PRIMARY KEY, pos bigint NOT NULL, at timestamptz)"))
    dir = H.tmpdir()
  end)

  after_each(function()
    conns.close_all()
    db:close()
    H.rmdir(dir)
  end)

  local function spawn(opts)
    H.write_file(dir .. "/sub.lua", subscriber_script(opts))
    return H.spawn({ H.bin, dir .. "/sub.lua" })
  end

  local function append(conn, id, over)
    local ev = H.event(over)
    ev.aggregate_id = id
    return assert(store:append(conn, pup.any(), { ev })).global_positions[1]
  end

  local function delivered()
    local out = {}
    for i, r in ipairs(assert(db:query("SELECT pos FROM t_subs_delivered ORDER BY n"))) do out[i] = r.pos end
    return out
  end

  it("next to out-of-order commits and rollbacks: every committed event once, in order", function()
    local seed = tonumber(os.getenv("PUP_SEED") or "") or os.time()
    math.randomseed(seed)
    local proc = spawn("{ from = 0, batch_size = 3, poll_interval = 0.05 }")
    local writers, open = {}, {}
    for i = 1, 4 do writers[i] = connect() end
    for step = 1, 250 do
      local w = math.random(#writers)
      local r = math.random()
      if not open[w] then
        open[w] = assert(writers[w]:begin())
      elseif r < 0.55 then
        append(open[w], ("agg%d_%d"):format(w, step))
      elseif r < 0.85 then
        assert(open[w]:commit())
        open[w] = nil
      else
        assert(open[w]:rollback())
        open[w] = nil
      end
      if math.random() < 0.25 then append(db, "auto" .. step) end
      if math.random() < 0.1 then pup.sleep(0.005) end -- let the subscriber catch up now and then
    end
    for _, tx in pairs(open) do
      if math.random() < 0.5 then assert(tx:commit()) else assert(tx:rollback()) end
    end
    local stop = append(db, "stop", { event_type = "Stop" })
    assert.equal(0, H.wait_exit(proc, 30), H.stderr_of(proc))
    assert.equal(stop .. "\tstopped\n", H.stdout_of(proc))
    local want = {}
    for i, r in ipairs(assert(db:query(("SELECT global_position AS p FROM %s WHERE event_type <> 'Stop' ORDER BY 1")
        :format(store:names().events_quoted)))) do want[i] = r.p end
    assert.is_true(#want > 50, "seed " .. seed)
    assert.same(want, delivered(), "seed " .. seed)
  end)

  it("wakes on an append's notification (not the poll interval) and resumes from a cursor or position", function()
    local first = append(db, "w1")
    local proc = spawn("{ from = 0, poll_interval = 30 }")
    H.wait_until("the first event", 20, function() return #delivered() == 1 end)
    pup.sleep(0.2) -- the subscriber waits now
    local t0 = pup.now()
    local second = append(db, "w2")
    H.wait_until("the second event", 20, function() return #delivered() == 2 end)
    assert.is_true(pup.now() - t0 < 5, "woken by the notification, not the 30 s poll")
    local stop = append(db, "w3", { event_type = "Stop" })
    assert.equal(0, H.wait_exit(proc, 20), H.stderr_of(proc))
    assert.same({ first, second }, delivered())
    assert.equal(stop .. "\tstopped\n", H.stdout_of(proc))
    -- in process: resume after the stop event, stop when idle
    local got = {}
    local cursor, why = pup.subscribe(db, { from = stop, store = store, idle_timeout = 0.2 }, function(e)
      got[#got + 1] = e.global_position
    end)
    assert.same({}, got)
    assert.equal("idle", why)
    assert.equal(stop, cursor.position)
    local later = append(db, "w4")
    cursor, why = pup.subscribe(db, { from = cursor, store = store, idle_timeout = 0.2 }, function(e)
      got[#got + 1] = e.global_position
    end)
    assert.same({ later }, got)
    assert.equal(later, cursor.position)
    assert.equal("idle", why)
  end)

  it("filters by aggregate and event type; fn returning false stops at that event", function()
    local ps = {}
    for i = 1, 6 do ps[i] = append(db, "f" .. i, { aggregate_type = i % 2 == 0 and "Even" or "Odd" }) end
    local got = {}
    local cursor, why = pup.subscribe(db, { from = 0, store = store, aggregate_types = { "Even" }, batch_size = 10 },
      function(e)
        got[#got + 1] = e.global_position
        if #got == 2 then return false end
      end)
    assert.equal("stopped", why)
    assert.same({ ps[2], ps[4] }, got)
    assert.equal(ps[4], cursor.position) -- resuming delivers what follows the stopping event
    got = {}
    pup.subscribe(db, { from = cursor, store = store, aggregate_types = { "Even" }, idle_timeout = 0.1 },
      function(e) got[#got + 1] = e.global_position end)
    assert.same({ ps[6] }, got)
  end)

  it("raises on misuse; a failing read returns nil, err and the cursor to resume from", function()
    local fn = function() end
    assert.has_error(function() pup.subscribe(db, { store = store }, fn) end,
      "pup.subscribe: opts.from is required: a position (0 = the start of the log) or a cursor")
    assert.has_error(function() pup.subscribe(db, { from = 0, store = store, frm = 1 }, fn) end,
      "pup.subscribe: unknown option frm")
    assert.has_error(function() pup.subscribe(db, { from = 0, store = store }) end)
    assert.has_error(function() pup.subscribe(db, { from = 0, store = store, poll_interval = 0 }, fn) end)
    local tx = assert(db:begin())
    assert.has_error(function() pup.subscribe(tx, { from = 0, store = store }, fn) end)
    assert(tx:rollback())
    -- fn's error propagates as it was raised
    append(db, "e1")
    local ok, err = pcall(pup.subscribe, db, { from = 0, store = store }, function() error({ mine = true }) end)
    assert.is_false(ok)
    assert.same({ mine = true }, err)
    -- the store's tables gone: nil, err (not_migrated) and the cursor
    local gone = pup.store(H.tables("subs_gone"))
    local res, e2, cur = pup.subscribe(db, { from = 5, store = gone }, fn)
    assert.is_nil(res)
    assert.equal("not_migrated", e2.code)
    assert.equal(5, cur)
  end)
end)
