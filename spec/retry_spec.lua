-- Which failures the processor loop retries (docs/reliability.md): deadlocks (40P01),
-- serialization failures (40001), lock timeouts (55P03) and lost connections are retried
-- (the batch rolls back and runs again, nothing applied twice); any other error stops the
-- projection with an error naming the event. Real PostgreSQL errors, raised by a handler's
-- own statement, pipelined (tx:exec) or waited for (tx:query).
local pup = require "pupsourcing"
local H = require "spec.helpers"

local N = 5

-- Lua's own assert: raises the error object itself (busted's assert turns it into text,
-- losing the SQLSTATE a real projection's assert(tx:exec(...)) keeps).
local function check(ok, err)
  if not ok then error(err) end
  return ok
end

describe("processor loop retries", function()
  local store, db, ctl

  local function counter() return assert(ctl:query("SELECT n FROM t_retry_cnt"))[1].n end

  -- Counts every event; `fail(tx, e)` runs in the handler of event 3 until it returns false.
  local function projection(name, fail)
    return {
      name = name,
      handle = function(tx, e)
        if e.global_position == 3 and fail then
          if not fail(tx, e) then fail = nil end
        end
        check(tx:exec("UPDATE t_retry_cnt SET n = n + 1"))
      end,
    }
  end

  -- A handler statement raising sqlstate `code`, the first `times` times.
  local function raising(code, times, how)
    local left = times
    return function(tx)
      if left == 0 then return false end
      left = left - 1
      local sql = ("DO $$ BEGIN RAISE EXCEPTION 'injected %s' USING ERRCODE = '%s'; END $$"):format(code, code)
      if how == "query" then tx:query(sql) else tx:exec(sql) end
      return true
    end
  end

  before_each(function()
    ctl = H.connect()
    store, db = H.fresh_store("retry")
    assert(ctl:exec("DROP TABLE IF EXISTS t_retry_cnt"))
    assert(ctl:exec("CREATE TABLE t_retry_cnt (n bigint NOT NULL)"))
    assert(ctl:exec("INSERT INTO t_retry_cnt VALUES (0)"))
    for i = 1, N do assert(store:append(ctl, pup.any(), H.events(1, { aggregate_id = "r" .. i }))) end
  end)

  after_each(function()
    db:close()
    ctl:close()
  end)

  for _, case in ipairs {
    { "40P01", "exec" }, { "40001", "exec" }, { "55P03", "exec" }, { "40P01", "query" }, { "40001", "query" },
  } do
    local code, how = case[1], case[2]
    it(("retries a batch whose handler statement (tx:%s) failed with %s, applying each event once"):format(how, code), function()
      local p = pup.processor(db, projection("retry", raising(code, 2, how)), { store = store, batch_size = 100 })
      local t0 = pup.now()
      assert.equal(N, p:run { once = true })
      assert.equal(N, counter())
      assert.equal(N, p:stats().position)
      -- two retries: 100 ms, then 200 ms
      assert.is_true(pup.now() - t0 >= 0.3, "retried without backing off")
    end)
  end

  it("retries a batch whose connection was terminated mid-batch, reconnecting", function()
    local killed = false
    local p = pup.processor(db, projection("retry", function(tx)
      if killed then return false end
      killed = true
      local pid = assert(tx:query("SELECT pg_backend_pid() AS p"))[1].p
      assert.is_true(assert(ctl:query("SELECT pg_terminate_backend($1) AS ok", pid))[1].ok)
      return true
    end), { store = store })
    assert.equal(N, p:run { once = true })
    assert.is_true(killed)
    assert.equal(N, counter())
  end)

  it("stops at any other error, naming the event, with nothing applied", function()
    for _, case in ipairs { { "23505", "exec" }, { "22012", "query" }, { "42P01", "exec" } } do
      local code, how = case[1], case[2]
      local name = "retry_" .. code
      local p = pup.processor(db, projection(name, raising(code, 1, how)), { store = store })
      local n, err = p:run { once = true }
      assert.is_nil(n)
      assert.equal(code, err.sqlstate)
      assert.equal("handler", err.code)
      assert.matches("handler failed at global position 3", err.message)
      assert.equal(0, counter())
    end
  end)
end)

describe("a pipelined statement's failure", function()
  local store, db

  before_each(function()
    store, db = H.fresh_store("retry_pipe")
    for i = 1, N do assert(store:append(db, pup.any(), H.events(1, { aggregate_id = "p" .. i }))) end
  end)

  after_each(function() db:close() end)

  -- Every handler pipelines a statement; event `bad`'s divides by zero. Whether the error
  -- is read while later handlers run or only at the batch's end, it names event `bad`.
  for _, bad in ipairs { 1, 3, N } do
    it(("is blamed on its own event (%d of %d), not on the one that noticed it"):format(bad, N), function()
      local returned = {}
      local p = pup.processor(db, {
        name = "pipe" .. bad,
        handle = function(tx, e)
          local d = e.global_position == bad and 0 or 1
          returned[#returned + 1] = tx:exec("SELECT $1::int / $2::int", e.global_position, d)
        end,
      }, { store = store })
      local n, err = p:run_once()
      assert.is_nil(n)
      assert.equal("22012", err.sqlstate)
      assert.equal("handler", err.code)
      local ev = assert(store:read_events(db, bad - 1, { limit = 1 }))[1]
      assert.equal(bad, ev.global_position)
      local want = ("handler failed at global position %d (event_type %s, event_id %s)"):format(
        bad, ev.event_type, ev.event_id)
      assert.is_truthy(err.message:find(want, 1, true), err.message)
      assert.is_true(returned[1]) -- pipelined: the first exec returned at once
      assert.equal(0, p:stats().position)
    end)
  end
end)
