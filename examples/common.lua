-- The plumbing the examples share: connecting, messages, integer flags, sample events.
-- Not an example itself. Each examples/<name>/main.lua loads it from its own path:
--
--   local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
--   local common = dofile(here .. "/../common.lua")
--
-- Copying an example into your own script? Inline what it uses from here: each piece is a
-- few lines of plain pupsourcing.
local pup = require "pupsourcing"
io.stdout:setvbuf("line") -- every line at once, also into a pipe or a file

local common = {}

-- The private database `scripts/pg.sh start` runs; DATABASE_URL overrides it.
common.DEFAULT_URL = "postgresql://postgres@127.0.0.1:54329/pupsourcing"

-- The repository root (for projections/*.lua), found from this file's own path.
local src = debug.getinfo(1, "S").source
common.root = (src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/[^/]*$") or ".") .. "/.."

-- A connection URL fit to print: the password replaced by ***.
function common.redact(url) return (url:gsub("(//[^:/@]+):[^@/]*@", "%1:***@")) end

-- die(fmt, ...) prints "<name>: message" on stderr and exits with status (default 2).
-- die_as makes one; connect and append_new below report through the last one made.
local die = function(fmt, ...) error(fmt:format(...), 0) end
function common.die_as(name, status)
  die = function(fmt, ...)
    io.stderr:write(name, ": ", fmt:format(...), "\n")
    os.exit(status or 2)
  end
  return die
end

-- log(fmt, ...) prints "HH:MM:SS [tag ]message" on stdout.
function common.logger(tag)
  local prefix = tag and tag .. " " or ""
  return function(fmt, ...) io.write(os.date("%H:%M:%S "), prefix, fmt:format(...), "\n") end
end

-- int(flag, env, default) reads an integer from --flag, else from the environment variable
-- env (when given), else it is default. Anything else than an integer is fatal.
function common.int_options(opts)
  return function(flag, env, default)
    local v = opts[flag]
    if v == nil or v == true then v = env and os.getenv(env) end
    if v == nil or v == "" then return default end
    local n = math.tointeger(tonumber(v))
    if not n then
      die("--%s%s must be an integer, got %q", flag, env and " (" .. env .. ")" or "", tostring(v))
    end
    return n
  end
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
