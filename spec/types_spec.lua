-- Issue 16: the LuaLS annotations (lua/pupsourcing/types.lua) cover the public Lua API:
-- every function and field the module and its objects export is annotated, and nothing is
-- annotated that the module does not export (compared with the real objects, not a list).
local pup = require "pupsourcing"
local testing = require "pupsourcing.testing"
local H = require "spec.helpers"

local META = H.source_dir .. "/lua/pupsourcing/types.lua"

-- The annotations: functions[class][name] = true for `function Class.name(` / `Class:name(`,
-- fields[class][name] = true for `---@field name` under `---@class pupsourcing.X` (class X;
-- `pupsourcing` itself is class "pup", `pupsourcing.testing` class "testing").
local function parse(text)
  local functions, fields, cur = {}, {}, nil
  for line in text:gmatch("[^\n]*") do
    local class = line:match("^%-%-%-@class ([%w%._]+)")
    if class then
      cur = class == "pupsourcing" and "pup" or class == "pupsourcing.testing" and "testing"
        or class:match("([%w_]+)$")
      fields[cur] = fields[cur] or {}
    end
    local f = cur and line:match("^%-%-%-@field ([%w_]+)")
    if f then fields[cur][f] = true end
    local owner, name = line:match("^function ([%w_]+)[%.:]([%w_]+)%(")
    if owner then
      functions[owner] = functions[owner] or {}
      functions[owner][name] = true
    end
  end
  return functions, fields
end

local functions, fields = parse(H.read_file(META))

local function public(t)
  local out = {}
  for k, v in pairs(t) do
    if type(k) == "string" and k:sub(1, 1) ~= "_" then out[k] = type(v) end
  end
  return out
end

-- The exported names of `t` against the annotations of class `class`: functions as
-- functions, anything else as fields, both ways.
local function same(class, t)
  local want_f, want_v = {}, {}
  for k, ty in pairs(public(t)) do
    if ty == "function" then want_f[k] = true else want_v[k] = true end
  end
  assert.same(H.sorted(want_f), H.sorted(functions[class] or {}), class .. ": annotated functions")
  assert.same(H.sorted(want_v), H.sorted(fields[class] or {}), class .. ": annotated fields")
end

local function methods(obj)
  local idx = getmetatable(obj).__index
  assert.is_table(idx)
  return idx
end

describe("LuaLS annotations (types.lua)", function()
  it("is a ---@meta file that loads and is installed with the module", function()
    local text = H.read_file(META)
    assert.is_truthy(text:find("^%-%-%-@meta pupsourcing\n"), "first line")
    assert.is_table(dofile(META)) -- valid Lua (luacheck lints it as well)
    local cm = H.read_file(H.source_dir .. "/CMakeLists.txt")
    assert.is_truthy(cm:find("install(DIRECTORY lua/ DESTINATION", 1, true), "lua/ is installed whole")
  end)

  it("covers the module: pup.*, pup.json, pup.limits", function()
    same("pup", pup)
    same("JSON", pup.json)
    same("DeadLetters", pup.dead_letters)
    assert.same(H.sorted(public(pup.limits)), H.sorted(fields.Limits))
  end)

  it("covers store, db, tx, processor and runner methods", function()
    local store = pup.store()
    same("Store", methods(store))
    local db = H.connect()
    same("DB", methods(db))
    local tx = assert(db:begin())
    same("Tx", methods(tx))
    assert(tx:rollback())
    local p = pup.processor(db, { name = "types_spec", handle = function() end })
    same("Processor", methods(p))
    p:close()
    local r = pup.runner { files = { H.source_dir .. "/spec/fixtures/run_counter.lua" }, once = true }
    same("Runner", methods(r))
    r:close()
    db:close()
  end)

  it("covers errors, events and processor stats", function()
    local db = H.connect()
    local _, err = db:query("SELECT 1/0")
    for k in pairs(err) do assert.is_true(fields.Error[k], "Error." .. k) end
    local store = H.fresh_store("types", db)
    assert(store:append(db, pup.any(), { H.event { metadata = { m = 1 }, causation_id = "c",
      correlation_id = "r", trace_id = "t" } }))
    local ev = assert(store:read_events(db, 0, { limit = 1 }))[1]
    for k in pairs(ev) do assert.is_true(fields.Event[k], "Event." .. k) end
    assert.is_true(fields.Event.data)
    local p = pup.processor(db, { name = "types_spec", handle = function() end }, { store = store })
    for k in pairs(p:stats()) do assert.is_true(fields.ProcessorStats[k], "ProcessorStats." .. k) end
    p:close()
    db:close()
  end)

  it("covers pupsourcing.testing", function()
    same("testing", testing)
    local spec = testing.decider { initial = function() return {} end, evolve = function(s) return s end }
    same("Spec", methods(spec))
    same("Case", testing.Case)
  end)
end)
