-- The README's tour of the Lua API runs as written and prints what its comments say (in a
-- database of its own, since it uses the default table names).
local H = require "spec.helpers"

local UUID = "%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x"

-- The tour's output line by line: a string is the exact line, a table {pattern} a Lua
-- pattern the whole line must match (for the aggregate id, a new UUID each run).
local EXPECTED = {
  "1\t1\t1",                                          -- global position, from and to version
  { "^optimistic_concurrency\tUser/" .. UUID .. " already has events %(version 1%); expected no stream$" },
  "1\t1\ta@x.io",                                     -- stream length, version, decoded payload
  "3",                                                -- rows seen inside the transaction
  "integer\ttrue",                                    -- integers stay integers, NULL is pup.null
  "2",                                                -- run_once: the two events in scope
  "Ann",                                              -- the read model row
  "AvatarUploaded\t1",                                -- the event counter, through the runner
  "UserCreated\t1",
  "UserRenamed\t1",
}

describe("README", function()
  it("the tour of the Lua API runs as written and prints what it says", function()
    local readme = H.read_file(H.source_dir .. "/README.md")
    local tour = readme:match("## A tour of the Lua API\n.-```lua\n(.-)\n```")
    assert.is_truthy(tour, "no tour in README.md")
    local db = H.connect()
    assert(db:exec("DROP DATABASE IF EXISTS spec_readme"))
    assert(db:exec("CREATE DATABASE spec_readme"))
    local dir = H.tmpdir()
    H.write_file(dir .. "/tour.lua", tour)
    local url = H.url():gsub("/[^/?]*$", "/spec_readme")
    -- (ctest runs specs from the source directory: the tour's projection paths resolve)
    local r = H.run({ dir .. "/tour.lua" }, { env = { DATABASE_URL = url } })
    H.rmdir(dir)
    assert.equal(0, r.code, r.output)
    assert.equal("", r.stderr)
    local lines = {}
    for line in r.stdout:gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
    assert.equal(#EXPECTED, #lines, r.stdout)
    for i, want in ipairs(EXPECTED) do
      if type(want) == "table" then
        assert.is_truthy(lines[i]:match(want[1]), ("line %d: %q does not match %q"):format(i, lines[i], want[1]))
      else
        assert.equal(want, lines[i], "line " .. i)
      end
    end
    assert(db:exec("DROP DATABASE spec_readme"))
    db:close()
  end)
end)
