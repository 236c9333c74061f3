-- Issue 10 (review): --handler-timeout must stop a handler that swallows the time-limit
-- error with pcall in a loop. Before, the count hook raised inside the inner pcall every
-- 10000 instructions and the outer loop went on for ever: `run --once --handler-timeout
-- 300` never ended, and SIGTERM did not stop it either (only SIGKILL).
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("the handler time limit against pcall", function()
  local store, db, T, dir

  before_each(function()
    T = H.tables("htpc")
    store, db = H.fresh_store("htpc")
    dir = H.tmpdir()
    assert(store:append(db, pup.any(), H.events(3, { aggregate_id = H.uid("a") })))
  end)

  after_each(function()
    db:close()
    H.rmdir(dir)
  end)

  local function run(name, body)
    H.write_file(dir .. "/p.lua", ("return { name = %q, handle = function(tx, e)\n%s\nend }\n"):format(name, body))
    local words = { "timeout", "-k", "2", "15", H.shquote(H.bin), "run", "--once", "--handler-timeout", "300" }
    for _, a in ipairs(H.table_flags(T)) do words[#words + 1] = H.shquote(a) end
    words[#words + 1] = H.shquote(dir .. "/p.lua")
    local t0 = pup.now()
    local r = H.sh(table.concat(words, " "))
    r.seconds = pup.now() - t0
    return r
  end

  local function assert_stopped(r, name)
    assert.is_true(r.code ~= 124 and r.code ~= 137, ("still running after 15 s (exit %d):\n%s"):format(r.code, r.output))
    assert.equal(1, r.code, r.output)
    assert.matches("handler exceeded its time limit of 300 ms", r.stderr, nil, true)
    assert.is_true(r.seconds < 10, "took " .. r.seconds .. " s")
    local cp = assert(db:query(('SELECT count(*) AS n FROM "%s" WHERE projection_name = $1 AND last_global_position > 0')
      :format(T.checkpoints_table), name))[1].n
    assert.equal(0, cp)
  end

  it("an endless loop inside pcall, itself in an endless loop", function()
    assert_stopped(run("htpc_loop", "while true do pcall(function() while true do end end) end"), "htpc_loop")
  end)

  it("nested pcalls and xpcall with a message handler", function()
    assert_stopped(run("htpc_nested", [[
      while true do
        xpcall(function()
          while true do pcall(function() while true do end end) end
        end, function(m) return m end)
      end]]), "htpc_nested")
  end)
end)
