-- pup.json keeps what events hold: integers stay integers, floats read back as the same
-- double, and the trip through PostgreSQL (payload bytea, metadata jsonb) changes nothing.
local h = require "spec.helpers"
local pup = require "pupsourcing"
local json = pup.json

-- Equal values of equal Lua types, all the way down (integer 1 is not float 1.0).
local function same(a, b, path)
  path = path or "value"
  if type(a) ~= type(b) then return false, path .. ": " .. type(a) .. " vs " .. type(b) end
  if type(a) == "number" then
    if math.type(a) ~= math.type(b) then return false, path .. ": " .. math.type(a) .. " vs " .. math.type(b) end
    if a ~= b and not (a ~= a and b ~= b) then return false, path .. ": " .. tostring(a) .. " vs " .. tostring(b) end
    if a == 0 and math.type(a) == "float" and 1 / a ~= 1 / b then return false, path .. ": sign of zero" end
    return true
  end
  if type(a) ~= "table" then
    if a ~= b then return false, path .. ": " .. tostring(a) .. " vs " .. tostring(b) end
    return true
  end
  for k, v in pairs(a) do
    local ok, why = same(v, b[k], path .. "." .. tostring(k))
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if a[k] == nil then return false, path .. "." .. tostring(k) .. ": extra" end
  end
  return true
end

local function assert_same(a, b)
  local ok, why = same(a, b)
  assert(ok, why)
end

