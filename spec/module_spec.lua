-- Issue 2: the module's small pieces (uuid, json, null, expected-version values, args).
local pup = require "pupsourcing"

describe("pupsourcing module", function()
  local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89abAB]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

  it("pup.uuid() makes distinct random (v4) UUIDs", function()
    local seen = {}
    for _ = 1, 1000 do
      local u = pup.uuid()
      assert.is_truthy(u:match(UUID), u)
      assert.is_nil(seen[u])
      seen[u] = true
    end
  end)

  it("pup.json encodes and decodes", function()
    assert.are.equal("function", type(pup.json.encode))
    assert.are.equal("function", type(pup.json.decode))
    local t = { a = 1, b = { "x", "y" }, c = true }
    assert.are.same(t, pup.json.decode(pup.json.encode(t)))
  end)

  it("expected-version constructors exist", function()
    assert.is_not_nil(pup.any())
    assert.is_not_nil(pup.no_stream())
    assert.is_not_nil(pup.exact(3))
    assert.is_not_nil(pup.exact(0))
  end)

  it("pup.null is a unique sentinel", function()
    assert.is_not_nil(pup.null)
    assert.is_truthy(pup.null ~= false)
  end)

  it("pup.now() and pup.sleep()", function()
    local t0 = pup.now()
    assert.are.equal("number", type(t0))
    assert.is_true(math.abs(t0 - os.time()) < 5)
    pup.sleep(0.05)
    local dt = pup.now() - t0
    assert.is_true(dt >= 0.04 and dt < 2, tostring(dt))
  end)

  it("pup.args parses --k=v, --k v and --flag, keeping numbers as strings", function()
    local a = pup.args { "--a=1", "--b", "two", "--flag", "--c=x=y" }
    assert.are.equal("1", a.a)
    assert.are.equal("two", a.b)
    assert.are.equal(true, a.flag)
    assert.are.equal("x=y", a.c)
  end)

  it("pup.store() with defaults builds the schema SQL without a database", function()
    local sql = pup.store():schema_sql()
    assert.are.equal("string", type(sql))
    assert.is_truthy(sql:find("events", 1, true))
    assert.is_truthy(sql:find("aggregate_heads", 1, true))
    assert.is_truthy(sql:find("projection_checkpoints", 1, true))
  end)
end)
