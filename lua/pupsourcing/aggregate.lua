-- pupsourcing.aggregate: the application half over the store: store:load (fold an
-- aggregate's stream, from its snapshot when there is one), store:handle (load, decide,
-- append with exact(version), retry on conflicts, write snapshots), store:inline
-- (projections run inside every append of the store) and pup.upcast
-- (payloads of old event versions turned into the current shape on every read of this Lua
-- state). lua/pupsourcing.lua wires them in. Reference: docs/lua-api.md "Aggregates and
-- commands".
local core = require "pupsourcing.core"

local json = core.json
local registry = debug.getregistry()
local error_mt = registry["pupsourcing.error"]
local event_mt = registry["pupsourcing.event"]
local tx_mt = registry["pupsourcing.tx"]
local store_methods = registry["pupsourcing.store"].__index

local M = {}

local function new_error(code, message)
  return setmetatable({ code = code, message = message }, error_mt)
end

-- ---- upcasters --------------------------------------------------------------------

-- {[event_type] = {[event_version] = fn}} of this Lua state. The C side (every event it
-- builds: reads, snapshot loads, projection handlers) calls registry[UPCAST_KEY], which
-- is set only while some upcaster is registered.
local UPCAST_KEY = "pupsourcing.upcast"
local upcasters = {}
local nupcasters = 0
M.MAX_UPCAST_STEPS = 100

-- Upcasts a persisted event in place: data, event_type and event_version become the
-- current ones; stored_event_type and stored_event_version keep what was stored; payload
-- stays the stored bytes.
local function apply_upcasters(ev)
  local by = upcasters[ev.event_type]
  local fn = by and by[ev.event_version]
  if not fn then return ev end
  local stored_type, stored_version = ev.event_type, ev.event_version
  for _ = 1, M.MAX_UPCAST_STEPS do
    local from_type, from_version = ev.event_type, ev.event_version
    local data, t, v = fn(ev.data, ev)
    if type(data) ~= "table" then
      error(("upcaster of %s version %d (event at position %s) returned %s, not the payload table")
        :format(from_type, from_version, tostring(ev.global_position), type(data)), 0)
    end
    t = t == nil and from_type or t
    v = v == nil and from_version + 1 or v
    if type(t) ~= "string" or t == "" or math.type(v) ~= "integer" or v < 1 then
      error(("upcaster of %s version %d returned a bad event type or version (%s, %s)")
        :format(from_type, from_version, tostring(t), tostring(v)), 0)
    end
    rawset(ev, "data", data)
    ev.event_type, ev.event_version = t, v
    by = upcasters[t]
    fn = by and by[v]
    if not fn then
      ev.stored_event_type, ev.stored_event_version = stored_type, stored_version
      return ev
    end
  end
  error(("upcasters of %s version %d: more than %d steps (a cycle?)")
    :format(stored_type, stored_version, M.MAX_UPCAST_STEPS), 0)
end

local function check_key(fname, event_type, event_version)
  if type(event_type) ~= "string" or event_type == "" then
    error(("bad argument #1 to '%s' (event_type must be a non-empty string)"):format(fname), 3)
  end
  if math.type(event_version) ~= "integer" or event_version < 1 or event_version > 2147483647 then
    error(("bad argument #2 to '%s' (event_version must be a positive integer)"):format(fname), 3)
  end
end

-- pup.upcast(event_type, event_version, fn): fn(data, event) -> data[, event_type[,
-- event_version]] for stored events of (event_type, event_version), in this Lua state.
-- Raises on misuse and on a second registration.
function M.upcast(event_type, event_version, fn)
  check_key("upcast", event_type, event_version)
  if type(fn) ~= "function" then error("bad argument #3 to 'upcast' (function expected)", 2) end
  local by_version = upcasters[event_type]
  if not by_version then by_version = {} upcasters[event_type] = by_version end
  if by_version[event_version] then
    error(("upcast: an upcaster for %s version %d is already registered"):format(event_type, event_version), 2)
  end
  by_version[event_version] = fn
  nupcasters = nupcasters + 1
  registry[UPCAST_KEY] = apply_upcasters
