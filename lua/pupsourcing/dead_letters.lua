-- pupsourcing.dead_letters (pup.dead_letters): the events a projection gave up on under
-- on_error = "skip" or "retry" (docs/operations.md, "Poison events"): list them, run the
-- (fixed) handler on them again, or discard them. `pupsourcing dead-letters` wraps these.
local M = {}

local function pup() return require "pupsourcing" end -- loaded by then (it requires this file)

local COLUMNS = "projection_name AS projection, global_position, partition_key, total_partitions,"
  .. " event_id::text AS event_id, event_type, aggregate_type, aggregate_id, aggregate_version, error, attempts,"
  .. " to_char(first_failed_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.MSOF') AS first_failed_at,"
  .. " to_char(last_failed_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.MSOF') AS last_failed_at"

-- Checks (db, projection, opts) and returns the projection's name, the store, the dead
-- letters table (quoted) and the position asked for (nil: all).
local function args(fname, db, projection, opts)
  local P = pup()
  if db == nil then error(("bad argument #1 to '%s' (db expected)"):format(fname), 3) end
  P.check_projection(projection)
  opts = opts or {}
  if type(opts) ~= "table" then error(("bad argument #3 to '%s' (table expected)"):format(fname), 3) end
  for k in pairs(opts) do
    if k ~= "position" and k ~= "store" then
      error(("pup.dead_letters.%s: unknown option %s"):format(fname, tostring(k)), 3)
    end
  end
  local pos = opts.position
  if pos ~= nil and (math.type(pos) ~= "integer" or pos < 1) then
    error(("pup.dead_letters.%s: position must be a positive integer"):format(fname), 3)
  end
  local store = opts.store or P.store()
  return projection.name, store, store:names().dead_letters_quoted, pos
end

-- The parameters of a statement over one projection's dead letters, or one of them.
local function params(name, pos)
  if pos then return name, pos end
  return name
end

local function select_sql(dl, pos)
  return ("SELECT %s FROM %s WHERE projection_name = $1%s ORDER BY global_position"):format(
    COLUMNS, dl, pos and " AND global_position = $2" or "")
end

-- list(db, projection, {position=, store=}) -> rows in position order | nil, err
function M.list(db, projection, opts)
  local name, _, dl, pos = args("list", db, projection, opts)
  return db:query(select_sql(dl, pos), params(name, pos))
end

-- discard(db, projection, {position=, store=}) -> the number deleted | nil, err
function M.discard(db, projection, opts)
  local name, _, dl, pos = args("discard", db, projection, opts)
  return db:exec(("DELETE FROM %s WHERE projection_name = $1%s"):format(dl, pos and " AND global_position = $2" or ""),
    params(name, pos))
end

-- The event a dead letter names, read by its aggregate stream (gap rules do not apply:
-- it is below the checkpoint that moved past it).
local function event_of(tx, store, d)
  local evs, err = store:read_aggregate_stream(tx, d.aggregate_type, d.aggregate_id,
    { from_version = d.aggregate_version, to_version = d.aggregate_version })
  if not evs then return nil, err end
  local ev = evs[1]
  if not ev or ev.global_position ~= d.global_position then
    return nil, pup().new_error("database", ("the event at global position %d (%s %s version %d) is not in the log")
      :format(d.global_position, d.aggregate_type, d.aggregate_id, d.aggregate_version))
  end
  return ev
end

-- retry(db, projection, {position=, store=}) -> the number retried
--   | nil, err, the number retried before the one that failed
-- Runs projection.handle on each dead letter in position order, each in its own
-- transaction that also deletes the dead letter: a retry killed half-way applies the
-- event entirely or not at all. The first failure stops it; that dead letter keeps the
-- new error (attempts + 1). A dead letter gone meanwhile (a concurrent retry or discard)
-- is passed over.
function M.retry(db, projection, opts)
  local name, store, dl, pos = args("retry", db, projection, opts)
  local rows, err = db:query(select_sql(dl, pos), params(name, pos))
  if not rows then return nil, err, 0 end
  local lock = ("SELECT 1 AS ok FROM %s WHERE projection_name = $1 AND global_position = $2 FOR UPDATE"):format(dl)
  local delete = ("DELETE FROM %s WHERE projection_name = $1 AND global_position = $2"):format(dl)
  local done = 0
  for _, d in ipairs(rows) do
    local failure -- the handler's error with its traceback
    local ok, terr = db:transaction(function(tx)
      local held = assert(tx:query(lock, name, d.global_position))
      if #held == 0 then return "gone" end
      local ev = assert(event_of(tx, store, d))
      local called, res, herr = xpcall(projection.handle, debug.traceback, tx, ev)
      if called and res == nil and herr ~= nil then called, res = false, tostring(herr) end
      if not called then
        failure = tostring(res)
        return nil, pup().new_error("handler", failure)
      end
      assert(tx:exec(delete, name, d.global_position))
      return "retried"
    end)
    if not ok then
      local msg = ("projection %s: dead letter at global position %d (event_type %s, event_id %s): %s"):format(
        name, d.global_position, d.event_type, d.event_id, failure or tostring(terr))
      if failure then
        db:exec(("UPDATE %s SET error = $3, attempts = attempts + 1, last_failed_at = now()"
          .. " WHERE projection_name = $1 AND global_position = $2"):format(dl), name, d.global_position, failure)
      end
      local e = pup().new_error(failure and "handler" or (terr and terr.code) or "database", msg,
        terr and terr.sqlstate)
      return nil, e, done
    end
    if ok == "retried" then done = done + 1 end
  end
  return done
end

return M
