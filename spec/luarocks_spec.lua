-- The rock: `luarocks make` (pupsourcing-scm-1.rockspec, CMake backend) builds a copy of the
-- source and installs the module and the binary into a tree of its own; plain lua5.4 and
-- the installed binary then use that tree, against the test server. Runs the README's
-- luarocks block as written (with HOME in a temporary directory, so `--local` is private).
local H = require "spec.helpers"

-- H.sh runs one command (its environment and redirections bind to the first and last of
-- a list); a compound command line goes through bash, which also unsets opts.unset
-- (H.sh cannot mix unset and set variables).
local function bash(cmdline, opts)
  if opts and opts.unset then cmdline = "unset " .. table.concat(opts.unset, " ") .. "; " .. cmdline end
  return H.sh("bash -c " .. H.shquote(cmdline), opts)
end

local function luarocks_block()
  local readme = H.read_file(H.source_dir .. "/README.md")
  local section = assert(readme:match("\n## Install\n(.-)\n## "), "no Install section in README.md")
  for text in section:gmatch("```bash\n(.-)\n```") do
    if text:find("luarocks", 1, true) then return text end
  end
  error("no luarocks block in the README's Install section")
end

describe("luarocks make", function()
  local work, home, tree

  setup(function()
    local which = bash("command -v luarocks")
    assert(which.code == 0, "luarocks not found: scripts/deps.sh installs Debian's luarocks")
    work = H.tmpdir()
    home = work .. "/home"
    tree = home .. "/.luarocks"
    local r = bash(("mkdir -p %s %s/src && tar -C %s --exclude=./build --exclude='./build-*' --exclude=./build.luarocks"
      .. " --exclude=./.git --exclude=./.pg -cf - . | tar -C %s/src -xf -"):format(
      H.shquote(tree), H.shquote(work), H.shquote(H.source_dir), H.shquote(work)))
    assert.equal(0, r.code, r.output)
    -- The rock depends on argparse; offline, Debian's lua-argparse (scripts/deps.sh) is it.
    H.write_file(tree .. "/config-5.4.lua", 'rocks_provided = { argparse = "0.7.1-1" }\n')
  end)

  teardown(function() if work then H.rmdir(work) end end)

  it("builds and installs the rock as the README says, offline", function()
    H.write_file(work .. "/rock.sh", luarocks_block())
    local r = bash("cd " .. H.shquote(work .. "/src") .. " && bash -eo pipefail ../rock.sh",
                   { env = { HOME = home }, unset = { "LUA_PATH", "LUA_CPATH", "LUA_INIT" } })
    assert.equal(0, r.code, r.output)
    local uuid = "%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x"
    -- (luarocks make reports its build on stdout first)
    assert.is_truthy(r.stdout:match("\n" .. uuid .. "\npupsourcing %d+%.%d+%.%d+\n$"), r.stdout)
    assert.is_truthy(r.stdout:find("pupsourcing scm-1 is now installed in " .. tree, 1, true), r.stdout)
    for _, f in ipairs { "bin/pupsourcing", "share/lua/5.4/pupsourcing.lua", "share/lua/5.4/pupsourcing/cli.lua", "share/lua/5.4/pupsourcing/types.lua",
                         "lib/lua/5.4/pupsourcing/core.so" } do
      local fh = io.open(tree .. "/" .. f)
      assert.is_truthy(fh, f)
      fh:close()
    end
    -- a rock carries the Lua side only: no C library, headers or package files in the tree
    local found = bash("find " .. H.shquote(tree) .. " -name 'libpupsourcing*' -o -name '*.h' -o -name '*.pc'")
    assert.equal("", found.stdout)
    assert.equal("pupsourcing\tscm-1\tinstalled\t" .. tree .. "/lib/luarocks/rocks-5.4\n",
                 H.sh("luarocks --lua-version 5.4 --tree " .. H.shquote(tree) .. " list --porcelain",
                      { env = { HOME = home } }).stdout)
  end)

  it("gives plain lua5.4 a module that connects, appends and reads back from the tree", function()
    local script = work .. "/app.lua"
    H.write_file(script, [[
      local pup = require "pupsourcing"
      local tree = os.getenv("TREE")
      assert(package.searchpath("pupsourcing", package.path):sub(1, #tree) == tree)
      assert(package.searchpath("pupsourcing.core", package.cpath):sub(1, #tree) == tree)
      local db = assert(pup.connect())
      local store = pup.store{events_table = "t_rock_events", aggregate_heads_table = "t_rock_heads",
                              checkpoints_table = "t_rock_checkpoints"}
      assert(store:migrate(db))
      local id = pup.uuid()
      local res = assert(store:append(db, pup.no_stream(), {{aggregate_type = "User", aggregate_id = id,
        event_type = "UserCreated", payload = {email = "rock@x.io"}}}))
      local s = assert(store:read_aggregate_stream(db, "User", id))
      print("ok", res.to_version, #s, s[1].event_type, s[1].data.email)
    ]])
    local r = H.sh("lua5.4 " .. H.shquote(script), { env = { TREE = tree, HOME = home,
      LUA_PATH = tree .. "/share/lua/5.4/?.lua;" .. tree .. "/share/lua/5.4/?/init.lua;;",
      LUA_CPATH = tree .. "/lib/lua/5.4/?.so;;" } })
    assert.equal(0, r.code, r.output)
    assert.equal("ok\t1\t1\tUserCreated\trock@x.io\n", r.stdout)
  end)

  it("installs a binary that runs scripts with the tree's Lua files", function()
    local script = work .. "/where.lua"
    H.write_file(script, [[
      local pup = require "pupsourcing"
      print(package.searchpath("pupsourcing", package.path))
      local db = assert(pup.connect())
      print(#assert(db:query("SELECT 1 AS one")))
    ]])
    local r = bash(H.shquote(tree .. "/bin/pupsourcing") .. " " .. H.shquote(script),
                   { env = { HOME = home }, unset = { "LUA_PATH", "LUA_CPATH" } })
    assert.equal(0, r.code, r.output)
    assert.equal(tree .. "/bin/../share/lua/5.4/pupsourcing.lua\n1\n", r.stdout)
  end)
end)
