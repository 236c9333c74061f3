-- Issue 16: the README's CLI reference lists exactly the flags each command's --help lists
-- (it once put `--group` under `status`). A flag is the long form in the label column of a
-- line that starts with a dash (`    -w, --workers N     text...` / argparse's
-- `   -w N, --workers N   text...`), so flags named in descriptions do not count.
local H = require "spec.helpers"

-- The commands, from `pupsourcing --help` (so a new command is checked too).
local COMMANDS = {}
do
  local r = H.run { "--help" }
  assert(r.code == 0, r.output)
  for line in r.stdout:match("\nCommands:\n(.-)\n\n"):gmatch("[^\n]+") do
    local name = line:match("^   ([%l][%l%-]*)%s")
    if name and name ~= "help" then COMMANDS[#COMMANDS + 1] = name end
  end
  assert(#COMMANDS >= 6, "no commands found in --help:\n" .. r.stdout)
end

-- The long flags in the label columns of `text`'s option lines.
local function label_flags(text, into)
  into = into or {}
  for line in text:gmatch("[^\n]+") do
    local label = line:match("^%s+(%-.-)%s%s") or line:match("^%s+(%-.*)$")
    if label then
      for f in label:gmatch("%-%-[%w][%w%-]*") do into[f] = true end
    end
  end
  return into
end

-- The README reference: { [command] = flags, every = flags of every command }.
local function reference()
  local readme = H.read_file(H.source_dir .. "/README.md")
  local block = readme:match("## CLI reference\n.-```text\n(.-)```")
  assert(block, "no CLI reference block in README.md")
  local sections, cur = { every = {} }, nil
  for line in block:gmatch("[^\n]+") do
    local cmd = line:match("^pupsourcing ([%w%-]+)")
    if cmd then
      cur = nil
      for _, c in ipairs(COMMANDS) do
        if c == cmd then cur = cmd end
      end
      if cur then sections[cur] = sections[cur] or {} end
    elseif line:match("^every command:") then
      cur = "every"
    elseif cur then
      label_flags(line .. "\n", sections[cur])
    end
  end
  return sections
end

describe("README CLI reference", function()
  local ref = reference()

  for _, cmd in ipairs(COMMANDS) do
    it(cmd .. ": the same flags as `pupsourcing " .. cmd .. " --help`", function()
      assert.is_table(ref[cmd], "README has no `pupsourcing " .. cmd .. "` entry")
      local r = H.run({ cmd, "--help" })
      assert.equal(0, r.code, r.output)
      assert.is_truthy(r.stdout:find("^Usage: pupsourcing " .. cmd:gsub("%-", "%%-") .. " "), r.stdout)
      local want = {}
      for f in pairs(ref[cmd]) do want[f] = true end
      for f in pairs(ref.every) do want[f] = true end
      local got = label_flags(r.stdout)
      assert.is_true(got["--help"] and got["--database-url"] and true, r.stdout) -- the parse found flags
      assert.same(H.sorted(want), H.sorted(got))
    end)
  end

  it("lists no command that does not exist", function()
    local readme = H.read_file(H.source_dir .. "/README.md")
    local block = readme:match("## CLI reference\n.-```text\n(.-)```")
    for cmd in block:gmatch("\npupsourcing ([%l][%l%-]*)") do
      local r = H.run({ "help", cmd })
      assert.equal(0, r.code, cmd .. ": " .. r.output)
    end
  end)
end)
