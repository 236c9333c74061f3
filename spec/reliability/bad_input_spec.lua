-- Issue 5, bad input: a table-driven suite. Every case runs the host binary (a `run`,
-- `status`, `migrate` command line or a script), expects a normal exit code (1 or 2, never
-- a signal), an exact message fragment on stderr, and leaves the database as it was
-- (events, heads, checkpoint positions, read model, and which t_rel_bad* relations exist).
local pup = require "pupsourcing"
local H = require "spec.helpers"
local R = require "spec.reliability.common"

local PW = "S3cretPw0rd"
-- Cases that must fail before they connect run with this URL: refused at once if they do.
local NO_DB = "postgresql://nobody@127.0.0.1:1/nowhere"
local RM = "t_rel_bad_rm"

-- Projection files of the cases (%{RM} is the read model table, created by the spec).
local FILES = {
  syntax = "return { name = 'syn', handle = function(tx, e) end\n",
  no_name = "return { handle = function(tx, e) end }",
  empty_name = "return { name = '', handle = function(tx, e) end }",
  no_handle = "return { name = 'nohandle' }",
  handle_string = "return { name = 'hstr', handle = 'not a function' }",
  not_table = "return 42",
  raises_at_load = "error('boom while loading')",
  bad_batch = "return { name = 'bb', batch_size = 0, handle = function(tx, e) end }",
  bad_scope = "return { name = 'bs', event_types = 'Inc', handle = function(tx, e) end }",
  dup_a = "return { name = 'dup', handle = function(tx, e) end }",
  dup_b = "return { name = 'dup', handle = function(tx, e) end }",
  raises = [[return { name = 'raises', handle = function(tx, e)
    assert(tx:exec("INSERT INTO %{RM} (pos) VALUES ($1)", e.global_position))
    if e.global_position == 3 then error("kaboom at three") end end }]],
  error_table = [[return { name = 'errtable', handle = function(tx, e)
    assert(tx:exec("INSERT INTO %{RM} (pos) VALUES ($1)", e.global_position))
    error({ code = 7, why = "a table" }) end }]],
  error_table_tostring = [[return { name = 'errtts', handle = function(tx, e)
    error(setmetatable({}, { __tostring = function() return "my error object" end })) end }]],
  return_nil_err = [[return { name = 'retnil', handle = function(tx, e) return nil, "refused by handler" end }]],
  junk = [[local junk = { 42, "junk", { 1, 2 }, true, function() end, 0.5, coroutine.create(function() end) }
    return { name = 'junk', handle = function(tx, e)
      assert(tx:exec("INSERT INTO %{RM} (pos) VALUES ($1)", e.global_position))
      return junk[(e.global_position - 1) % #junk + 1], "more", "junk" end }]],
  forever = [[return { name = 'forever', handle = function(tx, e)
    assert(tx:exec("INSERT INTO %{RM} (pos) VALUES ($1)", e.global_position))
    local n = 0 while true do n = n + 1 end end }]],
  forever_in_db = [[return { name = 'foreverdb', handle = function(tx, e)
    assert(tx:exec("INSERT INTO %{RM} (pos) VALUES ($1)", e.global_position))
    assert(tx:query("SELECT pg_sleep(3600)")) end }]],
  bad_sql = [[return { name = 'badsql', handle = function(tx, e)
    assert(tx:exec("INSERT INTO %{RM} (pos) VALUES ($1)", e.global_position))
    assert(tx:exec("INSERT INTO %{RM} (pos VALUES ($1)", e.global_position)) end }]],
  bad_sql_ignored = [[return { name = 'badsqlign', handle = function(tx, e)
    assert(tx:exec("INSERT INTO %{RM} (pos) VALUES ($1)", e.global_position))
    if e.global_position == 2 then tx:exec("SELEC nonsense") end end }]],
  bad_sql_query = [[return { name = 'badq', handle = function(tx, e)
    assert(tx:query("SELECT no_such_column FROM %{RM}")) end }]],
  setup_raises = [[return { name = 'setupr', setup = function(tx)
    assert(tx:exec("CREATE TABLE t_rel_bad_setup (x int)")); error("setup refused") end,
    handle = function(tx, e) end }]],
  good = "return { name = 'good', handle = function(tx, e) end }",
}

-- An append script; EVENTS is Lua source of the events list.
local APPEND = [[
local pup = require "pupsourcing"
local store = pup.store { events_table = "%{EV}", aggregate_heads_table = "%{HEADS}", checkpoints_table = "%{CP}" }
local db = assert(pup.connect())
local res, err = store:append(db, pup.any(), %{EVENTS})
if res then print("appended") os.exit(0) end
io.stderr:write("append failed: ", tostring(err), "\n")
os.exit(1)
]]

local function ev(over)
  local parts = { 'aggregate_type = "T"', 'aggregate_id = "bad-1"', 'event_type = "E"', 'payload = "p"' }
  local out = {}
  local keys = {}
  for k in pairs(over) do keys[#keys + 1] = k end
  for _, p in ipairs(parts) do
    local k = p:match("^([%w_]+)")
    if over[k] == nil then out[#out + 1] = p end
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    if over[k] ~= false then out[#out + 1] = k .. " = " .. over[k] end
  end
  return "{ " .. table.concat(out, ", ") .. " }"
end

local function url_with(db_name)
  local url = H.url()
  local scheme, user, rest = url:match("^(postgres%w*://)([^@:/]+)@(.*)$")
  assert(scheme, "DATABASE_URL not of the form scheme://user@host...")
  local hostport = rest:match("^([^/]+)")
  return ("%s%s:%s@%s/%s"):format(scheme, user, PW, hostport, db_name)
end

-- The cases. kind: run (args + files), cli (raw args), script (append events).
--   code: expected exit code; expect: fragments that must all be in stderr;
--   line: the exact first line of stderr (%{EID1}: the event id at position 1);
--   absent: fragments that must not appear anywhere in the output;
--   within: seconds the whole process may take, start included;
--   connects: the case reaches the test database (scripts always do). The others run with
--   DATABASE_URL=NO_DB, so any attempt to connect fails the case, unless they name a
--   database of their own (the URL cases).
local CASES = {
  -- malformed projection files
  { name = "syntax error", kind = "run", files = { "syntax" }, code = 2, expect = { "syntax.lua:2:", "expected" } },
  { name = "missing name", kind = "run", files = { "good", "no_name" }, code = 2, expect = { "no_name.lua: missing `name` (a non-empty string)" } },
  { name = "empty name", kind = "run", files = { "empty_name" }, code = 2, expect = { "empty_name.lua: missing `name`" } },
  { name = "missing handle", kind = "run", files = { "no_handle" }, code = 2, expect = { 'no_handle.lua: projection "nohandle": `handle` must be a function, got nil' } },
  { name = "handle not a function", kind = "run", files = { "handle_string" }, code = 2, expect = { 'handle_string.lua: projection "hstr": `handle` must be a function, got string' } },
  { name = "file returns a number", kind = "run", files = { "not_table" }, code = 2, expect = { "not_table.lua: must return a table, got number" } },
  { name = "file raises while loading", kind = "run", files = { "raises_at_load" }, code = 2, expect = { "raises_at_load.lua:", "boom while loading" } },
  { name = "batch_size 0", kind = "run", files = { "bad_batch" }, code = 2, expect = { 'bad_batch.lua: projection "bb": `batch_size` must be a positive integer' } },
  { name = "event_types not a list", kind = "run", files = { "bad_scope" }, code = 2, expect = { 'bad_scope.lua: projection "bs": `event_types` must be a list of strings' } },
  { name = "duplicate names across files", kind = "run", files = { "dup_a", "dup_b" }, code = 2, expect = { 'dup_b.lua: projection name "dup" is also used by', "dup_a.lua" } },
  { name = "a missing file", kind = "run", files = {}, extra = { "/nonexistent/proj.lua" }, code = 2, expect = { "/nonexistent/proj.lua" } },
  -- handlers
  { name = "handler raises", kind = "run", connects = true, files = { "raises" }, code = 1,
    expect = { "projection raises partition 0/1: handler failed at global position 3", "kaboom at three", "stack traceback" } },
  { name = "handler calls error with a table", kind = "run", connects = true, files = { "error_table" }, code = 1,
    expect = { "projection errtable partition 0/1: handler failed at global position 1", "error object is a table", '"why":"a table"' } },
  { name = "handler error object with __tostring", kind = "run", connects = true, files = { "error_table_tostring" }, code = 1,
    expect = { "projection errtts partition 0/1: handler failed at global position 1", "my error object" } },
  { name = "handler returns nil, err", kind = "run", connects = true, files = { "return_nil_err" }, code = 1,
    expect = { "projection retnil partition 0/1: handler failed at global position 1", "refused by handler" } },
  { name = "handler runs forever in Lua (--handler-timeout 300)", kind = "run", connects = true, files = { "forever" }, args = { "--handler-timeout", "300ms" },
    code = 1, within = 10,
    line = "pupsourcing: handler: projection forever partition 0/1: handler failed at global position 1 (event_type Tick, event_id %{EID1}): handler exceeded its time limit of 300 ms",
    expect = { "stack traceback", "forever.lua:3:" } },
  { name = "handler blocks in the database forever (--handler-timeout 300)", kind = "run", connects = true, files = { "forever_in_db" }, args = { "--handler-timeout", "300ms" },
    code = 1, within = 10,
    line = "pupsourcing: handler: projection foreverdb partition 0/1: handler failed at global position 1 (event_type Tick, event_id %{EID1}): handler exceeded its time limit of 300 ms: database: canceling statement due to statement timeout (SQLSTATE 57014)",
    expect = { "stack traceback", "forever_in_db.lua:3:" } },
  { name = "handler writes bad SQL (asserted)", kind = "run", connects = true, files = { "bad_sql" }, code = 1,
    expect = { "projection badsql partition 0/1: handler failed at global position 1", "syntax error", "42601" } },
  { name = "handler writes bad SQL (result ignored)", kind = "run", connects = true, files = { "bad_sql_ignored" }, code = 1,
    expect = { "projection badsqlign partition 0/1: handler failed at global position 2", "syntax error" } },
  { name = "handler queries a missing column", kind = "run", connects = true, files = { "bad_sql_query" }, code = 1,
    expect = { "projection badq partition 0/1: handler failed at global position 1", "no_such_column", "42703" } },
  { name = "setup raises after a write", kind = "run", connects = true, files = { "setup_raises" }, code = 1, expect = { "setup failed", "setup refused" } },
  -- invalid flags and environment values
  { name = "--batch-size 0", kind = "run", files = { "good" }, args = { "--batch-size", "0" }, code = 2, expect = { '--batch-size must be an integer >= 1, got "0"' } },
  { name = "--batch-size abc", kind = "run", files = { "good" }, args = { "--batch-size", "abc" }, code = 2, expect = { '--batch-size must be an integer >= 1, got "abc"' } },
  { name = "--batch-size 1.5", kind = "run", files = { "good" }, args = { "--batch-size=1.5" }, code = 2, expect = { '--batch-size must be an integer >= 1, got "1.5"' } },
  { name = "--handler-timeout -5", kind = "run", files = { "good" }, args = { "--handler-timeout=-5" }, code = 2, expect = { '--handler-timeout must be a duration from 1ms to 24h in whole milliseconds (like 500ms, 2s, 1m), got "-5"' } },
  { name = "--poll-interval 0", kind = "run", files = { "good" }, args = { "--poll-interval", "0" }, code = 2, expect = { '--poll-interval must be a duration from 1ms to 1h', 'got "0"' } },
  { name = "--workers x", kind = "run", files = { "good" }, args = { "--workers", "x" }, code = 2, expect = { '--workers must be an integer >= 1, got "x"' } },
  { name = "--workers 99999999999999999999", kind = "run", files = { "good" }, args = { "--workers", "99999999999999999999" }, code = 2, expect = { "--workers must be an integer >= 1" } },
  { name = "--log-format xml", kind = "run", files = { "good" }, args = { "--log-format", "xml" }, code = 2, expect = { "--log-format must be text or json" } },
  { name = "flag without its value", kind = "run", files = { "good" }, args_after = { "--batch-size" }, code = 2, expect = { "run: option '--batch-size' requires an argument" } },
  { name = "unknown flag", kind = "run", files = { "good" }, args = { "--frobnicate", "1" }, code = 2, expect = { "run: unknown option '--frobnicate'" } },
  { name = "TOTAL_PARTITIONS=abc", kind = "run", files = { "good" }, env = { PARTITION_KEY = "0", TOTAL_PARTITIONS = "abc" }, code = 2, expect = { 'TOTAL_PARTITIONS must be an integer >= 1, got "abc"' } },
  { name = "PARTITION_KEY=-1", kind = "run", files = { "good" }, env = { PARTITION_KEY = "-1", TOTAL_PARTITIONS = "2" }, code = 2, expect = { 'PARTITION_KEY must be an integer >= 0, got "-1"' } },
  { name = "PARTITION_KEY=3 TOTAL_PARTITIONS=3", kind = "run", files = { "good" }, env = { PARTITION_KEY = "3", TOTAL_PARTITIONS = "3" }, code = 2, expect = { "PARTITION_KEY 3 must be below TOTAL_PARTITIONS 3" } },
  -- hostile table names
  { name = "table name with a quote", kind = "cli", args = { "migrate", "--events-table", 'ev"; DROP TABLE t_rel_bad_rm; --' }, code = 2, expect = { "invalid events_table", "use letters, digits and _" } },
  { name = "table name with a semicolon", kind = "cli", args = { "status", "--checkpoints-table", "cp; DELETE FROM x" }, code = 2, expect = { "invalid checkpoints_table" } },
    { name = "table name $1", kind = "run", files = { "good" }, args = { "--aggregate-heads-table", "$1" }, code = 2,
    line = 'pupsourcing: invalid aggregate_heads_table "$1": use letters, digits and _ (optionally schema.table), at most 63 characters a part' },
  -- database URLs (the password is never printed)
  { name = "unreachable database (status)", kind = "cli", args = { "status", "--database-url", "postgresql://bob:" .. PW .. "@127.0.0.1:1/db" }, code = 2,
    expect = { "cannot connect to", "127.0.0.1" }, absent = { PW } },
  { name = "unreachable database (run)", kind = "cli", args = { "run", "--once", "--database-url", "postgresql://bob:" .. PW .. "@127.0.0.1:1/db", "%{good}" }, code = 1,
    expect = { "cannot connect to", "127.0.0.1" }, absent = { PW } },
  { name = "unknown host", kind = "cli", args = { "migrate", "--database-url", "postgresql://bob:" .. PW .. "@no-such-host.invalid:5432/db" }, code = 2,
    expect = { "cannot connect to", "no-such-host.invalid" }, absent = { PW } },
  { name = "malformed URL", kind = "cli", args = { "status", "--database-url", "postgresql://bob:" .. PW .. "@[::1:5432/db" }, code = 2,
    expect = { "cannot connect to" }, absent = { PW } },
  { name = "unknown database", kind = "cli", args = { "status", "--database-url", url_with("no_such_db_rel") }, code = 2,
    expect = { 'database "no_such_db_rel" does not exist' }, absent = { PW } },
  { name = "DATABASE_URL with an invalid keyword", kind = "cli", args = { "status" },
    env = { DATABASE_URL = "host=127.0.0.1 port=1 user=bob password=" .. PW .. " bogus_option=1" }, code = 2,
    expect = { "cannot connect to", "invalid connection option" }, absent = { PW } },
  { name = "DATABASE_URL with a bad sslmode", kind = "cli", args = { "status" },
    env = { DATABASE_URL = "postgresql://bob:" .. PW .. "@127.0.0.1:1/db?sslmode=sometimes" }, code = 2,
    expect = { "cannot connect to", "sslmode" }, absent = { PW } },
  -- tables not migrated
  { name = "status on tables not migrated", kind = "cli", connects = true, args = { "status", "--events-table", "t_rel_bad_nm_events", "--checkpoints-table", "t_rel_bad_nm_cp" },
    code = 2, expect = { "run `pupsourcing migrate`" } },
  { name = "run on tables not migrated", kind = "cli", connects = true, args = { "run", "--once", "--events-table", "t_rel_bad_nm_events", "--checkpoints-table", "t_rel_bad_nm_cp", "%{good}" },
    code = 1, expect = { "run `pupsourcing migrate`" } },
  { name = "append on tables not migrated", kind = "script", nm = true, events = "{" .. ev {} .. "}", code = 1, expect = { "not_migrated", "run `pupsourcing migrate`" } },
  -- events
  { name = "event without aggregate_id", kind = "script", events = "{" .. ev { aggregate_id = false } .. "}", code = 1, expect = { "invalid_event: event 1: aggregate_id is required" } },
  { name = "event without event_type", kind = "script", events = "{" .. ev {} .. ", " .. ev { event_type = false } .. "}", code = 1, expect = { "invalid_event: event 2: event_type is required" } },
  { name = "aggregate_type a table", kind = "script", events = "{" .. ev { aggregate_type = "{}" } .. "}", code = 1, expect = { "invalid_event: event 1: aggregate_type must be a string" } },
  { name = "aggregate_id a number", kind = "script", events = "{" .. ev { aggregate_id = "12" } .. "}", code = 1, expect = { "invalid_event: event 1: aggregate_id must be a string" } },
  { name = "payload a boolean", kind = "script", events = "{" .. ev { payload = "true" } .. "}", code = 1, expect = { "invalid_event: event 1: payload must be a string or a table" } },
  { name = "event_version not a number", kind = "script", events = "{" .. ev { event_version = '"abc"' } .. "}", code = 1, expect = { "invalid_event: event 1: event_version must be a positive integer" } },
  { name = "event_id not a UUID", kind = "script", events = "{" .. ev { event_id = '"not-a-uuid\'; --"' } .. "}", code = 1, expect = { "invalid_event: event 1: event_id is not a UUID" } },
  { name = "metadata invalid JSON text", kind = "script", events = "{" .. ev { metadata = '"{bad"' } .. "}", code = 1, expect = { "invalid input syntax for type json", "22P02" } },
  { name = "created_at not a timestamp", kind = "script", events = "{" .. ev { created_at = '"yesterday-ish"' } .. "}", code = 1, expect = { "invalid input syntax for type timestamp", "22007" } },
  { name = "events of two aggregates", kind = "script", events = "{" .. ev {} .. ", " .. ev { aggregate_id = '"bad-2"' } .. "}", code = 1, expect = { "invalid_event: event 2: aggregate_id differs from event 1" } },
  { name = "empty events list", kind = "script", events = "{}", code = 1, expect = { "no_events" } },
  { name = "events not a table", kind = "script", events = '"events"', code = 1, expect = { "bad argument", "table expected, got string" } },
  { name = "non-UTF-8 aggregate_id", kind = "script", events = "{" .. ev { aggregate_id = '"bad-\\xff\\xfe"' } .. "}", code = 1, expect = { 'invalid byte sequence for encoding "UTF8": 0xff', "22021" } },
  { name = "non-UTF-8 event_type (second event)", kind = "script", events = "{" .. ev {} .. ", " .. ev { event_type = '"E\\xc3\\x28"' } .. "}", code = 1, expect = { 'invalid byte sequence for encoding "UTF8": 0xc3 0x28' } },
  { name = "non-UTF-8 in metadata", kind = "script", events = "{" .. ev { metadata = '{ note = "\\xff" }' } .. "}", code = 1, expect = { 'invalid_event: event 1: metadata cannot be written as JSON: string: not valid UTF-8' } },
  { name = "non-UTF-8 trace_id", kind = "script", events = "{" .. ev { trace_id = '"t\\x80"' } .. "}", code = 1, expect = { 'invalid byte sequence for encoding "UTF8": 0x80' } },
}

describe("reliability: bad input", function()
  local store, db, T, tmp, files

  setup(function()
    store, db, T = H.fresh_store("rel_bad")
    assert(db:exec("DROP TABLE IF EXISTS " .. RM))
    assert(db:exec("DROP TABLE IF EXISTS t_rel_bad_setup"))
    assert(db:exec("CREATE TABLE " .. RM .. " (pos bigint)"))
    H.drop_tables(db, "rel_bad_nm")
    assert(db:exec("DROP TABLE IF EXISTS t_rel_bad_nm_cp"))
    R.populate(store, db, 5, 1, 5, "bad-")
    tmp = H.tmpdir()
    files = {}
    for k, text in pairs(FILES) do files[k] = R.template(tmp, k .. ".lua", text, { RM = RM }) end
  end)

  teardown(function()
    R.cleanup()
    db:close()
    H.rmdir(tmp)
  end)

  -- What "the database as it was" means here: events and heads byte for byte, checkpoint
  -- positions (a row at position 0 equals no row), the read model, the t_rel_bad* relations.
  local function snapshot()
    local function md5(sql) return R.one(db, sql).m end
    return {
      events = md5(('SELECT md5(COALESCE(string_agg(e::text, \'|\' ORDER BY global_position), \'\')) AS m FROM "%s" e'):format(T.events_table)),
      heads = md5(('SELECT md5(COALESCE(string_agg(h::text, \'|\' ORDER BY h::text), \'\')) AS m FROM "%s" h'):format(T.aggregate_heads_table)),
      checkpoints = md5(('SELECT md5(COALESCE(string_agg(projection_name || \'/\' || partition_key || \'/\' || last_global_position, \'|\''
        .. ' ORDER BY projection_name, partition_key), \'\')) AS m FROM "%s" WHERE last_global_position > 0'):format(T.checkpoints_table)),
      read_model = md5(("SELECT md5(COALESCE(string_agg(pos::text, '|' ORDER BY pos), '')) AS m FROM %s"):format(RM)),
      relations = md5("SELECT COALESCE(string_agg(relname, ',' ORDER BY relname), '') AS m FROM pg_class WHERE relname LIKE 't\\_rel\\_bad%'"),
    }
  end

  local function expand(a)
    return (a:gsub("%%{(%w+)}", function(k) return assert(files[k], k) end))
  end

  local function command(case)
    if case.kind == "run" then
      local args = { "run", "--once" }
      for _, a in ipairs(R.table_flags(T)) do args[#args + 1] = a end
      for _, a in ipairs(case.args or {}) do args[#args + 1] = a end
      for _, f in ipairs(case.files) do args[#args + 1] = files[f] end
      for _, a in ipairs(case.extra or {}) do args[#args + 1] = a end
      for _, a in ipairs(case.args_after or {}) do args[#args + 1] = a end
      return R.pup_argv(args)
    elseif case.kind == "cli" then
      local args = {}
      for _, a in ipairs(case.args) do args[#args + 1] = expand(a) end
      return R.pup_argv(args)
    else
      local names = case.nm and H.tables("rel_bad_nm") or T
      local path = R.template(tmp, "append_" .. tostring(case):match("0x(%x+)") .. ".lua", APPEND,
        { EV = names.events_table, HEADS = names.aggregate_heads_table, CP = names.checkpoints_table, EVENTS = case.events })
      return R.pup_argv { path }
    end
  end

  local counted = { cases = 0, before_connect = 0, unchanged = 0, own_url = 0 }
  local function own_url(case)
    if case.env and case.env.DATABASE_URL then return true end
    for _, a in ipairs(case.args or {}) do if a == "--database-url" then return true end end
    return false
  end
  for _, case in ipairs(CASES) do
    it(case.name, function()
      local connects = case.connects or case.kind == "script"
      local env = {}
      for k, v in pairs(case.env or {}) do env[k] = v end
      if not connects and not own_url(case) then env.DATABASE_URL = NO_DB end
      local before = snapshot()
      local t0 = pup.now()
      local p = R.spawn(command(case), env)
      local rc = p:wait(case.within or 30)
      if not rc then
        p:kill("KILL")
        p:wait(5)
        -- a backend blocked in pg_sleep outlives its killed client: end it
        local n = R.one(db, "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(3600)'").n
        error(("still running after %s s (killed; %d backend(s) in pg_sleep terminated); stderr:\n%s"):format(case.within or 30, n, p:stderr()))
      end
      local elapsed = pup.now() - t0
      local out, err = p:stdout(), p:stderr()
      assert.is_true(rc < 128, "ended by signal " .. (rc - 128) .. ":\n" .. err)
      assert.equal(case.code, rc, "exit code; stderr:\n" .. err)
      if case.line then
        local eid1 = R.one(db, ('SELECT event_id::text AS id FROM "%s" WHERE global_position = 1'):format(T.events_table)).id
        assert.equal(case.line:gsub("%%{EID1}", eid1), err:match("^[^\n]*"))
      end
      for _, frag in ipairs(case.expect or {}) do
        assert.is_truthy(err:find(expand(frag), 1, true), "expected " .. frag .. " in stderr:\n" .. err)
      end
      for _, frag in ipairs(case.absent or {}) do
        assert.is_falsy((out .. err):find(frag, 1, true), "must not print " .. frag .. ":\n" .. out .. err)
      end
      if env.DATABASE_URL == NO_DB then
        assert.is_falsy(err:find("cannot connect", 1, true), "tried to connect before failing:\n" .. err)
        counted.before_connect = counted.before_connect + 1
      elseif own_url(case) then
        counted.own_url = counted.own_url + 1
      else
        counted.unchanged = counted.unchanged + 1
      end
      assert.same(before, snapshot(), "the database changed")
      if case.within then assert.is_true(elapsed < case.within, ("took %.2f s"):format(elapsed)) end
      counted.cases = counted.cases + 1
    end)
  end

  it("a handler returning junk values (numbers, strings, tables, functions, threads) is fine", function()
    local before = R.checkpoint(db, T, "junk")
    assert.equal(0, before)
    local args = { "run", "--once" }
    for _, a in ipairs(R.table_flags(T)) do args[#args + 1] = a end
    args[#args + 1] = files.junk
    local p = R.spawn(R.pup_argv(args))
    assert.equal(0, p:wait(30), p:stderr())
    assert.equal(5, R.checkpoint(db, T, "junk"))
    assert.equal(5, R.one(db, ("SELECT count(*) AS n FROM %s"):format(RM)).n)
    assert(db:exec("DELETE FROM " .. RM))
    assert(db:exec(('DELETE FROM "%s" WHERE projection_name = \'junk\''):format(T.checkpoints_table)))
    R.report("bad input: %d table-driven cases (projection files, handlers, flags/env, table names, URLs,"
      .. " not migrated, events) checked: exact exit code, messages, database unchanged; %d passed: %d failed before"
      .. " connecting (DATABASE_URL refused), %d reached the database and left it unchanged, %d named a database of their own",
      #CASES, counted.cases, counted.before_connect, counted.unchanged, counted.own_url)
  end)
end)

describe("reliability: unusual but valid data round-trips exactly", function()
  local store, db, T

  before_each(function() store, db, T = H.fresh_store("rel_badok") end)
  after_each(function() db:close() end)

  local function roundtrip(e)
    local res = assert(store:append(db, pup.any(), { e }))
    local got = assert(store:read_events(db, res.global_positions[1] - 1, { limit = 1 }))[1]
    return got
  end

  it("a 16 MiB payload", function()
    local chunk = {}
    for i = 0, 255 do chunk[#chunk + 1] = string.char(i) end
    local big = string.rep(table.concat(chunk), 16 * 1024 * 1024 // 256)
    assert.equal(16 * 1024 * 1024, #big)
    local t0 = pup.now()
    local got = roundtrip { aggregate_type = "Blob", aggregate_id = "big-1", event_type = "Big", payload = big }
    assert.equal(#big, #got.payload)
    assert.is_true(got.payload == big, "payload bytes differ")
    -- and through a host-binary script (another process, its own connection), which writes
    -- the payload to a file; the spec compares every byte. And the server's md5 of the
    -- stored column equals that of the same bytes built by the server (256 byte values x 65536)
    local dir = H.tmpdir()
    local r = H.run_script(([[
      local pup = require "pupsourcing"
      local store = pup.store { events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q }
      local db = assert(pup.connect())
      local e = assert(store:read_events(db, 0, { limit = 1 }))[1]
      local f = assert(io.open(%q, "wb"))
      f:write(e.payload)
      f:close()]]):format(T.events_table, T.aggregate_heads_table, T.checkpoints_table, dir .. "/payload"))
    assert.equal(0, r.code, r.output)
    local f = assert(io.open(dir .. "/payload", "rb"))
    local back = f:read("a")
    f:close()
    H.rmdir(dir)
    assert.equal(#big, #back)
    assert.is_true(back == big, "payload bytes differ when read by another process")
    local sums = R.one(db, ('SELECT md5(payload) AS stored, md5(decode(repeat($1, 65536), \'hex\')) AS built FROM "%s"'
      .. ' WHERE global_position = $2'):format(T.events_table), H.hex(table.concat(chunk)), got.global_position)
    assert.equal(sums.built, sums.stored)
    R.report("bad input: a 16 MiB payload appended and read back byte-exact in %.2f s", pup.now() - t0)
  end)

  it("binary payloads with NUL bytes, every byte value, and an empty payload", function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    for _, payload in ipairs { "\0", "a\0b\0\0c", table.concat(all), string.rep("\0", 1000), "" } do
      local got = roundtrip { aggregate_type = "Bin", aggregate_id = "bin-1", event_type = "Bytes", payload = payload }
      assert.equal(H.hex(payload), H.hex(got.payload))
    end
  end)

  it("hostile ids and types (quotes, semicolons, $1, backslashes) are data", function()
    local hostile = { "a'b", 'a"b', "x'); DROP TABLE t_rel_badok_events; --", "$1", "$1::text", "\\", "é✓",
                      "1; DELETE FROM t_rel_badok_heads", "%s%d", "" }
    for i, id in ipairs(hostile) do
      local got = roundtrip { aggregate_type = "T'; --" .. i, aggregate_id = id, event_type = "$1" .. id,
                              payload = id, causation_id = id, correlation_id = id, trace_id = id }
      assert.same({ id, "T'; --" .. i, "$1" .. id, id, id, id, id },
        { got.aggregate_id, got.aggregate_type, got.event_type, got.payload, got.causation_id, got.correlation_id, got.trace_id })
      local stream = assert(store:read_aggregate_stream(db, "T'; --" .. i, id))
      assert.equal(1, #stream)
    end
    assert.equal(#hostile, assert(store:head(db)))
  end)
end)
