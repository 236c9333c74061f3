-- `cmake --install` to a fresh prefix: the binary, the module for plain lua5.4, the C
-- library and headers, and each finds the installed Lua files (not the source tree).
local H = require "spec.helpers"

describe("cmake --install", function()
  local prefix

  setup(function()
    prefix = H.tmpdir()
    local r = H.sh(("cmake --install %s --prefix %s"):format(H.shquote(H.binary_dir), H.shquote(prefix)))
    assert.equal(0, r.code, r.output)
  end)

  teardown(function() H.rmdir(prefix) end)

  it("installs the binary, the Lua module, the C library and headers", function()
    for _, f in ipairs { "bin/pupsourcing", "share/lua/5.4/pupsourcing.lua", "share/lua/5.4/pupsourcing/cli.lua",
                         "lib/lua/5.4/pupsourcing/core.so", "lib/libpupsourcing.a",
                         "include/pupsourcing/pup_db.h", "include/pupsourcing/pup_store.h",
                         "include/pupsourcing/pup_processor.h", "include/pupsourcing/pup_lua.h" } do
      assert.is_truthy(io.open(prefix .. "/" .. f), f)
    end
  end)

  it("lets a plain lua5.4 program require the module from the prefix's standard layout", function()
    local script = H.tmpdir()
    H.write_file(script .. "/app.lua", [[
      local pup = require "pupsourcing"
      assert(package.searchpath("pupsourcing", package.path):find(os.getenv("PREFIX"), 1, true))
      local db = assert(pup.connect())
      local store = pup.store{events_table = "t_install_events", aggregate_heads_table = "t_install_heads",
                              checkpoints_table = "t_install_checkpoints"}
      assert(store:migrate(db))
      local id = pup.uuid()
      local res = assert(store:append(db, pup.no_stream(), {{aggregate_type = "User", aggregate_id = id,
        event_type = "UserCreated", payload = {email = "a@x.io"}}}))
      local s = assert(store:read_aggregate_stream(db, "User", id))
      print("ok", res.to_version, s[1].data.email)
    ]])
    local env = { PREFIX = prefix, LUA_PATH = prefix .. "/share/lua/5.4/?.lua;;",
                  LUA_CPATH = prefix .. "/lib/lua/5.4/?.so;;" }
    -- a sanitizer build's module needs its runtime preloaded into lua5.4
    if os.getenv("LD_PRELOAD") then env.LD_PRELOAD = os.getenv("LD_PRELOAD") end
    local r = H.sh("lua5.4 " .. H.shquote(script .. "/app.lua"), { env = env })
    H.rmdir(script)
    assert.equal(0, r.code, r.output)
    assert.equal("ok\t1\ta@x.io\n", r.stdout)
  end)

  it("runs the installed binary with its installed Lua files", function()
    local r = H.sh(H.shquote(prefix .. "/bin/pupsourcing") .. " --version", { env = { LUA_PATH = false, LUA_CPATH = false } })
    assert.equal(0, r.code, r.output)
    local script = H.tmpdir()
    H.write_file(script .. "/where.lua", 'print(package.searchpath("pupsourcing", package.path))')
    r = H.sh(H.shquote(prefix .. "/bin/pupsourcing") .. " " .. H.shquote(script .. "/where.lua"),
             { env = { LUA_PATH = false, LUA_CPATH = false } })
    H.rmdir(script)
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stdout:find(prefix .. "/bin/../share/lua/5.4/pupsourcing.lua", 1, true), r.stdout)
  end)
end)