describe("pup.json", function()
  it("keeps 64-bit integers exact both ways", function()
    for _, v in ipairs { 0, 1, -1, 100, 123456789012345678, math.maxinteger, math.mininteger, 1 << 53, (1 << 53) + 1 } do
      local text = json.encode(v)
      assert.are.equal(string.format("%d", v), text)
      local back = json.decode(text)
      assert.are.equal("integer", math.type(back))
      assert.are.equal(v, back)
    end
    assert.are.equal('{"a":123456789012345678}', json.encode { a = 123456789012345678 })
  end)

  it("decodes a number without fraction or exponent as an integer, others as floats", function()
    assert.are.equal("integer", math.type(json.decode("100")))
    assert.are.equal("integer", math.type(json.decode('{"amount":100}').amount))
    assert.are.equal("float", math.type(json.decode("100.0")))
    assert.are.equal("float", math.type(json.decode("1e2")))
    assert.are.equal(100.0, json.decode("1e2"))
    -- beyond 64 bits: the nearest double, not a wrapped integer
    local big = json.decode("123456789012345678901234567890")
    assert.are.equal("float", math.type(big))
    assert.are.equal(1.2345678901234568e29, big)
    assert.are.equal("float", math.type(json.decode("-0")))
    assert.are.equal(-math.huge, 1 / json.decode("-0"))
  end)

  it("writes floats as the shortest text that reads back as the same double", function()
    local cases = { -- pairs, not a table keyed by float: Lua turns 100.0 into the key 100
      { 0.1, "0.1" }, { 1 / 3, "0.3333333333333333" }, { 100.0, "100.0" }, { -2.5, "-2.5" },
      { 1e300, "1e+300" }, { 5e-324, "5e-324" }, { 2.2250738585072014e-308, "2.2250738585072014e-308" },
      { 0.1 + 0.2, "0.30000000000000004" }, { 2 ^ 63, "9.223372036854776e+18" },
      { 123456789012.25, "123456789012.25" }, { 0.0, "0.0" },
    }
    for _, case in ipairs(cases) do
      local v, text = case[1], case[2]
      assert.are.equal(text, json.encode(v))
      local back = json.decode(text)
      assert.are.equal("float", math.type(back))
      assert.are.equal(v, back)
    end
    assert.are.equal("-0.0", json.encode(-0.0))
  end)

  it("round-trips arrays, empty ones included, objects, null, booleans and UTF-8", function()
    local v = json.decode('{"list":[1,2.5,"x",null,true,false],"empty":[],"obj":{},"s":"caf\\u00e9 \\ud83d\\ude00"}')
    assert.are.equal("café 😀", v.s)
    assert.are.equal(pup.null, v.list[4])
    assert.are.equal(6, #v.list)
    assert.are.equal(json.array_mt, getmetatable(v.empty))
    local text = json.encode(v)
    assert_same(v, json.decode(text))
    assert.is_truthy(text:find('"empty":[]', 1, true), text)
    assert.is_truthy(text:find('"obj":{}', 1, true), text)
    assert.are.equal("[]", json.encode(setmetatable({}, json.array_mt)))
    assert.are.equal("{}", json.encode {})
    assert.are.equal('[1,2,3]', json.encode { 1, 2, 3 })
    assert.are.equal('{"1":"a","3":"c"}', json.encode { [1] = "a", [3] = "c" })
    assert.are.equal("null", json.encode(pup.null))
    assert.are.equal('"a\\"b\\\\c\\n"', json.encode('a"b\\c\n'))
  end)

  it("raises, naming what is wrong, on what JSON cannot hold and on invalid text", function()
    local function raises(pattern, f, ...)
      local ok, err = pcall(f, ...)
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find(pattern), tostring(err))
    end
    raises("NaN", json.encode, 0 / 0)
    raises("infinity", json.encode, { x = math.huge })
    raises("UTF%-8", json.encode, "\xff\xfe")
    raises("type function", json.encode, { f = print })
    raises("key of type float", json.encode, { [1.5] = 1 })
    local cyclic = {}
    cyclic.self = cyclic
    raises("nested deeper than 127 levels", json.encode, cyclic)
    raises("pup.json.decode", json.decode, "{")
    raises("pup.json.decode", json.decode, "[1,]")
    raises("more than one JSON value", json.decode, "1 2")
    raises("premature EOF", json.decode, "   ")
    raises("premature EOF", json.decode, "")
    raises("pup.json.decode", json.decode, '"\xff"')
    raises("nested deeper than 127 levels", json.decode, string.rep("[", 128) .. string.rep("]", 128))
    assert.are.equal(127, #json.encode(json.decode(string.rep("[", 127) .. string.rep("]", 127))) // 2)
    -- the codec is still usable after every error
    assert.are.same({ 1, 2 }, json.decode("[1,2]"))
    -- and a reused one (after a success) refuses empty text and a stream of values alike
    for _, text in ipairs { "", "   ", string.rep("1 ", 500), '{} "x"' } do
      assert.are.equal(1, json.decode("1"))
      local ok, err = pcall(json.decode, text)
      assert.is_false(ok, ("%q decoded"):format(text:sub(1, 20)))
      assert.matches("pup.json.decode: ", tostring(err))
    end
  end)

  it("round-trips random values exactly (property test)", function()
    math.randomseed(20261129)
    local function rand_string()
      local parts = {}
      for _ = 1, math.random(0, 8) do
        local c = math.random(1, 6)
        if c == 1 then parts[#parts + 1] = utf8.char(math.random(0x80, 0x7ff))
        elseif c == 2 then parts[#parts + 1] = utf8.char(math.random(0x800, 0xd7ff))
        elseif c == 3 then parts[#parts + 1] = utf8.char(math.random(0x10000, 0x10ffff))
        elseif c == 4 then parts[#parts + 1] = string.char(math.random(0, 31))
        else parts[#parts + 1] = string.char(math.random(32, 126)) end
      end
      return table.concat(parts)
    end
    local function rand_float()
      while true do
        local f = string.unpack("<d", string.pack("<i8", math.random(math.mininteger, math.maxinteger)))
        if f == f and f ~= math.huge and f ~= -math.huge then return f end
      end
    end
    local function rand_value(depth)
      local c = math.random(1, depth > 3 and 5 or 7)
      if c == 1 then return math.random(math.mininteger, math.maxinteger)
      elseif c == 2 then return rand_float()
      elseif c == 3 then return rand_string()
      elseif c == 4 then return math.random(0, 1) == 1
      elseif c == 5 then return pup.null
      elseif c == 6 then
        local t = setmetatable({}, json.array_mt)
        for i = 1, math.random(0, 5) do t[i] = rand_value(depth + 1) end
        return t
      else
        local t = {}
        for _ = 1, math.random(0, 5) do t[rand_string()] = rand_value(depth + 1) end
        return t
      end
    end
    for _ = 1, 3000 do
      local v = rand_value(0)
      assert_same(v, json.decode(json.encode(v)))
    end
  end)

  it("stores payload and metadata tables through PostgreSQL unchanged", function()
    local store, db = h.fresh_store("json")
    local payload = { a = 123456789012345678, third = 1 / 3, amount = 100, price = 19.99, big = math.maxinteger,
                      list = setmetatable({}, json.array_mt), nested = { { x = -0.5 }, pup.null } }
    local metadata = { n = 123456789012345678, f = 0.1, whole = 100.0 }
    local id = pup.uuid()
    assert(store:append(db, pup.no_stream(), { {
      aggregate_type = "J", aggregate_id = id, event_type = "T", payload = payload, metadata = metadata } }))
    local stream = assert(store:read_aggregate_stream(db, "J", id))
    assert_same(payload, stream[1].data)
    assert_same(metadata, json.decode(stream[1].metadata))
    local rows = assert(db:query("SELECT (metadata->>'n')::numeric::text AS n FROM "
      .. h.tables("json").events_table .. " WHERE aggregate_id = $1", id))
    assert.are.equal("123456789012345678", rows[1].n)
    -- what JSON cannot hold is a bad event (nil, err), and nothing is written
    for _, bad in ipairs { { payload = { x = 0 / 0 } }, { payload = { s = "\xff" } }, { metadata = { f = print } } } do
      local ev = { aggregate_type = "J", aggregate_id = id, event_type = "T", payload = bad.payload or "{}",
                   metadata = bad.metadata }
      local ok, err = store:append(db, pup.exact(1), { ev })
      assert.is_nil(ok)
      assert.are.equal("invalid_event", err.code)
      assert.matches("^event 1: %a+ cannot be written as JSON: ", err.message)
    end
    assert.are.equal(1, assert(store:read_aggregate_stream(db, "J", id)).version)
    db:close()
  end)
end)
