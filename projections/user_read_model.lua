-- User read model: one row per user in the `users` table, kept current with upserts.
--
--   pupsourcing run projections/user_read_model.lua        (or via pup.processor / pup.runner)
--   SELECT * FROM users ORDER BY created_at;
--
-- Events (aggregate type "User", JSON payloads):
--   UserCreated      {email=, name=}
--   UserEmailChanged {email=}
--   UserRenamed      {name=}
--   UserDeactivated  {}
--   UserReactivated  {}
--
-- Idempotent: every write is an upsert guarded by the aggregate version, so handling an event
-- twice (a reset checkpoint, a change of partition layout) never moves a row backwards or
-- counts anything twice. An aggregate's events always reach one partition in version order.

local P = {
  name = "user_read_model",
  aggregate_types = { "User" },
  event_types = { "UserCreated", "UserEmailChanged", "UserRenamed", "UserDeactivated", "UserReactivated" },
  batch_size = 100,
}

function P.setup(tx)
  -- Several processes (partitions) may start at once: serialize the CREATE so two of them
  -- cannot race on the catalog (CREATE TABLE IF NOT EXISTS alone is not concurrency-safe).
  assert(tx:query("SELECT pg_advisory_xact_lock(hashtext('pupsourcing.projection.users'))"))
  assert(tx:exec([[
    CREATE TABLE IF NOT EXISTS users (
      id            TEXT PRIMARY KEY,          -- the aggregate id
      email         TEXT,
      name          TEXT,
      active        BOOLEAN NOT NULL DEFAULT true,
      version       BIGINT NOT NULL,           -- aggregate version of the last event applied
      last_position BIGINT NOT NULL,           -- global position of the last event applied
      created_at    TIMESTAMPTZ,
      updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
    )]]))
end

-- One upsert per event type: INSERT the row if the user is new to the read model, otherwise
-- update the columns this event changes, but only if the event is newer than the row.
-- Parameters: $1 id, $2 version, $3 global position, $4 event time, $5 the changed value.
local function upsert(columns, values, updates)
  return ([[
    INSERT INTO users (id, version, last_position, updated_at%s)
    VALUES ($1, $2, $3, $4::timestamptz%s)
    ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,
      last_position = EXCLUDED.last_position, updated_at = EXCLUDED.updated_at%s
    WHERE users.version < EXCLUDED.version]]):format(columns, values, updates)
end

local UPSERT = {
  UserCreated = {
    sql = upsert(", email, name, active, created_at", ", $5, $6, true, $4::timestamptz",
                 ", email = EXCLUDED.email, name = EXCLUDED.name, active = true, created_at = EXCLUDED.created_at"),
    args = function(d) return d.email, d.name end,
  },
  UserEmailChanged = {
    sql = upsert(", email", ", $5", ", email = EXCLUDED.email"),
    args = function(d) return d.email end,
  },
  UserRenamed = {
    sql = upsert(", name", ", $5", ", name = EXCLUDED.name"),
    args = function(d) return d.name end,
  },
  UserDeactivated = {
    sql = upsert(", active", ", false", ", active = false"),
    args = function() end,
  },
  UserReactivated = {
    sql = upsert(", active", ", true", ", active = true"),
    args = function() end,
  },
}

function P.handle(tx, event)
  local u = UPSERT[event.event_type]
  if not u then return end -- outside our scope (only possible without the SQL filter)
  local data = event.data
  if type(data) ~= "table" then data = {} end
  assert(tx:exec(u.sql, event.aggregate_id, event.aggregate_version, event.global_position,
                 event.created_at, u.args(data)))
end

function P.reset(tx)
  P.setup(tx) -- so that a reset before the first run does not fail
  assert(tx:exec("DELETE FROM users"))
end

return P
