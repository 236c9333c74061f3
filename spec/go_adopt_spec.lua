-- Issue 14: adopting a database made by the Go library (docs/go.md). Fixtures of both Go
-- shapes (spec/fixtures/go/) filled the way the Go library writes: uuid ids, no
-- aggregate_id_hash, BIGSERIAL positions, one checkpoint row per projection.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local FIX = H.source_dir .. "/spec/fixtures/go/"

-- The Go library's statements (spec/fixtures/go/go_writes.sql) for tables T.
local function go_statements(T)
  local sql = H.read_file(FIX .. "go_writes.sql")
  local out, name = {}, nil
  for line in sql:gmatch("[^\n]+") do
    local n = line:match("^%-%- name: (%S+)")
    if n then name = n
    elseif name and not line:match("^%-%-") then out[name] = (out[name] or "") .. line end
  end
  for k, v in pairs(out) do
    out[k] = v:gsub("{events}", T.events_table):gsub("{heads}", T.aggregate_heads_table)
      :gsub("{checkpoints}", T.checkpoints_table)
  end
  return out
end

local function fixture(file, T)
  return (H.read_file(FIX .. file):gsub("{events}", T.events_table):gsub("{heads}", T.aggregate_heads_table)
    :gsub("{checkpoints}", T.checkpoints_table))
end

-- The spec area's name of a table set (pup.store refuses keys it does not know).
local function area(T) return (T.events_table:match("^t_(.*)_events$")) end

local function drop(db, T)
  H.drop_tables(db, area(T))
  assert(db:exec("DROP FUNCTION IF EXISTS " .. T.events_table .. "_next_position()"))
end

local function tables(name) return H.tables(name) end

local function q(db, sql, ...)
  local r, err = db:query(sql, ...)
  if not r then error(tostring(err), 2) end
  return r
end

-- A random UUID in canonical (lower-case) text.
local function uuid() return pup.uuid() end

