-- The README's tour of the Lua API runs as written (in a database of its own, since it
-- uses the default table names).
local H = require "spec.helpers"

describe("README", function()
  it("the tour of the Lua API runs as written", function()
    local readme = H.read_file(H.source_dir .. "/README.md")
    local tour = readme:match("## A tour of the Lua API%s+```lua\n(.-)\n```")
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
    assert.is_truthy(r.stdout:find("optimistic_concurrency", 1, true), r.stdout)
    assert(db:exec("DROP DATABASE spec_readme"))
    db:close()
  end)
end)
