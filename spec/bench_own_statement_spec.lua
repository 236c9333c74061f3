-- bench/own_statement.lua (issue 13's append ceiling: the library's own 1-event append
-- statement without its wake-up, run by pgbench): the script it writes from the statement
-- the store prepares runs in pgbench and appends one event per transaction, so the bench's
-- second ceiling follows the append statement when the code changes it.
local H = require "spec.helpers"

local NAME = "pupspec_bench_own"

describe("bench/own_statement.lua", function()
  local dir
  after_each(function()
    if dir then H.rmdir(dir) end
    dir = nil
    H.drop_database(NAME)
  end)

  it("writes the store's 1-event append statement as a pgbench script that appends one event a transaction, to a new aggregate with a UUID's text as id", function()
    local bindir = assert(H.pg_bindir(), "no PostgreSQL server binaries (pgbench) under /usr/lib/postgresql")
    local url = H.fresh_database(NAME)
    local r = H.run({ H.source_dir .. "/bench/own_statement.lua", "--url", url })
    assert.equal(0, r.code, r.output)
    local script = r.stdout
    assert.is_nil(script:find("%$%d"), "a parameter was left in the script: " .. script)
    assert.truthy(script:find("CASE WHEN false::boolean", 1, true), "the wake-up is not off: " .. script)
    assert.truthy(script:find("INSERT INTO \"events\"", 1, true), script)

    dir = H.tmpdir()
    H.write_file(dir .. "/own.sql", script)
    local payload = '{"email":"u@example.com","name":"User"}'
    local cmd = table.concat({ H.shquote(bindir .. "/pgbench"), "-n -M prepared -c 2 -j 2 -t 25",
      "-D t=User -D et=UserCreated -D v=0 -D ev=1", "-D " .. H.shquote("m={}"),
      "-D " .. H.shquote("p=\\x" .. H.hex(payload)), "-f", H.shquote(dir .. "/own.sql"), H.shquote(url) }, " ")
    local b = H.sh(cmd)
    assert.equal(0, b.code, b.output)
    assert.truthy(b.stdout:find("number of transactions actually processed: 50/50", 1, true), b.output)

    local db = H.connect(url)
    local rows = assert(db:query("SELECT count(*) AS n, count(DISTINCT aggregate_id) AS aggs,"
      .. " count(*) FILTER (WHERE aggregate_version = 1 AND event_type = 'UserCreated'"
      .. " AND convert_from(payload, 'UTF8') = $1 AND metadata = '{}'::jsonb"
      .. " AND aggregate_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$') AS same"
      .. " FROM events WHERE event_type = 'UserCreated' AND aggregate_type = 'User'", payload))
    local heads = assert(db:query("SELECT count(*) AS n FROM aggregate_heads WHERE aggregate_version = 1"))
    db:close()
    -- 50 from pgbench (W1's payload, UUID-shaped ids) and the one the script appended to find the statement
    assert.equal(51, rows[1].n)
    assert.equal(51, rows[1].aggs)
    assert.equal(50, rows[1].same)
    assert.equal(51, heads[1].n)
  end)
end)
