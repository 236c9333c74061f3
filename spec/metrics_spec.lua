-- Issue 16, metrics and health: `pupsourcing run --metrics-addr HOST:PORT` serves the
-- Prometheus text format on /metrics and a health check on /healthz. Read with the curl
-- binary, and scraped by a real Prometheus server (Debian's `prometheus`) started here.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local CNT = "t_met_cnt"

-- A counting projection; events of type Poison fail it, Slow events take SLOW seconds.
local PROJ = [[
local pup = require "pupsourcing"
return {
  name = %q,
  handle = function(tx, e)
    if e.event_type == "Poison" then error("poison event at " .. e.global_position) end
    if e.event_type == "Slow" then pup.sleep(%s) end
    assert(tx:exec("INSERT INTO ]] .. CNT .. [[ (name, n) VALUES ($1, 1) ON CONFLICT (name)"
      .. " DO UPDATE SET n = ]] .. CNT .. [[.n + 1", %q))
  end,
}
]]

local function curl(url)
  local r = H.sh("curl -sS -m 5 -w '\\n%{http_code}' " .. H.shquote(url))
  local body, code = r.stdout:match("^(.*)\n(%d+)$")
  return tonumber(code), body, r.stderr
end

-- The metrics address a spawned `run` printed ("metrics on http://ADDR/metrics").
local function address_of(proc)
  return H.wait_until(function() return "the metrics line in: " .. H.stderr_of(proc) end, 20, function()
    return H.stderr_of(proc):match("metrics on http://(%S+)/metrics")
  end)
end

-- The value of one sample line `name{labels} value` in a /metrics text.
local function sample(text, name, labels)
  local line = name .. (labels and ("{" .. labels .. "}") or "") .. " "
  for l in text:gmatch("[^\n]+") do
    if l:sub(1, #line) == line then return tonumber(l:sub(#line + 1)) end
  end
  return nil
end

describe("run --metrics-addr", function()
  local store, db, T, dir
  local procs = {}

  local function spawn_run(files, extra)
    local args = { H.bin, "run", "--poll-interval", "50ms" }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    for _, a in ipairs(H.table_flags(T)) do args[#args + 1] = a end
    for _, f in ipairs(files) do args[#args + 1] = f end
    local p = H.spawn(args, { env = { DATABASE_URL = H.url(), ASAN_OPTIONS = "detect_leaks=1" } })
    procs[#procs + 1] = p
    return p
  end

  local function projection(name, slow)
    local path = dir .. "/" .. name:gsub("[^%w]", "_") .. ".lua"
    H.write_file(path, PROJ:format(name, slow or "0", name))
    return path
  end

  local function counted(name)
    local rows = assert(db:query("SELECT n FROM " .. CNT .. " WHERE name = $1", name))
    return rows[1] and rows[1].n or 0
  end

  before_each(function()
    store, db, T, dir = H.fresh_area("met", { CNT })
    assert(db:exec("CREATE TABLE " .. CNT .. " (name text PRIMARY KEY, n bigint NOT NULL)"))
  end)

  after_each(function()
    for _, p in ipairs(procs) do H.signal(p, "TERM") end
    for _, p in ipairs(procs) do
      H.wait_exit(p, 10)
      local err = H.stderr_of(p)
      H.reap(p)
      -- under PUP_SANITIZE=1 the binary reports races on memory, UB and leaks here
      assert.falsy(err:find("Sanitizer", 1, true) or err:find("runtime error", 1, true), err)
    end
    procs = {}
    H.close_area(db, dir)
  end)

  it("serves exact Prometheus lines per projection and partition, and /healthz ok", function()
    local name = 'met "q" \\ x' -- quotes and a backslash, escaped in the label
    local file = projection(name)
    local proc = spawn_run({ file }, { "--workers", "2", "--metrics-addr", "127.0.0.1:0" })
    local addr = address_of(proc)
    for i = 1, 10 do assert(store:append(db, pup.any(), H.events(3, { aggregate_id = "agg-" .. i }))) end
    local head = assert(store:head(db))
    local lbl = 'projection="met \\"q\\" \\\\ x",partition="%d"'
    local text
    -- Both partitions at the head: lag 0 alone is not enough, it is measured from the head
    -- a partition's last batch saw, and the events at the head may all be the other's.
    H.wait_until(function() return "30 events handled, both at " .. head .. "; last scrape:\n" .. tostring(text)
      .. "\nstderr: " .. H.stderr_of(proc) end, 30, function()
      local code
      code, text = curl("http://" .. addr .. "/metrics")
      if code ~= 200 then return false end
      local n = (sample(text, "pupsourcing_events_handled_total", lbl:format(0)) or 0)
          + (sample(text, "pupsourcing_events_handled_total", lbl:format(1)) or 0)
      return n == 30 and sample(text, "pupsourcing_position", lbl:format(0)) == head
          and sample(text, "pupsourcing_position", lbl:format(1)) == head
          and sample(text, "pupsourcing_lag_events", lbl:format(0)) == 0
          and sample(text, "pupsourcing_lag_events", lbl:format(1)) == 0
    end, 0.1)
    assert.equal(30, counted(name))
    for k = 0, 1 do
      local l = lbl:format(k)
      assert.equal(head, sample(text, "pupsourcing_position", l))
      assert.equal(head, sample(text, "pupsourcing_head", l))
      assert.equal(0, sample(text, "pupsourcing_handler_errors_total", l))
      assert.equal(0, sample(text, "pupsourcing_retries_total", l))
      assert.equal(0, sample(text, "pupsourcing_waiting_position", l))
      assert.equal(0, sample(text, "pupsourcing_waiting_seconds", l))
      assert.equal(0, sample(text, "pupsourcing_standby", l))
      assert.equal(1, sample(text, "pupsourcing_partitions_held", l))
      assert.equal(1, sample(text, "pupsourcing_running", l))
    end
    -- the families are announced as the text format asks
    assert.truthy(text:find("\n# HELP pupsourcing_events_handled_total [^\n]+\n# TYPE pupsourcing_events_handled_total counter\n"))
    assert.truthy(text:find("\n# TYPE pupsourcing_lag_events gauge\n", 1, true))
    assert.truthy(text:find("\n# TYPE pupsourcing_retries_total counter\n", 1, true))
    assert.equal(2, sample(text, "pupsourcing_connections"))
    assert.is_true(sample(text, "process_resident_memory_bytes") > 1024 * 1024)
    local started = sample(text, "process_start_time_seconds")
    assert.is_true(math.abs(started - pup.now()) < 60, "process_start_time_seconds " .. tostring(started))
    local code, body = curl("http://" .. addr .. "/healthz")
    assert.equal(200, code)
    assert.equal("ok\n", body)
    code = curl("http://" .. addr .. "/nothing")
    assert.equal(404, code)
  end)

  it("shows a standby partition and the one holding it", function()
    local file = projection("met_sb")
    local a = spawn_run({ file }, { "--metrics-addr", "127.0.0.1:0" })
    local addr_a = address_of(a)
    H.wait_until("the first processor to hold the partition", 20, function()
      local _, text = curl("http://" .. addr_a .. "/metrics")
      return text and sample(text, "pupsourcing_partitions_held", 'projection="met_sb",partition="0"') == 1
    end, 0.1)
    local b = spawn_run({ file }, { "--metrics-addr", "127.0.0.1:0" })
    local addr_b = address_of(b)
    local text
    H.wait_until(function() return "standby 1 on the second; last scrape:\n" .. tostring(text) end, 20, function()
      text = select(2, curl("http://" .. addr_b .. "/metrics"))
      return text and sample(text, "pupsourcing_standby", 'projection="met_sb",partition="0"') == 1
    end, 0.1)
    assert.equal(0, sample(text, "pupsourcing_partitions_held", 'projection="met_sb",partition="0"'))
    local _, ta = curl("http://" .. addr_a .. "/metrics")
    assert.equal(0, sample(ta, "pupsourcing_standby", 'projection="met_sb",partition="0"'))
  end)

  it("labels a group worker partition=\"group\" with the partitions it holds", function()
    local file = projection("met_grp")
    local proc = spawn_run({ file }, { "--group", "--partitions", "4", "--metrics-addr", "127.0.0.1:0" })
    local addr = address_of(proc)
    assert(store:append(db, pup.any(), H.events(4, { aggregate_id = "g-1" })))
    local lbl = 'projection="met_grp",partition="group"'
    local text
    H.wait_until(function() return "4 held and 4 handled; last scrape:\n" .. tostring(text) end, 30, function()
      text = select(2, curl("http://" .. addr .. "/metrics"))
      return text and sample(text, "pupsourcing_partitions_held", lbl) == 4
          and sample(text, "pupsourcing_events_handled_total", lbl) == 4
    end, 0.1)
    assert.equal(0, sample(text, "pupsourcing_standby", lbl))
    assert.equal(200, (curl("http://" .. addr .. "/healthz")))
  end)

  it("shows the hole a partition waits on and for how long, then its passing", function()
    local file = projection("met_hole")
    local proc = spawn_run({ file }, { "--metrics-addr", "127.0.0.1:0" })
    local addr = address_of(proc)
    local lbl = 'projection="met_hole",partition="0"'
    local a = H.connect()
    local txa = assert(a:begin())
    local ra = assert(store:append(txa, pup.any(), { H.event { aggregate_id = "h-a" } })) -- holds its position
    local rb = assert(store:append(db, pup.any(), { H.event { aggregate_id = "h-b" } }))  -- commits after it
    local hole = ra.global_positions[1]
    assert.is_true(rb.global_positions[1] > hole)
    local text
    H.wait_until(function() return "the hole for 1.5 s; last scrape:\n" .. tostring(text) end, 20, function()
      text = select(2, curl("http://" .. addr .. "/metrics"))
      return text and sample(text, "pupsourcing_waiting_position", lbl) == hole
          and sample(text, "pupsourcing_waiting_seconds", lbl) >= 1.5
    end, 0.1)
    assert.is_true(sample(text, "pupsourcing_waiting_seconds", lbl) < 20)
    -- the event after the hole waits too: its age is the lag in seconds
    local lag_s = sample(text, "pupsourcing_lag_seconds", lbl)
    assert.is_true(lag_s >= 1.5 and lag_s < 20, "lag_seconds " .. tostring(lag_s))
    assert.equal(hole - 1, sample(text, "pupsourcing_position", lbl))
    assert.equal(0, sample(text, "pupsourcing_events_handled_total", lbl))
    assert(txa:commit())
    a:close()
    H.wait_until(function() return "the hole to be passed; last scrape:\n" .. tostring(text) end, 20, function()
      text = select(2, curl("http://" .. addr .. "/metrics"))
      return text and sample(text, "pupsourcing_events_handled_total", lbl) == 2
          and sample(text, "pupsourcing_waiting_position", lbl) == 0
    end, 0.1)
    assert.equal(0, sample(text, "pupsourcing_waiting_seconds", lbl))
    assert.equal(0, sample(text, "pupsourcing_lag_events", lbl))
    assert.equal(0, sample(text, "pupsourcing_lag_seconds", lbl))
  end)

  it("shows a batch while it runs, then counts it in the batch duration histogram", function()
    local file = projection("met_hist", "1.5")
    local proc = spawn_run({ file }, { "--metrics-addr", "127.0.0.1:0" })
    local addr = address_of(proc)
    local lbl = 'projection="met_hist",partition="0"'
    local text
    H.wait_until(function() return "the processor to run; last scrape:\n" .. tostring(text) end, 20, function()
      text = select(2, curl("http://" .. addr .. "/metrics"))
      return text and sample(text, "pupsourcing_running", lbl) == 1
    end, 0.1)
    -- idle batches (nothing moved) are not counted
    assert.equal(0, sample(text, "pupsourcing_batch_duration_seconds_count", lbl))
    assert(store:append(db, pup.any(), { H.event { aggregate_id = "s-1", event_type = "Slow" } }))
    H.wait_until(function() return "a batch running 0.5 s; last scrape:\n" .. tostring(text) end, 20, function()
      text = select(2, curl("http://" .. addr .. "/metrics"))
      return text and sample(text, "pupsourcing_batch_running_seconds", lbl) >= 0.5
    end, 0.05)
    assert.is_true(sample(text, "pupsourcing_batch_running_seconds", lbl) < 1.6, text)
    H.wait_until(function() return "the slow batch to commit; last scrape:\n" .. tostring(text) end, 20, function()
      text = select(2, curl("http://" .. addr .. "/metrics"))
      return text and sample(text, "pupsourcing_batch_duration_seconds_count", lbl) == 1
    end, 0.1)
    assert.truthy(text:find("\n# TYPE pupsourcing_batch_duration_seconds histogram\n", 1, true))
    local function bucket(le) return sample(text, "pupsourcing_batch_duration_seconds_bucket", lbl .. ',le="' .. le .. '"') end
    assert.same({ 0, 0, 1, 1, 1, 1 }, { bucket("0.005"), bucket("1"), bucket("2.5"), bucket("5"), bucket("10"), bucket("+Inf") })
    local sum = sample(text, "pupsourcing_batch_duration_seconds_sum", lbl)
    assert.is_true(sum >= 1.5 and sum < 2.5, "sum " .. tostring(sum))
    assert.is_true(sample(text, "pupsourcing_batch_running_seconds", lbl) < 0.5) -- the slow one is over (an idle poll may run)
    assert.equal(0, sample(text, "pupsourcing_lag_seconds", lbl))
    assert.equal(1, counted("met_hist"))
  end)

  it("keeps serving across a lost connection and counts the retry", function()
    local file = projection("met_retry")
    local url = H.url() .. (H.url():find("?", 1, true) and "&" or "?") .. "application_name=met_retry"
    local args = { H.bin, "run", "--poll-interval", "50", "--metrics-addr", "127.0.0.1:0", "--database-url", url }
    for _, a in ipairs(H.table_flags(T)) do args[#args + 1] = a end
    args[#args + 1] = file
    local proc = H.spawn(args, { env = { ASAN_OPTIONS = "detect_leaks=1" } })
    procs[#procs + 1] = proc
    local addr = address_of(proc)
    local lbl = 'projection="met_retry",partition="0"'
    assert(store:append(db, pup.any(), H.events(3)))
    local text
    local function handled(n)
      return function()
        text = select(2, curl("http://" .. addr .. "/metrics"))
        return text and sample(text, "pupsourcing_events_handled_total", lbl) == n
      end
    end
    H.wait_until("3 handled", 20, handled(3), 0.1)
    local killed = assert(db:query("SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
      .. " WHERE application_name = 'met_retry'"))
    assert.equal(1, killed[1].n)
    H.wait_until(function() return "a reconnect in: " .. H.stderr_of(proc) end, 20, function()
      return H.stderr_of(proc):find("reconnected", 1, true)
    end)
    assert(store:append(db, pup.any(), H.events(2)))
    H.wait_until(function() return "5 handled; last scrape:\n" .. tostring(text) end, 20, handled(5), 0.1)
    assert.equal(5, counted("met_retry"))
    local code = curl("http://" .. addr .. "/healthz")
    assert.equal(200, code)
    assert.is_true(sample(text, "pupsourcing_retries_total", lbl) >= 1, text)
  end)

  it("/healthz turns 503 naming the failed projection while the others finish", function()
    -- met_slow stays inside its Slow event until the gate file exists (it too fails on
    -- the poison event after)
    local gate = dir .. "/gate"
    local bad = projection("met_bad")
    local slow = projection("met_slow", ("(function() while not io.open(%q) do pup.sleep(0.05) end return 0 end)()")
      :format(gate))
    assert(store:append(db, pup.any(), { H.event { aggregate_id = "s-1", event_type = "Slow" } }))
    local proc = spawn_run({ slow, bad }, { "--metrics-addr", "127.0.0.1:0" })
    local addr = address_of(proc)
    local code, body
    H.wait_until(function() return "200 from /healthz, got " .. tostring(code) .. " " .. tostring(body) end, 10,
      function()
        code, body = curl("http://" .. addr .. "/healthz")
        return code == 200 -- both run: met_slow is inside its slow event
      end, 0.05)
    assert(store:append(db, pup.any(), { H.event { aggregate_id = "p-1", event_type = "Poison" } }))
    H.wait_until(function() return "503 from /healthz, got " .. tostring(code) .. " " .. tostring(body) end, 10,
      function()
        code, body = curl("http://" .. addr .. "/healthz")
        return code == 503
      end, 0.05)
    assert.matches("projection met_bad partition 0: failed: [^\n]*poison event at", body)
    local _, text = curl("http://" .. addr .. "/metrics") -- (the gated handler keeps the process up)
    assert.equal(1, sample(text, "pupsourcing_handler_errors_total", 'projection="met_bad",partition="0"'))
    assert.equal(0, sample(text, "pupsourcing_running", 'projection="met_bad",partition="0"'))
    assert.equal(0, sample(text, "pupsourcing_handler_errors_total", 'projection="met_slow",partition="0"'))
    assert.equal(1, sample(text, "pupsourcing_running", 'projection="met_slow",partition="0"'))
    H.write_file(gate, "")
    assert.equal(1, H.wait_exit(proc, 20))
  end)

  it("counts the events a projection gave up on (on_error = skip) as dead letters", function()
    local path = dir .. "/met_skip.lua"
    H.write_file(path, PROJ:format("met_skip", "0", "met_skip"):gsub("\nreturn {\n", "\nreturn {\n  on_error = \"skip\",\n", 1))
    local proc = spawn_run({ path }, { "--metrics-addr", "127.0.0.1:0" })
    local addr = address_of(proc)
    assert(store:append(db, pup.any(), { H.event { aggregate_id = "k-1", event_type = "Poison" } }))
    assert(store:append(db, pup.any(), H.events(2, { aggregate_id = "k-2" })))
    local head = assert(store:head(db))
    local text
    local l = 'projection="met_skip",partition="0"'
    H.wait_until(function() return "a dead letter and the head in:\n" .. tostring(text) end, 20, function()
      local code
      code, text = curl("http://" .. addr .. "/metrics")
      return code == 200 and sample(text, "pupsourcing_dead_letters_total", l) == 1
        and sample(text, "pupsourcing_position", l) == head and sample(text, "pupsourcing_lag_events", l) == 0
    end, 0.1)
    assert.equal(2, counted("met_skip"))
    assert.equal(1, sample(text, "pupsourcing_handler_errors_total", l))
    assert.equal(1, sample(text, "pupsourcing_running", l))
    assert.truthy(text:find("\n# TYPE pupsourcing_dead_letters_total counter\n", 1, true))
  end)

  it("a bad --metrics-addr fails run up front (exit 2), nothing processed", function()
    local file = projection("met_addr")
    assert(store:append(db, pup.any(), H.events(3)))
    local holder = spawn_run({ projection("met_holder") }, { "--metrics-addr", "127.0.0.1:0" })
    local taken = address_of(holder)
    local cases = {
      { taken, taken .. ": cannot listen: Address already in use" },
      { "9464", '"9464" is not HOST:PORT' },
      { "127.0.0.1:65536", '"127.0.0.1:65536" is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464, :9464; port 0..65535)' },
      { "127.0.0.1:", '"127.0.0.1:" is not HOST:PORT' },
      { "::1:9464", '"::1:9464" is not HOST:PORT' },
      { "no-such-host.invalid:9464", "no-such-host.invalid:9464: host no-such-host.invalid: " },
      { "192.0.2.1:9464", "192.0.2.1:9464: cannot listen: Cannot assign requested address" },
    }
    for _, c in ipairs(cases) do
      local r = H.run(H.with_tables(T, { "run", "--once", "--metrics-addr", c[1], file }),
        { env = { DATABASE_URL = H.url() } })
      assert.equal(2, r.code, c[1] .. ": " .. r.output)
      assert.truthy(r.stderr:find("pupsourcing: --metrics-addr " .. c[2], 1, true), c[1] .. ": " .. r.stderr)
    end
    assert.equal(0, counted("met_addr"))
    local cp = assert(db:query(('SELECT count(*) AS n FROM "%s" WHERE projection_name = $1'):format(
      T.checkpoints_table), "met_addr"))
    assert.equal(0, cp[1].n)
    -- and the Lua API returns nil, err
    local r, err = pup.runner { files = { file }, metrics_addr = taken }
    assert.is_nil(r)
    assert.equal("invalid_argument", err.code)
    assert.has_error(function() pup.runner { files = { file }, metrics_addr = 9464 } end,
      "runner option metrics_addr must be a string HOST:PORT")
  end)

  it("is scraped by a real Prometheus server: lag reaches 0 and handled equals the events", function()
    local prom = io.popen("command -v prometheus"):read("l")
    if not prom or prom == "" then
      pending("prometheus is not installed (scripts/deps.sh installs Debian's prometheus)")
      return
    end
    local file = projection("met_prom")
    local proc = spawn_run({ file }, { "--workers", "2", "--metrics-addr", "127.0.0.1:0" })
    local addr = address_of(proc)
    local pdir = dir .. "/prom"
    os.execute("mkdir -p " .. H.shquote(pdir .. "/data"))
    -- docs/operations.md's scrape configuration, at a 1 s interval and this run's address
    local config = H.read_file(H.source_dir .. "/docs/operations.md"):match("```yaml\n(.-)```")
    assert.truthy(config and config:find("'127.0.0.1:9464'", 1, true), "no scrape config in docs/operations.md")
    config = config:gsub("scrape_interval: %S+", "scrape_interval: 1s\n  evaluation_interval: 1s")
        :gsub("127%.0%.0%.1:9464", addr)
    H.write_file(pdir .. "/prometheus.yml", config)
    -- A free port for its web API: try a few; skip when it cannot start at all.
    local server, api
    for _ = 1, 5 do
      local port = math.random(20000, 60000)
      if H.sh("ss -Hltn 'sport = :" .. port .. "' | grep -q .").code ~= 0 then
        api = "http://127.0.0.1:" .. port
        server = H.spawn({ prom, "--config.file=" .. pdir .. "/prometheus.yml", "--storage.tsdb.path=" .. pdir .. "/data",
          "--web.listen-address=127.0.0.1:" .. port, "--log.level=warn" })
        procs[#procs + 1] = server
        local ok = pcall(H.wait_until, "prometheus", 30, function()
          return H.exit_code(server) or curl(api .. "/-/ready") == 200
        end, 0.2)
        if ok and not H.exit_code(server) then break end
        table.remove(procs) -- this attempt's server: reaped here, not by after_each
        H.reap(server)
        server = nil
      end
    end
    if not server then
      pending("prometheus cannot start here (no free port or it exits at once)")
      return
    end
    local function query(q)
      local code, body = curl(api .. "/api/v1/query?query=" .. q:gsub("[^%w_]", function(c)
        return ("%%%02X"):format(c:byte())
      end))
      if code ~= 200 then return nil, body end
      local res = pup.json.decode(body)
      local v = res.data and res.data.result and res.data.result[1]
      return v and tonumber(v.value[2]), body
    end
    local last
    H.wait_until(function() return "Prometheus to scrape the processor (up == 1): " .. tostring(last) end, 30,
      function()
        local v
        v, last = query('up{job="pupsourcing"}')
        return v == 1
      end, 0.5)
    for i = 1, 20 do assert(store:append(db, pup.any(), H.events(5, { aggregate_id = "p-" .. i }))) end
    H.wait_until(function() return "PromQL: handled 100 and lag 0, last answer: " .. tostring(last) end, 40, function()
      local handled, lag
      handled, last = query('sum(pupsourcing_events_handled_total{projection="met_prom"})')
      if handled ~= 100 then return false end
      lag, last = query('max(pupsourcing_lag_events{projection="met_prom"})')
      return lag == 0
    end, 0.5)
    assert.equal(2, (query('count(pupsourcing_running{projection="met_prom"} == 1)')))
    H.wait_until(function() return "PromQL: lag_seconds 0 and a batch quantile, last answer: " .. tostring(last) end, 20,
      function()
        local lag_s, q99
        lag_s, last = query('max(pupsourcing_lag_seconds{projection="met_prom"})')
        if lag_s ~= 0 then return false end
        q99, last = query('histogram_quantile(0.99, sum by (le) (pupsourcing_batch_duration_seconds_bucket{projection="met_prom"}))')
        return q99 and q99 > 0 and q99 <= 10
      end, 0.5)
    local batches = query('sum(pupsourcing_batch_duration_seconds_count{projection="met_prom"})')
    assert.is_true(batches >= 1 and batches <= 100, tostring(batches))
    assert.equal(100, counted("met_prom"))
  end)
end)
