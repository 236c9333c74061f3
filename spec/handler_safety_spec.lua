-- Issue 10, the handler path of pup.processor run by the host binary (under the sanitizer
-- build too: an ASan report or a leak makes the binary fail): Lua errors raised outside
-- the handler itself (an __index on the projection table, a __tostring on a returned
-- error), p:close()/db:close() inside a handler, the handler time limit against
-- pup.sleep and coroutines, the user's debug hook, _run_fd's stats argument.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local RM = "t_hsafe_rm"

-- Every script starts with this: pup, db, store, rm (the read model table) and
-- writer(name), a projection writing one row per event.
local PRELUDE = [[
local pup = require "pupsourcing"
local url, ev, hd, ck, rm = ...
local db = assert(pup.connect(url))
local store = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
local function writer(name)
  return { name = name, handle = function(tx, e)
    assert(tx:exec("INSERT INTO " .. rm .. " (pos) VALUES ($1)", e.global_position))
  end }
end
local function state_of(pid) -- the server's view of a backend: "idle", "idle in transaction", ...
  local other = assert(pup.connect(url))
  local s = assert(other:query("SELECT state FROM pg_stat_activity WHERE pid = $1", pid))[1].state
  other:close()
  return s
end
local PID = assert(db:query("SELECT pg_backend_pid() AS pid"))[1].pid
]]

