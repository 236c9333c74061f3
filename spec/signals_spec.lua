-- Issue 10, signals and threads: p:run() when no signalfd can be made (SIGINT/SIGTERM must
-- not stay blocked), and the runner when a worker thread cannot be started (the started
-- ones must stop). Real limits, no test knobs: RLIMIT_NOFILE for the first, RLIMIT_NPROC
-- as the unprivileged user `nobody` for the second.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local RM = "t_sig_rm"

describe("signals and threads", function()
  local store, db, T, dir

  local function one(sql, ...) return assert(db:query(sql, ...))[1] end

  -- The read model matches the checkpoints: what was committed was handled exactly once.
  local function assert_consistent(name)
    local rm = one(("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM %s"):format(RM))
    local cp = one(('SELECT COALESCE(sum(last_global_position), 0)::bigint AS p, count(*) AS rows FROM "%s"'
      .. " WHERE projection_name = $1"):format(T.checkpoints_table), name)
    assert.equal(rm.n, rm.d)
    return rm.n, cp
  end

  before_each(function()
    T = H.tables("sig")
    store, db = H.fresh_store("sig")
    dir = H.tmpdir()
    os.execute("chmod 755 " .. dir)
    assert(db:exec("DROP TABLE IF EXISTS " .. RM))
    assert(db:exec("CREATE TABLE " .. RM .. " (pos bigint NOT NULL)"))
    assert(db:exec("GRANT ALL ON " .. RM .. " TO PUBLIC"))
    for i = 1, 8 do
      assert(store:append(db, pup.any(), H.events(5, { aggregate_id = "agg-" .. i })))
    end
  end)

  after_each(function()
    db:close()
    H.rmdir(dir)
  end)

  it("p:run() without a signalfd (no file descriptor left) still ends on SIGTERM", function()
    H.write_file(dir .. "/s.lua", ([[
      local pup = require "pupsourcing"
      local url, ev, hd, ck = ...
      local db = assert(pup.connect(url))
      local store = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
      local p = pup.processor(db, { name = "sig_nofd", handle = function(tx, e)
        assert(tx:exec("INSERT INTO %s (pos) VALUES ($1)", e.global_position))
      end }, { store = store, poll_interval = 0.05 })
      local files = {}
      while true do -- use up every descriptor, so signalfd() fails with EMFILE
        local f = io.open("/dev/null")
        if not f then break end
        files[#files + 1] = f
      end
      p:run()
    ]]):format(RM))
    local proc = H.spawn({ "sh", "-c", 'ulimit -n 64; exec "$0" "$@"', H.bin, dir .. "/s.lua", H.url(),
      T.events_table, T.aggregate_heads_table, T.checkpoints_table })
    H.wait_until(function() return "the processor to catch up: " .. H.stderr_of(proc) end, 20, function()
      local r = one(('SELECT last_global_position AS p FROM "%s" WHERE projection_name = $1'):format(T.checkpoints_table), "sig_nofd")
      return r and r.p == 40
    end)
    H.signal(proc, "TERM")
    local rc = H.wait_exit(proc, 10)
    local err = H.stderr_of(proc)
    H.reap(proc)
    -- before: SIGTERM stayed blocked for the whole run and the process never ended
    assert.equal(128 + 15, rc, err)
    assert.matches("cannot watch for SIGINT/SIGTERM %(signalfd: Too many open files%)", err)
    assert.is_nil(err:find("Sanitizer", 1, true), err)
    local n, cp = assert_consistent("sig_nofd")
    assert.equal(40, n)
    assert.equal(40, cp.p)
  end)

  it("a runner whose thread cannot start stops the workers it started and fails", function()
    if not H.is_root() then
      pending("needs root to run the binary as `nobody` under RLIMIT_NPROC")
      return
    end
    H.write_file(dir .. "/p.lua", ([[
      return { name = "sig_threads", handle = function(tx, e)
        assert(tx:exec("INSERT INTO %s (pos) VALUES ($1)", e.global_position))
      end }
    ]]):format(RM))
    os.execute("chmod 644 " .. dir .. "/p.lua")
    -- nobody may have 3 tasks: the main thread and two workers; the third worker fails
    local words = { "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "bash", "-c",
      'ulimit -u 3; exec "$0" "$@"', H.bin, "run", "--workers", "4", "--poll-interval", "50" }
    for _, a in ipairs(H.table_flags(T)) do words[#words + 1] = a end
    words[#words + 1] = dir .. "/p.lua"
    local proc = H.spawn(words, { env = { DATABASE_URL = H.url() } })
    local rc = H.wait_exit(proc, 20)
    local err = H.stderr_of(proc)
    H.reap(proc)
    -- before: the started workers ran on for ever (not --once), so it never exited
    assert.equal(1, rc, err)
    assert.matches("cannot start a thread for [^\n]*p%.lua %(worker 3 of 4%): Resource temporarily unavailable", err)
    assert.is_nil(err:find("Sanitizer", 1, true), err)
    assert_consistent("sig_threads")
  end)
end)
