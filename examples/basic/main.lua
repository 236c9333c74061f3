-- basic: the simplest append-and-project script.
--
--   pupsourcing examples/basic/main.lua
--
-- 1. connects to DATABASE_URL (default: the private database `scripts/pg.sh start` runs)
--    and creates the event store tables if they are missing (store:migrate);
-- 2. appends three events to a new User aggregate (a new UUID every run, so it is safe to
--    run again and again), in two appends with optimistic concurrency;
-- 3. shows that a stale expected version is refused;
-- 4. reads the aggregate's stream back and prints it;
-- 5. runs a small projection until it has caught up and prints the read model row.
local pup = require "pupsourcing"
local common = dofile((arg[0]:match("^(.*)/") or ".") .. "/../common.lua") -- shared plumbing

local function say(fmt, ...) io.write(fmt:format(...), "\n") end
local die = common.die_and_log("basic", 1)
local redact = common.redact

-- 1. Connect and migrate ------------------------------------------------------------------
local db, store, url = common.connect()
say("Connected to %s; event store schema is up to date.", redact(url))

-- 2. Append ---------------------------------------------------------------------------------
local user_id = pup.uuid()

-- A new aggregate: expect that no stream exists yet.
local r, aerr = store:append(db, pup.no_stream(), {
  { aggregate_type = "User", aggregate_id = user_id, event_type = "UserCreated",
    payload = { email = "alice@example.com", name = "Alice Smith" },
    metadata = { source = "examples/basic" } },
})
if not r then die("append failed: %s", tostring(aerr)) end
say("Appended UserCreated to User %s: version %d at position %d",
    user_id, r.to_version, r.global_positions[1])

-- Two more events in one append, expecting the stream to be at version 1.
r, aerr = store:append(db, pup.exact(1), {
  { aggregate_type = "User", aggregate_id = user_id, event_type = "UserEmailChanged",
    payload = { email = "alice.smith@example.com" } },
  { aggregate_type = "User", aggregate_id = user_id, event_type = "UserRenamed",
    payload = { name = "Alice Smith-Jones" } },
})
if not r then die("append failed: %s", tostring(aerr)) end
say("Appended UserEmailChanged and UserRenamed: versions %d..%d at positions %s",
    r.from_version, r.to_version, table.concat(r.global_positions, ", "))

-- 3. Optimistic concurrency: the stream is at version 3 now, so expecting 1 must fail.
local stale, cerr = store:append(db, pup.exact(1), {
  { aggregate_type = "User", aggregate_id = user_id, event_type = "UserDeactivated", payload = {} },
})
if stale then die("a stale expected version was accepted") end
local code = type(cerr) == "table" and cerr.code or tostring(cerr)
if code ~= "optimistic_concurrency" then die("unexpected error: %s", tostring(cerr)) end
say("A stale append (expected version 1, actual 3) was refused: %s", code)

-- 4. Read the stream back -----------------------------------------------------------------
local stream, rerr = store:read_aggregate_stream(db, "User", user_id)
if not stream then die("read failed: %s", tostring(rerr)) end
say("")
say("Stream User/%s (%d events, version %d):", user_id, #stream, stream.version or #stream)
for _, e in ipairs(stream) do
  say("  v%d  %-17s position %-6d %s  %s", e.aggregate_version, e.event_type,
      e.global_position, e.created_at, e.payload)
end

-- 5. Project --------------------------------------------------------------------------------
-- A projection is a table with a name and a handle(tx, event) function; its writes and its
-- checkpoint commit in one transaction.
local directory = {
  name = "basic_user_directory",
  aggregate_types = { "User" },
  setup = function(tx)
    common.create_table(tx, "basic_user_directory",
                        "id TEXT PRIMARY KEY, name TEXT, email TEXT, version BIGINT NOT NULL")
  end,
  handle = function(tx, e)
    local d = type(e.data) == "table" and e.data or {}
    -- Idempotent upsert: COALESCE keeps columns an event does not carry.
    assert(tx:exec([[
      INSERT INTO basic_user_directory (id, name, email, version) VALUES ($1, $2, $3, $4)
      ON CONFLICT (id) DO UPDATE SET name = COALESCE(EXCLUDED.name, basic_user_directory.name),
        email = COALESCE(EXCLUDED.email, basic_user_directory.email), version = EXCLUDED.version
      WHERE basic_user_directory.version < EXCLUDED.version]],
      e.aggregate_id, d.name, d.email, e.aggregate_version))
  end,
  reset = function(tx) assert(tx:exec("DELETE FROM basic_user_directory")) end,
}

local processor = pup.processor(db, directory)
local handled, perr = processor:run { once = true } -- until caught up with the log as it is now
if not handled then die("projection failed: %s", tostring(perr)) end
local rows = assert(db:query("SELECT name, email, version FROM basic_user_directory WHERE id = $1", user_id))
say("")
say("Projection %s caught up (handled %d events in this run).", directory.name, handled)
if rows[1] then
  say("Read model row: %s <%s>, version %d", rows[1].name, rows[1].email, rows[1].version)
else
  die("the read model has no row for %s", user_id)
end
say("")
say("Done. Look around with:")
say("  psql %s -c 'SELECT global_position, aggregate_id, event_type FROM events ORDER BY global_position'", redact(url))
say("  psql %s -c 'SELECT * FROM projection_checkpoints'", redact(url))
db:close()
