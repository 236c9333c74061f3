-- scripts/pg.sh (used by run.sh, test.sh, mutants.sh): a taken port is skipped and said;
-- a server already running in a directory keeps its port.
local H = require "spec.helpers"

describe("scripts/pg.sh", function()
  it("takes the next free port when the asked one is taken, and says which", function()
    local dir = H.tmpdir()
    os.execute("chmod 755 " .. H.shquote(dir))
    local pg = "bash " .. H.shquote(os.getenv("PUP_SOURCE_DIR") .. "/scripts/pg.sh")
    local function start(sub, port) return H.sh(("%s start %s %d"):format(pg, H.shquote(dir .. "/" .. sub), port)) end
    finally(function()
      for _, sub in ipairs { "a", "b" } do H.sh(("%s stop %s"):format(pg, H.shquote(dir .. "/" .. sub))) end
      H.sh("rm -rf " .. H.shquote(dir))
    end)
    -- find a free port for the first server: pg.sh itself moves on if it is taken
    local a = start("a", 54500)
    assert.equal(0, a.code, a.stderr)
    local pa = tonumber(a.stdout:match("^postgresql://postgres@127%.0%.0%.1:(%d+)/pupsourcing\n$"))
    assert.is_not_nil(pa, a.stdout)
    local b = start("b", pa)
    assert.equal(0, b.code, b.stderr)
    local pb = tonumber(b.stdout:match("^postgresql://postgres@127%.0%.0%.1:(%d+)/pupsourcing\n$"))
    assert.is_true(pb > pa, b.stdout)
    assert.truthy(b.stderr:find(("pg.sh: port %d is taken; using %d"):format(pa, pb), 1, true), b.stderr)
    -- both answer, on their own ports
    for _, p in ipairs { pa, pb } do
      local r = H.sh(("psql -qAt postgresql://postgres@127.0.0.1:%d/pupsourcing -c 'SELECT 41 + 1'"):format(p))
      assert.equal("42\n", r.stdout, r.stderr)
    end
    -- started again while running: the same URL, whatever port is asked
    local again = start("b", 54329)
    assert.equal(0, again.code, again.stderr)
    assert.equal(b.stdout, again.stdout)
  end)
end)
