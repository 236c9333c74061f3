-- The plumbing the examples share: connecting, messages, integer flags, sample events.
-- Not an example itself. Each examples/<name>/main.lua loads it from its own path:
--
--   local common = dofile((arg[0]:match("^(.*)/") or ".") .. "/../common.lua")
--
-- Copying an example into your own script? Inline what it uses from here: each piece is a
-- few lines of plain pupsourcing.
local pup = require "pupsourcing"
io.stdout:setvbuf("line") -- every line at once, also into a pipe or a file

local common = {}

-- The private database `scripts/pg.sh start` runs; DATABASE_URL overrides it.
common.DEFAULT_URL = "postgresql://postgres@127.0.0.1:54329/pupsourcing"

-- The running example's directory (from arg[0]), and the repository root (for
-- projections/*.lua) from this file's own path: both work from any working directory.
common.here = (arg and arg[0] or ""):match("^(.*)/") or "."
local src = debug.getinfo(1, "S").source
common.root = (src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/") or ".") .. "/.."

-- A connection URL fit to print: the password replaced by ***.
function common.redact(url) return (url:gsub("(//[^:/@]+):[^@/]*@", "%1:***@")) end

-- log(fmt, ...) prints "HH:MM:SS [tag ]message" on stdout.
function common.logger(tag)
  local prefix = tag and tag .. " " or ""
  return function(fmt, ...) io.write(os.date("%H:%M:%S "), prefix, fmt:format(...), "\n") end
end

-- die, log for the example called name: die(fmt, ...) prints "<name>: message" on stderr and
-- exits with exit_status (default 2); log is logger(). The helpers below that can fail
-- (options, connect, append_new, partition_flags) report through the last die made here.
local die = function(fmt, ...) error(fmt:format(...), 0) end
function common.die_and_log(name, exit_status)
  die = function(fmt, ...)
    io.stderr:write(name, ": ", fmt:format(...), "\n")
    os.exit(exit_status or 2)
  end
  return die, common.logger()
end

-- opts, int: the flags (pup.args) and int(flag, env, default), which reads an integer from
-- --flag, else from the environment variable env (when given), else it is default. Anything
-- else than an integer is fatal.
function common.options(arg)
  local opts = pup.args(arg)
  local function int(flag, env, default)
    local v = opts[flag]
    if v == nil or v == true then v = env and os.getenv(env) end
    if v == nil or v == "" then return default end
    local n = math.tointeger(tonumber(v))
    if not n then
      die("--%s%s must be an integer, got %q", flag, env and " (" .. env .. ")" or "", tostring(v))
    end
    return n
  end
  return opts, int
end

-- key, total: which partition this process owns, from --<key_flag> (required) and
-- --<total_flag> (default 4), or from the environment variables of the same names in upper
-- case (--partition-key: PARTITION_KEY); fatal unless 0 <= key < total.
function common.partition_flags(int, key_flag, total_flag)
  local key_env = key_flag:upper():gsub("-", "_")
  local key = int(key_flag, key_env, -1)
  local total = int(total_flag, (total_flag:upper():gsub("-", "_")), 4)
  if key < 0 then die("%s is required (use --%s flag or %s env var)", key_flag, key_flag, key_env) end
  if total < 1 then die("%s must be at least 1", total_flag) end
  if key >= total then die("%s (%d) must be less than %s (%d)", key_flag, key, total_flag, total) end
  return key, total
end

-- value, unless it is nil or false: then "<label>: <err>" on stderr and exit status 1 (a
-- failure at run time; bad flags and a missing database exit through die instead).
function common.or_exit(label, value, err)
  if not value then
    io.stderr:write(label, ": ", tostring(err), "\n")
    os.exit(1)
  end
  return value
end

-- db, store, url: connects to DATABASE_URL (default DEFAULT_URL) and creates the event store
-- tables if they are missing (store:migrate). A database that is not there is fatal.
function common.connect()
  local url = os.getenv("DATABASE_URL")
  if not url or url == "" then url = common.DEFAULT_URL end
  local db, err = pup.connect(url)
  if not db then
    die("cannot connect to %s: %s\n(start the example database with: scripts/pg.sh start)",
        common.redact(url), tostring(err))
  end
  local store = pup.store()
  local ok, merr = store:migrate(db)
  if not ok then die("migration failed: %s", tostring(merr)) end
  return db, store, url
end

-- The first event of a new aggregate (a fresh UUID, expecting no stream yet); returns the
-- aggregate id and the append result. A failed append is fatal.
function common.append_new(db, store, aggregate_type, event_type, payload)
  local id = pup.uuid()
  local r, err = store:append(db, pup.no_stream(), {
    { aggregate_type = aggregate_type, aggregate_id = id, event_type = event_type, payload = payload },
  })
  if not r then die("append failed: %s", tostring(err)) end
  return id, r
end

-- Sample UserCreated payloads for user number i = 1, 2, ...
-- person: Alice Smith <alice.smith@example.com>, Bob Johnson, ..., then "Alice Smith 2".
local NAMES = { "Alice Smith", "Bob Johnson", "Carol Williams", "Dave Brown",
                "Eve Davis", "Frank Miller", "Grace Wilson", "Henry Moore" }
function common.person(i)
  local name = NAMES[(i - 1) % #NAMES + 1]
  if i > #NAMES then name = name .. " " .. ((i - 1) // #NAMES + 1) end
  return { email = name:lower():gsub("%s+", ".") .. "@example.com", name = name }
end
-- numbered_user: User 1 <user1@example.com>, User 2, ...
function common.numbered_user(i)
  return { email = ("user%d@example.com"):format(i), name = ("User %d"):format(i) }
end

-- In a projection's setup: CREATE TABLE IF NOT EXISTS name (columns), serialized by an
-- advisory lock, because processes starting together would otherwise race on the catalog
-- (CREATE TABLE IF NOT EXISTS alone is not concurrency-safe).
function common.create_table(tx, name, columns)
  assert(tx:query(("SELECT pg_advisory_xact_lock(hashtext('pupsourcing.projection.%s'))"):format(name)))
  assert(tx:exec(("CREATE TABLE IF NOT EXISTS %s (%s)"):format(name, columns)))
end

-- Wraps projection.handle: after each event it handled, report(event, data, n) runs, where
-- data is the event's payload table ({} if none) and n counts the events of this process.
function common.on_handled(projection, report)
  local handle, n = projection.handle, 0
  projection.handle = function(tx, event)
    handle(tx, event)
    n = n + 1
    report(event, type(event.data) == "table" and event.data or {}, n)
  end
  return projection
end

return common