end

-- pup.remove_upcaster(event_type, event_version) -> true if one was registered.
function M.remove_upcaster(event_type, event_version)
  check_key("remove_upcaster", event_type, event_version)
  local by_version = upcasters[event_type]
  if not (by_version and by_version[event_version]) then return false end
  by_version[event_version] = nil
  if next(by_version) == nil then upcasters[event_type] = nil end
  nupcasters = nupcasters - 1
  if nupcasters == 0 then registry[UPCAST_KEY] = nil end
  return true
end

-- Upcasts every event of a list built in Lua (the C side upcasts the events it builds).
function M.upcast_events(events)
  if nupcasters > 0 then
    for i = 1, #events do apply_upcasters(events[i]) end
  end
  return events
end

-- ---- the aggregate definition (options of load and handle) ----------------------------

local KNOWN = { initial = true, evolve = true, snapshot_every = true, snapshot_version = true,
                max_retries = true, retry_delay = true }

-- Checks an aggregate definition; raises naming the bad key. `extra` lists more keys.
function M.check_definition(o, where, extra)
  if type(o) ~= "table" then error(("%s: options must be a table, got %s"):format(where, type(o)), 3) end
  for k in pairs(o) do
    if not KNOWN[k] and not (extra and extra[k]) then
      error(("%s: unknown option %s"):format(where, tostring(k)), 3)
    end
  end
  if type(o.initial) ~= "function" then error(where .. ": `initial` must be a function returning a new state", 3) end
  if type(o.evolve) ~= "function" then error(where .. ": `evolve` must be a function(state, event) -> state", 3) end
  local every = o.snapshot_every
  if every ~= nil and (math.type(every) ~= "integer" or every < 1) then
    error(where .. ": `snapshot_every` must be a positive integer", 3)
  end
  local sv = o.snapshot_version
  if sv ~= nil and (math.type(sv) ~= "integer" or sv < 0 or sv > 2147483647) then
    error(where .. ": `snapshot_version` must be an integer 0..2147483647", 3)
  end
  local mr = o.max_retries
  if mr ~= nil and (math.type(mr) ~= "integer" or mr < 0 or mr > 1000) then
    error(where .. ": `max_retries` must be an integer 0..1000", 3)
  end
  local rd = o.retry_delay
  if rd ~= nil and (type(rd) ~= "number" or rd < 0 or rd > 60 or rd ~= rd) then
    error(where .. ": `retry_delay` must be seconds, 0..60", 3)
  end
end

-- A new state from initial(); raises when it returns nil.
function M.initial_state(o)
  local s = o.initial()
  if s == nil then error("initial() returned nil: it must return the state", 0) end
  return s
end

-- Folds events into state with evolve; raises when evolve returns nil.
function M.fold(o, state, events)
  local evolve = o.evolve
  for i = 1, #events do
    local ev = events[i]
    local s = evolve(state, ev)
    if s == nil then
      error(("evolve returned nil for %s version %d (aggregate version %s): it must return the state")
        :format(tostring(ev.event_type), ev.event_version or 1, tostring(ev.aggregate_version)), 0)
    end
    state = s
  end
  return state
end

-- ---- load -------------------------------------------------------------------------

-- state, version, snapshot_base (the version of the snapshot used, 0 without) | nil, err
local function load(store, db, atype, id, o)
  local events, err, base
  local state
  if o.snapshot_every then
    local snap, sv
    events, snap, sv = store:read_snapshot_stream(db, atype, id, o.snapshot_version or 1)
    if not events then return nil, snap end
    if snap then
      local ok, decoded = pcall(json.decode, snap)
      if ok then
        state, base = decoded, sv
      else
        -- An unreadable snapshot is skipped: the full stream is the truth.
        events, err = store:read_aggregate_stream(db, atype, id)
        if not events then return nil, err end
      end
    end
  else
    events, err = store:read_aggregate_stream(db, atype, id)
    if not events then return nil, err end
  end
  if state == nil then state, base = M.initial_state(o), 0 end
  return M.fold(o, state, events), events.version, base
