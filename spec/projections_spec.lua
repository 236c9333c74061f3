-- Issue 3: projection files (pup.load_projection), the shipped projections in projections/
-- (user read model with upserts, per-type event counter) and pup.runner.
-- The shipped projections write fixed table names (users, event_type_count_shards), so this
-- spec runs them in a database of its own on the test server.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local USERS = H.source_dir .. "/projections/user_read_model.lua"
local COUNTER = H.source_dir .. "/projections/event_counter.lua"
local DBNAME = "spec_projections"

-- DATABASE_URL with the database name replaced.
local function url_of(dbname)
  local url = H.url()
  local out, n = url:gsub("^(postgres%a*://[^/?]*/)[^?]*", "%1" .. dbname)
  if n == 1 then return out end
  out, n = url:gsub("^(postgres%a*://[^/?]*)(%??)", "%1/" .. dbname .. "%2")
  if n == 1 then return out end
  out, n = url:gsub("dbname=%S+", "dbname=" .. dbname)
  if n == 1 then return out end
  return url .. " dbname=" .. dbname
end

describe("projections", function()
  local url, db, store

  setup(function()
    local admin = H.connect()
    assert(admin:exec("DROP DATABASE IF EXISTS " .. DBNAME .. " WITH (FORCE)"))
    assert(admin:exec("CREATE DATABASE " .. DBNAME))
    admin:close()
    url = url_of(DBNAME)
  end)

  teardown(function()
    local admin = H.connect()
    admin:exec("DROP DATABASE IF EXISTS " .. DBNAME .. " WITH (FORCE)")
    admin:close()
  end)

  before_each(function()
    store, db = H.fresh_store("proj", H.connect(url))
    for _, t in ipairs { "users", "event_type_count_shards" } do
      assert(db:exec("DROP TABLE IF EXISTS " .. t .. " CASCADE"))
    end
  end)

  after_each(function() db:close() end)

  local function q(sql, ...) return assert(db:query(sql, ...)) end

  local function append(type_, id, events)
    local list = {}
    for i, e in ipairs(events) do
      list[i] = { aggregate_type = type_, aggregate_id = id, event_type = e[1], payload = e[2] or {} }
    end
    return assert(store:append(db, pup.any(), list))
  end

  -- Runs a projection file with pup.processor until caught up.
  local function catch_up(file, opts)
    local proj = pup.load_projection(file)
    local o = { store = store }
    for k, v in pairs(opts or {}) do o[k] = v end
    local p = pup.processor(db, proj, o)
    local deadline = pup.now() + 20
    local head = assert(store:head(db))
    repeat assert(p:run_once()) until p:stats().position >= head or pup.now() > deadline
    assert.equal(head, p:stats().position)
    p:close()
  end

  describe("pup.load_projection", function()
    local dir
    before_each(function() dir = H.tmpdir() end)
    after_each(function() H.rmdir(dir) end)

    local function loads(src)
      local path = dir .. "/p.lua"
      H.write_file(path, src)
      return path, pcall(pup.load_projection, path)
    end

    it("returns the table of a valid file", function()
      local _, ok, p = loads([[return { name = "ok", handle = function() end, batch_size = 5,
        aggregate_types = {"User"}, event_types = {"A", "B"}, setup = function() end, reset = function() end }]])
      assert.is_true(ok, p)
      assert.equal("ok", p.name)
      assert.equal(5, p.batch_size)
    end)

    local cases = {
      { "return 42", "must return a table" },
      { "return { handle = function() end }", "missing `name`" },
      { "return { name = '', handle = function() end }", "missing `name`" },
      { "return { name = 'x' }", "`handle` must be a function" },
      { "return { name = 'x', handle = {} }", "`handle` must be a function" },
      { "return { name = 'x', handle = function() end, setup = 1 }", "`setup` must be a function" },
      { "return { name = 'x', handle = function() end, reset = 'no' }", "`reset` must be a function" },
      { "return { name = 'x', handle = function() end, aggregate_types = { 1 } }", "`aggregate_types` must be a list of strings" },
      { "return { name = 'x', handle = function() end, event_types = 'A' }", "`event_types` must be a list of strings" },
      { "return { name = 'x', handle = function() end, batch_size = 0 }", "`batch_size` must be a positive integer" },
      { "return { name = 'x', handle = function() end, batch_size = 1.5 }", "`batch_size` must be a positive integer" },
      { "return { name = 'x', handle = function( end }", "p.lua:1:" },
      { "error('cannot load me')", "cannot load me" },
    }
    for _, c in ipairs(cases) do
      it("rejects " .. c[1] .. " naming the file", function()
        local path, ok, err = loads(c[1])
        assert.is_false(ok)
        err = tostring(err)
        assert.is_truthy(err:find(path, 1, true), err)
        assert.is_truthy(err:find(c[2], 1, true), err)
      end)
    end

    it("pup.processor rejects an invalid projection table", function()
      assert.has_error(function() pup.processor(db, { name = "x" }, { store = store }) end)
      assert.has_error(function() pup.processor(db, { handle = function() end }, { store = store }) end)
    end)
  end)

  describe("projections/user_read_model.lua", function()
    local function users()
      local out = {}
      for _, r in ipairs(q("SELECT id, email, name, active, version FROM users ORDER BY id")) do
        out[r.id] = { email = r.email, name = r.name, active = r.active, version = r.version }
      end
      return out
    end

    local function story()
      append("User", "u1", {
        { "UserCreated", { email = "a@x.io", name = "Ann" } },
        { "UserEmailChanged", { email = "ann@x.io" } },
        { "UserRenamed", { name = "Anne" } },
        { "UserDeactivated" },
        { "UserLoggedIn" }, -- outside event_types
      })
      append("Order", "o1", { { "UserCreated", { email = "order@x.io", name = "not a user" } } }) -- outside aggregate_types
      append("User", "u2", {
        { "UserCreated", { email = "b@x.io", name = "Bob" } },
        { "UserDeactivated" },
        { "UserReactivated" },
      })
      return {
        u1 = { email = "ann@x.io", name = "Anne", active = false, version = 4 },
        u2 = { email = "b@x.io", name = "Bob", active = true, version = 3 },
      }
    end

    it("builds one row per user with upserts, within its scope", function()
      local expect = story()
      catch_up(USERS)
      assert.same(expect, users())
    end)

    it("is idempotent: handling everything again (checkpoint deleted, rows kept) changes nothing", function()
      local expect = story()
      catch_up(USERS)
      assert(db:exec(('DELETE FROM "%s"'):format(H.tables("proj").checkpoints_table)))
      catch_up(USERS)
      assert.same(expect, users())
    end)

    it("4 partitions build the same read model", function()
      local expect = story()
      for i = 1, 40 do
        append("User", "p" .. i, { { "UserCreated", { email = i .. "@x.io", name = "n" .. i } }, { "UserRenamed", { name = "m" .. i } } })
        expect["p" .. i] = { email = i .. "@x.io", name = "m" .. i, active = true, version = 2 }
      end
      for k = 0, 3 do catch_up(USERS, { partition_key = k, total_partitions = 4 }) end
      assert.same(expect, users())
    end)

    it("pup.reset empties the read model and deletes its checkpoints; a new run rebuilds it", function()
      local expect = story()
      catch_up(USERS)
      assert(pup.reset(db, pup.load_projection(USERS), store))
      assert.same({}, users())
      assert.same({}, q(('SELECT * FROM "%s"'):format(H.tables("proj").checkpoints_table)))
      catch_up(USERS)
      assert.same(expect, users())
    end)
  end)

  describe("projections/event_counter.lua", function()
    local function counts()
      local out = {}
      for _, r in ipairs(q("SELECT event_type, count FROM event_type_counts")) do out[r.event_type] = r.count end
      return out
    end

    local function populate(naggs, per)
      local expect = {}
      for a = 1, naggs do
        local evs = {}
        for i = 1, per do
          local t = "T" .. ((a + i) % 5)
          evs[i] = { t }
          expect[t] = (expect[t] or 0) + 1
        end
        append("Thing", "thing-" .. a, evs)
      end
      return expect
    end

    it("counts events per type exactly, with 4 partitions (pup.processor)", function()
      local expect = populate(50, 20)
      for k = 0, 3 do catch_up(COUNTER, { partition_key = k, total_partitions = 4 }) end
      assert.same(expect, counts())
    end)

    it("is exact with pup.runner (workers = 4) and again after pup.reset", function()
      local expect = populate(40, 25)
      local function run()
        local r = pup.runner { files = { COUNTER, USERS }, workers = 4, once = true, database_url = url,
                               store = H.tables("proj") }
        local res = assert(r:run())
        return res
      end
      local res = run()
      assert.equal(1000, res.event_counter.handled)
      assert.equal(4, res.event_counter.partitions)
      assert.equal(0, res.user_read_model.handled)
      assert.same(expect, counts())
      -- a second run handles nothing new
      res = run()
      assert.equal(0, res.event_counter.handled)
      assert.same(expect, counts())
      assert(pup.reset(db, pup.load_projection(COUNTER), store))
      assert.same({}, counts())
      run()
      assert.same(expect, counts())
    end)
  end)

  describe("pup.runner", function()
    it("returns nil, err naming projection and position when a handler fails", function()
      append("User", "u1", { { "Fine" }, { "Bad" } })
      local dir = H.tmpdir()
      local path = dir .. "/failing.lua"
      H.write_file(path, [[return { name = "failing", handle = function(_, e)
        if e.event_type == "Bad" then error("bad event") end end }]])
      local r = pup.runner { files = { path }, once = true, database_url = url, store = H.tables("proj") }
      local res, err = r:run()
      H.rmdir(dir)
      assert.is_nil(res)
      assert.equal("handler", err.code)
      local m = tostring(err)
      assert.is_truthy(m:find("failing", 1, true), m)
      assert.is_truthy(m:find("global position 2", 1, true), m)
      assert.is_truthy(m:find("bad event", 1, true), m)
    end)

    it("rejects invalid partitioning when it is built", function()
      local t = H.tables("proj")
      assert.has_error(function() pup.runner { files = { USERS }, partition_key = 2, total_partitions = 2, store = t } end)
      assert.has_error(function() pup.runner { files = { USERS }, partition_key = 0, total_partitions = 0, store = t } end)
      assert.has_error(function() pup.runner { files = { USERS }, workers = 2, partition_key = 0, store = t } end)
      assert.has_error(function() pup.runner { files = {}, store = t } end)
    end)
  end)
end)
