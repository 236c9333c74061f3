-- multiple-projections: different projections concurrently in one process.
--
--   pupsourcing examples/multiple-projections/main.lua [--once]
--
-- Appends 3 users and 3 orders, then runs three projection files side by side, each on its
-- own thread with its own checkpoint and batch size:
--   projections/user_read_model.lua   users            batch 100
--   projections/event_counter.lua     event_type_counts batch 200
--   examples/multiple-projections/revenue.lua  user_revenue  batch 50
-- Ctrl+C (SIGINT) or SIGTERM stops them all; it then prints what each one handled.
-- The same as `pupsourcing run projections/user_read_model.lua projections/event_counter.lua ...`.
local pup = require "pupsourcing"
local common = dofile((arg[0]:match("^(.*)/") or ".") .. "/../common.lua") -- shared plumbing

local _, log = common.die_and_log("multiple-projections", 2)

local opts = common.options(arg)
local once = opts.once and true or false

local db, store, url = common.connect()

-- Sample events: three users, three orders.
log("Appending sample events...")
local function append(...) return (common.append_new(db, store, ...)) end -- the new aggregate's id
local alice = append("User", "UserCreated", { email = "alice@example.com", name = "Alice" })
local bob = append("User", "UserCreated", { email = "bob@example.com", name = "Bob" })
append("User", "UserCreated", { email = "carol@example.com", name = "Carol" })
append("Order", "OrderPlaced", { user_id = alice, amount = 99.99 })
append("Order", "OrderPlaced", { user_id = bob, amount = 149.99 })
append("Order", "OrderPlaced", { user_id = alice, amount = 49.99 })
log("Appended 3 UserCreated and 3 OrderPlaced events.")

local files = {
  common.root .. "/projections/user_read_model.lua",
  common.root .. "/projections/event_counter.lua",
  common.here .. "/revenue.lua",
}
-- No batch_size here: each projection file brings its own.
local runner = pup.runner { files = files, once = once, database_url = url }
log("Starting %d projections: user_read_model, event_counter, revenue_tracker%s", #files,
    once and " (--once: stop when caught up)" or "")
if not once then log("Press Ctrl+C to stop") end

local result = common.or_exit("multiple-projections: runner error", runner:run())
if not once then log("Received shutdown signal, all projections stopped.") end

local names = {}
for name in pairs(result) do names[#names + 1] = name end
table.sort(names)
for _, name in ipairs(names) do
  log("  %-16s handled %d events", name, result[name].handled or 0)
end

-- The read models, each with its own table and its own checkpoint.
local users = assert(db:query("SELECT count(*) AS n FROM users"))[1].n
local revenue = assert(db:query("SELECT coalesce(sum(total), 0)::text AS total, coalesce(sum(orders), 0)::bigint AS orders FROM user_revenue"))[1]
log("Final stats - users: %d, orders: %d, revenue: $%s", users, revenue.orders, revenue.total)
for _, row in ipairs(assert(db:query("SELECT event_type, count FROM event_type_counts ORDER BY event_type"))) do
  log("  %-16s %d", row.event_type, row.count)
end
log("Checkpoints: SELECT * FROM projection_checkpoints;")
db:close()
