-- Issue 10, secrets: a failed connection never shows the password, whatever the shape of
-- the connection string. Every case uses a password (or pieces of one) that appears
-- nowhere else, so finding any piece in the output means it leaked.
local pup = require "pupsourcing"
local H = require "spec.helpers"

-- {conninfo, pieces of the password that must not appear}
local CASES = {
  { "password=Kv7SecretQ host=127.0.0.1 port=1", { "Kv7SecretQ" } },
  { "host=127.0.0.1 port=1 password = Sp4cedSecretQ", { "Sp4cedSecretQ" } },
  { "password='Zx1q Zy2q Zw3q' host=127.0.0.1 port=1", { "Zx1q", "Zy2q", "Zw3q" } },
  { "password=Zx1u Zy2u Zw3u host=127.0.0.1 port=1", { "Zx1u", "Zy2u", "Zw3u" } }, -- unquoted: malformed
  { "postgresql://u:AtPa@ss9Word@127.0.0.1:1/db", { "AtPa", "ss9Word" } },         -- unencoded @
  { "postgresql://u:SlPa/ss8W@127.0.0.1:1/db", { "SlPa", "ss8W" } },               -- unencoded /
  { "postgresql://u:Qt5Sec@127.0.0.1:1/db?connect_timeout=5", { "Qt5Sec" } },
  -- short passwords, hidden or not, must not appear either
  { "postgresql://u:\xc2\xa7@127.0.0.1:1/db", { "\xc2\xa7" } },
  { "postgresql://u:~^@127.0.0.1:1/db", { "~^" } },
  { "postgresql://u:***@127.0.0.1:1/db", { "***" } },
  { "password=}|{ host=127.0.0.1 port=1", { "}|{" } },
  { "postgresql://u:***@[badhost/x", { "***" } },                                  -- was an endless loop
  -- malformed and over 1 KB (was a stack overflow for 1-2 character passwords)
  { "postgresql://u:~^@[" .. ("h"):rep(1100), { "~^" } },
  { "postgresql://u:\xc2\xa7@[" .. ("h"):rep(1100), { "\xc2\xa7" } },
  { "postgresql://u:Lg5SecretW@[" .. ("h"):rep(1100), { "Lg5SecretW" } },
  { "password=Lg6SecretW host=" .. ("h"):rep(1100) .. " bogus", { "Lg6SecretW" } },
}

local function assert_hidden(text, case)
  for _, piece in ipairs(case[2]) do
    assert.is_falsy(text:find(piece, 1, true),
      ("password piece %q shown for %q:\n%s"):format(piece, case[1]:sub(1, 80), text))
  end
end

describe("connection errors never show the password", function()
  it("pup.connect: err.message and tostring(err)", function()
    for _, case in ipairs(CASES) do
      local db, err = pup.connect(case[1])
      assert.is_nil(db, case[1])
      assert.are.equal("connection", err.code, tostring(err))
      assert.is_truthy(err.message:find("cannot connect", 1, true), err.message)
      assert_hidden(err.message, case)
      assert_hidden(tostring(err), case)
    end
  end)

  it("a refused connection is described from libpq's fields: database, host, port, user", function()
    local _, err = pup.connect("password=Kv7SecretQ host=127.0.0.1 port=1 user=spec_u dbname=spec_d")
    assert.is_truthy(err.message:find('database "spec_d" on host 127.0.0.1 port 1 as user "spec_u"', 1, true),
      err.message)
    assert.is_truthy(err.message:find("Connection refused", 1, true), err.message)
  end)

  it("a malformed string says so, with libpq's reason only when it quotes nothing", function()
    local _, err = pup.connect("postgresql://u:Lg5SecretW@[badhost/x")
    assert.is_truthy(err.message:find("^cannot connect to the database: the connection string is malformed"),
      err.message)
    _, err = pup.connect("password='Zq9 host=127.0.0.1")
    assert.are.equal("cannot connect to the database: the connection string is malformed "
      .. "(unterminated quoted string in connection info string)", err.message)
    -- libpq quotes what it echoes: only its own words before the quote are kept
    _, err = pup.connect("password=Zq9Secret bogus_option=1")
    assert.are.equal("cannot connect to the database: the connection string is malformed "
      .. "(invalid connection option)", err.message)
    _, err = pup.connect("password=Zq9 Zq8Secret=1 host=127.0.0.1")
    assert.is_falsy(err.message:find("Zq8Secret", 1, true), err.message)
    _, err = pup.connect("postgresql://u:AtPa@ss9Word@127.0.0.1:1/db")
    assert.is_truthy(err.message:find("%40", 1, true), err.message)
  end)

  it("a percent-encoded @ in a URL password is fine", function()
    local _, err = pup.connect("postgresql://u:AtPa%40ss9Word@127.0.0.1:1/db")
    assert.is_truthy(err.message:find("Connection refused", 1, true), err.message)
    assert_hidden(err.message, { "", { "AtPa", "ss9Word" } })
  end)

  describe("the host binary (stdout and stderr)", function()
    local fixture = H.source_dir .. "/spec/fixtures/run_counter.lua"
    local commands = {
      { "status" },
      { "run", fixture },
      { "run", "--log-format", "json", fixture },
    }

    for _, args in ipairs(commands) do
      it(table.concat(args, " "):gsub(fixture, "FILE") .. " with DATABASE_URL", function()
        for _, case in ipairs(CASES) do
          local words = { "timeout", "-k", "5", "20", H.shquote(H.bin) }
          for _, a in ipairs(args) do words[#words + 1] = H.shquote(a) end
          local r = H.sh(table.concat(words, " "), { env = { DATABASE_URL = case[1] } })
          assert.are_not.equal(0, r.code, r.output)
          assert.is_true(r.code ~= 124 and r.code ~= 137, "timed out: " .. case[1]:sub(1, 80))
          assert.is_truthy(r.output:find("cannot connect", 1, true), r.output)
          assert_hidden(r.output, case)
        end
      end)
    end

    it("--database-url as well", function()
      for _, case in ipairs(CASES) do
        local r = H.sh(("timeout -k 5 20 %s status --database-url %s"):format(H.shquote(H.bin), H.shquote(case[1])))
        assert.are_not.equal(0, r.code, r.output)
        assert_hidden(r.output, case)
      end
    end)
  end)
end)
