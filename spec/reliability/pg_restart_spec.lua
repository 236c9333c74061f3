-- Issue 5, faults: PostgreSQL restarted (fast, then immediate shutdown) under a running
-- `pupsourcing run` and a running writer. Uses a private server (scripts/pg.sh on a free
-- port in a temp dir) that this spec stops and starts with pg_ctl.
local pup = require "pupsourcing"
local H = require "spec.helpers"
local R = require "spec.reliability.common"

local WRITER = H.source_dir .. "/spec/reliability/writer.lua"

-- A NON-idempotent counter plus a log of handled positions (H.COUNTER_TEMPLATE).
local COUNTER_VARS = { NAME = "rel_restart", CNT = "t_rel_restart_cnt", SEEN = "t_rel_restart_seen" }

describe("reliability: PostgreSQL restarts", function()
  local server, tmp

  setup(function()
    server = R.server()
    tmp = H.tmpdir()
  end)

  teardown(function()
    R.cleanup()
    if server then server:destroy() end
    if tmp then H.rmdir(tmp) end
  end)

  local function lines_of(path)
    local out = {}
    local f = io.open(path)
    if not f then return out end
    for l in f:lines() do out[#out + 1] = l end
    f:close()
    return out
  end

  local function count_ok(path)
    local n = 0
    for _, l in ipairs(lines_of(path)) do if l:match("^ok ") then n = n + 1 end end
    return n
  end

  local function cp_of(url, T, name)
    local c = pup.connect(url)
    if not c then return -1 end
    local v = R.checkpoint(c, T, name)
    c:close()
    return v
  end

  it("fast and immediate shutdowns under `run`: it reconnects with backoff and ends with exact counts", function()
    local t0 = pup.now()
    local url = server.url
    local db = H.connect(url)
    local store, _, T = H.fresh_store("rel_restart_run", db)
    local head = R.populate(store, db, 20000, 100, 200)
    db:close()
    local file = R.template(tmp, "restart.lua", H.COUNTER_TEMPLATE, COUNTER_VARS)
    local args = { "run", "--database-url", url, "--poll-interval", "200" }
    for _, x in ipairs(R.table_flags(T)) do args[#args + 1] = x end
    args[#args + 1] = file
    local run = R.spawn(R.pup_argv(args), { DATABASE_URL = url, REL_SLEEP = "0.0003" })
    local downs = {}
    -- down long enough (7 s) once for the backoff to reach its 5000 ms cap
    local down_for = { fast = 7.0, immediate = 1.0 }
    for i, mode in ipairs { "fast", "immediate" } do
      R.wait_until("progress before the " .. mode .. " shutdown", 30, function()
        assert.is_nil(run:code(), run:stderr())
        return cp_of(url, T, "rel_restart") > 0
      end, 0.05)
      local cp_before = cp_of(url, T, "rel_restart")
      local t = pup.now()
      server:restart(mode, down_for[mode])
      downs[#downs + 1] = ("-m %s at checkpoint %d (down %.1f s)"):format(mode, cp_before, pup.now() - t)
      R.wait_until(function() return "the run to reconnect after -m " .. mode .. "; stderr:\n" .. run:stderr() end, 30, function()
        assert.is_nil(run:code(), "run exited after -m " .. mode .. ":\n" .. run:stderr())
        local _, n = run:stderr():gsub("reconnected", "")
        return n >= i and cp_of(url, T, "rel_restart") > cp_before
      end, 0.1)
      -- a batch committed after the reconnect (that is what resets the backoff to 100 ms)
      local cp_reconnected = cp_of(url, T, "rel_restart")
      R.wait_until("a batch after the reconnect", 30, function()
        assert.is_nil(run:code(), run:stderr())
        return cp_of(url, T, "rel_restart") > cp_reconnected
      end, 0.05)
    end
    db = H.connect(url)
    R.wait_until("the run to catch up", 120, function()
      assert.is_nil(run:code(), run:stderr())
      return R.checkpoint(db, T, "rel_restart") >= head
    end, 0.1)
    run:kill("TERM")
    assert.equal(0, run:wait(10), run:stderr())
    local rerr = run:stderr()
    -- the backoff, as printed: per outage 100, 200, 400 ... ms doubling up to 5000, then
    -- `reconnected`; one outage per shutdown, and nothing retried at any other time
    local episodes, cur = {}, {}
    for line in rerr:gmatch("[^\n]+") do
      local ms = line:match("; retrying in (%d+) ms$")
      if ms then
        cur[#cur + 1] = math.tointeger(tonumber(ms))
      elseif line:find("projection rel_restart: reconnected", 1, true) then
        assert.is_true(#cur > 0, "reconnected without a retry before it:\n" .. rerr)
        episodes[#episodes + 1] = cur
        cur = {}
      end
    end
    assert.same({}, cur, "retries after the last reconnect:\n" .. rerr)
    assert.equal(2, #episodes, rerr)
    for _, seq in ipairs(episodes) do
      local want = {}
      for k = 1, #seq do want[k] = k == 1 and 100 or math.min(want[k - 1] * 2, 5000) end
      assert.same(want, seq, rerr)
    end
    -- 7 s down: 100+200+...+3200 = 6.3 s of waits are not enough, the next wait is capped
    assert.is_true(#episodes[1] >= 7, "the backoff never reached its cap:\n" .. rerr)
    -- 1 s down: 100+200+400 = 0.7 s of waits are not enough
    assert.is_true(#episodes[2] >= 4, rerr)
    local wrong = R.one(db, ([[SELECT count(*) AS n FROM (SELECT aggregate_id AS agg, count(*) AS n FROM "%s"
        GROUP BY aggregate_id) e FULL JOIN t_rel_restart_cnt c USING (agg) WHERE e.n IS DISTINCT FROM c.n]]):format(
        T.events_table)).n
    assert.equal(0, wrong, "aggregates with a wrong count")
    local s = R.one(db, "SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_rel_restart_seen")
    assert.same({ n = head, d = head }, s)
    db:close()
    local seqs = {}
    for k, seq in ipairs(episodes) do seqs[k] = table.concat(seq, "/") end
    R.report("pg restart under run: %s; retries logged with backoff %s ms, reconnected each time; final counts exact"
      .. " over %d events, %.1f s", table.concat(downs, ", "), table.concat(seqs, " and "), head, pup.now() - t0)
  end)

  it("fast and immediate shutdowns under a writer: in-flight appends get `connection`, none half-written, acked ones kept", function()
    local t0 = pup.now()
    local url = server.url
    local db = H.connect(url)
    local _, _, T = H.fresh_store("rel_restart_w", db)
    db:close()
    local wlog, stop = tmp .. "/writer.log", tmp .. "/stop"
    local wargs = { WRITER, "--mode", "loop", "--database-url", url, "--log", wlog, "--stop", stop,
                    "--aggregates", "10", "--prefix", "live-", "--max-sleep", "0.05" }
    for _, x in ipairs(R.table_flags(T)) do wargs[#wargs + 1] = x end
    local writer = R.spawn(R.pup_argv(wargs), { DATABASE_URL = url })
    local downs = {}
    for _, mode in ipairs { "fast", "immediate" } do
      R.wait_until("appends before the " .. mode .. " shutdown", 30, function()
        assert.is_nil(writer:code(), writer:stderr())
        return count_ok(wlog) > 20
      end, 0.05)
      local ok_before = count_ok(wlog)
      local t = pup.now()
      server:restart(mode, 1.0)
      downs[#downs + 1] = ("-m %s (down %.1f s)"):format(mode, pup.now() - t)
      R.wait_until("the writer to append again after -m " .. mode, 30, function()
        assert.is_nil(writer:code(), "writer exited after -m " .. mode .. ":\n" .. writer:stderr())
        return count_ok(wlog) > ok_before
      end, 0.1)
    end
    H.write_file(stop, "")
    assert.equal(0, writer:wait(30), writer:stderr())
    db = H.connect(url)
    local stored = {}
    for _, r in ipairs(assert(db:query(('SELECT event_id::text AS id FROM "%s"'):format(T.events_table)))) do
      stored[r.id] = true
    end
    local acked, unknown, unknown_committed, aborted, nobegin, connect_errors, others = 0, 0, 0, 0, 0, 0, {}
    local messages = {}
    local function present_of(ids)
      local n = 0
      for id in ids:gmatch("[^,]+") do if stored[id] then n = n + 1 end end
      return n
    end
    for _, l in ipairs(lines_of(wlog)) do
      local w = {}
      for word in l:gmatch("%S+") do w[#w + 1] = word end
      if w[1] == "ok" then
        for id in w[6]:gmatch("[^,]+") do assert.is_true(stored[id] == true, "acked event lost: " .. id) end
        acked = acked + 1
      elseif w[1] == "unknown" then -- lost at COMMIT: all or nothing
        assert.equal("connection", w[2], l)
        local present = present_of(w[4])
        assert.is_true(present == 0 or present == 3, "half-written append: " .. l)
        unknown = unknown + 1
        if present == 3 then unknown_committed = unknown_committed + 1 end
        messages[#messages + 1] = l:match("^unknown %S+ %S+ %S+ (.*)$")
      elseif w[1] == "aborted" then -- lost inside the transaction: nothing stored
        assert.equal("connection", w[2], l)
        assert.equal(0, present_of(w[4]), "an append whose transaction never committed is stored: " .. l)
        aborted = aborted + 1
        messages[#messages + 1] = l:match("^aborted %S+ %S+ %S+ (.*)$")
      elseif w[1] == "nobegin" then -- BEGIN failed on the dead connection: not an append at all
        assert.equal("connection", w[2], l)
        assert.equal(0, present_of(w[4]), l)
        nobegin = nobegin + 1
      elseif w[1] == "connect_error" then
        assert.equal("connection", w[2], l)
        connect_errors = connect_errors + 1
      elseif w[1] ~= "done" then
        others[#others + 1] = l
      end
    end
    assert.same({}, others)
    assert.is_true(aborted + unknown >= 1, "no append was in flight at a shutdown")
    -- streams stay whole: versions 1..n per aggregate, a multiple of 3 events each
    local bad = R.one(db, ([[SELECT count(*) AS n FROM (SELECT count(*) AS c, max(aggregate_version) AS hi
        FROM "%s" GROUP BY aggregate_id) s WHERE c <> hi OR c %% 3 <> 0]]):format(T.events_table)).n
    assert.equal(0, bad, "streams with holes or partial appends")
    local total = R.one(db, ('SELECT count(*) AS n FROM "%s"'):format(T.events_table)).n
    db:close()
    R.report("pg restart under a writer: %s; %d acked appends all present; %d in-flight appends got `connection`:"
      .. " %d lost inside the transaction (none stored), %d at COMMIT (%d had committed, all 3 events; none half-written);"
      .. " %d BEGINs failed on the dead connection (not counted as in flight); %d connect attempts refused while down,"
      .. " %d events stored, %.1f s. Messages: %s", table.concat(downs, ", "), acked, aborted + unknown, aborted, unknown,
      unknown_committed, nobegin, connect_errors, total, pup.now() - t0, table.concat(messages, " | "):sub(1, 500))
  end)
end)
