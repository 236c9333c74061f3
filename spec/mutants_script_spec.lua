-- scripts/mutants.sh (CI's mutation stage): it may report a mutation killed only when its
-- tests failed against a server that answers, and an interrupted run leaves no worker, test
-- or server behind. Runs the script on real mutations (its scratch copies and servers).
local pup = require "pupsourcing"
local H = require "spec.helpers"

local SCRIPT = H.source_dir .. "/scripts/mutants.sh"

-- Whether a process's command line has `text` (its first character as a bracket class:
-- pgrep's own shell, whose command line holds the pattern, does not match it).
local function pattern_of(text) return "[" .. text:sub(1, 1) .. "]" .. text:sub(2) end
local function running(text)
  return H.sh("pgrep -f -- " .. H.shquote(pattern_of(text))).code == 0
end

describe("scripts/mutants.sh", function()
  local dir
  after_each(function()
    if dir then H.rmdir(dir) end
    dir = nil
  end)

  it("counts tests that failed because the server is gone as SERVER LOST, not killed, and fails", function()
    local r = H.sh("bash " .. H.shquote(SCRIPT) .. " created-at-epoch", { env = {
      PUP_MUTANTS_BASELINE = "0", PUP_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/none" } })
    assert.equal(1, r.code, r.output)
    assert.truthy(r.stdout:find("created%-at%-epoch +SERVER +%d+s +SERVER LOST"), r.output)
    assert.truthy(r.stdout:find("1 mutations: 0 killed, 0 survived, 1 not applied", 1, true), r.output)
  end)

  it("refuses a PUP_MUTANTS_JOBS that is not a positive integer, naming it, with or without a database given", function()
    for _, url in ipairs { "", "postgresql://postgres@127.0.0.1:1/none" } do
      for _, bad in ipairs { "0", "abc", "-1" } do
        local r = H.sh("bash " .. H.shquote(SCRIPT) .. " created-at-epoch",
          { env = { PUP_MUTANTS_JOBS = bad, PUP_TEST_DATABASE_URL = url } })
        assert.equal(2, r.code, r.output)
        assert.truthy(r.stderr:find("PUP_MUTANTS_JOBS must be a positive integer", 1, true), r.output)
      end
    end
  end)

  it("stopped by SIGTERM while its tests run, leaves no worker, test or PostgreSQL behind and reports nothing", function()
    dir = H.tmpdir()
    local scratch = dir .. "/m"
    -- its tests take about 40 s: stopped well before they end
    local p = H.spawn({ "bash", SCRIPT, "notify-wakeup-ignored" },
      { env = { PUP_MUTANTS_BASELINE = "0", PUP_MUTANTS_DIR = scratch, PUP_TEST_DATABASE_URL = "" } })
    H.wait_until("the mutation's tests to run", 120, function()
      assert.is_nil(H.exit_code(p), H.stderr_of(p) .. H.stdout_of(p))
      return running("ctest --test-dir " .. scratch .. "/w1/build")
    end, 0.2)
    assert.is_true(running("pupsourcing-mutants-pg"), "no server of the run")
    pup.sleep(1)
    H.signal(p, "TERM")
    assert.equal(143, H.wait_exit(p, 60), H.stderr_of(p))
    assert.is_false(running(scratch .. "/w"), "a process of the run is left: "
      .. H.sh("pgrep -af -- " .. H.shquote(pattern_of(scratch .. "/w"))).stdout)
    assert.is_false(running("pupsourcing-mutants-pg"), "a server of the run is left")
    assert.is_nil(H.stdout_of(p):find("killed", 1, true), H.stdout_of(p))
  end)
end)
