-- Issue 5, concurrency: many writer processes on hot aggregates with exact versions, and
-- writers racing partitioned processors while appends commit out of order.
local pup = require "pupsourcing"
local H = require "spec.helpers"
local R = require "spec.reliability.common"

local WRITER = H.source_dir .. "/spec/reliability/writer.lua"

-- Parses the writer logs: acked appends, rejected attempts (by code), rolled-back ones.
local function read_logs(paths)
  local out = { ok = {}, reject = {}, rolledback = {}, codes = {}, lines = 0, done = 0 }
  for _, path in ipairs(paths) do
    for line in io.lines(path) do
      out.lines = out.lines + 1
      local w = {}
      for word in line:gmatch("%S+") do w[#w + 1] = word end
      if w[1] == "ok" then
        local pos, ids = {}, {}
        for p in w[5]:gmatch("[^,]+") do pos[#pos + 1] = tonumber(p) end
        for id in w[6]:gmatch("[^,]+") do ids[#ids + 1] = id end
        out.ok[#out.ok + 1] = { agg = w[2], from = tonumber(w[3]), to = tonumber(w[4]), pos = pos, ids = ids }
      elseif w[1] == "reject" then
        out.codes[w[2]] = (out.codes[w[2]] or 0) + 1
        local ids = {}
        for id in w[5]:gmatch("[^,]+") do ids[#ids + 1] = id end
        out.reject[#out.reject + 1] = { code = w[2], agg = w[3], ids = ids }
      elseif w[1] == "rolledback" then
        local ids = {}
        for id in w[3]:gmatch("[^,]+") do ids[#ids + 1] = id end
        out.rolledback[#out.rolledback + 1] = { agg = w[2], ids = ids }
      elseif w[1] == "done" then
        out.done = out.done + 1
      else
        error("unexpected writer log line in " .. path .. ": " .. line)
      end
    end
  end
  return out
end

-- Checks the log against the writers' reports: every stream 1..n without holes or
-- duplicates, every acked event where the writer was told, nothing of rejected or
-- rolled-back attempts, nothing else. Returns the number of stored events.
local function check_log(db, T, logs)
  local ev = T.events_table
  -- streams: versions 1..n, no holes, no duplicates
  local bad = R.one(db, ([[SELECT count(*) AS n FROM (
      SELECT aggregate_id, count(*) AS c, count(DISTINCT aggregate_version) AS d,
             min(aggregate_version) AS lo, max(aggregate_version) AS hi
        FROM "%s" GROUP BY aggregate_type, aggregate_id) s
     WHERE c <> d OR lo <> 1 OR hi <> c]]):format(ev)).n
  assert.equal(0, bad, "streams with holes or duplicate versions")
  -- heads agree with the streams
  local heads = R.one(db, ([[SELECT count(*) AS n FROM "%s" h FULL JOIN
      (SELECT aggregate_type, aggregate_id, max(aggregate_version) AS v FROM "%s" GROUP BY 1, 2) e
      USING (aggregate_type, aggregate_id) WHERE h.aggregate_version IS DISTINCT FROM e.v]]):format(
      T.aggregate_heads_table, ev)).n
  assert.equal(0, heads, "aggregate heads disagree with the streams")
  -- every stored event, by id
  local stored = {}
  local rows = assert(db:query(('SELECT event_id::text AS id, aggregate_id AS agg, aggregate_version AS v,'
    .. ' global_position AS pos FROM "%s"'):format(ev)))
  for _, r in ipairs(rows) do stored[r.id] = r end
  local acked = 0
  for _, a in ipairs(logs.ok) do
    assert.equal(#a.ids, a.to - a.from + 1, "ack reports a wrong version range")
    for i, id in ipairs(a.ids) do
      local r = stored[id]
      assert.is_table(r, "acknowledged event " .. id .. " is missing")
      assert.same({ agg = a.agg, v = a.from + i - 1, pos = a.pos[i] }, { agg = r.agg, v = r.v, pos = r.pos })
      acked = acked + 1
    end
  end
  for _, list in ipairs { logs.reject, logs.rolledback } do
    for _, a in ipairs(list) do
      for _, id in ipairs(a.ids) do
        assert.is_nil(stored[id], "event " .. id .. " of a rejected/rolled-back append is stored")
      end
    end
  end
  assert.equal(acked, #rows, "events stored that no writer acknowledged")
  return acked
end

describe("reliability: concurrency", function()
  local store, db, T, tmp
  local NAME = "rel_conc"

  before_each(function() store, db, T, tmp = H.fresh_area(NAME) end)

  after_each(function()
    R.cleanup()
    H.close_area(db, tmp)
  end)

  local function writer(i, mode, extra)
    local args = { WRITER, "--mode", mode, "--log", tmp .. "/w" .. i .. ".log", "--id", "w" .. i }
    for _, x in ipairs(R.table_flags(T)) do args[#args + 1] = x end
    for _, x in ipairs(extra) do args[#args + 1] = x end
    return R.spawn(R.pup_argv(args))
  end

  it("8 writer processes, 20 hot aggregates, exact versions, retry on conflict: 4,000 appends, none lost, doubled or partial", function()
    local t0 = pup.now()
    local ws, logs = {}, {}
    for i = 1, 8 do
      ws[i] = writer(i, "exact", { "--appends", "500", "--aggregates", "20" })
      logs[i] = tmp .. "/w" .. i .. ".log"
    end
    for i, w in ipairs(ws) do
      local rc = w:wait(120)
      assert.equal(0, rc, "writer " .. i .. " exit code (nil = still running): " .. w:stderr())
    end
    local l = read_logs(logs)
    assert.equal(8, l.done)
    assert.equal(4000, #l.ok)
    for code in pairs(l.codes) do assert.equal("optimistic_concurrency", code) end
    local events = check_log(db, T, l)
    assert.equal(20, R.one(db, ('SELECT count(DISTINCT aggregate_id) AS n FROM "%s"'):format(T.events_table)).n)
    R.report("concurrency: 8 writers, 20 aggregates: 4000 acknowledged appends (%d events), %d optimistic_concurrency"
      .. " rejections retried, 0 other errors, streams 1..n exact, %.1f s",
      events, l.codes.optimistic_concurrency or 0, pup.now() - t0)
    assert.is_true((l.codes.optimistic_concurrency or 0) > 0, "no conflict happened: the test did not contend")
  end)

  it("writers and 4 partitioned processors at once, appends committing out of order, some rolled back: read model = log", function()
    local t0 = pup.now()
    local RM, SEEN = "t_rel_conc_rm", "t_rel_conc_seen"
    assert(db:exec("DROP TABLE IF EXISTS " .. RM))
    assert(db:exec("DROP TABLE IF EXISTS " .. SEEN))
    local proj = R.template(tmp, "conc_rm.lua", [[
return {
  name = "rel_conc_rm",
  batch_size = 50,
  setup = function(tx)
    assert(tx:exec("CREATE TABLE IF NOT EXISTS %{RM} (agg text PRIMARY KEY, n bigint NOT NULL,"
      .. " last_version bigint NOT NULL, sum_x bigint NOT NULL, out_of_order bigint NOT NULL DEFAULT 0)"))
    assert(tx:exec("CREATE TABLE IF NOT EXISTS %{SEEN} (seq bigserial, pos bigint, agg text, version bigint,"
      .. " eid text, part int)"))
  end,
  handle = function(tx, e)
    local x = e.data.x
    assert(tx:exec("INSERT INTO %{SEEN} (pos, agg, version, eid, part) VALUES ($1, $2, $3, $4, $5)",
      e.global_position, e.aggregate_id, e.aggregate_version, e.event_id, tonumber(os.getenv("PARTITION_KEY"))))
    assert(tx:exec("INSERT INTO %{RM} AS r (agg, n, last_version, sum_x, out_of_order) VALUES ($1, 1, $2::bigint, $3::bigint,"
      .. " CASE WHEN $2::bigint = 1 THEN 0 ELSE 1 END) ON CONFLICT (agg) DO UPDATE SET n = r.n + 1, last_version = $2::bigint,"
      .. " sum_x = r.sum_x + $3::bigint, out_of_order = r.out_of_order + CASE WHEN r.last_version + 1 = $2::bigint THEN 0 ELSE 1 END",
      e.aggregate_id, e.aggregate_version, x))
  end,
}
]], { RM = RM, SEEN = SEEN })
    local procs = {}
    for k = 0, 3 do
      local args = { "run", "--poll-interval", "200" }
      for _, x in ipairs(R.table_flags(T)) do args[#args + 1] = x end
      args[#args + 1] = proj
      procs[k] = R.spawn(R.pup_argv(args), { PARTITION_KEY = tostring(k), TOTAL_PARTITIONS = "4" })
    end
    local ws, logs = {}, {}
    for i = 1, 8 do
      ws[i] = writer(i, "ooo", { "--appends", "250", "--aggregates", "20", "--prefix", "ooo-",
                                 "--max-sleep", "0.02", "--rollback", "0.1" })
      logs[i] = tmp .. "/w" .. i .. ".log"
    end
    for i, w in ipairs(ws) do
      assert.equal(0, w:wait(120), "writer " .. i .. ": " .. w:stderr())
    end
    local l = read_logs(logs)
    assert.equal(2000, #l.ok)
    for code in pairs(l.codes) do assert.equal("optimistic_concurrency", code) end
    local events = check_log(db, T, l)
    local head = assert(store:head(db))
    R.wait_until("the 4 partitions to catch up", 60, function()
      for k = 0, 3 do
        assert.is_nil(procs[k]:code(), "processor " .. k .. " exited: " .. procs[k]:stderr())
        if R.checkpoint(db, T, "rel_conc_rm", k, 4) < head then return false end
      end
      return true
    end, 0.1)
    for k = 0, 3 do procs[k]:kill("TERM") end
    for k = 0, 3 do assert.equal(0, procs[k]:wait(10), "processor " .. k .. " after SIGTERM: " .. procs[k]:stderr()) end
    -- each event handled exactly once, by the partition that owns it
    local s = R.one(db, ("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM %s"):format(SEEN))
    assert.same({ n = events, d = events }, s)
    local missing = R.one(db, ('SELECT count(*) AS n FROM "%s" e WHERE NOT EXISTS (SELECT 1 FROM %s s'
      .. ' WHERE s.pos = e.global_position AND s.eid = e.event_id::text AND s.version = e.aggregate_version)')
      :format(T.events_table, SEEN)).n
    assert.equal(0, missing, "events of the log never handled")
    for _, row in ipairs(assert(db:query(("SELECT DISTINCT agg, part FROM %s"):format(SEEN)))) do
      assert.equal(pup.partition_of(row.agg, 4), row.part, row.agg)
    end
    -- aggregate order: each aggregate's events reached handle in version order
    local disorder = R.one(db, ([[SELECT count(*) AS n FROM (SELECT version,
        row_number() OVER (PARTITION BY agg ORDER BY seq) AS rn FROM %s) s WHERE version <> rn]]):format(SEEN)).n
    assert.equal(0, disorder, "events handled out of version order")
    -- the read model equals the one computed from the final log
    local diff = R.one(db, ([[SELECT count(*) AS n FROM (
        (SELECT agg, n, last_version, sum_x, 0::bigint AS out_of_order FROM (
           SELECT aggregate_id AS agg, count(*) AS n, max(aggregate_version) AS last_version,
                  sum((convert_from(payload, 'UTF8')::jsonb->>'x')::bigint) AS sum_x
             FROM "%s" GROUP BY aggregate_id) e
         EXCEPT SELECT agg, n, last_version, sum_x, out_of_order FROM %s)
        UNION ALL
        (SELECT agg, n, last_version, sum_x, out_of_order FROM %s
         EXCEPT SELECT aggregate_id, count(*), max(aggregate_version),
                  sum((convert_from(payload, 'UTF8')::jsonb->>'x')::bigint), 0 FROM "%s" GROUP BY aggregate_id)) d]])
      :format(T.events_table, RM, RM, T.events_table)).n
    assert.equal(0, diff, "read model differs from the log")
    -- holes there were: positions drawn by rolled-back or rejected appends
    local holes = R.one(db, ('SELECT max(global_position) - count(*) AS n FROM "%s"'):format(T.events_table)).n
    R.report("concurrency+processors: 8 out-of-order writers (pg_sleep 0-20 ms in tx) + 4 partition processes:"
      .. " 2000 acked appends (%d events), %d rolled back, %d conflicts retried, %d holes in the positions;"
      .. " each event handled once, in aggregate order, read model = log, %.1f s",
      events, #l.rolledback, l.codes.optimistic_concurrency or 0, holes, pup.now() - t0)
    assert.is_true(#l.rolledback > 0 and holes > 0, "no hole happened: the test did not exercise gaps")
  end)
end)
