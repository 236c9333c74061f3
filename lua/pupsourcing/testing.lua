-- pupsourcing.testing: given / when / then for domain code, without a database (after
-- Emmett's DeciderSpecification). The events and the decide function are the ones
-- store:handle uses, run through the same code (payload JSON, upcasters, evolve):
--
--   local spec = testing.decider { initial = ..., evolve = ... }
--   spec:given { {event_type = "Opened", payload = {...}} }
--       :when(function(state, version) return ... end)
--       :then_events { {event_type = "Deposited", payload = {amount = 10}} }
--
-- Failures raise an error naming what differs (busted reports it as a failure).
-- Reference: docs/lua-api.md "Testing domain code".
local core = require "pupsourcing.core"
local agg = require "pupsourcing.aggregate"

local json = core.json
local M = {}

-- A readable, stable rendering of a value for failure messages (sorted keys).
local function show(v, depth)
  depth = depth or 0
  if type(v) == "string" then return ("%q"):format(v) end
  if type(v) ~= "table" then return tostring(v) end
  if depth > 8 then return "{...}" end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    if type(a) == type(b) and (type(a) == "number" or type(a) == "string") then return a < b end
    return type(a) < type(b)
  end)
  local parts = {}
  for _, k in ipairs(keys) do
    local key = math.type(k) == "integer" and ("[%d]"):format(k) or tostring(k)
    parts[#parts + 1] = key .. " = " .. show(v[k], depth + 1)
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end
M.show = show

-- A value as it reads back from the store: tables through JSON (what evolve and a later
-- load see), other values as they are.
local function stored(v)
  if type(v) == "table" then return json.decode(json.encode(v)) end
  return v
end

local Spec = {}
Spec.__index = Spec

local EXTRA = { aggregate_type = true, aggregate_id = true }

-- testing.decider(definition): definition is store:handle's (initial, evolve, ...) plus
-- optional aggregate_type and aggregate_id (for the events evolve sees). The upcasters
-- registered with pup.upcast apply to the given events, as on a load.
function M.decider(def)
  agg.check_definition(def, "testing.decider", EXTRA)
  return setmetatable({ def = def, atype = def.aggregate_type or "Aggregate",
                        id = def.aggregate_id or "test-1" }, Spec)
end

-- The persisted-like events of a list of events to append, after `version`.
local function persisted(self, events, version)
  local list, seen = agg.prepare(events, self.atype, self.id, version)
  if not list then error(tostring(seen), 3) end
  for i = 1, #seen do seen[i].global_position = version + i end
  agg.upcast_events(seen)
  return seen
end

-- A new case: the aggregate's past events (as store:append takes them).
function Spec:given(events)
  if type(events) ~= "table" then error("given: a list of events expected", 2) end
  local case = setmetatable({ spec = self }, { __index = M.Case })
  case.history = persisted(self, events, 0)
  case.version = #events
  case.state = agg.fold(self.def, agg.initial_state(self.def), case.history)
  return case
end

M.Case = {}
local Case = M.Case

-- Runs decide(state, version) as store:handle would.
function Case:when(decide)
  if type(decide) ~= "function" then error("when: decide function expected", 2) end
  local ok, events, err = pcall(agg.decide, decide, self.state, self.version)
  if not ok then
    self.raised = events
  elseif events == nil then
    self.rejected = err
  else
    self.events = events
  end
  self.ran = true
  return self
end

local function outcome(self)
  if self.raised ~= nil then return "it raised: " .. tostring(self.raised) end
  if self.rejected then return "it was rejected: " .. self.rejected.message end
  return "it decided " .. show(self.events)
end

local function need_when(self, what)
  if not self.ran then error(what .. ": call :when(decide) first", 3) end
end

-- Then decide returned these events (same count and order; each given field equal, the
-- payload and metadata compared as they read back from the store).
function Case:then_events(expected)
  need_when(self, "then_events")
  if not self.events then error("expected events, but " .. outcome(self), 2) end
  if #self.events ~= #expected then
    error(("expected %d event(s), got %d: %s"):format(#expected, #self.events, show(self.events)), 2)
  end
  for i, want in ipairs(expected) do
    local got = self.events[i]
    for k, v in pairs(want) do
      local a, b = stored(got[k]), stored(v)
      if k == "event_version" then a, b = a or 1, b or 1 end
      if not agg.same(a, b) then
        error(("event %d: %s is %s, expected %s"):format(i, tostring(k), show(a), show(b)), 2)
      end
    end
  end
  return self
end

-- Then decide returned no events.
function Case:then_nothing()
  need_when(self, "then_nothing")
  if not self.events or #self.events > 0 then error("expected no events, but " .. outcome(self), 2) end
  return self
end

-- Then decide rejected the command (returned nil, reason): store:handle's error has code
-- "rejected". `expected` (optional): the message (string), or a table of fields the
-- reason must have.
function Case:then_rejected(expected)
  need_when(self, "then_rejected")
  if not self.rejected then error("expected a rejection, but " .. outcome(self), 2) end
  if type(expected) == "string" and self.rejected.message ~= expected then
    error(("rejected with %q, expected %q"):format(self.rejected.message, expected), 2)
  elseif type(expected) == "table" then
    local reason = self.rejected.reason
    for k, v in pairs(expected) do
      if type(reason) ~= "table" or not agg.same(reason[k], v) then
        error(("rejection reason %s, expected %s = %s"):format(show(reason), tostring(k), show(v)), 2)
      end
    end
  end
  return self
end

-- Then decide raised (a bug or a broken invariant, not a rejection); `pattern` (optional)
-- must be found in the error's text.
function Case:then_raises(pattern)
  need_when(self, "then_raises")
  if self.raised == nil then error("expected decide to raise, but " .. outcome(self), 2) end
  if pattern and not tostring(self.raised):find(pattern) then
    error(("raised %q, which does not match %q"):format(tostring(self.raised), pattern), 2)
  end
  return self
end

-- Then the state after the given events and the decided ones (folded as handle returns
-- it) equals `expected` (compared as values, integers apart from floats).
function Case:then_state(expected)
  need_when(self, "then_state")
  if not self.events then error("expected a state, but " .. outcome(self), 2) end
  local new = persisted(self.spec, self.events, self.version)
  local state = agg.fold(self.spec.def, self.state, new)
  if not agg.same(state, expected) then
    error(("state is %s, expected %s"):format(show(state), show(expected)), 2)
  end
  return self
end

return M
