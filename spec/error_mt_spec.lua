-- Issue 11: the error metatable is exported (pup.error_mt) instead of being reached
-- through debug.getregistry: errors from C and from Lua share it, and code can test for
-- an error object without the debug library.
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("pup.error_mt", function()
  it("is the metatable of the core's errors and of pup.new_error's", function()
    assert.is_table(pup.error_mt)
    assert.is_function(pup.error_mt.__tostring)
    local db = H.connect()
    local _, err = db:query("SELECT * FROM no_such_table_error_mt")
    assert.are.equal(pup.error_mt, getmetatable(err))
    local mine = pup.new_error("invalid_argument", "bad thing")
    assert.are.equal(pup.error_mt, getmetatable(mine))
    assert.are.equal("invalid_argument: bad thing", tostring(mine))
    db:close()
  end)

  it("pupsourcing.lua no longer reaches into the registry", function()
    local src = H.read_file(H.source_dir .. "/lua/pupsourcing.lua")
    assert.is_nil(src:find("getregistry", 1, true))
  end)
end)