end

local function check_target(atype, id, where)
  if type(atype) ~= "string" or atype == "" then
    error(("bad argument #2 to '%s' (aggregate type must be a non-empty string)"):format(where), 3)
  end
  if type(id) ~= "string" or id == "" then
    error(("bad argument #3 to '%s' (aggregate id must be a non-empty string)"):format(where), 3)
  end
end

-- store:load(db_or_tx, type, id, definition) -> state, version | nil, err
function M.load(store, db, atype, id, o)
  check_target(atype, id, "load")
  M.check_definition(o, "load")
  local state, version = load(store, db, atype, id, o)
  return state, version
end

-- ---- decide -----------------------------------------------------------------------

-- The error handle returns for a domain rejection: code "rejected", the message of the
-- reason, and the reason itself in err.reason.
function M.rejection(reason)
  local msg
  if type(reason) == "table" and reason.message ~= nil then msg = tostring(reason.message)
  elseif reason == nil then msg = "command rejected"
  else msg = tostring(reason) end
  local err = new_error("rejected", msg)
  err.reason = reason
  return err
end

-- Runs decide(state, version): events (a list, maybe empty) | nil, rejected error.
-- Raises when decide raises or returns something that is not a list of events.
function M.decide(decide, state, version)
  local events, reason = decide(state, version)
  if events == nil then return nil, M.rejection(reason) end
  if type(events) ~= "table" then
    error(("decide must return a list of events or nil, err; got %s"):format(type(events)), 0)
  end
  return events
end

local EVENT_FIELDS = { "event_type", "event_version", "event_id", "causation_id", "correlation_id",
                       "trace_id", "created_at" }

-- The append list and, for each event, the persisted-like event evolve will see. The
-- payload is encoded here once, so evolve decodes the same bytes a later load reads.
-- Returns appended, seen | nil, err (invalid_event).
function M.prepare(events, atype, id, version)
  local out, seen = {}, {}
  for i = 1, #events do
    local ev = events[i]
    if type(ev) ~= "table" then
      return nil, new_error("invalid_event", ("event %d: must be a table, got %s"):format(i, type(ev)))
    end
    for _, f in ipairs { "aggregate_type", "aggregate_id" } do
      local want = f == "aggregate_type" and atype or id
      if ev[f] ~= nil and ev[f] ~= want then
        return nil, new_error("invalid_event",
          ("event %d: %s %s is not the command's aggregate %s"):format(i, f, tostring(ev[f]), want))
      end
    end
    local a = { aggregate_type = atype, aggregate_id = id }
    for _, f in ipairs(EVENT_FIELDS) do a[f] = ev[f] end
    a.event_id = a.event_id or core.uuid()
    for _, f in ipairs { "payload", "metadata" } do
      local v = ev[f]
      if type(v) == "table" then
        local ok, text = pcall(json.encode, v)
        if not ok then
          return nil, new_error("invalid_event", ("event %d: %s cannot be written as JSON: %s")
            :format(i, f, tostring(text):gsub("^pup%.json%.encode: ", "")))
        end
        v = text
      end
      a[f] = v
    end
    out[i] = a
    seen[i] = setmetatable({
      global_position = 0, aggregate_type = atype, aggregate_id = id, aggregate_version = version + i,
      event_id = a.event_id, event_type = a.event_type, event_version = a.event_version or 1,
      payload = a.payload, metadata = a.metadata, causation_id = a.causation_id,
      correlation_id = a.correlation_id, trace_id = a.trace_id, created_at = a.created_at,
    }, event_mt)
  end
  return out, seen
