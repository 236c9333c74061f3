-- Issue 3: pup.partition_of -- FNV-1a 32 of the id's bytes, as the Go library.
local pup = require "pupsourcing"

describe("pup.partition_of", function()
  -- id, hash, hash % 4, hash % 3 (from issue 3)
  local vectors = {
    { "", 2166136261, 1, 1 },
    { "a", 3826002220, 0, 1 },
    { "user-1", 4115888500, 0, 1 },
    { "550e8400-e29b-41d4-a716-446655440000", 2292069672, 0, 0 },
    { "order-42", 1461995252, 0, 2 },
    { "c", 3859557458, 2, 2 },
  }

  for _, v in ipairs(vectors) do
    local id, hash, m4, m3 = v[1], v[2], v[3], v[4]
    it(string.format("%q -> %d of 4, %d of 3", id, m4, m3), function()
      assert.are.equal(m4, pup.partition_of(id, 4))
      assert.are.equal(m3, pup.partition_of(id, 3))
      assert.are.equal("integer", math.type(pup.partition_of(id, 4)))
      -- the hash itself, through other moduli
      assert.are.equal(hash % 7, pup.partition_of(id, 7))
      assert.are.equal(hash % 1000, pup.partition_of(id, 1000))
    end)
  end

  it("total 1 is always partition 0", function()
    for _, v in ipairs(vectors) do assert.are.equal(0, pup.partition_of(v[1], 1)) end
  end)

  it("hashes bytes, NULs and high bytes included", function()
    -- FNV-1a 32 of "\0" = (2166136261 ~ 0) * 16777619 mod 2^32 = 84696351
    assert.are.equal(84696351 % 1000, pup.partition_of("\0", 1000))
    -- of "\255" = (2166136261 ~ 255) * 16777619 mod 2^32
    local h = ((2166136261 ~ 255) * 16777619) & 0xffffffff
    assert.are.equal(h % 1000, pup.partition_of("\255", 1000))
  end)

  it("matches a reference FNV-1a over many ids", function()
    local function fnv(s)
      local h = 2166136261
      for i = 1, #s do h = ((h ~ s:byte(i)) * 16777619) & 0xffffffff end
      return h
    end
    for i = 1, 2000 do
      local id = "agg-" .. i .. string.rep("x", i % 7)
      assert.are.equal(fnv(id) % 13, pup.partition_of(id, 13))
    end
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() pup.partition_of(nil, 4) end)
    assert.has_error(function() pup.partition_of("a", "four") end)
    assert.has_error(function() pup.partition_of("a", 0) end)
  end)
end)
