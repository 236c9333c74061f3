-- `cmake --install` to a fresh prefix: the binary, the module for plain lua5.4, the C
-- library and headers, and each finds the installed Lua files (not the source tree).
-- Then the README's "Install" section as written: a Release build of a copy of the source
-- installed into a prefix, and examples/c/main.c built against it by pkg-config and by
-- find_package, run on the test server. (Its luarocks block: spec/luarocks_spec.lua.)
local H = require "spec.helpers"

-- H.sh runs one command (its environment and redirections bind to the first and last of
-- a list); a compound command line goes through bash, which also unsets opts.unset
-- (H.sh cannot mix unset and set variables).
local function bash(cmdline, opts)
  if opts and opts.unset then cmdline = "unset " .. table.concat(opts.unset, " ") .. "; " .. cmdline end
  return H.sh("bash -c " .. H.shquote(cmdline), opts)
end

-- The fenced blocks of the README's "Install" section, in order: {lang, text}.
local function install_blocks()
  local readme = H.read_file(H.source_dir .. "/README.md")
  local section = assert(readme:match("\n## Install\n(.-)\n## "), "no Install section in README.md")
  local blocks = {}
  for lang, text in section:gmatch("```(%w+)\n(.-)\n```") do blocks[#blocks + 1] = { lang = lang, text = text } end
  return blocks
end

-- What examples/c prints on its first run in an empty database.
local EXAMPLE_C_OUTPUT = "handled 6 events\nOrderPaid 2\nOrderPlaced 3\nOrderShipped 1\n"

-- Runs a built examples/c program on a fresh database and checks what it printed and
-- what it wrote, and that it links no Lua.
local function check_example_c(exe, dbname)
  local ldd = H.sh("ldd " .. H.shquote(exe))
  assert.equal(0, ldd.code, ldd.output)
  for _, lib in ipairs { "lua", "yajl", "uuid" } do -- the C core needs libpq alone
    assert.is_falsy(ldd.stdout:lower():find(lib, 1, true), ldd.stdout)
  end
  assert.is_truthy(ldd.stdout:find("libpq", 1, true), ldd.stdout)
  local url = H.fresh_database(dbname)
  local r = H.sh(H.shquote(exe), { env = { DATABASE_URL = url } })
  assert.equal(0, r.code, r.output)
  assert.equal(EXAMPLE_C_OUTPUT, r.stdout)
  local db = H.connect(url)
  local rows = assert(db:query("SELECT (SELECT count(*) FROM cex_events) AS events,"
    .. " (SELECT sum(count) FROM cex_type_counts) AS counted,"
    .. " (SELECT last_global_position FROM cex_checkpoints WHERE projection_name = 'type_counts') AS checkpoint"))
  db:close()
  H.drop_database(dbname)
  assert.same({ events = 6, counted = 6, checkpoint = 6 }, { events = rows[1].events,
    counted = math.tointeger(rows[1].counted), checkpoint = rows[1].checkpoint })
end

describe("cmake --install", function()
  local prefix

  setup(function()
    prefix = H.tmpdir()
    local r = H.sh(("cmake --install %s --prefix %s"):format(H.shquote(H.binary_dir), H.shquote(prefix)))
    assert.equal(0, r.code, r.output)
  end)

  teardown(function() H.rmdir(prefix) end)

  it("installs the binary, the Lua module, the C library, its headers and package files", function()
    for _, f in ipairs { "bin/pupsourcing", "share/lua/5.4/pupsourcing.lua", "share/lua/5.4/pupsourcing/cli.lua", "share/lua/5.4/pupsourcing/types.lua",
                         "lib/lua/5.4/pupsourcing/core.so", "lib/libpupsourcing.a",
                         "include/pupsourcing/pup_db.h", "include/pupsourcing/pup_store.h", "include/pupsourcing/pup_gap.h",
                         "include/pupsourcing/pup_processor.h", "lib/pkgconfig/pupsourcing.pc",
                         "lib/cmake/pupsourcing/pupsourcingConfig.cmake",
                         "lib/cmake/pupsourcing/pupsourcingConfigVersion.cmake",
                         "lib/cmake/pupsourcing/pupsourcingTargets.cmake" } do
      local fh = io.open(prefix .. "/" .. f)
      assert.is_truthy(fh, f)
      fh:close()
    end
    -- the Lua binding is not part of the C library's interface
    assert.is_falsy(io.open(prefix .. "/include/pupsourcing/pup_lua.h"), "pup_lua.h installed")
  end)

  it("installs a C library with no Lua in it", function()
    local r = H.sh("nm -A " .. H.shquote(prefix .. "/lib/libpupsourcing.a"))
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stdout:find(" T pup_store_append\n", 1, true), "pup_store_append not defined")
    assert.is_truthy(r.stdout:find(" T pup_processor_batch\n", 1, true), "pup_processor_batch not defined")
    for line in r.stdout:gmatch("[^\n]+") do
      assert.is_falsy(line:find("lua", 1, true), line) -- no Lua object, no Lua symbol defined or needed
      assert.is_falsy(line:find(" U yajl_", 1, true), line)
      assert.is_falsy(line:find(" U uuid_", 1, true), line)
    end
    -- pkg-config describes it relative to where it was installed (the prefix moved here)
    r = H.sh("pkg-config --cflags --libs pupsourcing", { env = { PKG_CONFIG_PATH = prefix .. "/lib/pkgconfig" } })
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stdout:find("-I" .. prefix .. "/lib/pkgconfig/../../include/pupsourcing", 1, true), r.stdout)
    assert.is_truthy(r.stdout:find("-lpupsourcing", 1, true), r.stdout)
    assert.is_truthy(r.stdout:find("-lpq", 1, true), r.stdout)
    assert.is_falsy(r.stdout:find("lua", 1, true), r.stdout)
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

describe("README Install section", function()
  local work, prefix, blocks

  setup(function()
    blocks = install_blocks()
    -- every block of the section is run: here, or the luarocks one in spec/luarocks_spec.lua
    assert.equal(4, #blocks, "the Install section's blocks changed: run the new ones in a spec")
    work = H.tmpdir()
    prefix = work .. "/prefix"
    -- a copy of the source tree (no build directories), built as the README says
    local r = bash(("tar -C %s --exclude=./build --exclude='./build-*' --exclude=./build.luarocks --exclude=./.git"
      .. " --exclude=./.pg -cf - . | tar -C %s -xf -"):format(
      H.shquote(H.source_dir), H.shquote(work .. "/")))
    assert.equal(0, r.code, r.output)
  end)

  teardown(function() if work then H.rmdir(work) end end)

  it("builds and installs with its first block, run as written", function()
    assert.equal("bash", blocks[1].lang)
    H.write_file(work .. "/install.sh", blocks[1].text)
    local r = bash("cd " .. H.shquote(work) .. " && bash -eo pipefail install.sh", { env = { PREFIX = prefix } })
    assert.equal(0, r.code, r.output)
    for _, f in ipairs { "bin/pupsourcing", "lib/libpupsourcing.a", "lib/pkgconfig/pupsourcing.pc",
                         "lib/cmake/pupsourcing/pupsourcingConfig.cmake", "include/pupsourcing/pup_processor.h" } do
      local fh = io.open(prefix .. "/" .. f)
      assert.is_truthy(fh, f)
      fh:close()
    end
    r = H.sh(H.shquote(prefix .. "/bin/pupsourcing") .. " --version", { env = { LUA_PATH = false, LUA_CPATH = false } })
    assert.equal(0, r.code, r.output)
    assert.is_truthy(r.stdout:match("^pupsourcing %d+%.%d+%.%d+\n$"), r.stdout)
  end)

  it("builds examples/c/main.c with pkg-config as written, and it runs", function()
    assert.equal("bash", blocks[2].lang)
    local dir = work .. "/app-pc"
    assert.equal(0, bash("mkdir " .. H.shquote(dir) .. " && cp " .. H.shquote(H.source_dir .. "/examples/c/main.c")
      .. " " .. H.shquote(dir)).code)
    H.write_file(dir .. "/build.sh", blocks[2].text)
    local r = bash("cd " .. H.shquote(dir) .. " && bash -eo pipefail build.sh",
                   { env = { PKG_CONFIG_PATH = prefix .. "/lib/pkgconfig" } })
    assert.equal(0, r.code, r.output)
    check_example_c(dir .. "/app", "spec_install_pc")
  end)

  it("builds examples/c/main.c with find_package(pupsourcing) as written, and it runs", function()
    assert.equal("cmake", blocks[3].lang)
    local dir = work .. "/app-cmake"
    assert.equal(0, bash("mkdir " .. H.shquote(dir) .. " && cp " .. H.shquote(H.source_dir .. "/examples/c/main.c")
      .. " " .. H.shquote(dir)).code)
    H.write_file(dir .. "/CMakeLists.txt", blocks[3].text .. "\n")
    local r = bash(("cmake -S %s -B %s/build -DCMAKE_PREFIX_PATH=%s && cmake --build %s/build"):format(
      H.shquote(dir), H.shquote(dir), H.shquote(prefix), H.shquote(dir)))
    assert.equal(0, r.code, r.output)
    check_example_c(dir .. "/build/app", "spec_install_cmake")
    -- the version file refuses an incompatible request
    H.write_file(dir .. "/CMakeLists.txt", (blocks[3].text:gsub("find_package%(pupsourcing [%d.]+", "find_package(pupsourcing 9.0")))
    r = H.sh(("cmake -S %s -B %s/build2 -DCMAKE_PREFIX_PATH=%s"):format(H.shquote(dir), H.shquote(dir), H.shquote(prefix)))
    assert.is_not.equal(0, r.code)
    assert.is_truthy(r.output:find("pupsourcing", 1, true) and r.output:find("9.0", 1, true), r.output)
  end)
end)
