-- Issue 15: store:load, store:handle (retries, rejections, a caller's transaction),
-- snapshots and upcasters, against the real PostgreSQL.
local H = require "spec.helpers"
local pup = require "pupsourcing"

local AREA = "agg"

-- A fresh store on t_agg_* with its snapshots table emptied too (drop_tables does not
-- know it).
local function fresh(db)
  db = db or H.connect()
  assert(db:exec('DROP TABLE IF EXISTS "t_' .. AREA .. '_events_snapshots"'))
  return H.fresh_store(AREA, db)
end

-- A bank account: every Deposited carries the balance it leads to, so a lost update (a
-- command decided on a stale state) shows in the log.
local function Account(over)
  local def = {
    initial = function() return { balance = 0, deposits = 0 } end,
    evolve = function(s, e)
      if e.event_type == "Deposited" then
        s.balance = s.balance + e.data.amount
        s.deposits = s.deposits + 1
      elseif e.event_type == "Withdrawn" then
        s.balance = s.balance - e.data.amount
      end
      return s
    end,
  }
  for k, v in pairs(over or {}) do def[k] = v end
  return def
end

local function deposit(amount)
  return function(s)
    return { { event_type = "Deposited", payload = { amount = amount, balance_after = s.balance + amount } } }
  end
end

local function withdraw(amount)
  return function(s)
    if s.balance < amount then return nil, { code = "insufficient_funds", message = "insufficient funds" } end
    return { { event_type = "Withdrawn", payload = { amount = amount } } }
  end
end

local function count(db, T, sql_where)
  return db:query(('SELECT count(*) AS n FROM "%s" %s'):format(T.events_table, sql_where or ""))[1].n
end

describe("store:load", function()
  local store, db
  before_each(function() store, db = fresh() end)
  after_each(function() db:close() end)

  it("returns initial() and 0 for an aggregate without events", function()
    local state, version = store:load(db, "Account", "a-none", Account())
    assert.same({ balance = 0, deposits = 0 }, state)
    assert.equal(0, version)
    assert.equal("integer", math.type(version))
  end)

  it("folds the stream with evolve; integers stay integers", function()
    assert(store:append(db, pup.no_stream(), {
      { aggregate_type = "Account", aggregate_id = "a1", event_type = "Deposited", payload = { amount = 5 } },
      { aggregate_type = "Account", aggregate_id = "a1", event_type = "Deposited", payload = { amount = 7 } },
      { aggregate_type = "Account", aggregate_id = "a1", event_type = "Withdrawn", payload = { amount = 2 } } }))
    local state, version = store:load(db, "Account", "a1", Account())
    assert.same({ balance = 10, deposits = 2 }, state)
    assert.equal(3, version)
    assert.equal("integer", math.type(state.balance))
  end)

  it("raises on misuse", function()
    assert.has_error(function() store:load(db, "Account", "a1", { initial = function() return {} end }) end,
      "load: `evolve` must be a function(state, event) -> state")
    assert.has_error(function() store:load(db, "Account", "a1", Account { initail = 1 }) end,
      "load: unknown option initail")
    assert.has_error(function() store:load(db, "Account", "a1", Account { snapshot_every = 0 }) end,
      "load: `snapshot_every` must be a positive integer")
    assert.has_error(function() store:load(db, "Account", "a1", Account { snapshot_version = 1.5 }) end,
      "load: `snapshot_version` must be an integer 0..2147483647")
    assert.has_error(function() store:load(db, "", "a1", Account()) end)
    assert.has_error(function() store:load(db, "Account", 1, Account()) end)
    assert.has_error(function() store:load(db, "Account", "a1", Account { initial = function() end }) end,
      "initial() returned nil: it must return the state")
    assert(store:handle(db, "Account", "a1", deposit(1), Account()))
    assert.has_error(function()
      store:load(db, "Account", "a1", Account { evolve = function() end })
    end, "evolve returned nil for Deposited version 1 (aggregate version 1): it must return the state")
  end)

  it("returns nil, err (not_migrated) when the tables are missing", function()
    local other = pup.store { events_table = "t_agg_nothing_here" }
    local state, err = other:load(db, "Account", "a1", Account())
    assert.is_nil(state)
    assert.equal("not_migrated", err.code)
  end)
end)

describe("store:handle", function()
  local store, db, T
  before_each(function() store, db, T = fresh() end)
  after_each(function() db:close() end)

  it("loads, decides, appends with exact(version) and returns the new state, version and positions", function()
    local state, version, res = store:handle(db, "Account", "h1", deposit(10), Account())
    assert.same({ balance = 10, deposits = 1 }, state)
    assert.equal(1, version)
    assert.equal(1, #res.global_positions)
    assert.equal(1, res.attempts)
    state, version = assert(store:handle(db, "Account", "h1", function(s)
      return { { event_type = "Deposited", payload = { amount = 1, balance_after = s.balance + 1 } },
               { event_type = "Withdrawn", payload = { amount = 4 } } }
    end, Account()))
    assert.same({ balance = 7, deposits = 2 }, state)
    assert.equal(3, version)
    assert.same(state, (store:load(db, "Account", "h1", Account())))
  end)

  it("a rejection returns code rejected with the reason and writes nothing", function()
    local state, err = store:handle(db, "Account", "r1", withdraw(5), Account())
    assert.is_nil(state)
    assert.equal("rejected", err.code)
    assert.equal("insufficient funds", err.message)
    assert.equal("insufficient_funds", err.reason.code)
    assert.equal("rejected: insufficient funds", tostring(err))
    assert.equal(0, count(db, T))
    assert.equal(0, db:query(('SELECT count(*) AS n FROM "%s"'):format(T.aggregate_heads_table))[1].n)
    -- a plain string reason, and no reason at all
    local _, e2 = store:handle(db, "Account", "r1", function() return nil, "closed" end, Account())
    assert.equal("rejected", e2.code)
    assert.equal("closed", e2.message)
    local _, e3 = store:handle(db, "Account", "r1", function() return nil end, Account())
    assert.equal("command rejected", e3.message)
    assert.equal(0, count(db, T))
  end)

  it("no events decided: nothing written, the state and version as loaded", function()
    assert(store:handle(db, "Account", "n1", deposit(3), Account()))
    local state, version, res = store:handle(db, "Account", "n1", function() return {} end, Account())
    assert.same({ balance = 3, deposits = 1 }, state)
    assert.equal(1, version)
    assert.same({}, res.global_positions)
    assert.equal(1, count(db, T))
  end)

  it("raises on misuse, returns invalid_event for bad events", function()
    assert.has_error(function() store:handle(db, "Account", "m1", "decide", Account()) end,
      "bad argument #4 to 'handle' (decide function expected)")
    assert.has_error(function() store:handle(db, "Account", "m1", deposit(1), Account { max_retries = -1 }) end,
      "handle: `max_retries` must be an integer 0..1000")
    assert.has_error(function() store:handle(db, "Account", "m1", deposit(1), Account { retry_dalay = 1 }) end,
      "handle: unknown option retry_dalay")
    assert.has_error(function() store:handle(db, "Account", "m1", function() return "x" end, Account()) end,
      "decide must return a list of events or nil, err; got string")
    local _, err = store:handle(db, "Account", "m1", function()
      return { { event_type = "Deposited", aggregate_id = "other", payload = { amount = 1 } } }
    end, Account())
    assert.equal("invalid_event", err.code)
    assert.matches("aggregate_id other is not the command's aggregate m1", err.message, 1, true)
    _, err = store:handle(db, "Account", "m1", function() return { { payload = {} } } end, Account())
    assert.equal("invalid_event", err.code)
    _, err = store:handle(db, "Account", "m1", function()
      return { { event_type = "Deposited", payload = { amount = 0 / 0 } } }
    end, Account())
    assert.equal("invalid_event", err.code)
    assert.equal(0, count(db, T))
  end)

  it("retries a lost race with a fresh load, and gives up after max_retries", function()
    local other = H.connect()
    finally(function() other:close() end)
    -- decide lets another writer in the first time: the append conflicts, handle reloads
    local raced = 0
    local state, version, res = store:handle(db, "Account", "c1", function(s)
      if raced == 0 then
        raced = raced + 1
        assert(store:handle(other, "Account", "c1", deposit(100), Account()))
      end
      return deposit(1)(s)
    end, Account())
    assert.same({ balance = 101, deposits = 2 }, state)
    assert.equal(2, version)
    assert.equal(2, res.attempts)
    -- a writer that always wins: max_retries + 1 attempts, then the conflict
    local attempts = 0
    local s2, err = store:handle(db, "Account", "c1", function(s)
      attempts = attempts + 1
      assert(store:handle(other, "Account", "c1", deposit(1), Account()))
      return deposit(1)(s)
    end, Account { max_retries = 2, retry_delay = 0 })
    assert.is_nil(s2)
    assert.equal("optimistic_concurrency", err.code)
    assert.equal(3, attempts)
    assert.equal(3, err.attempts)
  end)

  it("in a caller's transaction: its writes commit with the events; a rollback leaves nothing", function()
    assert(db:exec("DROP TABLE IF EXISTS t_agg_audit"))
    assert(db:exec("CREATE TABLE t_agg_audit (id text, note text)"))
    local def = Account { snapshot_every = 1 }
    local ok, err = db:transaction(function(tx)
      assert(store:handle(tx, "Account", "t1", deposit(5), def))
      assert(tx:exec("INSERT INTO t_agg_audit VALUES ('t1', 'deposit')"))
      error("the caller changes its mind")
    end)
    assert.is_nil(ok)
    assert.matches("changes its mind", err.message)
    assert.equal(0, count(db, T))
    assert.equal(0, db:query("SELECT count(*) AS n FROM t_agg_audit")[1].n)
    assert.equal(0, db:query('SELECT count(*) AS n FROM "t_agg_events_snapshots"')[1].n)
    assert.equal(0, db:query(('SELECT count(*) AS n FROM "%s"'):format(T.aggregate_heads_table))[1].n)
    -- the same, committed: events, the caller's row and the snapshot together
    assert(db:transaction(function(tx)
      assert(store:handle(tx, "Account", "t1", deposit(5), def))
      assert(tx:exec("INSERT INTO t_agg_audit VALUES ('t1', 'deposit')"))
    end))
    assert.equal(1, count(db, T))
    assert.equal(1, db:query("SELECT count(*) AS n FROM t_agg_audit")[1].n)
    assert.equal(1, db:query('SELECT count(*) AS n FROM "t_agg_events_snapshots"')[1].n)
    assert(db:exec("DROP TABLE t_agg_audit"))
  end)

  it("in a caller's transaction a conflict is returned at once, not retried", function()
    local other = H.connect()
    finally(function() other:close() end)
    local attempts = 0
    local tx = assert(db:begin())
    local state, err = store:handle(tx, "Account", "t2", function(s)
      attempts = attempts + 1
      assert(store:handle(other, "Account", "t2", deposit(1), Account()))
      return deposit(1)(s)
    end, Account())
    assert.is_nil(state)
    assert.equal("optimistic_concurrency", err.code)
    assert.equal(1, attempts)
    assert(tx:rollback())
    assert.equal(1, count(db, T))
  end)
end)

-- The 8 writers: each sends N deposits to random accounts of 10, with retries, and
-- prints how many it got through.
local WRITER = [[
local pup = require "pupsourcing"
local url, ev, hd, ck, n, seed = table.unpack(arg)
math.randomseed(tonumber(seed))
local db = assert(pup.connect(url))
local store = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
local def = {
  initial = function() return { balance = 0 } end,
  evolve = function(s, e) s.balance = s.balance + e.data.amount return s end,
  max_retries = 50, retry_delay = 0.001, snapshot_every = 7,
}
local ok, conflicts = 0, 0
for _ = 1, tonumber(n) do
  local id = "hot-" .. math.random(1, 10)
  local amount = math.random(1, 100)
  local s, v, res = store:handle(db, "Account", id, function(st)
    return { { event_type = "Deposited", payload = { amount = amount, balance_after = st.balance + amount } } }
  end, def)
  if s then
    ok = ok + 1
    conflicts = conflicts + res.attempts - 1
  else
    assert(v.code == "optimistic_concurrency", tostring(v))
  end
end
print(ok, conflicts)
]]

describe("store:handle from 8 processes on 10 hot accounts", function()
  it("no lost update: every balance_after is its predecessor plus the amount; final states equal folds", function()
    local store, db, T = fresh()
    local dir = H.tmpdir()
    H.write_file(dir .. "/writer.lua", WRITER)
    local procs = {}
    for i = 1, 8 do
      procs[i] = H.spawn({ H.bin, dir .. "/writer.lua", H.url(), T.events_table, T.aggregate_heads_table,
                           T.checkpoints_table, "60", tostring(1000 + i) })
    end
    local succeeded, retried = 0, 0
    for i, p in ipairs(procs) do
      local rc = H.wait_exit(p, 90)
      assert.equal(0, rc, "writer " .. i .. ": " .. H.stderr_of(p))
      local ok, conflicts = H.stdout_of(p):match("^(%d+)\t(%d+)")
      succeeded, retried = succeeded + tonumber(ok), retried + tonumber(conflicts)
      H.reap(p)
    end
    H.rmdir(dir)
    assert.equal(succeeded, count(db, T))
    assert.is_true(retried > 0, "the accounts were not hot: no command was retried")
    local def = {
      initial = function() return { balance = 0 } end,
      evolve = function(s, e)
        assert.equal(s.balance + e.data.amount, e.data.balance_after,
          ("%s version %d decided on a stale state"):format(e.aggregate_id, e.aggregate_version))
        s.balance = e.data.balance_after
        return s
      end,
    }
    local total = 0
    for a = 1, 10 do
      local id = "hot-" .. a
      local full, version = store:load(db, "Account", id, def)
      local snap = store:load(db, "Account", id, { initial = def.initial, evolve = def.evolve, snapshot_every = 7 })
      assert.same(full, snap)
      local events = store:read_aggregate_stream(db, "Account", id)
      assert.equal(#events, version)
      for i, e in ipairs(events) do assert.equal(i, e.aggregate_version) end
      total = total + version
    end
    assert.equal(succeeded, total)
    db:close()
  end)
end)

describe("snapshots", function()
  local store, db, T
  local SNAP = '"t_agg_events_snapshots"'
  before_each(function() store, db, T = fresh() end)
  after_each(function() db:close() end)

  local function snapshot_row(id)
    return db:query("SELECT version, snapshot_version, convert_from(state, 'UTF8') AS state FROM " .. SNAP
      .. " WHERE aggregate_type = 'Account' AND aggregate_id = $1", id)[1]
  end

  it("migrate creates the table; read_snapshot_stream returns the snapshot and the events after it", function()
    assert.truthy(store:schema_sql():find('CREATE TABLE IF NOT EXISTS "t_agg_events_snapshots"', 1, true))
    local def = Account { snapshot_every = 3 }
    for i = 1, 7 do assert(store:handle(db, "Account", "s1", deposit(i), def)) end
    local row = snapshot_row("s1")
    assert.equal(6, row.version) -- 3 events after the snapshot at 3
    assert.equal(1, row.snapshot_version)
    local events, state, version = store:read_snapshot_stream(db, "Account", "s1", 1)
    assert.equal(6, version)
    assert.same({ balance = 21, deposits = 6 }, pup.json.decode(state))
    assert.equal(1, #events)
    assert.equal(7, events[1].aggregate_version)
    assert.equal(7, events.version)
    -- another snapshot_version: no snapshot, every event
    events, state, version = store:read_snapshot_stream(db, "Account", "s1", 2)
    assert.is_nil(state)
    assert.equal(0, version)
    assert.equal(7, #events)
  end)

  it("load uses the snapshot (a doctored one shows), raising snapshot_version ignores it", function()
    local def = Account { snapshot_every = 2 }
    for i = 1, 5 do assert(store:handle(db, "Account", "s2", deposit(i), def)) end
    assert.same({ balance = 15, deposits = 5 }, (store:load(db, "Account", "s2", def)))
    assert(db:exec("UPDATE " .. SNAP .. [[ SET state = convert_to('{"balance":1000,"deposits":4}', 'UTF8')]]))
    assert.same({ balance = 1005, deposits = 5 }, (store:load(db, "Account", "s2", def)))
    local v2 = Account { snapshot_every = 2, snapshot_version = 2 }
    assert.same({ balance = 15, deposits = 5 }, (store:load(db, "Account", "s2", v2)))
    -- the first command of the new version writes a snapshot of it; the old version's
    -- writers no longer replace it
    local _, _, res = assert(store:handle(db, "Account", "s2", deposit(6), v2))
    assert.is_true(res.snapshot)
    assert.same({ version = 6, snapshot_version = 2 }, { version = snapshot_row("s2").version,
                                                         snapshot_version = snapshot_row("s2").snapshot_version })
    assert.is_false(store:write_snapshot(db, "Account", "s2", 7, 1, "{}"))
    assert.equal(2, snapshot_row("s2").snapshot_version)
    assert.is_false(store:write_snapshot(db, "Account", "s2", 5, 2, "{}"))
    assert.is_true(store:write_snapshot(db, "Account", "s2", 8, 2, '{"balance":0,"deposits":0}'))
  end)

  it("loads from snapshots equal full folds over random histories, across a snapshot_version change", function()
    math.randomseed(15)
    local plain = Account()
    for a = 1, 12 do
      local id = "r" .. a
      local every = math.random(1, 9)
      local def = Account { snapshot_every = every }
      local def2 = Account { snapshot_every = math.random(1, 9), snapshot_version = 2 }
      for step = 1, math.random(5, 60) do
        local d = step > 30 and def2 or def
        local decide
        local k = math.random(1, 4)
        if k == 1 then decide = withdraw(math.random(1, 50))
        elseif k == 2 then decide = function(s) -- several events in one command
          return { { event_type = "Deposited", payload = { amount = 2, balance_after = s.balance + 2 } },
                   { event_type = "Deposited", payload = { amount = 3, balance_after = s.balance + 5 } } }
        end
        else decide = deposit(math.random(1, 40)) end
        local state, err = store:handle(db, "Account", id, decide, d)
        assert(state or err.code == "rejected", tostring(err))
        for _, x in ipairs { def, def2 } do
          local full, fv = store:load(db, "Account", id, plain)
          local snap, sv = store:load(db, "Account", id, x)
          assert.same(full, snap)
          assert.equal(fv, sv)
        end
      end
    end
    assert.is_true(db:query("SELECT count(*) AS n FROM " .. SNAP .. " WHERE snapshot_version = 2")[1].n > 0)
  end)

  it("a snapshot that cannot be written never fails the command", function()
    -- the table refuses writes
    assert(db:exec([[CREATE OR REPLACE FUNCTION t_agg_refuse() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN RAISE EXCEPTION 'no snapshots today'; END $$]]))
    assert(db:exec("CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON " .. SNAP
      .. " FOR EACH ROW EXECUTE FUNCTION t_agg_refuse()"))
    local def = Account { snapshot_every = 1 }
    local state, version, res = store:handle(db, "Account", "f1", deposit(4), def)
    assert.same({ balance = 4, deposits = 1 }, state)
    assert.equal(1, version)
    assert.equal("database", res.snapshot_error.code)
    assert.matches("no snapshots today", res.snapshot_error.message)
    assert.equal(1, count(db, T))
    -- inside a caller's transaction the failure is confined to a savepoint
    assert(db:transaction(function(tx)
      local _, _, r = assert(store:handle(tx, "Account", "f1", deposit(1), def))
      assert.equal("database", r.snapshot_error.code)
      assert(tx:exec("SELECT 1")) -- the transaction is still usable
    end))
    assert.equal(2, count(db, T))
    assert(db:exec("DROP TRIGGER refuse ON " .. SNAP))
    -- a state JSON cannot give back as it is: not written, loads stay right
    local sparse = Account { snapshot_every = 1, initial = function() return { balance = 0, deposits = 0, seen = {} } end }
    local evolve = sparse.evolve
    sparse.evolve = function(s, e)
      s = evolve(s, e)
      s.seen[e.aggregate_version * 2] = true -- integer keys: JSON makes them strings
      return s
    end
    local _, _, r = assert(store:handle(db, "Account", "f1", deposit(1), sparse))
    assert.equal("invalid_argument", r.snapshot_error.code)
    assert.equal(0, db:query("SELECT count(*) AS n FROM " .. SNAP)[1].n)
    assert.same((store:load(db, "Account", "f1", Account())).balance, 6)
  end)

  it("a snapshot row locked by another transaction is skipped, not waited for", function()
    local def = Account { snapshot_every = 1 }
    assert(store:handle(db, "Account", "l1", deposit(1), def))
    local other = H.connect()
    local tx = assert(other:begin())
    finally(function() other:close() end) -- (closing rolls back)
    assert(tx:query("SELECT 1 FROM " .. SNAP .. " WHERE aggregate_id = 'l1' FOR UPDATE"))
    local t0 = pup.now()
    assert(db:exec("SET statement_timeout = '5s'"))
    local _, version, res = assert(store:handle(db, "Account", "l1", deposit(1), def))
    assert.is_true(pup.now() - t0 < 2, "the command waited for the locked snapshot")
    assert.equal(2, version)
    assert.is_false(res.snapshot)
    assert(tx:rollback())
    assert.equal(1, snapshot_row("l1").version)
  end)
end)

describe("upcasters", function()
  local store, db, T
  local registered = {}
  local function upcast(t, v, fn)
    pup.upcast(t, v, fn)
    registered[#registered + 1] = { t, v }
  end
  before_each(function() store, db, T = fresh() end)
  after_each(function()
    for _, r in ipairs(registered) do pup.remove_upcaster(r[1], r[2]) end
    registered = {}
    db:close()
  end)

  -- history in two old shapes: MoneyIn v1 {amt=} and Deposited v1 {amt=}, then v2
  local function old_history(id)
    assert(store:append(db, pup.no_stream(), {
      { aggregate_type = "Account", aggregate_id = id, event_type = "MoneyIn", payload = { amt = 5 } },
      { aggregate_type = "Account", aggregate_id = id, event_type = "Deposited", payload = { amt = 7 } },
      { aggregate_type = "Account", aggregate_id = id, event_type = "Deposited", event_version = 2,
        payload = { amount = 1 } } }))
  end
  local function register()
    upcast("MoneyIn", 1, function(data) return data, "Deposited", 1 end)
    upcast("Deposited", 1, function(data) return { amount = data.amt } end)
  end
  local function check_upcast(events)
    assert.equal(3, #events)
    for i, e in ipairs(events) do
      assert.equal("Deposited", e.event_type, i)
      assert.equal(2, e.event_version, i)
    end
    assert.same({ amount = 5 }, events[1].data)
    assert.same({ amount = 7 }, events[2].data)
    assert.same({ amount = 1 }, events[3].data)
    assert.equal("MoneyIn", events[1].stored_event_type)
    assert.equal(1, events[1].stored_event_version)
    assert.equal('{"amt":5}', events[1].payload)
    assert.is_nil(events[3].stored_event_type)
  end

  it("are applied by read_aggregate_stream, read_events, load and handle; stored bytes never change", function()
    old_history("u1")
    assert.equal("MoneyIn", store:read_aggregate_stream(db, "Account", "u1")[1].event_type)
    register()
    check_upcast(store:read_aggregate_stream(db, "Account", "u1"))
    check_upcast(store:read_events(db, 0))
    assert.same({ balance = 13, deposits = 3 }, (store:load(db, "Account", "u1", Account())))
    -- new events are written in the current shape (version 2), so no upcaster applies
    local deposit2 = function(s)
      return { { event_type = "Deposited", event_version = 2, payload = { amount = 2, balance_after = s.balance + 2 } } }
    end
    local snap = Account { snapshot_every = 2 }
    assert.same({ balance = 15, deposits = 4 }, (store:handle(db, "Account", "u1", deposit2, snap)))
    assert.same({ balance = 17, deposits = 5 }, (store:handle(db, "Account", "u1", deposit2, snap)))
    assert.same({ balance = 17, deposits = 5 }, (store:load(db, "Account", "u1", snap)))
    -- an event decided in an old shape is upcast before evolve sees it, as a load would
    local state = store:handle(db, "Account", "u1", function()
      return { { event_type = "MoneyIn", payload = { amt = 3 } } }
    end, Account())
    assert.same({ balance = 20, deposits = 6 }, state)
    assert.same(state, (store:load(db, "Account", "u1", Account())))
    -- the stored rows are as written
    local rows = db:query(('SELECT event_type, event_version, convert_from(payload, \'UTF8\') AS p FROM "%s"'
      .. ' ORDER BY global_position LIMIT 2'):format(T.events_table))
    assert.same({ event_type = "MoneyIn", event_version = 1, p = '{"amt":5}' }, rows[1])
    assert.same({ event_type = "Deposited", event_version = 1, p = '{"amt":7}' }, rows[2])
    -- removed: the stored shapes again
    assert.is_true(pup.remove_upcaster("MoneyIn", 1))
    assert.is_false(pup.remove_upcaster("MoneyIn", 1))
    assert.equal("MoneyIn", store:read_aggregate_stream(db, "Account", "u1")[1].event_type)
  end)

  it("are applied to the events projection handlers get", function()
    old_history("u2")
    register()
    local seen = {}
    local p = pup.processor(db, {
      name = "agg_upcast_seen",
      handle = function(_, e) seen[#seen + 1] = e end,
    }, { store = store })
    assert.equal(3, p:run_once())
    p:close()
    check_upcast(seen)
  end)

  it("misuse raises: bad arguments, a second registration, a bad result, a cycle", function()
    assert.has_error(function() pup.upcast("", 1, function() end) end)
    assert.has_error(function() pup.upcast("E", 0, function() end) end)
    assert.has_error(function() pup.upcast("E", 1, "f") end)
    assert.has_error(function() pup.remove_upcaster("E", "1") end)
    upcast("E", 1, function() return 42 end)
    assert.has_error(function() pup.upcast("E", 1, function() end) end,
      "upcast: an upcaster for E version 1 is already registered")
    assert(store:append(db, pup.no_stream(), { { aggregate_type = "A", aggregate_id = "x", event_type = "E", payload = {} },
                                               { aggregate_type = "A", aggregate_id = "x", event_type = "F", payload = {} } }))
    assert.has_error(function() store:read_aggregate_stream(db, "A", "x") end,
      "upcaster of E version 1 (event at position 1) returned number, not the payload table")
    pup.remove_upcaster("E", 1)
    upcast("F", 1, function(d) return d, "F", 1 end)
    assert.has_error(function() store:read_aggregate_stream(db, "A", "x") end,
      "upcasters of F version 1: more than 100 steps (a cycle?)")
  end)
end)
