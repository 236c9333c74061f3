-- pup.subscribe(db, opts, fn): application code following the log, gap-safe, at least
-- once from the caller's position (docs/lua-api.md#subscriptions). Built on
-- store:read_events (the processor's gap rule) and store:wait (LISTEN, a wake-up only).
local core = require "pupsourcing.core"

local M = {}

local KNOWN = {
  from = true, store = true, aggregate_types = true, event_types = true, batch_size = true,
  poll_interval = true, idle_timeout = true,
}

local function seconds(opts, k, default)
  local v = opts[k]
  if v == nil then return default end
  if type(v) ~= "number" or not (v > 0 and v <= core.limits.seconds) then
    error(("pup.subscribe: %s must be a number of seconds above 0 and at most %d"):format(k, core.limits.seconds), 3)
  end
  return v
end

-- The loop; returns cursor, reason | nil, err, cursor.
local function follow(db, store, opts, fn)
  local read_opts = {
    limit = opts.batch_size or 100, aggregate_types = opts.aggregate_types, event_types = opts.event_types,
  }
  local poll = seconds(opts, "poll_interval", 1)
  local idle = seconds(opts, "idle_timeout", nil)
  local cursor, last_event, hole_wait = opts.from, core.now(), 0.002
  local look = core._drawn_look() -- at positions drawn above what was read (in flight)
  while true do
    local events, next_cursor = store:read_events(db, cursor, read_opts)
    if not events then return nil, next_cursor, cursor end
    for _, ev in ipairs(events) do
      if fn(ev) == false then return core._cursor_at(next_cursor, ev.global_position), "stopped" end
    end
    cursor = next_cursor
    local now = core.now()
    if #events > 0 then
      last_event, hole_wait = now, 0.002
      look:restart() -- news: look again at what is in flight
    elseif idle and now - last_event >= idle then
      return cursor, "idle"
    elseif cursor.waiting then
      -- a rollback does not notify: look again soon (2 ms doubling to 50 ms, as processors)
      core.sleep(hole_wait)
      hole_wait = math.min(hole_wait * 2, 0.05)
    else
      -- An append in flight above what was read may have left its wake-up to another's,
      -- already sent: look again soon, as processors do (docs/ordering.md, "Wake-ups").
      local wait = look:wait(cursor.in_flight, poll)
      if idle then wait = math.min(wait, idle - (now - last_event)) end
      local ok, err = store:wait(db, math.min(wait, poll))
      if ok == nil then return nil, err, cursor end
      if ok then look:restart() end
    end
  end
end

function M.subscribe(db, opts, fn)
  if type(opts) ~= "table" then error("pup.subscribe: opts must be a table {from=, ...}", 2) end
  for k in pairs(opts) do
    if not KNOWN[k] then error(("pup.subscribe: unknown option %s"):format(tostring(k)), 2) end
  end
  if type(fn) ~= "function" then error("pup.subscribe: fn must be a function", 2) end
  if opts.from == nil then
    error("pup.subscribe: opts.from is required: a position (0 = the start of the log) or a cursor", 2)
  end
  if type(db) ~= "userdata" or type(db.begin) ~= "function" then
    error("pup.subscribe: db must be a connection (pup.connect()), not a transaction: it waits between reads", 2)
  end
  local store = opts.store or core.store()
  local ok, a, b, c = pcall(follow, db, store, opts, fn)
  -- store:wait made the db listen; stop, so notifications do not pile up in it (best effort:
  -- the connection may be the failure).
  pcall(db.exec, db, ('UNLISTEN "%s"'):format(store:names().channel))
  if not ok then error(a, 0) end
  return a, b, c
end

return M
