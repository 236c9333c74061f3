-- The code blocks of docs/lua-api.md "Reactors" and "Inline projections" run as written,
-- each in a database of its own, twice (a second run finds the tables, checkpoints and
-- rows of the first), and print what their `-->` comments say.
local H = require "spec.helpers"

local doc = H.read_file(H.source_dir .. "/docs/lua-api.md")

local function block(title)
  local section = assert(doc:match("\n## " .. title .. "\n(.-)\n## "), "no " .. title .. " section in docs/lua-api.md")
  local blocks = {}
  for b in section:gmatch("```lua\n(.-)\n```") do blocks[#blocks + 1] = b end
  assert(#blocks == 1, ("expected 1 code block in %s, found %d"):format(title, #blocks))
  return blocks[1]
end

for _, title in ipairs { "Reactors", "Inline projections" } do
  describe("docs: " .. title, function()
    it("runs and prints what its comments say, also a second time", function()
      local script = block(title)
      local expected = {}
      for line in script:gmatch("[^\n]+") do
        local out = line:match("%-%-> (.*)$")
        if out then expected[#expected + 1] = out end
      end
      assert.is_true(#expected >= 3)
      local dir = H.tmpdir()
      H.write_file(dir .. "/doc.lua", script)
      local name = "spec_docs_" .. title:lower():gsub("%W", "_")
      local db = H.connect()
      assert(db:exec("DROP DATABASE IF EXISTS " .. name))
      assert(db:exec("CREATE DATABASE " .. name))
      local url = H.url():gsub("/[^/?]*$", "/" .. name)
      for _ = 1, 2 do
        local r = H.run({ dir .. "/doc.lua" }, { env = { DATABASE_URL = url } })
        assert.equal(0, r.code, r.output)
        assert.equal("", r.stderr)
        local lines = {}
        for line in r.stdout:gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
        assert.same(expected, lines)
      end
      H.rmdir(dir)
      assert(db:exec("DROP DATABASE " .. name))
      db:close()
    end)
  end)
end