end

-- ---- snapshots --------------------------------------------------------------------

-- True when a and b hold the same values (metatables aside, integers apart from floats).
local function same(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) ~= "table" then return a == b and math.type(a) == math.type(b) end
  for k, v in pairs(a) do
    if not same(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end
M.same = same

-- Writes the snapshot (in a transaction or savepoint of its own, so a failure never
-- touches the command's writes). Returns true | false (a newer one kept) | nil, err.
local function write_snapshot(store, db, atype, id, version, o, state)
  local ok, text = pcall(json.encode, state)
  if not ok then
    return nil, new_error("invalid_argument", "the state cannot be written as JSON: "
      .. tostring(text):gsub("^pup%.json%.encode: ", ""))
  end
  -- A state JSON cannot give back as it is (sparse arrays, integer keys that become
  -- strings) would make loads from the snapshot differ from full folds: not written.
  if not same(state, json.decode(text)) then
    return nil, new_error("invalid_argument",
      "the state does not read back the same from JSON (integer keys, sparse arrays?)")
  end
  local written
  local run = getmetatable(db) == tx_mt and db.savepoint or db.transaction
  local done, err = run(db, function(t)
    local err
    written, err = store:write_snapshot(t, atype, id, version, o.snapshot_version or 1, text)
    if written == nil then error(err) end
  end)
  if not done then return nil, err end
  return written
end

-- ---- handle -----------------------------------------------------------------------

-- store:handle(db_or_tx, type, id, decide, definition) -> state, version, result | nil, err
function M.handle(store, db, atype, id, decide, o)
  check_target(atype, id, "handle")
  if type(decide) ~= "function" then error("bad argument #4 to 'handle' (decide function expected)", 2) end
  M.check_definition(o, "handle")
  local in_tx = getmetatable(db) == tx_mt
  local max_retries = o.max_retries or 3
  local delay = o.retry_delay or 0.005
  local attempt = 0
  while true do
    attempt = attempt + 1
    local state, version, base = load(store, db, atype, id, o)
    if state == nil then return nil, version end
    local events, rejected = M.decide(decide, state, version)
    if not events then return nil, rejected end
    if #events == 0 then
      return state, version, { global_positions = {}, from_version = version + 1, to_version = version,
                               attempts = attempt }
    end
    local list, seen = M.prepare(events, atype, id, version)
    if not list then return nil, seen end
    local res, err = store:append(db, core.exact(version), list)
    if res then
      for i = 1, #seen do seen[i].global_position = res.global_positions[i] end
      M.upcast_events(seen)
      state = M.fold(o, state, seen)
      res.attempts = attempt
      if o.snapshot_every and res.to_version - base >= o.snapshot_every then
        local ok, serr = write_snapshot(store, db, atype, id, res.to_version, o, state)
        res.snapshot = ok or false
        if ok == nil then
          res.snapshot_error = serr
          io.stderr:write(("pupsourcing: snapshot of %s/%s at version %d not written: %s\n")
            :format(atype, id, res.to_version, tostring(serr)))
        end
      end
      return state, res.to_version, res
    end
    -- In a caller's transaction a conflict cannot be retried: the transaction saw the
    -- old version (and a lost race aborted it). The caller retries the transaction.
    if err.code ~= "optimistic_concurrency" or in_tx or attempt > max_retries then
      if err.code == "optimistic_concurrency" then err.attempts = attempt end
      return nil, err
    end
    if delay > 0 then core.sleep(delay * (1 << (attempt - 1)) * (0.5 + math.random())) end
  end
end

-- ---- inline projections -----------------------------------------------------------

-- {[store] = {projection, ...}} of this Lua state: what store:inline registered.
local inline_of = setmetatable({}, { __mode = "k" })
local raw_append = store_methods.append

local function contains(list, v)
  if list == nil or #list == 0 then return true end
  for i = 1, #list do
    if list[i] == v then return true end
  end
  return false
end

-- store:inline(db_or_tx, projection) -> true | nil, err: runs projection's setup(tx) (one
-- setup at a time, as processors do) and from then on its handle(tx, event) inside every
-- append of this store in this Lua state. Raises on misuse.
function M.inline(store, db, proj)
  local mt = getmetatable(db)
  if mt ~= tx_mt and mt ~= registry["pupsourcing.db"] then
    error("bad argument #1 to 'inline' (db or tx expected)", 2)
  end
  require("pupsourcing").check_projection(proj, "inline")
  if proj.kind == "reactor" then
    error(("inline: reactor %q cannot run inline: its side effects would not roll back with the append")
      :format(proj.name), 2)
  end
  local list = inline_of[store] or {}
  for i = 1, #list do
    if list[i].name == proj.name then
      error(("inline: a projection named %q is already inline in this store"):format(proj.name), 2)
    end
  end
  if proj.setup then
    local run = mt == tx_mt and db.savepoint or db.transaction
    local ok, err = run(db, function(tx)
      assert(tx:query("SELECT pg_advisory_xact_lock(hashtextextended('pupsourcing.setup', 0))"))
      proj.setup(tx)
    end)
    if not ok then return nil, err end
  end
  list[#list + 1] = proj
  inline_of[store] = list
  return true
end

-- Runs every inline projection on the events an append wrote (read back in tx: upcast,
-- with their positions and the server's created_at). Returns true | nil, err (handler).
local function run_inline(store, tx, list, atype, id, res)
  local events, err = store:read_aggregate_stream(tx, atype, id,
    { from_version = res.from_version, to_version = res.to_version })
  if not events then return nil, err end
  for _, ev in ipairs(events) do
    local stored_type = ev.stored_event_type or ev.event_type
    for _, proj in ipairs(list) do
      if contains(proj.aggregate_types, atype) and contains(proj.event_types, stored_type) then
        local ok, r1, r2 = pcall(proj.handle, tx, ev)
        local why = not ok and r1 or (not r1 and r2 ~= nil and r2) or nil
        if why ~= nil then
          -- an error object's text without its SQLSTATE, which the new error carries
          local text = type(why) == "table" and why.message ~= nil
            and (why.code and why.code .. ": " or "") .. tostring(why.message) or tostring(why)
          local e = new_error("handler", ("inline projection %s failed at global position %d (event_type %s, event_id %s): %s")
            :format(proj.name, ev.global_position, stored_type, ev.event_id, text))
          if type(why) == "table" then e.sqlstate, e.cause = why.sqlstate, why end
          return nil, e
        end
      end
    end
  end
  return true
end

-- store:append with inline projections: the append and their handlers in one transaction
-- (a savepoint inside a caller's), so a failing handler leaves nothing written.
function M.append(store, db, expected, events, ...)
  local list = inline_of[store]
  if not list or #list == 0 or type(events) ~= "table" or type(events[1]) ~= "table" then
    return raw_append(store, db, expected, events, ...)
  end
  local extra = table.pack(...)
  local res, failure
  local run = getmetatable(db) == tx_mt and db.savepoint or db.transaction
  if type(run) ~= "function" then return raw_append(store, db, expected, events, ...) end
  local ok, err = run(db, function(tx)
    res, failure = raw_append(store, tx, expected, events, table.unpack(extra, 1, extra.n))
    if not res then error(failure) end
    if res.retried then return end -- the same append again: its handlers ran with it
    local done, herr = run_inline(store, tx, list, events[1].aggregate_type, events[1].aggregate_id, res)
    if not done then
      failure = herr
      error(herr)
    end
  end)
  if not ok then return nil, failure or err end
  return res
end

-- Adds load, handle, inline and the inline-aware append to the store's methods.
function M.install()
  store_methods.load = M.load
  store_methods.handle = M.handle
  store_methods.inline = M.inline
  store_methods.append = M.append
end

return M
