-- Issue 10, transactions inside projection handlers: transaction control on the handler's
-- tx is refused (before the fix, tx:exec("ROLLBACK") dropped the writes of earlier events
-- while the checkpoint passed them), and tx:savepoint(fn) lets a handler recover from a
-- failed statement although its writes are pipelined.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("transactions in handlers", function()
  local store, db, T, dir

  local function q(sql, ...) return assert(db:query(sql, ...)) end
  local function one(sql, ...) return q(sql, ...)[1] end
  local function checkpoint(name)
    local r = one(('SELECT last_global_position AS p FROM "%s" WHERE projection_name = $1')
      :format(T.checkpoints_table), name)
    return r and r.p or 0
  end
  local function append(id, n, payload)
    local evs = H.events(n, { aggregate_id = id })
    if payload then for i, e in ipairs(evs) do e.payload = payload(i) end end
    return assert(store:append(db, pup.any(), evs)).global_positions
  end

  before_each(function()
    store, db, T, dir = H.fresh_area("htx", { "t_htx_rm", "t_htx_uniq", "t_htx_skipped", "t_htx_log" })
    assert(db:exec("CREATE TABLE t_htx_rm (pos bigint NOT NULL)"))
    assert(db:exec("CREATE TABLE t_htx_uniq (k int PRIMARY KEY, pos bigint NOT NULL)"))
    assert(db:exec("CREATE TABLE t_htx_skipped (pos bigint NOT NULL)"))
    assert(db:exec("CREATE TABLE t_htx_log (pos bigint NOT NULL, what text NOT NULL)"))
  end)

  after_each(function() H.close_area(db, dir) end)

  describe("transaction control on the handler's tx", function()
    local PROJECTION = [[
return {
  name = "htx_control",
  handle = function(tx, e)
    assert(tx:exec("INSERT INTO t_htx_rm (pos) VALUES ($1)", e.global_position))
    if e.aggregate_version == 5 then tx:exec("%s") end -- BROKEN
  end,
}
]]
    for _, stmt in ipairs { "rollback", "COMMIT", "BEGIN", "  /* x */ end", "savepoint s", "ROLLBACK TO s" } do
      it(("%q on the 5th event fails the batch; nothing is lost once the file is fixed"):format(stmt), function()
        append("ctl", 10)
        local file = dir .. "/control.lua"
        H.write_file(file, PROJECTION:format(stmt))
        local r = H.run(H.with_tables(T, { "run", "--once", file }), { env = { DATABASE_URL = H.url() } })
        assert.is_not.equal(0, r.code, r.output)
        assert.matches("is not allowed on a tx", r.stderr, nil, true)
        assert.matches("tx:savepoint", r.stderr, nil, true)
        -- read model and checkpoint agree: nothing committed
        assert.equal(0, one("SELECT count(*) AS n FROM t_htx_rm").n)
        assert.equal(0, checkpoint("htx_control"))

        H.write_file(file, (PROJECTION:format(stmt):gsub("\n[^\n]*BROKEN\n", "\n")))
        r = H.run(H.with_tables(T, { "run", "--once", file }), { env = { DATABASE_URL = H.url() } })
        assert.equal(0, r.code, r.output)
        local rm = one("SELECT count(*) AS n, count(DISTINCT pos) AS d, min(pos) AS lo, max(pos) AS hi FROM t_htx_rm")
        local head = assert(store:head(db))
        assert.same({ n = 10, d = 10, lo = head - 9, hi = head }, rm)
        assert.equal(head, checkpoint("htx_control"))
      end)
    end
  end)

  it("transaction control through the processor's own db in a handler fails the batch; nothing is doubled", function()
    -- db:exec("COMMIT") on the db the processor runs on used to commit the batch's first
    -- events; the batch then failed and its retry applied them again.
    append("dbctl", 10)
    local script = dir .. "/dbctl.lua"
    H.write_file(script, ([[
local pup = require "pupsourcing"
local db = assert(pup.connect(%q))
local store = pup.store { events_table = %q, aggregate_heads_table = %q, checkpoints_table = %q }
local broken = true
local p = pup.processor(db, { name = "htx_dbctl", handle = function(tx, e)
  assert(tx:exec("INSERT INTO t_htx_rm (pos) VALUES ($1)", e.global_position))
  if broken and e.aggregate_version == 6 then db:exec("COMMIT") end
end }, { store = store, batch_size = 100 })
local n, err = p:run_once()
print("first", tostring(n), tostring(err):match("db:exec: COMMIT is not allowed while a processor runs a batch") or tostring(err))
broken = false
print("second", assert(p:run_once()))
]]):format(H.url(), T.events_table, T.aggregate_heads_table, T.checkpoints_table))
    local r = H.run { script }
    assert.equal(0, r.code, r.output)
    assert.equal("first\tnil\tdb:exec: COMMIT is not allowed while a processor runs a batch\nsecond\t10\n", r.stdout)
    local rm = one("SELECT count(*) AS n, count(DISTINCT pos) AS d FROM t_htx_rm")
    assert.same({ n = 10, d = 10 }, rm)
    assert.equal(assert(store:head(db)), checkpoint("htx_dbctl"))
  end)

  describe("tx:savepoint in a handler (pipelined writes)", function()
    -- 20 events with keys i % 7: 7 first occurrences, 13 duplicates to skip.
    local function append_keys()
      return append("dups", 20, function(i) return { k = i % 7 } end)
    end

    local function insert_or_skip(tx, e)
      local ok, err = tx:savepoint(function()
        assert(tx:exec("INSERT INTO t_htx_uniq (k, pos) VALUES ($1, $2)", e.data.k, e.global_position))
        assert(tx:exec("INSERT INTO t_htx_log (pos, what) VALUES ($1, 'inserted')", e.global_position))
      end)
      if not ok then
        if err.sqlstate ~= "23505" then error(err) end
        assert(tx:exec("INSERT INTO t_htx_skipped (pos) VALUES ($1)", e.global_position))
      end
    end

    local function assert_uniq_exact(pos)
      local want_uniq, want_skipped = {}, {}
      for i, p in ipairs(pos) do
        if i <= 7 then want_uniq[#want_uniq + 1] = { k = i % 7, pos = p } else want_skipped[#want_skipped + 1] = p end
      end
      table.sort(want_uniq, function(a, b) return a.k < b.k end)
      assert.same(want_uniq, q("SELECT k, pos FROM t_htx_uniq ORDER BY k"))
      local skipped = {}
      for _, r in ipairs(q("SELECT pos FROM t_htx_skipped ORDER BY pos")) do skipped[#skipped + 1] = r.pos end
      assert.same(want_skipped, skipped)
      -- the rolled-back savepoints left no log row; the released ones one each
      local logged = {}
      for _, r in ipairs(q("SELECT pos FROM t_htx_log WHERE what = 'inserted' ORDER BY pos")) do
        logged[#logged + 1] = r.pos
      end
      assert.same({ table.unpack(pos, 1, 7) }, logged)
    end

    it("skips duplicates: the batch commits, rows exact, checkpoint at the head", function()
      local pos = append_keys()
      local p = pup.processor(db, { name = "htx_skip", handle = insert_or_skip }, { store = store })
      assert.equal(20, assert(p:run_once()))
      assert_uniq_exact(pos)
      assert.equal(pos[20], checkpoint("htx_skip"))
      assert.equal(0, assert(p:run_once()))
      p:close()
    end)

    it("nested savepoints: the inner one rolls back, the outer one keeps its work", function()
      local pos = append_keys()
      local p = pup.processor(db, {
        name = "htx_nested",
        handle = function(tx, e)
          assert(tx:savepoint(function()
            assert(tx:exec("INSERT INTO t_htx_log (pos, what) VALUES ($1, 'outer')", e.global_position))
            insert_or_skip(tx, e)
            local r, err = tx:savepoint(function()
              assert(tx:exec("INSERT INTO t_htx_log (pos, what) VALUES ($1, 'doomed')", e.global_position))
              error("inner raises")
            end)
            assert(r == nil and err.code == "error" and err.message:find("inner raises", 1, true))
            assert(tx:exec("INSERT INTO t_htx_log (pos, what) VALUES ($1, 'after')", e.global_position))
          end))
        end,
      }, { store = store })
      assert.equal(20, assert(p:run_once()))
      assert_uniq_exact(pos)
      assert.same({ { what = "after", n = 20 }, { what = "inserted", n = 7 }, { what = "outer", n = 20 } },
        q("SELECT what, count(*) AS n FROM t_htx_log GROUP BY what ORDER BY what"))
      assert.equal(pos[20], checkpoint("htx_nested"))
      p:close()
    end)

    it("a failure from before the savepoint still fails the batch", function()
      local pos = append_keys()
      local seen
      local p = pup.processor(db, {
        name = "htx_outside",
        handle = function(tx, e)
          if e.aggregate_version == 3 then -- a duplicate outside any savepoint (pipelined)
            assert(tx:exec("INSERT INTO t_htx_uniq (k, pos) VALUES (1, $1)", e.global_position))
            assert(tx:exec("INSERT INTO t_htx_uniq (k, pos) VALUES (1, $1)", e.global_position))
          elseif e.aggregate_version == 4 then
            local ok, err = tx:savepoint(function()
              assert(tx:exec("INSERT INTO t_htx_skipped (pos) VALUES ($1)", e.global_position))
            end)
            seen = { ok = ok, err = err }
          end
        end,
      }, { store = store })
      local n, err = p:run_once()
      assert.is_nil(n)
      assert.equal("23505", err.sqlstate)
      assert.matches("global position " .. pos[3] .. " ", err.message, nil, true)
      assert.is_nil(seen.ok)
      assert.matches("failed before it", seen.err.message, nil, true)
      assert.equal(0, one("SELECT count(*) AS n FROM t_htx_uniq").n)
      assert.equal(0, one("SELECT count(*) AS n FROM t_htx_skipped").n)
      assert.equal(0, checkpoint("htx_outside"))
      p:close()
    end)

    it("the skip-duplicates projection of docs/lua-api.md runs as written", function()
      local doc = H.read_file(H.source_dir .. "/docs/lua-api.md")
      local code = doc:match("```lua\n(%-%- a projection that skips events whose key.-)```")
      assert.is_string(code)
      local projection = assert(load(code, "=docs/lua-api.md"))()
      assert(db:exec("DROP TABLE IF EXISTS unique_keys"))
      assert(db:exec("CREATE TABLE unique_keys (k int PRIMARY KEY, pos bigint NOT NULL)"))
      local pos = append_keys()
      local p = pup.processor(db, projection, { store = store })
      assert.equal(20, assert(p:run_once()))
      local got = {}
      for _, r in ipairs(q("SELECT k, pos FROM unique_keys ORDER BY pos")) do got[#got + 1] = r.pos end
      assert.same({ table.unpack(pos, 1, 7) }, got)
      assert.equal(pos[20], checkpoint("unique_keys"))
      p:close()
      assert(db:exec("DROP TABLE unique_keys"))
    end)

    it("db:transaction on the processor's db inside a handler is a savepoint of the batch", function()
      local pos = append("viadb", 6)
      local begin_err
      local p = pup.processor(db, {
        name = "htx_viadb",
        handle = function(tx, e)
          assert(tx:exec("INSERT INTO t_htx_rm (pos) VALUES ($1)", e.global_position))
          local ok = pcall(db.begin, db)
          begin_err = begin_err or ok
          local r, err = db:transaction(function(t2)
            assert(t2:exec("INSERT INTO t_htx_log (pos, what) VALUES ($1, 'nested')", e.global_position))
            if e.aggregate_version % 2 == 0 then error("even") end
          end)
          assert(r or err.message:find("even", 1, true))
        end,
      }, { store = store })
      assert.equal(6, assert(p:run_once()))
      assert.is_false(begin_err)
      assert.equal(6, one("SELECT count(*) AS n FROM t_htx_rm").n)
      local logged = {}
      for _, r in ipairs(q("SELECT pos FROM t_htx_log ORDER BY pos")) do logged[#logged + 1] = r.pos end
      assert.same({ pos[1], pos[3], pos[5] }, logged)
      assert.equal(pos[6], checkpoint("htx_viadb"))
      p:close()
    end)

    it("a handler that ignores a failed savepoint's error still commits its other writes", function()
      local pos = append("ign", 5)
      local p = pup.processor(db, {
        name = "htx_ignore",
        handle = function(tx, e)
          tx:savepoint(function() assert(tx:exec("INSERT INTO t_htx_rm (pos) VALUES (NULL)")) end) -- not-null violation
          assert(tx:exec("INSERT INTO t_htx_rm (pos) VALUES ($1)", e.global_position))
        end,
      }, { store = store })
      assert.equal(5, assert(p:run_once()))
      local got = {}
      for _, r in ipairs(q("SELECT pos FROM t_htx_rm ORDER BY pos")) do got[#got + 1] = r.pos end
      assert.same(pos, got)
      assert.equal(pos[5], checkpoint("htx_ignore"))
      p:close()
    end)
  end)
end)
