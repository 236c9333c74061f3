-- Issue 10: ALTER TABLE on a read-model table while `run` is active made run exit 1
-- ("cached plan must not change result type", SQLSTATE 0A000). The error is transient:
-- the batch is retried after the connection forgets its prepared statements.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("a read-model table altered under prepared statements", function()
  local T = H.tables("replan")
  local store, db, dir
  local spawned = {}

  local function count(sql)
    return assert(db:query(sql))[1].n
  end

  before_each(function()
    store, db = H.fresh_store("replan")
    assert(db:exec("DROP TABLE IF EXISTS t_replan_rm"))
    assert(db:exec("DROP TABLE IF EXISTS t_replan_log"))
    dir = H.tmpdir()
  end)

  after_each(function()
    for _, p in ipairs(spawned) do H.reap(p) end
    spawned = {}
    H.rmdir(dir)
    db:close()
  end)

  it("run keeps going and ends exact", function()
    local path = dir .. "/replan.lua"
    H.write_file(path, [[
      return {
        name = "replan",
        setup = function(tx)
          assert(tx:exec("CREATE TABLE IF NOT EXISTS t_replan_rm (id text PRIMARY KEY, n bigint NOT NULL)"))
          assert(tx:exec("CREATE TABLE IF NOT EXISTS t_replan_log (pos bigint NOT NULL)"))
        end,
        handle = function(tx, e)
          local rows = assert(tx:query("SELECT * FROM t_replan_rm WHERE id = $1", e.aggregate_id))
          if #rows == 0 then
            assert(tx:exec("INSERT INTO t_replan_rm (id, n) VALUES ($1, 1)", e.aggregate_id))
          else
            assert(tx:exec("UPDATE t_replan_rm SET n = $2 WHERE id = $1", e.aggregate_id, rows[1].n + 1))
          end
          assert(tx:exec("INSERT INTO t_replan_log (pos) VALUES ($1)", e.global_position))
        end,
      }]])
    local function append(k)
      for i = 1, k do
        assert(store:append(db, pup.any(), { H.event { aggregate_id = "replan-" .. (i % 5) } }))
      end
    end
    append(20)
    local words = { H.bin }
    for _, a in ipairs(H.with_tables(T, { "run", "--poll-interval", "100", "--batch-size", "5", path })) do
      words[#words + 1] = a
    end
    local p = H.spawn(words)
    spawned[#spawned + 1] = p
    local log_count = "SELECT count(*) AS n FROM t_replan_log"
    H.wait_until("the first 20 events", 20, function()
      local rows = db:query("SELECT to_regclass('t_replan_log') IS NOT NULL AS ok")
      return rows and rows[1].ok and count(log_count) == 20
    end)
    assert(db:exec("ALTER TABLE t_replan_rm ADD COLUMN extra int"))
    append(20)
    H.wait_until(function() return "40 events; stderr:\n" .. H.stderr_of(p) end, 20, function()
      assert.is_nil(H.exit_code(p), "run exited: " .. H.stderr_of(p))
      return count(log_count) == 40
    end)
    assert(db:exec("ALTER TABLE t_replan_rm DROP COLUMN extra, ADD COLUMN other text"))
    append(20)
    H.wait_until(function() return "60 events; stderr:\n" .. H.stderr_of(p) end, 20, function()
      assert.is_nil(H.exit_code(p), "run exited: " .. H.stderr_of(p))
      return count(log_count) == 60
    end)
    assert.is_nil(H.exit_code(p), H.stderr_of(p))
    H.signal(p, "TERM")
    assert.are.equal(0, H.wait_exit(p, 10), H.stderr_of(p))
    -- exact: every event once, every aggregate counted right
    assert.are.equal(60, count("SELECT count(DISTINCT pos) AS n FROM t_replan_log"))
    assert.are.equal(60, count("SELECT COALESCE(sum(n), 0)::bigint AS n FROM t_replan_rm"))
    assert.are.equal(5, count("SELECT count(*) AS n FROM t_replan_rm"))
  end)

  it("outside a transaction the statement is prepared again and rerun at once", function()
    assert(db:exec("CREATE TABLE t_replan_rm (id text PRIMARY KEY, n bigint NOT NULL)"))
    assert(db:exec("INSERT INTO t_replan_rm VALUES ('a', 1)"))
    local sql = "SELECT * FROM t_replan_rm WHERE id = $1"
    assert.are.equal(1, assert(db:query(sql, "a"))[1].n)
    assert(db:exec("ALTER TABLE t_replan_rm ADD COLUMN extra int DEFAULT 5"))
    local rows = assert(db:query(sql, "a"))
    assert.are.equal(5, rows[1].extra)
    assert(db:exec("ALTER TABLE t_replan_rm DROP COLUMN extra"))
    rows = assert(db:query(sql, "a"))
    assert.is_nil(rows[1].extra)
  end)

  it("inside a transaction the error is transient; after rollback the next call works", function()
    assert(db:exec("CREATE TABLE t_replan_rm (id text PRIMARY KEY, n bigint NOT NULL)"))
    assert(db:exec("INSERT INTO t_replan_rm VALUES ('a', 1)"))
    local sql = "SELECT * FROM t_replan_rm WHERE id = $1"
    assert(db:query(sql, "a"))
    assert(db:exec("ALTER TABLE t_replan_rm ADD COLUMN extra int DEFAULT 5"))
    local tx = assert(db:begin())
    local rows, err = tx:query(sql, "a")
    assert.is_nil(rows)
    assert.are.equal("0A000", err.sqlstate, tostring(err))
    assert.is_truthy(err.message:find("cached plan must not change result type", 1, true), err.message)
    assert(tx:rollback())
    assert.are.equal(5, assert(db:query(sql, "a"))[1].extra)
  end)
end)
