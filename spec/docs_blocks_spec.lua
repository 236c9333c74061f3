-- Every fenced code block of README.md and docs/*.md runs in a spec (issue 12). This spec
-- runs the lua, sh/bash and sql blocks itself, each in a fresh migrated database on the test
-- server, and fails listing any block that is neither run here nor marked. To add a block:
--   * lua: a script is run by the host binary from the source directory; a block that starts
--     with `return {` is a projection file, run by `pupsourcing run --once`. A line comment
--     `--> text` says the script prints that line there: the output is compared line by line.
--   * sh/bash: run by `bash -euo pipefail` from the source directory with the built binary
--     first on PATH; `# --> text` comments as above. sql: run as one script.
--   * a block run by another spec says so on the line before its fence:
--       <!-- spec: spec/install_spec.lua -->   (that spec must exist and read this file)
--   * one that must never run (it runs the test suite itself, ...) says why:
--       <!-- not run: runs the whole test suite -->
--   * a listing that is not code (signatures, usage text) is fenced as `text`.
local H = require "spec.helpers"
local pup = require "pupsourcing"

local RUNS = { lua = true, sh = true, bash = true, sql = true }

local function doc_files()
  local files = { "README.md" }
  local p = io.popen("cd " .. H.shquote(H.source_dir) .. " && ls docs/*.md")
  for f in p:lines() do files[#files + 1] = f end
  p:close()
  return files
end

-- The fenced blocks of a file: {file=, line=, lang=, text=, marker=}.
local function blocks_of(file)
  local out, cur, prev = {}, nil, ""
  local n = 0
  for line in (H.read_file(H.source_dir .. "/" .. file) .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if cur then
      if line:match("^```%s*$") then
        cur.text = table.concat(cur.lines, "\n") .. "\n"
        out[#out + 1] = cur
        cur = nil
      else
        cur.lines[#cur.lines + 1] = line
      end
    else
      local lang = line:match("^```(%S*)%s*$")
      if lang then
        cur = { file = file, line = n, lang = lang, lines = {}, marker = prev:match("^<!%-%-%s*(.-)%s*%-%->$") }
      end
      prev = line
    end
  end
  assert(not cur, file .. ":" .. (cur and cur.line or 0) .. ": a fence that is never closed")
  return out
end

local ALL = {}
for _, f in ipairs(doc_files()) do
  for _, b in ipairs(blocks_of(f)) do ALL[#ALL + 1] = b end
end

-- Why a block is neither run here nor properly marked, or nil.
local function problem(b)
  local m = b.marker or ""
  local spec = m:match("^spec:%s*(%S+)$")
  if spec then
    local ok, text = pcall(H.read_file, H.source_dir .. "/" .. spec)
    if not ok then return "names " .. spec .. ", which does not exist" end
    local base = b.file:match("[^/]+$")
    if not text:find(base, 1, true) then return spec .. " does not read " .. base end
    return nil
  end
  if m:match("^not run:%s*%S") then return nil end
  if b.lang == "text" then return nil end
  if b.lang == "" then return "a fence without a language (fence listings as `text`)" end
  if not RUNS[b.lang] then
    return ("a `%s` block that no spec runs (mark it <!-- spec: ... --> or <!-- not run: why -->)"):format(b.lang)
  end
  return nil
end

local function runs_here(b)
  return RUNS[b.lang] and not b.marker
end

-- A fresh database with the store's tables (the docs use the default table names).
local function fresh_database()
  local url = H.fresh_database("spec_docs")
  local r = H.run({ "migrate" }, { env = { DATABASE_URL = url } })
  assert(r.code == 0, r.output)
  return url
end

-- The lines a block says it prints (`--> text` comments, `# --> text` in shell).
local function expected_output(b)
  local want = {}
  local mark = b.lang == "lua" and "%-%-> ?(.*)$" or "#%s*%-%-> ?(.*)$"
  for line in b.text:gmatch("[^\n]+") do
    local out = line:match(mark)
    if out then want[#want + 1] = out end
  end
  return want
end

local function check_output(b, r)
  local want = expected_output(b)
  if #want == 0 then return end
  local got = {}
  for line in r.stdout:gmatch("([^\n]*)\n") do got[#got + 1] = line end
  assert.same(want, got, ("%s:%d prints what its --> comments say\n%s"):format(b.file, b.line, r.output))
end

local function in_source(cmd, env)
  return H.sh("bash -c " .. H.shquote("cd " .. H.shquote(H.source_dir) .. " && " .. cmd), { env = env })
end

local function run_block(b)
  local url = fresh_database()
  local dir = H.tmpdir()
  local where = ("%s:%d"):format(b.file, b.line)
  local env = { DATABASE_URL = url, PATH = H.binary_dir .. ":" .. os.getenv("PATH") }
  if b.lang == "lua" and b.text:match("^%s*return%s*{") then
    local path = dir .. "/projection.lua"
    H.write_file(path, b.text)
    local proj = pup.load_projection(path)
    -- one event in its scope, which it must handle
    local db = assert(pup.connect(url))
    local pos = assert(pup.store():append(db, pup.any(), { {
      aggregate_type = (proj.aggregate_types or {})[1] or "Doc", aggregate_id = "doc-1",
      event_type = (proj.event_types or {})[1] or "DocEvent", payload = {} } })).global_positions[1]
    local r = in_source(H.shquote(H.bin) .. " run --once " .. H.shquote(path), env)
    assert.equal(0, r.code, where .. "\n" .. r.output)
    local rows = assert(db:query("SELECT max(last_global_position) AS p FROM projection_checkpoints"
      .. " WHERE projection_name = $1", proj.name))
    db:close()
    assert.equal(pos, rows[1].p, where .. ": the projection handled the event and moved its checkpoint")
  elseif b.lang == "lua" then
    local path = dir .. "/block.lua"
    H.write_file(path, b.text)
    local r = in_source(H.shquote(H.bin) .. " " .. H.shquote(path), env)
    assert.equal(0, r.code, where .. "\n" .. r.output)
    assert.equal("", r.stderr, where)
    check_output(b, r)
  elseif b.lang == "sh" or b.lang == "bash" then
    local path = dir .. "/block.sh"
    H.write_file(path, b.text)
    local r = in_source("bash -euo pipefail " .. H.shquote(path), env)
    assert.equal(0, r.code, where .. "\n" .. r.output)
    check_output(b, r)
  elseif b.lang == "sql" then
    local db = assert(pup.connect(url))
    local ok, err = db:exec(b.text)
    db:close()
    assert.is_truthy(ok, where .. ": " .. tostring(err))
  end
  H.rmdir(dir)
end

describe("docs code blocks", function()
  teardown(function()
    local db = H.connect()
    db:exec("DROP DATABASE IF EXISTS spec_docs WITH (FORCE)")
    db:close()
  end)

  it("each is run here, run by a named spec, or marked as not run", function()
    local bad = {}
    for _, b in ipairs(ALL) do
      local why = problem(b)
      if why then bad[#bad + 1] = ("%s:%d: %s"):format(b.file, b.line, why) end
    end
    assert.is_true(#ALL > 10, "found the blocks")
    assert.same({}, bad)
  end)

  for _, b in ipairs(ALL) do
    if runs_here(b) then
      it(("%s:%d (%s) runs as written"):format(b.file, b.line, b.lang), function() run_block(b) end)
    end
  end
end)
