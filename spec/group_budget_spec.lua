-- Issue 10, worker groups (`pupsourcing run --group`):
--   - a batch slower than the lease TTL still commits: each batch stops after a share of
--     the TTL and commits what it handled (before, it lost its leases and started over
--     for ever); a handler timeout that could outlast the lease is refused;
--   - `reset` before a repartition settles: the group settles, runs exact, and can be
--     repartitioned again.
-- Every case ends with an exact read model of the NON-idempotent counter of M.group.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("worker group batches and resets", function()
  local g

  after_each(function()
    if g then g:close() end
    g = nil
  end)

  local function assert_exact()
    local ok, why = g:exact()
    assert(ok, why)
  end

  local function stop(w)
    H.signal(w, "TERM")
    assert.equal(0, H.wait_exit(w, 10), H.stderr_of(w))
  end

  it("lease TTL 1 s, 40 events of 50 ms: progresses and ends exact, each event handled once", function()
    g = H.group("grp_budget", { ttl = 1000, partitions = 8, batch_size = 100 })
    g:append("b-", 4, 10)
    local t0 = pup.now()
    local w = g:worker { env = { FX_SLEEP = "0.05" } }
    H.wait_until(function() return "the group to catch up: " .. g:describe() .. "\n  " .. g:procs_text() end, 20,
      function() return g:caught_up() end, 0.05)
    local dt = pup.now() - t0
    print(("# 40 events of 50 ms under a 1 s lease: caught up in %.2f s"):format(dt))
    assert_exact()
    assert.is_nil(H.stderr_of(w):find("lost the lease", 1, true), H.stderr_of(w))
    stop(w)
  end)

  it("one event slower than the lease TTL (no handler timeout) stops the worker, naming the event", function()
    g = H.group("grp_overlong", { ttl = 1000, partitions = 1, batch_size = 100 })
    g:append("o-", 1, 2)
    local t0 = pup.now()
    local w = g:worker { env = { FX_SLEEP = "1.3" } }
    local rc = H.wait_exit(w, 20)
    local err = H.stderr_of(w)
    assert.equal(1, rc, err)
    assert.truthy(err:find("handler failed at global position 1 ", 1, true), err)
    assert.truthy(err:find("longer than the lease TTL (1000 ms), twice: it can never commit under the lease;"
      .. " raise --lease-ttl or make the handler faster", 1, true), err)
    -- once was retried (a stall may pass), the second time stopped it: not a retry loop
    local _, retries = err:gsub("lost the lease", "")
    assert.equal(1, retries, err)
    assert.is_true(pup.now() - t0 < 15)
  end)

  it("refuses a handler timeout above half the lease TTL", function()
    g = H.group("grp_budget", { ttl = 1000, partitions = 2 })
    local w = g:worker { args = { "--handler-timeout", "600" } }
    local rc = H.wait_exit(w, 10)
    assert.equal(1, rc, H.stderr_of(w))
    assert.truthy(H.stderr_of(w):find("handler timeout (600 ms) must be at most half the lease TTL (1000 ms)", 1, true),
      H.stderr_of(w))
  end)

  it("reset before a repartition settles: the group settles, ends exact, and repartitions again", function()
    g = H.group("grp_rreset", { ttl = 1000, partitions = 4 })
    g:append("r-", 20, 5)
    local w = g:worker()
    H.wait_until(function() return "the group to catch up: " .. g:describe() end, 20,
      function() return g:caught_up() end, 0.05)
    stop(w)

    local r = g:cli { "repartition", g.file, "2" }
    assert.equal(0, r.code, r.output)
    assert.same({ 2, 4 }, { g:total() })
    r = g:cli { "reset", g.file }
    assert.equal(0, r.code, r.output)
    assert.equal(0, g:one("SELECT count(*) AS n FROM " .. g.counter).n, "reset(tx) emptied the read model")

    w = g:worker()
    H.wait_until(function()
      return "the group to settle and catch up after the reset: " .. g:describe() .. "\n  " .. g:procs_text()
    end,
      20, function() return g:caught_up() end, 0.05)
    assert_exact()
    assert.same({ 2 }, { g:total() })

    r = g:cli { "repartition", g.file, "3" }
    assert.equal(0, r.code, r.output)
    assert.truthy(r.stdout:find("2 -> 3", 1, true), r.stdout)
    g:append("s-", 10, 3)
    H.wait_until(function() return "the group to catch up at 3 partitions: " .. g:describe() end, 20,
      function() return g:caught_up() end, 0.05)
    assert.same({ 3 }, { g:total() })
    assert_exact()
    stop(w)
  end)
end)
