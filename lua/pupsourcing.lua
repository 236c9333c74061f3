-- pupsourcing: event sourcing on PostgreSQL. The C core (pupsourcing.core) does the
-- database work (db:transaction included); this file adds what is simplest in Lua:
-- projection files, script flags, status and reset. Reference: docs/lua-api.md.
local core = require "pupsourcing.core"

-- store:load, store:handle, pup.upcast (lua/pupsourcing/aggregate.lua).
local aggregate = require "pupsourcing.aggregate"
aggregate.install()

local M = {}
for k, v in pairs(core) do
  if k:sub(1, 1) ~= "_" then M[k] = v end
end
M.version = "0.1.0"
M.subscribe = require("pupsourcing.subscribe").subscribe
M.upcast = aggregate.upcast
M.dead_letters = require "pupsourcing.dead_letters"
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

-- The fields a projection table may have: any other raises (a misspelt `on_eror` would
-- otherwise leave the default policy in force without a word).
M.projection_fields = {
  name = true, handle = true, setup = true, reset = true, aggregate_types = true, event_types = true,
  batch_size = true, on_error = true, max_attempts = true, retry_backoff = true, kind = true,
  handle_batch = true,
}

-- Why the poison policy fields (on_error, max_attempts, retry_backoff) are wrong, or nil.
local function policy_problem(p)
  local policy = p.on_error
  if policy ~= nil and policy ~= "stop" and policy ~= "skip" and policy ~= "retry" then
    return ('`on_error` must be "stop", "skip" or "retry", got %s'):format(
      type(policy) == "string" and ("%q"):format(policy) or type(policy))
  end
  if policy ~= "retry" then
    for _, f in ipairs { "max_attempts", "retry_backoff" } do
      if p[f] ~= nil then return ('`%s` goes with on_error = "retry"'):format(f) end
    end
    return nil
  end
  local n = p.max_attempts
  if n ~= nil and (math.type(n) ~= "integer" or n < 1 or n > 1000) then
    return "`max_attempts` must be an integer from 1 to 1000"
  end
  local b = p.retry_backoff
  if b ~= nil and (type(b) ~= "number" or not (b > 0 and b <= M.limits.seconds)) then
    return ("`retry_backoff` must be a number of seconds above 0 and at most %d"):format(M.limits.seconds)
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
  -- kind: "projection" (the default: handle(tx, event) in the batch transaction) or
  -- "reactor" (handle(event): side effects, no transaction).
  local kind = p.kind
  if kind ~= nil and kind ~= "projection" and kind ~= "reactor" then
    error(("%s: projection %q: unknown `kind` %s (\"projection\" or \"reactor\")")
      :format(where, p.name, type(kind) == "string" and ("%q"):format(kind) or tostring(kind)), 0)
  end
  if kind == "reactor" and p.handle_batch ~= nil then
    error(("%s: reactor %q: takes handle(event), not handle_batch: a reactor gets no transaction")
      :format(where, p.name), 0)
  end
  if kind == "reactor" then
    local info = debug.getinfo(p.handle, "u")
    if info.nparams > 1 then
      error(("%s: reactor %q: `handle` takes (event) alone: a reactor gets no transaction (declared with %d parameters)")
        :format(where, p.name, info.nparams), 0)
    end
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
  bad = policy_problem(p)
  if bad then error(("%s: projection %q: %s"):format(where, p.name, bad), 0) end
  for k in pairs(p) do
    if not M.projection_fields[k] then
      local known = {}
      for f in pairs(M.projection_fields) do known[#known + 1] = f end
      table.sort(known)
      error(("%s: projection %q: unknown field %s (known: %s)"):format(where, p.name,
        type(k) == "string" and "`" .. k .. "`" or tostring(k), table.concat(known, ", ")), 0)
    end
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
-- For scripts and examples; the binary's commands use lua-argparse (pupsourcing.cli).
function M.args(argv)
  local out, i = {}, 1
  argv = argv or {}
  while i <= #argv do
    local a = argv[i]
    local k, v = a:match("^%-%-([^=]+)=(.*)$")
    if k then
      out[k] = v
    elseif a:match("^%-%-.") then
      local nxt = argv[i + 1]
      if nxt ~= nil and not nxt:match("^%-%-") then
        out[a:sub(3)] = nxt
        i = i + 1
      else
        out[a:sub(3)] = true
      end
    else
      out[#out + 1] = a
    end
    i = i + 1
  end
  return out
end

-- A store statement run from Lua that failed on a missing table: its tables are the
-- store's, so the store is not migrated (what pup_store_error says for the C side's).
local function store_result(res, err)
  if res == nil and err and err.code == "database" and err.sqlstate == "42P01" then
    err.code = "not_migrated"
    err.message = err.message .. " (run `pupsourcing migrate` to create the tables)"
  end
  return res, err
end

-- Checkpoints of every projection partition with the head and lag (the store's SQL),
-- and for poison events: `failed_since`, `error` (and `failed_position`) on a partition a
-- handler failure stopped, `dead_letters` (the count of its events given up on).
function M.status(db, store)
  store = store or M.store()
  local n = store:names()
  local rows, err = store_result(db:query(n.sql.status))
  if not rows then return nil, err end
  -- A store not migrated since these tables came has neither: nothing to add.
  local have = db:query("SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL AS ok",
    n.dead_letters_quoted, n.failures_quoted)
  if not (have and have[1].ok) then return rows end
  local function key(r) return r.projection .. "\0" .. r.total_partitions .. "\0" .. r.partition_key end
  local by = {}
  for _, r in ipairs(rows) do
    r.dead_letters = 0
    by[key(r)] = r
  end
  local extra, qerr = db:query(("SELECT 'f' AS kind, projection_name AS projection, total_partitions, partition_key,"
    .. " global_position, error, to_char(failed_since, 'YYYY-MM-DD\"T\"HH24:MI:SS.MSOF') AS since, 0::bigint AS n"
    .. " FROM %s UNION ALL SELECT 'd', projection_name, total_partitions, partition_key, NULL, NULL, NULL, count(*)"
    .. " FROM %s GROUP BY projection_name, total_partitions, partition_key"):format(n.failures_quoted,
      n.dead_letters_quoted))
  if not extra then return nil, qerr end
  for _, x in ipairs(extra) do
    local r = by[key(x)]
    if r and x.kind == "f" then
      r.failed_since, r.error, r.failed_position = x.since, x.error, x.global_position
    elseif r then
      r.dead_letters = x.n
    end
  end
  return rows
end

-- The warning `status` and `run` print when the events table's global_position does
-- not default to the xid-first function (the Go library's BIGSERIAL, a hand-made table):
-- the ordering rule of docs/ordering.md is then not in force. nil when it is, or when
-- the table does not exist (yet); nil, err when the catalog cannot be read.
function M.position_warning(db, store)
  store = store or M.store()
  local rows, err = db:query(store:names().sql.position_default)
  if not rows then return nil, err end
  local r = rows[1]
  if not r.exists or r.xid_first then return nil end
  return ("warning: %s.global_position does not default to %s: appends that leave it to the default"
    .. " may commit out of order unseen, so projections can skip events (docs/ordering.md);"
    .. " run `pupsourcing migrate --upgrade` (docs/go.md)"):format(store:names().events_quoted, r["function"])
end

-- Every projection's live layout from the registry (<checkpoints>_groups): name, mode
-- ("static" or "group"), total_partitions, previous_mode/previous_total while a change
-- settles (else pup.null), generation (reset count).
function M.layouts(db, store)
  store = store or M.store()
  return db:query(("SELECT projection_name AS projection, mode, total_partitions, previous_mode, previous_total,"
    .. " generation FROM %s ORDER BY projection_name"):format(store:names().groups_quoted))
end

-- Starts a new generation of a projection: waits for its running batches and holds off
-- new ones (they share the generation lock), deletes its checkpoints and runs its
-- reset(tx), in one transaction. A processor of the old generation can no longer write a
-- checkpoint: it logs that it starts over and does (docs/operations.md).
function M.reset(db, projection, store)
  store = store or M.store()
  M.check_projection(projection)
  local n = store:names()
  return db:transaction(function(tx)
    assert(tx:exec("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
      "pupsourcing.generation/" .. n.checkpoints_table .. "/" .. projection.name))
    assert(tx:exec(("UPDATE %s SET generation = generation + 1, previous_total = NULL, previous_mode = NULL,"
      .. " changed_at = now() WHERE projection_name = $1"):format(n.groups_quoted), projection.name))
    local deleted = assert(store_result(tx:exec(n.sql.reset, projection.name)))
    -- a rebuilt read model starts clean: no failed partition, no dead letter
    for _, t in ipairs { n.failures_quoted, n.dead_letters_quoted } do
      if assert(tx:query("SELECT to_regclass($1) IS NOT NULL AS ok", t))[1].ok then
        assert(tx:exec(("DELETE FROM %s WHERE projection_name = $1"):format(t), projection.name))
      end
    end
    if projection.reset then projection.reset(tx) end
    assert(tx:exec("SELECT pg_notify($1, '')", n.channel)) -- idle processors notice at once
    return deleted
  end)
end

-- Reset + catch-up: resets the projection, then runs it (one processor, partition 0 of
-- 1) until it reaches the head seen at start. opts: store, batch_size. Returns the events
-- handled, or nil, err (layout_conflict while processors of another layout run: the
-- reset is done and they start over themselves).
function M.rebuild(db, projection, opts)
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "store" and k ~= "batch_size" then error(("pup.rebuild: unknown option %q"):format(tostring(k)), 2) end
  end
  local store = opts.store or M.store()
  local _, err = M.reset(db, projection, store)
  if err then return nil, err end
  local p <close> = M.processor(db, projection, { store = store, batch_size = opts.batch_size })
  return p:run { once = true }
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