describe("handler safety", function()
  local store, db, T

  local function script(body, args, opts)
    return H.run_script(PRELUDE .. body,
      { H.url(), T.events_table, T.aggregate_heads_table, T.checkpoints_table, RM, table.unpack(args or {}) }, opts)
  end

  -- The exit code and no sanitizer report.
  local function assert_clean(r, code)
    assert.is_nil(r.output:find("AddressSanitizer", 1, true), r.output)
    assert.is_nil(r.output:find("LeakSanitizer", 1, true), r.output)
    assert.is_nil(r.output:find("runtime error:", 1, true), r.output)
    assert.equal(code, r.code, r.output)
  end

  local function one(sql, ...) return assert(db:query(sql, ...))[1] end

  -- Each event handled exactly once and the checkpoint at the head.
  local function assert_exact(name, n)
    local rm = one(("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM %s"):format(RM))
    assert.same({ n = n, d = n }, { n = rm.n, d = rm.d })
    local cp = one(('SELECT last_global_position AS p FROM "%s" WHERE projection_name = $1'):format(T.checkpoints_table), name)
    assert.equal(n, cp and cp.p)
  end

  before_each(function()
    T = H.tables("hsafe")
    store, db = H.fresh_store("hsafe")
    assert(db:exec("DROP TABLE IF EXISTS " .. RM))
    assert(db:exec("CREATE TABLE " .. RM .. " (pos bigint NOT NULL)"))
    assert(store:append(db, pup.any(), H.events(5, { aggregate_id = H.uid("a") })))
  end)

  after_each(function() db:close() end)

  describe("a Lua error outside the handler itself fails the batch cleanly", function()
    it("an __index on the projection table raising when `handle` is looked up", function()
      local r = script [[
        local armed = false
        local real = writer("hs_index")
        local proj = setmetatable({ name = "hs_index" }, { __index = function(_, k)
          if k == "handle" and armed then error("index boom") end
          return real[k]
        end })
        local p = pup.processor(db, proj, { store = store })
        armed = true
        local ok, n, err = pcall(p.run_once, p)
        print("first", tostring(ok), tostring(n), tostring(err):match("^[^\n]*"))
        print("state", state_of(PID))
        armed = false
        print("second", assert(p:run_once()))
        p:close()
        db:close()
      ]]
      assert_clean(r, 0)
      -- returned as nil, err (nothing raised through the processor), the connection out of
      -- the batch transaction, and the next run exact
      assert.matches("first\ttrue\tnil\thandler: [^\n]*index boom", r.stdout)
      assert.matches("state\tidle\n", r.stdout)
      assert.matches("second\t5\n", r.stdout)
      assert_exact("hs_index", 5)
    end)

    it("a returned error whose __tostring raises", function()
      local r = script [[
        local armed = true
        local proj = writer("hs_tostring")
        local write = proj.handle
        proj.handle = function(tx, e)
          write(tx, e)
          if armed then return nil, setmetatable({}, { __tostring = function() error("tostring boom") end }) end
        end
        local p = pup.processor(db, proj, { store = store })
        local ok, n, err = pcall(p.run_once, p)
        print("first", tostring(ok), tostring(n), tostring(err):match("^[^\n]*"))
        print("state", state_of(PID))
        armed = false
        print("second", assert(p:run_once()))
      ]]
      assert_clean(r, 0)
      assert.matches("first\ttrue\tnil\thandler: [^\n]*tostring boom", r.stdout)
      assert.matches("state\tidle\n", r.stdout)
      assert.matches("second\t5\n", r.stdout)
      assert_exact("hs_tostring", 5)
    end)

    it("an __index raising when `setup` is looked up", function()
      local r = script [[
        local armed = false
        local real = writer("hs_setup")
        real.setup = function(tx) assert(tx:exec("CREATE TABLE IF NOT EXISTS t_hsafe_setup (x int)")) end
        local proj = setmetatable({ name = "hs_setup" }, { __index = function(_, k)
          if k == "setup" and armed then error("setup index boom") end
          return real[k]
        end })
        local p = pup.processor(db, proj, { store = store })
        armed = true
        local ok, n, err = pcall(p.run_once, p)
        print("first", tostring(ok), tostring(n), tostring(err):match("^[^\n]*"))
        print("state", state_of(PID))
        armed = false
        print("second", assert(p:run_once()))
      ]]
      assert_clean(r, 0)
      assert.matches("first\ttrue\tnil\thandler: [^\n]*setup failed: [^\n]*setup index boom", r.stdout)
      assert.matches("state\tidle\n", r.stdout)
      assert.matches("second\t5\n", r.stdout)
      assert_exact("hs_setup", 5)
      assert(db:exec("DROP TABLE IF EXISTS t_hsafe_setup"))
    end)
  end)

  describe("objects in use refuse to close", function()
    it("p:close() inside a handler raises 'processor is running'; the processor goes on", function()
      local r = script [[
        local p, closing = nil, true
        local proj = writer("hs_pclose")
        local write = proj.handle
        proj.handle = function(tx, e)
          if closing then p:close() end
          write(tx, e)
        end
        p = pup.processor(db, proj, { store = store })
        local n, err = p:run_once()
        print("first", tostring(n), tostring(err):match("^[^\n]*"))
        closing = false
        print("second", assert(p:run_once()))
        closing = true
        assert(p:run_once()) -- nothing left: the handler does not run
        assert(store:append(db, pup.any(), { { aggregate_type = "A", aggregate_id = "x", event_type = "E", payload = "{}" } }))
        assert(p:run_once())
      ]]
      assert_clean(r, 1)
      assert.matches("first\tnil\thandler: [^\n]*processor is running", r.stdout)
      assert.matches("second\t5\n", r.stdout)
      assert.matches("processor is running", r.stderr)
      assert_exact("hs_pclose", 5)
    end)

    it("db:close() on the processor's db inside a handler raises; the db stays usable", function()
      local r = script [[
        local closing = true
        local proj = writer("hs_dbclose")
        local write = proj.handle
        proj.handle = function(tx, e)
          if closing then db:close() end
          write(tx, e)
        end
        local p = pup.processor(db, proj, { store = store })
        local n, err = p:run_once()
        print("first", tostring(n), tostring(err):match("^[^\n]*"))
        print("query", assert(db:query("SELECT 41 + 1 AS x"))[1].x)
        closing = false
        print("second", assert(p:run_once()))
        p:close()
        db:close() -- allowed once nothing runs
        print("closed", tostring(db))
        local db2 = assert(pup.connect(url))
        local p2 = pup.processor(db2, { name = "hs_dbclose2", handle = function() db2:close() end }, { store = store })
        assert(p2:run_once())
      ]]
      assert_clean(r, 1)
      assert.matches("first\tnil\thandler: [^\n]*db:close: the connection is in use", r.stdout)
      assert.matches("query\t42\n", r.stdout)
      assert.matches("second\t5\n", r.stdout)
      assert.matches("closed\tpupsourcing.db %(closed%)", r.stdout)
      assert.matches("db:close: the connection is in use", r.stderr)
      assert_exact("hs_dbclose", 5)
    end)

    it("a store closed (<close>) while a processor borrows it raises; the processor goes on", function()
      local r = script [[
        local p
        local ok, err = pcall(function()
          local s <close> = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
          p = pup.processor(db, writer("hs_sclose"), { store = s })
        end)
        print("close", tostring(ok), tostring(err):match("store is in use by 1 processor%(s%)"))
        print("run", assert(p:run_once()))
        p:close()
        local s2 <close> = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
        pup.processor(db, writer("hs_sclose2"), { store = s2 }):close()
        print("unpinned")
      ]]
      assert_clean(r, 0)
      assert.matches("close\tfalse\tstore is in use by 1 processor%(s%)\n", r.stdout)
      assert.matches("run\t5\n", r.stdout)
      assert.matches("unpinned\n", r.stdout)
      assert_exact("hs_sclose", 5)
    end)

    it("a processor cannot run inside a handler (its own or another's)", function()
      local r = script [[
        local p, other
        local proj = writer("hs_nested")
        proj.handle = function() if other then assert(other:run_once()) else assert(p:run_once()) end end
        p = pup.processor(db, proj, { store = store })
        local n, err = p:run_once()
        print("own", tostring(n), tostring(err):match("^[^\n]*"))
        other = pup.processor(assert(pup.connect(url)), writer("hs_nested2"), { store = store })
        n, err = p:run_once()
        print("other", tostring(n), tostring(err):match("^[^\n]*"))
        print("alone", assert(other:run_once()))
      ]]
      assert_clean(r, 0)
      assert.matches("own\tnil\thandler: [^\n]*processor is running", r.stdout)
      assert.matches("other\tnil\thandler: [^\n]*cannot run inside another processor's handler", r.stdout)
      assert.matches("alone\t5\n", r.stdout)
    end)
  end)

  describe("the handler time limit", function()
    local function run_file(source, args)
      local dir = H.tmpdir()
      H.write_file(dir .. "/p.lua", source)
      local all = { "run", "--once" }
      for _, a in ipairs(args or {}) do all[#all + 1] = a end
      all[#all + 1] = dir .. "/p.lua"
      local t0 = pup.now()
      local r = H.run(H.with_tables(T, all))
      r.seconds = pup.now() - t0
      H.rmdir(dir)
      return r
    end

    it("stops pup.sleep(60) at the deadline", function()
      local r = run_file([[
        local pup = require "pupsourcing"
        return { name = "hs_sleep", handle = function() pup.sleep(60) end }
      ]], { "--handler-timeout", "300" })
      assert_clean(r, 1)
      assert.matches("handler exceeded its time limit of 300 ms", r.stderr)
      assert.is_true(r.seconds < 5, "took " .. r.seconds .. " s")
      assert.is_nil(one(('SELECT 1 AS x FROM "%s" WHERE projection_name = $1 AND last_global_position > 0')
        :format(T.checkpoints_table), "hs_sleep"))
    end)

    it("pup.sleep shorter than the limit just sleeps", function()
      local r = run_file([[
        local pup = require "pupsourcing"
        return { name = "hs_nap", handle = function() pup.sleep(0.01) end }
      ]], { "--handler-timeout", "2000" })
      assert_clean(r, 0)
      assert.matches("hs_nap: 5 event%(s%) handled", r.stderr)
    end)

    it("stops an endless loop in a coroutine the handler creates (it inherits the hook)", function()
      local r = run_file([[
        return { name = "hs_co", handle = function()
          coroutine.wrap(function() while true do end end)()
        end }
      ]], { "--handler-timeout", "300" })
      assert_clean(r, 1)
      assert.matches("handler exceeded its time limit of 300 ms", r.stderr)
      assert.is_true(r.seconds < 5, "took " .. r.seconds .. " s")
    end)

    it("keeps the user's debug hook: it goes on counting during handlers and is there after", function()
      local r = script [[
        local calls = 0
        local function hook() calls = calls + 1 end
        local during = {}
        local proj = writer("hs_hook")
        proj.setup = function() debug.sethook(hook, "", 100) end
        local write = proj.handle
        proj.handle = function(tx, e)
          local before = calls
          local x = 0
          for i = 1, 20000 do x = x + i end
          during[#during + 1] = calls - before
          write(tx, e)
        end
        local p = pup.processor(db, proj, { store = store, handler_timeout = 5 })
        print("handled", assert(p:run_once()))
        local f, mask, count = debug.gethook()
        print("after", tostring(f == hook), mask, count)
        print("during", table.concat(during, ","))
        -- the limit still works with the user's count hook installed
        local loop = pup.processor(db, { name = "hs_hook_loop", handle = function() while true do end end },
          { store = store, handler_timeout = 0.2 })
        local n, err = loop:run_once()
        print("loop", tostring(n), tostring(err):match("time limit of 200 ms") or tostring(err))
        f = debug.gethook()
        print("still", tostring(f == hook))
        debug.sethook()
      ]]
      assert_clean(r, 0)
      assert.matches("handled\t5\n", r.stdout)
      assert.matches("after\ttrue\t\t100\n", r.stdout)
      for n in r.stdout:match("during\t([%d,]+)"):gmatch("%d+") do
        assert.is_true(tonumber(n) > 0, r.stdout)
      end
      assert.matches("loop\tnil\ttime limit of 200 ms", r.stdout)
      assert.matches("still\ttrue\n", r.stdout)
    end)
  end)

  it("_run_fd checks its stats argument", function()
    local r = script [[
      local p = pup.processor(db, writer("hs_runfd"), { store = store })
      for _, bad in ipairs { io.stdout, {}, "x" } do
        local ok, err = pcall(p._run_fd, p, -1, true, bad)
        print("bad", tostring(ok), tostring(err))
      end
      print("nil", assert(p:_run_fd(-1, true, nil)))
    ]]
    assert_clean(r, 0)
    local n = 0
    for line in r.stdout:gmatch("bad\t[^\n]*") do
      n = n + 1
      assert.matches("bad\tfalse\t.*pupsourcing.stats expected", line)
    end
    assert.equal(3, n, r.stdout)
    assert.matches("nil\t5\n", r.stdout)
    assert_exact("hs_runfd", 5)
  end)
end)
