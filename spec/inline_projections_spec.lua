-- Issue 15: inline projections (store:inline): handlers inside the appending transaction;
-- a failing one fails the append and nothing is written, also inside a caller's
-- transaction. Against the real PostgreSQL.
local H = require "spec.helpers"
local pup = require "pupsourcing"

local AREA = "inl"
local RM = "t_inl_balances"

-- A fresh store on t_inl_* (a new store object each time: inline registrations are per
-- store) and no read model table.
local function fresh()
  local db = H.connect()
  assert(db:exec('DROP TABLE IF EXISTS "t_' .. AREA .. '_events_snapshots"'))
  assert(db:exec("DROP TABLE IF EXISTS " .. RM))
  return H.fresh_store(AREA, db)
end

-- The read model: a balance per account; `fail_on` (an amount) makes its handler raise,
-- `seen` collects the events it got.
local function balances(fail_on, seen, over)
  local p = {
    name = "inl_balances",
    aggregate_types = { "Account" },
    setup = function(tx)
      assert(tx:exec("CREATE TABLE IF NOT EXISTS " .. RM .. " (id text PRIMARY KEY, balance bigint NOT NULL, pos bigint NOT NULL)"))
    end,
    handle = function(tx, e)
      if seen then seen[#seen + 1] = e end
      if fail_on and e.data.amount == fail_on then error("amount " .. fail_on .. " refused by the read model") end
      assert(tx:exec("INSERT INTO " .. RM .. " AS b VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE"
        .. " SET balance = b.balance + EXCLUDED.balance, pos = EXCLUDED.pos", e.aggregate_id, e.data.amount, e.global_position))
    end,
  }
  for k, v in pairs(over or {}) do p[k] = v end
  return p
end

local function dep(id, amount, over)
  local e = { aggregate_type = "Account", aggregate_id = id, event_type = "Deposited", payload = { amount = amount } }
  for k, v in pairs(over or {}) do e[k] = v end
  return e
end

local function n_events(db, T) return db:query(('SELECT count(*) AS n FROM "%s"'):format(T.events_table))[1].n end
local function row(db, id) return db:query("SELECT balance, pos FROM " .. RM .. " WHERE id = $1", id)[1] end

describe("inline projections", function()
  local store, db, T
  before_each(function() store, db, T = fresh() end)
  after_each(function() db:close() end)

  it("a retried append (same event_ids) writes nothing and does not run the handlers again", function()
    local seen = {}
    assert.is_true(store:inline(db, balances(nil, seen)))
    local ids = { pup.uuid(), pup.uuid() }
    local events = { dep("r1", 5, { event_id = ids[1] }), dep("r1", 7, { event_id = ids[2] }) }
    local first = assert(store:append(db, pup.no_stream(), events))
    assert.is_nil(first.retried)
    local again = assert(store:append(db, pup.no_stream(), events)) -- a timeout hid the first
    assert.is_true(again.retried)
    assert.same(first.global_positions, again.global_positions)
    assert.same({ balance = 12, pos = first.global_positions[2] }, row(db, "r1"))
    assert.equal(2, #seen)
    assert.equal(2, n_events(db, T))
  end)

  it("run in the appending transaction: a read after the append sees them; events carry their positions", function()
    local seen = {}
    assert.is_true(store:inline(db, balances(nil, seen)))
    local res = assert(store:append(db, pup.no_stream(), { dep("a1", 5), dep("a1", 7) }))
    assert.same({ balance = 12, pos = res.global_positions[2] }, row(db, "a1"))
    assert.equal(2, #seen)
    for i, e in ipairs(seen) do
      assert.equal(res.global_positions[i], e.global_position)
      assert.equal(i, e.aggregate_version)
      assert.is_string(e.created_at)
    end
    -- another connection sees both as soon as append returned (one commit)
    local other = H.connect()
    assert.equal(12, other:query("SELECT balance FROM " .. RM .. " WHERE id = 'a1'")[1].balance)
    other:close()
  end)

  it("a failing handler fails the append: nil, err (handler) and no event, no read-model row", function()
    assert(store:inline(db, balances(13)))
    assert(store:append(db, pup.no_stream(), { dep("a2", 1) }))
    local res, err = store:append(db, pup.exact(1), { dep("a2", 2), dep("a2", 13) })
    assert.is_nil(res)
    assert.equal("handler", err.code)
    assert.matches("inline projection inl_balances failed at global position %d+ %(event_type Deposited", err.message)
    assert.matches("amount 13 refused", err.message)
    assert.equal(1, n_events(db, T))
    assert.same({ balance = 1, pos = row(db, "a2").pos }, row(db, "a2"))
    -- `return nil, err` fails it the same way
    local p2 = balances(nil, nil, { name = "inl_refuser", setup = false,
      handle = function(_, e) if e.data.amount == 99 then return nil, "no 99s" end end })
    p2.setup = nil
    assert(store:inline(db, p2))
    res, err = store:append(db, pup.exact(1), { dep("a2", 99) })
    assert.is_nil(res)
    assert.matches("inline projection inl_refuser .*no 99s", err.message)
    assert.equal(1, n_events(db, T))
    assert.equal(1, row(db, "a2").balance)
    -- the aggregate's version did not move: exact(1) still appends
    assert(store:append(db, pup.exact(1), { dep("a2", 3) }))
    assert.equal(4, row(db, "a2").balance)
  end)

  it("a handler's failed statement (sqlstate) fails the append too", function()
    assert(store:inline(db, balances(nil, nil, { name = "inl_badsql",
      -- (busted's assert raises text: the error object is raised as it is)
      handle = function(tx)
        local ok, e = tx:exec("INSERT INTO no_such_table_inl VALUES (1)")
        if not ok then error(e) end
      end })))
    local res, err = store:append(db, pup.no_stream(), { dep("a3", 1) })
    assert.is_nil(res)
    assert.equal("handler", err.code)
    assert.equal("42P01", err.sqlstate)
    assert.equal("database", err.cause.code) -- a read model's table, not the store's
    assert.equal(0, n_events(db, T))
  end)

  it("inside a caller's db:transaction: a failing handler undoes the append only; the caller goes on", function()
    assert(store:inline(db, balances(13)))
    assert(db:exec("CREATE TEMP TABLE inl_caller (note text)"))
    local ok = assert(db:transaction(function(tx)
      assert(tx:exec("INSERT INTO inl_caller VALUES ('before')"))
      local res, err = store:append(tx, pup.no_stream(), { dep("a4", 13) })
      assert.is_nil(res)
      assert.equal("handler", err.code)
      assert(tx:exec("INSERT INTO inl_caller VALUES ('after')"))
      assert(store:append(tx, pup.no_stream(), { dep("a4", 4) }))
      return "committed"
    end))
    assert.equal("committed", ok)
    assert.equal(2, db:query("SELECT count(*) AS n FROM inl_caller")[1].n)
    assert.equal(1, n_events(db, T))
    assert.equal(4, row(db, "a4").balance)
    -- the caller's rollback takes the events and the inline writes with it
    local r, err = db:transaction(function(tx)
      assert(store:append(tx, pup.exact(1), { dep("a4", 5) }))
      assert.equal(9, tx:query("SELECT balance FROM " .. RM .. " WHERE id = 'a4'")[1].balance)
      error("caller gives up")
    end)
    assert.is_nil(r)
    assert.matches("caller gives up", tostring(err))
    assert.equal(1, n_events(db, T))
    assert.equal(4, row(db, "a4").balance)
  end)

  it("store:handle appends through them (retries included); a failing handler fails the command", function()
    assert(store:inline(db, balances(13)))
    local def = { initial = function() return { balance = 0 } end,
                  evolve = function(s, e) s.balance = s.balance + e.data.amount return s end }
    local function deposit(n) return function() return { { event_type = "Deposited", payload = { amount = n } } } end end
    local state = assert(store:handle(db, "Account", "a5", deposit(6), def))
    assert.equal(6, state.balance)
    assert.equal(6, row(db, "a5").balance)
    local s, err = store:handle(db, "Account", "a5", deposit(13), def)
    assert.is_nil(s)
    assert.equal("handler", err.code)
    assert.equal(1, n_events(db, T))
    -- a lost race is still retried: the other writer's event goes through the read model too
    local other = H.connect()
    local raced = false
    local state2 = assert(store:handle(db, "Account", "a5", function(st)
      if not raced then
        raced = true
        assert(store:append(other, pup.exact(1), { dep("a5", 100) }))
      end
      return deposit(1)(st)
    end, def))
    other:close()
    assert.equal(107, state2.balance)
    assert.equal(107, row(db, "a5").balance)
  end)

  it("apply scopes and upcasters; the handler sees the upcast event", function()
    local seen = {}
    assert(store:inline(db, balances(nil, seen, { event_types = { "Deposited" } })))
    pup.upcast("Deposited", 1, function(d) return { amount = d.cents // 100 } end)
    local ok, err = pcall(function()
      assert(store:append(db, pup.no_stream(), { dep("a6", nil, { payload = { cents = 500 } }) }))
      assert(store:append(db, pup.no_stream(), { { aggregate_type = "Other", aggregate_id = "o1", event_type = "Deposited",
                                                   event_version = 2, payload = { amount = 1 } } }))
      assert(store:append(db, pup.exact(1), { dep("a6", nil, { event_type = "Closed", payload = {} }) }))
    end)
    pup.remove_upcaster("Deposited", 1)
    assert(ok, err)
    assert.equal(1, #seen)
    assert.equal(2, seen[1].event_version)
    assert.equal(5, row(db, "a6").balance)
    assert.is_nil(row(db, "o1"))
  end)

  it("misuse raises: a reactor, the same name twice, a bad projection, a bad db", function()
    assert(store:inline(db, balances()))
    assert.has_error(function() store:inline(db, balances()) end,
      'inline: a projection named "inl_balances" is already inline in this store')
    assert.has_error(function() store:inline(db, { name = "r", kind = "reactor", handle = function() end }) end,
      'inline: reactor "r" cannot run inline: its side effects would not roll back with the append')
    assert.has_error(function() store:inline(db, { name = "x" }) end,
      'inline: projection "x": `handle` must be a function, got nil')
    assert.has_error(function() store:inline(nil, balances()) end, "bad argument #1 to 'inline' (db or tx expected)")
    -- registrations belong to the store object: another store appends without them
    local plain = pup.store(T)
    assert(plain:append(db, pup.no_stream(), { dep("a7", 13) }))
    assert.is_nil(row(db, "a7"))
  end)

  it("a setup that fails returns nil, err and registers nothing", function()
    local res, err = store:inline(db, balances(nil, nil, { name = "inl_badsetup",
      setup = function(tx)
        local ok, e = tx:exec("CREATE TABLE")
        if not ok then error(e) end
      end }))
    assert.is_nil(res)
    assert.equal("42601", err.sqlstate)
    assert(store:append(db, pup.no_stream(), { dep("a8", 1) }))
  end)
end)
