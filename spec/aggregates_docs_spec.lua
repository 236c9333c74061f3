-- The code blocks of docs/lua-api.md "Aggregates and commands" and "Testing domain code"
-- run as written: the application script prints what its `-->` comments say (in a
-- database of its own: it uses the default table names), and the busted example runs here
-- with the domain module the docs give.
local H = require "spec.helpers"

local doc = H.read_file(H.source_dir .. "/docs/lua-api.md")
local section = assert(doc:match("\n## Aggregates and commands\n(.*)$"), "no Aggregates section in docs/lua-api.md")
local blocks = {}
for b in section:gmatch("```lua\n(.-)\n```") do blocks[#blocks + 1] = b end
assert(#blocks == 3, "expected 3 code blocks (script, account.lua, tests), found " .. #blocks)
local script, account, tests = blocks[1], blocks[2], blocks[3]

local dir = H.tmpdir()
H.write_file(dir .. "/account.lua", account)
H.write_file(dir .. "/app.lua", script)
package.path = dir .. "/?.lua;" .. package.path

-- The docs' busted example, registered as it is.
assert(load(tests, "=docs/lua-api.md (Testing domain code)", "t", _ENV))()

describe("docs: the aggregates example", function()
  it("runs and prints what its comments say", function()
    local expected = {}
    for line in script:gmatch("[^\n]+") do
      local out = line:match("%-%-> (.*)$")
      if out then expected[#expected + 1] = out end
    end
    assert.is_true(#expected >= 5)
    local db = H.connect()
    assert(db:exec("DROP DATABASE IF EXISTS spec_aggregates_docs"))
    assert(db:exec("CREATE DATABASE spec_aggregates_docs"))
    local url = H.url():gsub("/[^/?]*$", "/spec_aggregates_docs")
    local r = H.run({ dir .. "/app.lua" }, { env = { DATABASE_URL = url, LUA_PATH = dir .. "/?.lua;;" } })
    H.rmdir(dir)
    assert.equal(0, r.code, r.output)
    assert.equal("", r.stderr)
    local lines = {}
    for line in r.stdout:gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
    assert.same(expected, lines)
    assert(db:exec("DROP DATABASE spec_aggregates_docs"))
    db:close()
  end)
end)
