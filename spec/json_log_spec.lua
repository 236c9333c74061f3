-- Issue 10: with --log-format json every line `pupsourcing run` prints is one JSON object:
-- server notices and warnings, the retry and reconnect lines, the summary, a failure,
-- a bad flag.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local RM = "t_jlog_rm"
local RFC3339 = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"

-- Seconds since the epoch of an RFC 3339 UTC time of ours.
local function epoch(t)
  local y, mo, d, h, mi, s, ms = t:match("^(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+)%.(%d+)Z$")
  local days = os.time { year = y, month = mo, day = d, hour = 12 } // 86400 -- local-time free day count
  return days * 86400 + h * 3600 + mi * 60 + s + ms / 1000
end

describe("--log-format json", function()
  local store, db, T, dir

  local function cli(args) return H.run(H.with_tables(T, args)) end

  -- Every line of stdout and stderr decoded (fails on the first that is not a JSON object).
  local function json_lines(r)
    local out = {}
    for line in (r.stdout .. r.stderr):gmatch("[^\n]+") do
      local ok, v = pcall(pup.json.decode, line)
      assert(ok and type(v) == "table" and type(v.msg) == "string",
        "not a JSON log line: " .. line .. "\n--- whole output:\n" .. r.output)
      assert.is_string(v.time)
      assert.truthy(v.time:match(RFC3339), "time is not RFC 3339 (UTC, ms): " .. line)
      assert.is_string(v.level)
      out[#out + 1] = v
    end
    return out
  end

  local function find(lines, pattern)
    for _, l in ipairs(lines) do
      if l.msg:find(pattern) then return l end
    end
  end

  before_each(function()
    T = H.tables("jlog")
    store, db = H.fresh_store("jlog")
    dir = H.tmpdir()
    assert(db:exec("DROP TABLE IF EXISTS " .. RM))
    assert(db:exec("CREATE TABLE " .. RM .. " (pos bigint NOT NULL)"))
    assert(store:append(db, pup.any(), H.events(4, { aggregate_id = H.uid("a") })))
  end)

  after_each(function()
    db:close()
    H.rmdir(dir)
  end)

  it("server notices, a retried failure and a lost connection: every line is JSON", function()
    H.write_file(dir .. "/p.lua", ([==[
      local step = 0
      return { name = "jlog", handle = function(tx, e)
        assert(tx:exec("SET LOCAL client_min_messages = notice"))
        assert(tx:exec([[DO $$ BEGIN RAISE NOTICE 'x'; RAISE WARNING 'a "quoted" \ warning'; END $$]]))
        step = step + 1
        if step == 1 then -- a serialization failure: retried
          assert(tx:exec([[DO $$ BEGIN RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END $$]]))
        elseif step == 2 then -- the connection lost: reconnected and retried
          tx:query("SELECT pg_terminate_backend(pg_backend_pid())")
        end
        assert(tx:exec("INSERT INTO %s (pos) VALUES ($1)", e.global_position))
      end }
    ]==]):format(RM))
    local r = cli { "run", "--once", "--log-format", "json", dir .. "/p.lua" }
    assert.equal(0, r.code, r.output)
    local lines = json_lines(r)
    local notice = find(lines, "^postgres: NOTICE: +x$")
    assert.is_truthy(notice, r.output)
    assert.equal("notice", notice.level)
    assert.is_truthy(find(lines, '^postgres: WARNING: +a "quoted" \\ warning$'), r.output)
    local retry = find(lines, "try again.*retrying in %d+ ms")
    assert.is_truthy(retry, r.output)
    -- the retry's fields: what failed, its code and SQLSTATE, the backoff, where
    assert.equal("retry", retry.event)
    assert.equal("warning", retry.level)
    assert.truthy(retry.error:find("try again", 1, true), r.output)
    assert.equal("handler", retry.code) -- raised by the handler (assert), retried by its SQLSTATE
    assert.equal("40001", retry.sqlstate)
    assert.is_true(math.type(retry.retry_in_ms) == "integer" and retry.retry_in_ms > 0, r.output)
    assert.same({ "jlog", 0, 1 }, { retry.projection, retry.partition, retry.total_partitions })
    assert.equal("reconnected", find(lines, "reconnected").event)
    -- start, the lease, stop: one line each, with their fields
    local events = {}
    for _, l in ipairs(lines) do if l.event then events[#events + 1] = l.event end end
    assert.same({ "start", "lease_gained", "retry", "retry", "reconnected", "stop" }, events)
    local stop = lines[#lines - 1]
    assert.same({ "stop", "caught up (once)", 4 }, { stop.event, stop.reason, stop.position })
    assert.is_truthy(find(lines, "^jlog: 4 event%(s%) handled by 1 partition worker%(s%)$"), r.output)
    local rm = assert(db:query("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM " .. RM))[1]
    assert.same({ n = 4, d = 4 }, { n = rm.n, d = rm.d })
  end)

  it("a hole waited on longer than 5 s: its position and since when, then its passing; stop on SIGTERM", function()
    H.write_file(dir .. "/h.lua", ([==[
      return { name = "jlog_hole", handle = function(tx, e)
        assert(tx:exec("INSERT INTO %s (pos) VALUES ($1)", e.global_position))
      end }
    ]==]):format(RM))
    local words = { H.bin, "run", "--log-format", "json", "--poll-interval", "50" }
    for _, a in ipairs(H.table_flags(T)) do words[#words + 1] = a end
    words[#words + 1] = dir .. "/h.lua"
    local proc = H.spawn(words)
    local ok, err = pcall(function()
      H.wait_until("the four events handled", 20, function()
        return assert(db:query("SELECT count(*) AS n FROM " .. RM))[1].n == 4
      end)
      local other = H.connect()
      local tx = assert(other:begin())
      local held = assert(store:append(tx, pup.any(), { H.event { aggregate_id = H.uid("h") } })).global_positions[1]
      assert(store:append(db, pup.any(), { H.event { aggregate_id = H.uid("h") } }))
      local t0 = pup.now()
      local hole
      H.wait_until(function() return "a hole line in: " .. H.stderr_of(proc) end, 20, function()
        for line in H.stderr_of(proc):gmatch("[^\n]+") do
          local v = pup.json.decode(line)
          if v.event == "hole" then hole = v end
        end
        return hole
      end, 0.2)
      assert.is_true(pup.now() - t0 >= 4.5, "logged before the threshold")
      assert.same({ "warning", held, "jlog_hole", 0, held - 1 },
        { hole.level, hole.hole_position, hole.projection, hole.partition, hole.position })
      assert.truthy(hole.hole_since:match(RFC3339), hole.hole_since)
      assert.is_true(math.abs(epoch(hole.hole_since) - t0) < 2, hole.hole_since .. " vs " .. t0)
      assert.truthy(hole.msg:find("waiting %d+ s on position " .. held), hole.msg)
      assert(tx:commit())
      other:close()
      H.wait_until(function() return "a hole_passed line in: " .. H.stderr_of(proc) end, 20, function()
        return H.stderr_of(proc):find('"event":"hole_passed"', 1, true)
      end, 0.1)
      H.signal(proc, "TERM")
      assert.equal(0, H.wait_exit(proc, 20))
      local r = { stdout = H.stdout_of(proc), stderr = H.stderr_of(proc) }
      r.output = r.stdout .. r.stderr
      local lines = json_lines(r) -- every line JSON
      local events = {}
      for _, l in ipairs(lines) do
        if l.event and l.event ~= "retry" then events[#events + 1] = l.event end
      end
      assert.same({ "start", "lease_gained", "hole", "hole_passed", "stop" }, events)
      local stop = find(lines, "stopped at position")
      assert.same({ "stop requested", held + 1 }, { stop.reason, stop.position })
    end)
    H.reap(proc)
    assert(ok, err)
  end)

  it("--log-format text: the same lifecycle lines; on a terminal JSON mode prints no progress line", function()
    H.write_file(dir .. "/t.lua", [[return { name = "jlog_text", handle = function() end }]])
    -- without --log-format: only what needs attention (here: nothing but the summary)
    local r = cli { "run", "--once", dir .. "/t.lua" }
    assert.equal(0, r.code, r.output)
    assert.equal("pupsourcing: jlog_text: 4 event(s) handled by 1 partition worker(s)\n", r.stderr)
    assert(db:exec('DELETE FROM "' .. T.checkpoints_table .. '"'))
    r = cli { "run", "--once", "--log-format", "text", dir .. "/t.lua" }
    assert.equal(0, r.code, r.output)
    assert.truthy(r.stderr:find("pupsourcing: projection jlog_text partition 0/1: starting (batch size 100)\n", 1, true), r.stderr)
    assert.truthy(r.stderr:find("pupsourcing: projection jlog_text partition 0/1: holds the partition from position 0\n", 1, true), r.stderr)
    assert.truthy(r.stderr:find("pupsourcing: projection jlog_text partition 0/1: stopped at position 4 (caught up (once); 4 event(s) handled)\n", 1, true), r.stderr)
    -- stderr a terminal (script(1) gives it one): nothing but JSON lines, no progress line
    local cmd = { H.bin, "run", "--once", "--log-format", "json" }
    for _, a in ipairs(H.table_flags(T)) do cmd[#cmd + 1] = a end
    cmd[#cmd + 1] = dir .. "/t.lua"
    for i, w in ipairs(cmd) do cmd[i] = H.shquote(w) end
    assert(db:exec('DELETE FROM "' .. T.checkpoints_table .. '"')) -- so it handles the four again
    r = H.sh("script -qec " .. H.shquote(table.concat(cmd, " ")) .. " /dev/null")
    assert.equal(0, r.code, r.output)
    local n = 0
    for line in r.stdout:gsub("\r", ""):gmatch("[^\n]+") do
      local ok, v = pcall(pup.json.decode, line)
      assert(ok and type(v) == "table", "not a JSON line on the terminal: " .. line)
      n = n + 1
    end
    assert.is_true(n >= 4, r.stdout)
  end)

  it("Lua warnings (warn) are JSON lines too, and still honour @on/@off", function()
    H.write_file(dir .. "/w.lua", [[
      local n = 0
      return { name = "jlog_warn", handle = function()
        n = n + 1
        if n == 1 then warn("not shown: warnings start off") end
        if n == 2 then warn("@on"); warn("first ", "warning") end
        if n == 3 then warn("@off"); warn("not shown either") end
        if n == 4 then warn("@on"); warn("a \"quoted\" one") end
      end }
    ]])
    local r = cli { "run", "--once", "--log-format", "json", dir .. "/w.lua" }
    assert.equal(0, r.code, r.output)
    local warnings = {}
    for _, l in ipairs(json_lines(r)) do
      if l.level == "warning" then warnings[#warnings + 1] = l.msg end
    end
    assert.same({ "Lua warning: first warning", 'Lua warning: a "quoted" one' }, warnings)
  end)

  it("a failing handler and a bad flag", function()
    H.write_file(dir .. "/f.lua", [[
      return { name = "jlog_fail", handle = function() error("broken\n\"handler\"") end }
    ]])
    local r = cli { "run", "--once", "--log-format", "json", dir .. "/f.lua" }
    assert.equal(1, r.code, r.output)
    local failed = find(json_lines(r), 'handler failed at global position 1.*broken\n"handler"')
    assert.is_truthy(failed, r.output)
    assert.equal("error", failed.level)

    r = cli { "run", "--once", "--log-format", "json", "--batch-size", "0", dir .. "/f.lua" }
    assert.equal(2, r.code, r.output)
    assert.is_truthy(find(json_lines(r), "^%-%-batch%-size must be an integer >= 1"), r.output)
  end)
end)
