-- Issue 10: with --log-format json every line `pupsourcing run` prints is one JSON object:
-- server notices and warnings, the retry and reconnect lines, the summary, a failure,
-- a bad flag.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local RM = "t_jlog_rm"

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
      assert.is_number(v.time)
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
    assert.is_truthy(find(lines, "try again.*retrying in %d+ ms"), r.output)
    assert.is_truthy(find(lines, "reconnected"), r.output)
    assert.is_truthy(find(lines, "^jlog: 4 event%(s%) handled by 1 partition worker%(s%)$"), r.output)
    local rm = assert(db:query("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM " .. RM))[1]
    assert.same({ n = 4, d = 4 }, { n = rm.n, d = rm.d })
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
