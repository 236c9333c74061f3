-- pupsourcing: event sourcing on PostgreSQL. The C core (pupsourcing.core) does the
-- database work (db:transaction included); this file adds what is simplest in Lua:
-- projection files, flags, status and reset. Reference: docs/lua-api.md.
local core = require "pupsourcing.core"

-- store:load, store:handle, pup.upcast (lua/pupsourcing/aggregate.lua).
local aggregate = require "pupsourcing.aggregate"
aggregate.install()

local M = {}
for k, v in pairs(core) do
  if k:sub(1, 1) ~= "_" then M[k] = v end
end
M.version = "0.1.0"
M.upcast = aggregate.upcast
M.remove_upcaster = aggregate.remove_upcaster

local error_mt = core.error_mt

-- An error object like the ones the core returns, for errors raised in Lua code.
local function new_error(code, message, sqlstate)
  return setmetatable({ code = code, message = message, sqlstate = sqlstate }, error_mt)
end
M.new_error = new_error

M.limits = core.limits
-- Projection names go into checkpoint rows, lock keys and log lines: at most this many
-- bytes of UTF-8 without control characters.
M.limits.name_bytes = 200

-- Why a projection name is not usable, or nil.
local function name_problem(v)
  if type(v) ~= "string" or v == "" then return "missing `name` (a non-empty string)" end
  if #v > M.limits.name_bytes then
    return ("`name` must be at most %d bytes, got %d"):format(M.limits.name_bytes, #v)
  end
  if not utf8.len(v) then return "`name` must be valid UTF-8" end
  local at = v:find("%c")
  if at then return ("`name` must not contain control characters (byte 0x%02x at %d)"):format(v:byte(at), at) end
end

-- Why scope field f (aggregate_types, event_types) is not a list of usable strings, or nil.
local function scope_problem(v, f)
  if type(v) ~= "table" then return ("`%s` must be a list of strings"):format(f) end
  if next(v) ~= nil and #v == 0 then return ("`%s` must be a list of strings"):format(f) end
  for i = 1, #v do
    local s = v[i]
    if type(s) ~= "string" then return ("`%s` must be a list of strings"):format(f) end
    if s == "" then return ("`%s`[%d] must not be empty"):format(f, i) end
    if not utf8.len(s) then return ("`%s`[%d] must be valid UTF-8"):format(f, i) end
    if s:find("\0", 1, true) then return ("`%s`[%d] must not contain a NUL byte"):format(f, i) end
  end
end

-- Checks a projection table; raises "<where>: <what is wrong>".
function M.check_projection(p, where)
  where = where or "projection"
  if type(p) ~= "table" then
    error(("%s: must return a table, got %s"):format(where, type(p)), 0)
  end
  local bad = name_problem(p.name)
  if bad then error(("%s: %s"):format(where, bad), 0) end
  if p.handle ~= nil and p.handle_batch ~= nil then
    error(("%s: projection %q: has both `handle` and `handle_batch`: give one (handle_batch(tx, events) gets"
      .. " a batch's events at once)"):format(where, p.name), 0)
  end
  if p.handle_batch ~= nil then
    if type(p.handle_batch) ~= "function" then
      error(("%s: projection %q: `handle_batch` must be a function, got %s")
        :format(where, p.name, type(p.handle_batch)), 0)
    end
  elseif type(p.handle) ~= "function" then
    error(("%s: projection %q: `handle` must be a function, got %s"):format(where, p.name, type(p.handle)), 0)
  end
  for _, f in ipairs { "setup", "reset" } do
    if p[f] ~= nil and type(p[f]) ~= "function" then
      error(("%s: projection %q: `%s` must be a function"):format(where, p.name, f), 0)
    end
  end
  for _, f in ipairs { "aggregate_types", "event_types" } do
    bad = p[f] ~= nil and scope_problem(p[f], f)
    if bad then error(("%s: projection %q: %s"):format(where, p.name, bad), 0) end
  end
  if p.batch_size ~= nil and (math.type(p.batch_size) ~= "integer" or p.batch_size < 1) then
    error(("%s: projection %q: `batch_size` must be a positive integer"):format(where, p.name), 0)
  end
  if p.batch_size ~= nil and p.batch_size > M.limits.batch_size then
    error(("%s: projection %q: `batch_size` must be at most %d"):format(where, p.name, M.limits.batch_size), 0)
  end
  return p
end

-- Loads a projection file and checks it; raises an error naming the file.
function M.load_projection(path)
  assert(type(path) == "string", "bad argument #1 to 'load_projection' (string expected)")
  local chunk, err = loadfile(path)
  if not chunk then error(err, 0) end
  local ok, p = pcall(chunk)
  if not ok then error(("%s: %s"):format(path, tostring(p)), 0) end
  return M.check_projection(p, path)
end

-- Parses --k=v, --k v and --flag (true) into a table; other words go to the array part.
-- opts.first: the first index of argv to read (1); opts.booleans: the set of flags that take
-- no value; with it, any other flag without a value is an error (returns nil, message).
function M.args(argv, opts)
  opts = opts or {}
  local out, i, bools = {}, opts.first or 1, opts.booleans
  argv = argv or {}
  while i <= #argv do
    local a = argv[i]
    local k, v = a:match("^%-%-([^=]+)=(.*)$")
    if k then
      out[k] = v
    elseif a:match("^%-%-.") then
      k = a:sub(3)
      local nxt = argv[i + 1]
      if bools and bools[k] then
        out[k] = true
      elseif nxt ~= nil and not nxt:match("^%-%-") then
        out[k] = nxt
        i = i + 1
      elseif bools then
        return nil, ("flag --%s needs a value"):format(k)
      else
        out[k] = true
      end
    else
      out[#out + 1] = a
    end
    i = i + 1
  end
  return out
end

-- Checkpoints of every projection partition with the head and lag (the store's SQL).
function M.status(db, store)
  store = store or M.store()
  return db:query(store:names().sql.status)
end

-- Deletes a projection's checkpoints and runs its reset(tx), in one transaction.
function M.reset(db, projection, store)
  store = store or M.store()
  M.check_projection(projection)
  local sql = store:names().sql.reset
  return db:transaction(function(tx)
    local deleted = assert(tx:exec(sql, projection.name))
    if projection.reset then projection.reset(tx) end
    return deleted
  end)
end

-- Sets a worker group's partition count (`pupsourcing repartition`): returns the count
-- before (0 for a new group, the same count when unchanged), or nil, err while an earlier
-- repartition still settles.
function M.repartition(db, projection, count, store)
  store = store or M.store()
  M.check_projection(projection)
  return core._repartition(db, store, projection.name, count)
end

return M