-- Appends events the way the Go library does (head lookup, one INSERT per event with
-- every field given and global_position left to the default, head upsert) in `tx`.
-- Each event: {event_type=, payload=, metadata=, trace_id=, correlation_id=,
-- causation_id=, created_at=, event_version=}. Returns the events with their ids,
-- versions and positions filled in.
local function go_append(tx, S, atype, aid, events)
  local head = q(tx, S.head, atype, aid)[1]
  local v = head and head.aggregate_version or 0
  for i, e in ipairs(events) do
    e.aggregate_type, e.aggregate_id, e.aggregate_version = atype, aid, v + i
    e.event_id = e.event_id or uuid()
    e.event_version = e.event_version or 1
    e.global_position = q(tx, S.insert, atype, aid, v + i, e.event_id, e.event_type, e.event_version, e.payload,
      e.trace_id, e.correlation_id, e.causation_id, e.metadata, e.created_at)[1].global_position
  end
  assert(tx:exec(S.upsert_head, atype, aid, v + #events))
  return events
end

-- One event as the Go library would write it; every optional field varies with i.
local function go_event(i)
  return {
    event_type = ({ "Opened", "Deposited", "Withdrawn" })[i % 3 + 1],
    event_version = i % 2 + 1,
    payload = i % 4 == 0 and ("\0\1bin" .. i .. "\255") or ('{"i": %d}'):format(i),
    metadata = i % 3 ~= 0 and ('{"n": %d, "who": "go"}'):format(i) or nil,
    trace_id = i % 2 == 0 and uuid() or nil,
    correlation_id = i % 5 ~= 0 and uuid() or nil,
    causation_id = i % 3 == 1 and uuid() or nil,
    created_at = ("2024-%02d-%02dT%02d:%02d:%02d.%06dZ"):format(i % 12 + 1, i % 28 + 1, i % 24, i % 60, (i * 7) % 60,
      (i * 7919) % 1000000),
  }
end

local FIELDS = { "global_position", "aggregate_type", "aggregate_id", "aggregate_version", "event_id", "event_type",
  "event_version", "payload", "metadata", "trace_id", "correlation_id", "causation_id", "created_at" }

-- A Go database on tables T: the seed's schema, naggs aggregates of `per` events each
-- written by the Go appender, and a Go checkpoint row `go_counter` at position `cp`.
-- Returns the written events keyed by position and the list of aggregate ids.
local function go_database(db, T, naggs, per, cp)
  drop(db, T)
  assert(db:exec(fixture("seed_schema.sql", T)))
  local S = go_statements(T)
  local written, ids, i = {}, {}, 0
  for a = 1, naggs do
    ids[a] = uuid()
    local evs = {}
    for j = 1, per do
      i = i + 1
      evs[j] = go_event(i)
    end
    for _, e in ipairs(go_append(db, S, "Account", ids[a], evs)) do written[e.global_position] = e end
  end
  assert(db:exec(S.checkpoint, "go_counter", cp))
  return written, ids, S
end

-- What a migration may change: columns (type, null, default), constraints, indexes,
-- the position functions, and every table's rows.
local function catalog(db, T)
  local out = {}
  local like = "t_" .. area(T) .. "_%"
  for _, r in ipairs(q(db, [[SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
      || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END || ' default ' || COALESCE(pg_get_expr(d.adbin, d.adrelid), '-') AS x
      FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
      WHERE c.relname LIKE $1 ORDER BY 1]], like)) do out[#out + 1] = r.x end
  for _, r in ipairs(q(db, [[SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) AS x
      FROM pg_constraint WHERE conrelid::regclass::text LIKE $1 ORDER BY 1]], like)) do out[#out + 1] = r.x end
  for _, r in ipairs(q(db, [[SELECT indexrelid::regclass::text || ' ' || pg_get_indexdef(indexrelid) AS x
      FROM pg_index WHERE indrelid::regclass::text LIKE $1 ORDER BY 1]], like)) do out[#out + 1] = r.x end
  for _, r in ipairs(q(db, "SELECT proname::text AS x FROM pg_proc WHERE proname LIKE $1 ORDER BY 1", like)) do
    out[#out + 1] = "function " .. r.x
  end
  for _, t in ipairs { T.events_table, T.aggregate_heads_table, T.checkpoints_table } do
    local r = q(db, ('SELECT count(*) AS n, COALESCE(md5(string_agg(x::text, \',\' ORDER BY x::text)), \'\') AS h'
      .. ' FROM "%s" x'):format(t))[1]
    out[#out + 1] = ("%s: %d rows, %s"):format(t, r.n, r.h)
  end
  return out
end

local function relfilenode(db, t)
  return q(db, "SELECT relfilenode FROM pg_class WHERE oid = $1::regclass", t)[1].relfilenode
end

-- A projection file: counts events per aggregate and logs each handled position (an
-- event handled twice or skipped shows in both).
local PROJECTION = [[
return {
  name = "%s",
  setup = function(tx)
    assert(tx:exec("CREATE TABLE IF NOT EXISTS %s (agg text PRIMARY KEY, n bigint NOT NULL)"))
    assert(tx:exec("CREATE TABLE IF NOT EXISTS %s (pos bigint NOT NULL, agg text NOT NULL)"))
  end,
  handle = function(tx, e)
    assert(tx:exec("INSERT INTO %s AS c (agg, n) VALUES ($1, 1) ON CONFLICT (agg) DO UPDATE SET n = c.n + 1", e.aggregate_id))
    assert(tx:exec("INSERT INTO %s (pos, agg) VALUES ($1, $2)", e.global_position, e.aggregate_id))
  end,
}
]]

describe("a database made by the Go library (seed shape)", function()
  local T = tables("goadopt")
  local db, dir

  local function projection(name)
    local cnt, seen = "t_goadopt_" .. name .. "_n", "t_goadopt_" .. name .. "_seen"
    assert(db:exec("DROP TABLE IF EXISTS " .. cnt))
    assert(db:exec("DROP TABLE IF EXISTS " .. seen))
    local path = dir .. "/" .. name .. ".lua"
    H.write_file(path, PROJECTION:format(name, cnt, seen, cnt, seen))
    return path, cnt, seen
  end

  before_each(function()
    db = H.connect()
    dir = H.tmpdir()
  end)

  after_each(function()
    db:close()
    H.rmdir(dir)
  end)

  it("is refused by migrate without --upgrade, naming the differences, and nothing changes", function()
    go_database(db, T, 5, 4, 7)
    local before = catalog(db, T)
    -- status cannot read the Go checkpoints, and says what to do
    local st = H.run(H.with_tables(T, { "status" }))
    assert.equal(2, st.code, st.output)
    assert.is_truthy(st.stderr:find("does not default to", 1, true), st.stderr)
    assert.is_truthy(st.stderr:find("run `pupsourcing migrate --upgrade`", 1, true), st.stderr)
    local r = H.run(H.with_tables(T, { "migrate" }))
    assert.equal(2, r.code, r.output)
    assert.equal("", r.stdout)
    for _, want in ipairs {
      "nothing was changed",
      "t_goadopt_events.global_position defaults to nextval",
      "keeps one checkpoint per projection",
      "migrate --upgrade",
      "keep aggregate_id, trace_id, correlation_id, causation_id of t_goadopt_events as uuid",
      "set the default of global_position to \"t_goadopt_events_next_position\"()",
      "add the column aggregate_id_hash",
      "continues as partition 0 of 1 at N",
      "is named t_goadopt_events_aggregate_type_aggregate_id_aggregate_vers_key",
      "rename it to t_goadopt_events_aggregate_version_key",
    } do
      assert.is_truthy(r.stderr:find(want, 1, true), "missing " .. want .. " in: " .. r.stderr)
    end
    local store = pup.store(T)
    local ok, err = store:migrate(db)
    assert.is_nil(ok)
    assert.equal("not_migrated", err.code)
    assert.equal("PU001", err.sqlstate)
    assert.same(before, catalog(db, T))
    -- a misspelled option is misuse, not an upgrade
    assert.has_error(function() store:migrate(db, { upgrad = true }) end)
    assert.same(before, catalog(db, T))
  end)

  it("is converted in place by migrate --upgrade and then used by both sides", function()
    local written, ids, S = go_database(db, T, 12, 5, 20)
    local head = #ids * 5
    local node = relfilenode(db, T.events_table)
    local r = H.run(H.with_tables(T, { "migrate", "--upgrade" }))
    assert.equal(0, r.code, r.output)
    assert.equal("migrated (--upgrade): t_goadopt_events, t_goadopt_heads, t_goadopt_checkpoints\n", r.stdout)
    assert.equal(node, relfilenode(db, T.events_table)) -- not rewritten
    assert.equal("uuid", q(db, "SELECT format_type(atttypid, NULL) AS t FROM pg_attribute WHERE attrelid = $1::regclass"
      .. " AND attname = 'aggregate_id'", T.events_table)[1].t)
    -- idempotent afterwards, with or without --upgrade
    local again = catalog(db, T)
    assert.equal(0, H.run(H.with_tables(T, { "migrate" })).code)
    assert.equal(0, H.run(H.with_tables(T, { "migrate", "--upgrade" })).code)
    assert.same(again, catalog(db, T))

    -- every field of every event read back as text, as the Go library wrote it
    local store = pup.store(T)
    local events = assert(store:read_events(db, 0, { limit = 1000 }))
    assert.equal(head, #events)
    for _, e in ipairs(events) do
      local w = written[e.global_position]
      for _, f in ipairs(FIELDS) do
        assert.equal(w[f], e[f], ("position %d field %s"):format(e.global_position, f))
      end
    end
    local stream = assert(store:read_aggregate_stream(db, "Account", ids[3]))
    assert.equal(5, #stream)
    assert.equal(5, stream.version)
    for _, e in ipairs(stream) do
      for _, f in ipairs(FIELDS) do assert.equal(written[e.global_position][f], e[f]) end
    end

    -- Lua appends: ids given in upper case are stored and hashed in canonical form
    local upper = ids[1]:upper()
    local cause, corr = uuid(), uuid():upper()
    local res = assert(store:append(db, pup.exact(5), { { aggregate_type = "Account", aggregate_id = upper,
      event_type = "Deposited", payload = { amount = 5 }, causation_id = cause, correlation_id = corr } }))
    assert.same({ head + 1 }, res.global_positions)
    local mine = assert(store:read_events(db, head, { limit = 10 }))[1]
    assert.equal(ids[1], mine.aggregate_id)
    assert.equal(6, mine.aggregate_version)
    assert.equal(cause, mine.causation_id)
    assert.equal(corr:lower(), mine.correlation_id)
    assert.is_nil(mine.trace_id)
    local hash = q(db, ('SELECT aggregate_id_hash AS h FROM "%s" WHERE global_position = $1'):format(T.events_table),
      head + 1)[1].h
    assert.equal(pup.partition_of(ids[1], 4), hash % 4)
    assert.equal(pup.partition_of(ids[1], 7), hash % 7)
    -- a lost race is optimistic_concurrency (the version key was renamed)
    local _, err = store:append(db, pup.exact(5), { { aggregate_type = "Account", aggregate_id = ids[1],
      event_type = "Late", payload = {} } })
    assert.equal("optimistic_concurrency", err.code)
    local direct = db:exec(('INSERT INTO "%s" (aggregate_type, aggregate_id, aggregate_version, event_id, event_type, payload)'
      .. " VALUES ('Account', $1, 1, gen_random_uuid(), 'Dup', '\\x00')"):format(T.events_table), ids[2])
    assert.is_nil(direct) -- (its position, head + 2, is a hole now)
    assert.equal("t_goadopt_events_aggregate_version_key", q(db, "SELECT conname FROM pg_constraint WHERE conrelid"
      .. " = $1::regclass AND contype = 'u' AND array_length(conkey, 1) = 3", T.events_table)[1].conname)
    -- an id that is not a UUID is a bad event, nothing written
    _, err = store:append(db, pup.any(), { { aggregate_type = "Account", aggregate_id = "acct-1",
      event_type = "Opened", payload = {} } })
    assert.equal("invalid_event", err.code)
    assert.matches("aggregate_id must be a UUID", err.message)
    assert.equal(head + 1, assert(store:head(db)))

    -- the Go appender still works (positions from the xid-first default)
    local go = go_append(db, S, "Account", ids[1], { go_event(1000), go_event(1001) })
    assert.same({ head + 3, head + 4 }, { go[1].global_position, go[2].global_position })
    assert.same({ 7, 8 }, { go[1].aggregate_version, go[2].aggregate_version })
    local fresh = go_append(db, S, "Account", uuid(), { go_event(1002) })[1]
    assert.equal(head + 5, fresh.global_position)
    for _, e in ipairs { go[1], go[2], fresh } do written[e.global_position] = e end
    for _, e in ipairs(assert(store:read_events(db, head + 1, { limit = 10 }))) do
      for _, f in ipairs(FIELDS) do assert.equal(written[e.global_position][f], e[f]) end
    end
    head = head + 5

    -- commands with snapshots: the snapshots table is keyed by uuid like the events
    assert.equal("uuid", q(db, "SELECT format_type(atttypid, NULL) AS t FROM pg_attribute WHERE attrelid ="
      .. " $1::regclass AND attname = 'aggregate_id'", T.events_table .. "_snapshots")[1].t)
    local acct = { initial = function() return { n = 0 } end, snapshot_every = 2,
      evolve = function(st, e) st.n = st.n + 1 return st end }
    local st, v = assert(store:handle(db, "Account", ids[4]:upper(), function() return { { event_type = "Noted",
      payload = {} } } end, acct))
    assert.same({ { n = 6 }, 6 }, { st, v })
    assert.equal(1, q(db, ('SELECT count(*) AS n FROM "%s_snapshots" WHERE aggregate_id = $1 AND version = 6')
      :format(T.events_table), ids[4])[1].n)
    local ls, lv = assert(store:load(db, "Account", ids[4], acct))
    assert.same({ { n = 6 }, 6 }, { ls, lv })
    head = head + 1 -- (the event Noted is counted by the runs below)
    local count = q(db, ('SELECT count(*) AS n FROM "%s"'):format(T.events_table))[1].n

    -- the Go checkpoint continued: go_counter at 20 is partition 0 of 1 at 20
    local cps = q(db, ('SELECT projection_name AS p, partition_key AS k, total_partitions AS t,'
      .. ' last_global_position AS pos FROM "%s" ORDER BY 1'):format(T.checkpoints_table))
    assert.same({ { p = "go_counter", k = 0, t = 1, pos = 20 } }, cps)
    local gofile, _, goseen = projection("go_counter")
    r = H.run(H.with_tables(T, { "run", "--once", gofile }))
    assert.equal(0, r.code, r.output)
    assert.is_nil(r.stderr:find("does not default", 1, true), r.stderr)
    local handled = q(db, "SELECT min(pos) AS lo, max(pos) AS hi, count(*) AS n, count(DISTINCT pos) AS d FROM " .. goseen)[1]
    assert.same({ lo = 21, hi = head, n = count - 20, d = count - 20 }, handled)

    -- a Go processor still on the converted table fails loudly at its checkpoint write;
    -- docs/go.md's SQL gives it a table of its own with its position
    local _, gerr = db:exec(S.checkpoint, "go_counter", 1)
    assert.equal("42P10", gerr.sqlstate)
    local block = H.read_file(H.source_dir .. "/docs/go.md"):match("```sql\n(.-)```")
    block = block:gsub("go_projection_checkpoints", "t_goadopt_gock"):gsub("projection_checkpoints", T.checkpoints_table)
      :gsub("my_go_projection", "go_counter")
    assert(db:exec("DROP TABLE IF EXISTS t_goadopt_gock"))
    assert(db:exec(block))
    assert.same({ { p = "go_counter", pos = head } }, q(db, "SELECT projection_name AS p, last_global_position AS pos"
      .. " FROM t_goadopt_gock"))
    assert(db:exec(S.checkpoint:gsub(T.checkpoints_table, "t_goadopt_gock"), "go_counter", head))
    assert(db:exec("DROP TABLE t_goadopt_gock"))

    -- run with 4 partitions: every event exactly once, aggregates whole
    local file, cnt, seen = projection("adopt_counter")
    r = H.run(H.with_tables(T, { "run", "--once", "--workers", "4", file }))
    assert.equal(0, r.code, r.output)
    local s = q(db, "SELECT count(*) AS n, count(DISTINCT pos) AS d, min(pos) AS lo, max(pos) AS hi FROM " .. seen)[1]
    assert.same({ n = count, d = count, lo = 1, hi = head }, s)
    local wrong = q(db, ('SELECT count(*) AS n FROM (SELECT aggregate_id::text AS agg, count(*) AS n FROM "%s"'
      .. ' GROUP BY 1) e FULL JOIN %s c USING (agg) WHERE c.n IS DISTINCT FROM e.n'):format(T.events_table, cnt))[1].n
    assert.equal(0, wrong)
    local parts = q(db, ('SELECT partition_key AS k, last_global_position AS pos FROM "%s" WHERE projection_name ='
      .. " 'adopt_counter' AND total_partitions = 4 ORDER BY 1"):format(T.checkpoints_table))
    assert.equal(4, #parts)

    -- status: both projections at the head, no warning
    r = H.run(H.with_tables(T, { "status" }))
    assert.equal(0, r.code, r.output)
    assert.is_nil(r.output:find("warning", 1, true), r.output)
    assert.matches("go_counter%s+0/1%s+" .. head .. "%s+" .. head .. "%s+0", r.stdout)
    assert.matches("adopt_counter%s+3/4%s+" .. head .. "%s+" .. head .. "%s+0", r.stdout)
  end)

  it("is upgraded while Go appenders write: nothing lost, nothing doubled", function()
    local _, _, S = go_database(db, T, 1, 1, 0)
    local script = dir .. "/writer.lua"
    H.write_file(script, ([[
      local pup = require "pupsourcing"
      local db = assert(pup.connect(os.getenv("DATABASE_URL")))
      local ids = {}
      for a = 1, 8 do ids[a] = pup.uuid() end
      for i = 1, 400 do
        local id = ids[i %% 8 + 1]
        assert(db:transaction(function(tx)
          local h = assert(tx:query(%q, "Account", id))[1]
          local v = (h and h.aggregate_version or 0) + 1
          assert(tx:query(%q, "Account", id, v, pup.uuid(), "W", 1, "{}", nil, nil, nil, nil, "2024-01-01T00:00:00Z"))
          assert(tx:exec(%q, "Account", id, v))
        end))
      end
      print("done")
    ]]):format(S.head, S.insert, S.upsert_head))
    local writer = H.spawn({ H.bin, script })
    local ok, perr = pcall(function()
      H.wait_until("the writer to start", 10, function()
        return q(db, ('SELECT count(*) AS n FROM "%s"'):format(T.events_table))[1].n > 50
      end)
      local r = H.run(H.with_tables(T, { "migrate", "--upgrade" }))
      assert.equal(0, r.code, r.output)
      local during = q(db, ('SELECT count(*) AS n FROM "%s"'):format(T.events_table))[1].n
      assert.equal(0, H.wait_exit(writer, 60), H.stderr_of(writer))
      assert.is_true(during < 401, "the upgrade ran after the writer had finished")
      local file, cnt, seen = projection("adopt_race")
      r = H.run(H.with_tables(T, { "run", "--once", "--workers", "4", file }))
      assert.equal(0, r.code, r.output)
      local s = q(db, "SELECT count(*) AS n, count(DISTINCT pos) AS d FROM " .. seen)[1]
      assert.same({ n = 401, d = 401 }, s)
      local wrong = q(db, ('SELECT count(*) AS n FROM (SELECT aggregate_id::text AS agg, count(*) AS n FROM "%s"'
        .. ' GROUP BY 1) e FULL JOIN %s c USING (agg) WHERE c.n IS DISTINCT FROM e.n'):format(T.events_table, cnt))[1].n
      assert.equal(0, wrong)
    end)
    H.reap(writer)
    assert(ok, perr)
  end)

  it("keeps the ordering rule for Go appends: a position drawn before its writer's xid is waited for", function()
    -- A BEFORE INSERT trigger holds the Go writer after its position is drawn and before
    -- the row (and, with a plain nextval default, its transaction id) exists.
    local _, _, S = go_database(db, T, 1, 1, 0)
    assert(pup.store(T):migrate(db, { upgrade = true }))
    assert(db:exec(([[CREATE FUNCTION t_goadopt_hold() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.event_type = 'Held' THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF; RETURN NEW; END $$;
      CREATE TRIGGER hold BEFORE INSERT ON "%s" FOR EACH ROW EXECUTE FUNCTION t_goadopt_hold()]]):format(T.events_table)))
    local store = pup.store(T)
    local seen = {}
    local p = pup.processor(db, { name = "go_order", handle = function(_, e) seen[#seen + 1] = e.event_type end },
      { store = store })
    assert.equal(1, p:run_once())
    local first = seen[1]
    local lock = H.connect()
    local ltx = assert(lock:begin())
    assert(ltx:query("SELECT pg_advisory_xact_lock(4242)"))
    local script = dir .. "/held.lua"
    H.write_file(script, ([[
      local pup = require "pupsourcing"
      local db = assert(pup.connect(os.getenv("DATABASE_URL")))
      assert(db:query(%q, "Account", pup.uuid(), 1, pup.uuid(), "Held", 1, "{}", nil, nil, nil, nil, "2024-01-01T00:00:00Z"))
      print("inserted")
    ]]):format(S.insert))
    local held = H.spawn({ H.bin, script })
    local ok, perr = pcall(function()
      H.wait_until("the held writer to draw its position", 10, function()
        return q(db, ('SELECT last_value AS v FROM "%s_global_position_seq"'):format(T.events_table))[1].v == 2
      end)
      local b = go_append(db, S, "Account", uuid(), { go_event(7) })[1]
      assert.equal(3, b.global_position)
      for _ = 1, 10 do
        assert.equal(0, p:run_once())
        pup.sleep(0.02)
      end
      assert.same({ first }, seen)
      assert(ltx:commit())
      assert.equal(0, H.wait_exit(held, 10), H.stderr_of(held))
      local deadline = pup.now() + 20
      while #seen < 3 and pup.now() < deadline do
        p:run_once()
        pup.sleep(0.01)
      end
      assert.same({ first, "Held", b.event_type }, seen)
    end)
    H.reap(held)
    p:close()
    lock:close()
    assert(db:exec("DROP FUNCTION t_goadopt_hold() CASCADE"))
    assert(ok, perr)
  end)

  it("keeps the ordering rule for appends that commit out of order", function()
    local _, _, S = go_database(db, T, 1, 1, 0)
    assert(pup.store(T):migrate(db, { upgrade = true }))
    local store = pup.store(T)
    local seen = {}
    local p = pup.processor(db, { name = "lua_order", handle = function(_, e) seen[#seen + 1] = e.global_position end },
      { store = store })
    assert.equal(1, p:run_once())
    local a, b = H.connect(), H.connect()
    local txa = assert(a:begin())
    local ra = assert(store:append(txa, pup.any(), { { aggregate_type = "Account", aggregate_id = uuid(),
      event_type = "A", payload = {} } }))
    local rb = go_append(b, S, "Account", uuid(), { go_event(3) })[1]
    assert.is_true(rb.global_position > ra.global_positions[1])
    assert.equal(0, p:run_once())
    local waiting
    for _, row in ipairs(assert(pup.status(db, store))) do
      if row.projection == "lua_order" then waiting = row.waiting_position end
    end
    assert.equal(ra.global_positions[1], waiting)
    assert(txa:commit())
    assert.equal(2, p:run_once())
    assert.same({ 1, ra.global_positions[1], rb.global_position }, seen)
    p:close()
    a:close()
    b:close()
  end)
end)

describe("the position default", function()
  it("is warned about by status and run, and fixed by migrate --upgrade", function()
    local store, db, T = H.fresh_store("goadopt_def")
    local dir = H.tmpdir()
    assert(db:exec(('ALTER TABLE "%s" ALTER COLUMN global_position SET DEFAULT nextval(\'%s_global_position_seq\')')
      :format(T.events_table, T.events_table)))
    assert(store:append(db, pup.any(), { H.event() }))
    local warn = 'warning: "t_goadopt_def_events".global_position does not default to "t_goadopt_def_events_next_position"()'
    local r = H.run(H.with_tables(T, { "status" }))
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stdout:find(warn, 1, true), r.output)
    assert.is_truthy(r.stdout:find("migrate --upgrade", 1, true), r.output)
    local file = dir .. "/p.lua"
    H.write_file(file, 'return { name = "goadopt_def", handle = function() end }')
    r = H.run(H.with_tables(T, { "run", "--once", file }))
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stderr:find(warn:gsub("^warning: ", ""), 1, true), r.output)
    r = H.run(H.with_tables(T, { "migrate" }))
    assert.equal(2, r.code, r.output)
    assert.is_truthy(r.stderr:find("defaults to nextval", 1, true), r.output)
    assert.equal(0, H.run(H.with_tables(T, { "migrate", "--upgrade" })).code)
    r = H.run(H.with_tables(T, { "status" }))
    assert.equal(0, r.code, r.output)
    assert.is_nil(r.output:find("warning", 1, true), r.output)
    assert.equal(2, assert(store:append(db, pup.any(), { H.event() })).global_positions[1])
    db:close()
    H.rmdir(dir)
  end)
end)

describe("an events table with id columns of mixed types", function()
  it("is refused by append, nothing written", function()
    local store, db, T = H.fresh_store("goadopt_mixed")
    assert(db:exec(('ALTER TABLE "%s" ALTER COLUMN aggregate_id TYPE uuid USING aggregate_id::uuid')
      :format(T.events_table)))
    local ok, err = store:append(db, pup.any(), { H.event { aggregate_id = uuid() } })
    assert.is_nil(ok)
    assert.equal("invalid_argument", err.code)
    assert.matches("must be all text or all uuid", err.message)
    assert.equal(0, assert(store:head(db)))
    db:close()
  end)
end)

describe("the Go library's newest shape (bounded_context)", function()
  it("is refused with and without --upgrade, nothing changed", function()
    local T = tables("gobounded")
    local db = H.connect()
    drop(db, T)
    assert(db:exec(fixture("bounded_schema.sql", T)))
    for i = 1, 3 do
      assert(db:exec(('INSERT INTO "%s" (bounded_context, aggregate_type, aggregate_id, aggregate_version, event_id,'
        .. " event_type, payload) VALUES ('billing', 'Account', $1, 1, $2, 'Opened', '{}')"):format(T.events_table),
        uuid(), uuid()))
      assert(db:exec(('INSERT INTO "%s" (projection_name, last_global_position) VALUES ($1, $2)')
        :format(T.checkpoints_table), "p" .. i, i))
    end
    local before = catalog(db, T)
    for _, args in ipairs { { "migrate" }, { "migrate", "--upgrade" } } do
      local r = H.run(H.with_tables(T, args))
      assert.equal(2, r.code, r.output)
      assert.is_truthy(r.stderr:find("t_gobounded_events has a bounded_context column", 1, true), r.stderr)
      assert.is_truthy(r.stderr:find("does not support bounded contexts, with or without --upgrade", 1, true), r.stderr)
      assert.same(before, catalog(db, T))
    end
    local ok, err = pup.store(T):migrate(db, { upgrade = true })
    assert.is_nil(ok)
    assert.equal("not_migrated", err.code)
    assert.same(before, catalog(db, T))
    db:close()
  end)
end)
