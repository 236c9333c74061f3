-- The W1/W6 second ceiling (issue 13 defines the ceiling as "pgbench with the same single-event
-- append statement without NOTIFY"): prints a pgbench script running the library's own 1-event
-- append statement, as the store prepares it, with its wake-up off ($14 false) and W1's values.
--   pupsourcing bench/own_statement.lua --url URL > own.sql   (appends one event to URL)
--   pgbench -n -M prepared -D t=User -D et=UserCreated -D v=0 -D ev=1 -D p=PAYLOAD -D m='{}' -f own.sql
-- The NULL parameters of a W1 append (event_id, trace ids, created_at) stay NULL; the aggregate
-- id is a UUID's text (36 characters, as W1's pup.uuid()) made from a random integer, a new
-- aggregate per append.
local pup = require "pupsourcing"
local a = pup.args(arg)
local db = assert(pup.connect(a.url))
local store = pup.store()
assert(store:migrate(db))
assert(store:append(db, pup.no_stream(), { { aggregate_type = "User", aggregate_id = pup.uuid(),
  event_type = "UserCreated", payload = "{}", metadata = "{}" } }))
local rows = assert(db:query("SELECT statement FROM pg_prepared_statements WHERE statement LIKE 'WITH cur AS%'"))
assert(#rows == 1, "expected the one prepared 1-event append statement, found " .. #rows)
local params = { ":t", "(md5(:id::text)::uuid::text)", ":v", "NULL", ":et", ":ev", ":p", ":m", "NULL", "NULL", "NULL", "NULL", ":h", "false" }
local text, n = rows[1].statement:gsub("%$(%d+)", function(k)
  return params[tonumber(k)] or error("parameter $" .. k .. " has no value here: bench/own_statement.lua is out of date")
end)
assert(n > 0 and text:find("false::boolean", 1, true), "no wake-up parameter ($14) in the statement")
io.write("\\set id random(1, 1000000000000000)\n\\set h random(0, 4294967295)\n", text, ";\n")
db:close()
