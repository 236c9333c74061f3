-- Issue 15: reactors (kind = "reactor"): handle(event) without a transaction, from the
-- same batch loop as projections; at least once, in order per partition, the checkpoint
-- after the handler returns. The kill test runs a reactor in a worker group, SIGKILLed
-- 5 times while writers append, and checks every event was delivered, duplicates only
-- around the kills. Against the real PostgreSQL.
local H = require "spec.helpers"
local pup = require "pupsourcing"

local AREA = "rx"
local DELIVERED = "t_rx_delivered"

local function fresh()
  local db = H.connect()
  assert(db:exec("DROP TABLE IF EXISTS " .. DELIVERED))
  assert(db:exec("CREATE TABLE " .. DELIVERED .. [[ (n bigserial PRIMARY KEY, event_id text NOT NULL,
    pos bigint NOT NULL, agg text NOT NULL, ver bigint NOT NULL, pid int NOT NULL)]]))
  return H.fresh_store(AREA, db)
end

local function ev(id, over)
  local e = { aggregate_type = "Thing", aggregate_id = id, event_type = "Happened", payload = { n = 1 } }
  for k, v in pairs(over or {}) do e[k] = v end
  return e
end

local function checkpoint(db, T, name)
  local rows = assert(db:query(('SELECT min(last_global_position) AS p FROM "%s" WHERE projection_name = $1')
    :format(T.checkpoints_table), name))
  return rows[1].p
end

describe("pup.check_projection kinds", function()
  it("accepts projection and reactor; raises on an unknown kind and on a reactor taking a tx", function()
    assert(pup.check_projection { name = "p", kind = "projection", handle = function(tx, e) return tx, e end })
    assert(pup.check_projection { name = "r", kind = "reactor", handle = function(e) return e end })
    assert(pup.check_projection { name = "r", kind = "reactor", handle = function(...) return ... end })
    assert.has_error(function() pup.check_projection { name = "x", kind = "reacter", handle = function() end } end,
      'projection: projection "x": unknown `kind` "reacter" ("projection" or "reactor")')
    assert.has_error(function() pup.check_projection { name = "x", kind = 1, handle = function() end } end,
      'projection: projection "x": unknown `kind` 1 ("projection" or "reactor")')
    assert.has_error(function()
      pup.check_projection { name = "x", kind = "reactor", handle = function(tx, e) return tx, e end }
    end, 'projection: reactor "x": `handle` takes (event) alone: a reactor gets no transaction (declared with 2 parameters)')
  end)
end)

describe("reactors", function()
  local store, db, T
  before_each(function() store, db, T = fresh() end)
  after_each(function() db:close() end)

  it("get the event alone, one event per batch by default, the checkpoint moved after each", function()
    local got = {}
    local r = { name = "rx_args", kind = "reactor",
      handle = function(...)
        got[#got + 1] = table.pack(...)
        -- the processor's checkpoint has not moved for this event yet
        local other = H.connect()
        got[#got].cp = checkpoint(other, T, "rx_args")
        other:close()
      end }
    local res = assert(store:append(db, pup.no_stream(), { ev("a"), ev("a"), ev("a") }))
    local p = pup.processor(db, r, { store = store })
    assert.equal(1, p:run_once())
    assert.equal(1, got[1].n)
    assert.equal(res.global_positions[1], got[1][1].global_position)
    assert.equal("Happened", got[1][1].event_type)
    assert.equal(res.global_positions[1], checkpoint(db, T, "rx_args"))
    assert.equal(2, p:run { once = true })
    assert.equal(3, #got)
    assert.equal(res.global_positions[2], got[3].cp)
    assert.equal(res.global_positions[3], checkpoint(db, T, "rx_args"))
    p:close()
    -- in a catch-up too (full windows read ahead, which a projection commits behind the
    -- next batch): each side effect only once the batch before it committed
    local other, seen = H.connect(), {}
    local s = pup.processor(db, { name = "rx_chain", kind = "reactor", handle = function(e)
      seen[#seen + 1] = { pos = e.global_position, cp = checkpoint(other, T, "rx_chain") }
    end }, { store = store })
    for i = 1, 40 do assert(store:append(db, pup.any(), { ev("c" .. i) })) end
    assert.equal(43, s:run { once = true })
    for i = 2, #seen do
      assert.equal(seen[i - 1].pos, seen[i].cp, "the side effect of the event at " .. seen[i].pos)
    end
    s:close()
    other:close()
    -- the file's batch_size and the option still apply
    local q = pup.processor(db, { name = "rx_batch", kind = "reactor", batch_size = 2, handle = function() end },
      { store = store })
    assert.equal(2, q:run_once())
    q:close()
    q = pup.processor(db, { name = "rx_batch2", kind = "reactor", handle = function() end },
      { store = store, batch_size = 3 })
    assert.equal(3, q:run_once())
    q:close()
  end)

  it("a failing handler fails its batch: the checkpoint stays, the event is delivered again", function()
    local calls, fail = {}, true
    local r = { name = "rx_fail", kind = "reactor",
      handle = function(e)
        calls[#calls + 1] = e.global_position
        if fail and e.aggregate_version == 2 then error("mail server down") end
      end }
    local res = assert(store:append(db, pup.no_stream(), { ev("f"), ev("f"), ev("f") }))
    local p = pup.processor(db, r, { store = store })
    local n, err = p:run { once = true }
    assert.is_nil(n)
    assert.equal("handler", err.code)
    assert.matches("handler failed at global position " .. res.global_positions[2], err.message)
    assert.matches("mail server down", err.message)
    assert.equal(res.global_positions[1], checkpoint(db, T, "rx_fail"))
    fail = false
    assert.equal(2, p:run { once = true })
    assert.same({ res.global_positions[1], res.global_positions[2], res.global_positions[2], res.global_positions[3] }, calls)
    -- `return nil, err` fails it as well
    p:close()
    p = pup.processor(db, { name = "rx_fail2", kind = "reactor", handle = function() return nil, "bounced" end },
      { store = store })
    n, err = p:run_once()
    assert.is_nil(n)
    assert.matches("bounced", err.message)
    p:close()
  end)

  it("scopes and upcasters apply to the events they get", function()
    local got = {}
    pup.upcast("Happened", 1, function(d) return { n = d.n, upcast = true } end)
    local ok, err = pcall(function()
      assert(store:append(db, pup.no_stream(), { ev("u") }))
      assert(store:append(db, pup.no_stream(), { ev("v", { aggregate_type = "Other" }) }))
      local p = pup.processor(db, { name = "rx_up", kind = "reactor", aggregate_types = { "Thing" },
        handle = function(e) got[#got + 1] = e end }, { store = store })
      assert(p:run { once = true })
      p:close()
    end)
    pup.remove_upcaster("Happened", 1)
    assert(ok, err)
    assert.equal(1, #got)
    assert.equal(2, got[1].event_version)
    assert.is_true(got[1].data.upcast)
  end)
end)

-- The reactor of the kill test: records every delivered event through a connection of
-- its own (autocommit: outside the batch transaction), slowly.
local REACTOR = [[
local pup = require "pupsourcing"
local f = assert(io.open("/proc/self/stat"))
local pid = tonumber(f:read("l"):match("^(%d+)"))
f:close()
local db
return {
  name = "rx_recorder",
  kind = "reactor",
  handle = function(e)
    db = db or assert(pup.connect(os.getenv("DATABASE_URL")))
    assert(db:exec("INSERT INTO @T@ (event_id, pos, agg, ver, pid) VALUES ($1, $2, $3, $4, $5)",
      e.event_id, e.global_position, e.aggregate_id, e.aggregate_version, pid))
    pup.sleep(0.004)
  end,
}
]]

-- A writer: n events over 8 aggregates, one per append, pausing a little.
local WRITER = [[
local pup = require "pupsourcing"
local url, ev, hd, ck, n, prefix = table.unpack(arg)
local db = assert(pup.connect(url))
local store = pup.store { events_table = ev, aggregate_heads_table = hd, checkpoints_table = ck }
for i = 1, tonumber(n) do
  assert(store:append(db, pup.any(), { { aggregate_type = "Thing", aggregate_id = prefix .. (i % 8),
    event_type = "Happened", payload = { i = i } } }))
  if i % 10 == 0 then pup.sleep(0.02) end
end
print("done")
]]

describe("a reactor in a worker group, SIGKILLed 5 times while writers append", function()
  it("delivers every event at least once, in order per aggregate, duplicates at most one per kill or lost lease", function()
    local _, db, T = fresh()
    local dir = H.tmpdir()
    H.write_file(dir .. "/reactor.lua", (REACTOR:gsub("@T@", DELIVERED)))
    H.write_file(dir .. "/writer.lua", WRITER)
    local flags = { "--database-url", H.url(), "--events-table", T.events_table, "--aggregate-heads-table",
                    T.aggregate_heads_table, "--checkpoints-table", T.checkpoints_table }
    local function start_reactor()
      local words = { H.bin, "run", "--group", "--partitions", "4", "--lease-ttl", "600", "--poll-interval", "50" }
      for _, f in ipairs(flags) do words[#words + 1] = f end
      words[#words + 1] = dir .. "/reactor.lua"
      return H.spawn(words)
    end
    local writers = {}
    for w = 1, 2 do
      writers[w] = H.spawn({ H.bin, dir .. "/writer.lua", H.url(), T.events_table, T.aggregate_heads_table,
                             T.checkpoints_table, "300", "w" .. w .. "-" })
    end
    local function delivered() return assert(db:query("SELECT count(*) AS n FROM " .. DELIVERED))[1].n end
    local kills, losses = 0, 0
    -- a worker that stalled past its lease (a loaded machine) gives its batch up and says so:
    -- the next holder delivers that batch again
    local function count_losses(proc)
      local _, n = H.stderr_of(proc):gsub("lost the lease", "")
      losses = losses + n
    end
    for _ = 1, 5 do
      local proc = start_reactor()
      local before = delivered()
      -- mid-stream: it delivered some events since it started
      H.wait_until(function() return "deliveries by the reactor; stderr: " .. H.stderr_of(proc) end, 60,
        function() return delivered() >= before + 15 end, 0.01)
      H.signal(proc, "KILL")
      assert.equal(137, H.wait_exit(proc, 10))
      kills = kills + 1
      count_losses(proc)
      H.reap(proc)
    end
    for w, p in ipairs(writers) do
      assert.equal(0, H.wait_exit(p, 90), "writer " .. w .. ": " .. H.stderr_of(p))
      H.reap(p)
    end
    local total = db:query(('SELECT count(*) AS n FROM "%s"'):format(T.events_table))[1].n
    assert.equal(600, total)
    local final = start_reactor()
    H.wait_until(function() return "the reactor to catch up; stderr: " .. H.stderr_of(final) end, 90, function()
      return assert(db:query(('SELECT count(*) AS n FROM "%s" e WHERE NOT EXISTS (SELECT 1 FROM %s d WHERE d.event_id = e.event_id::text)')
        :format(T.events_table, DELIVERED)))[1].n == 0
    end, 0.05)
    H.signal(final, "TERM")
    assert.equal(0, H.wait_exit(final, 20), H.stderr_of(final))
    count_losses(final)
    H.reap(final)
    H.rmdir(dir)
    assert.equal(5, kills)
    -- none lost: every event was delivered (waited for above), nothing else was
    local rows = db:query("SELECT event_id, pos, agg, ver, pid FROM " .. DELIVERED .. " ORDER BY n")
    local seen, dups = {}, 0
    for _, r in ipairs(rows) do
      if seen[r.event_id] then dups = dups + 1 end
      seen[r.event_id] = true
    end
    local distinct = 0
    for _ in pairs(seen) do distinct = distinct + 1 end
    assert.equal(total, distinct)
    -- duplicates only around the kills: a kill loses at most the one uncommitted batch
    -- (batch_size 1), delivered again by the next worker
    io.stderr:write(("reactor kill test: %d events, %d deliveries, %d duplicates, %d kills, %d leases lost\n"):format(
      total, #rows, dups, kills, losses))
    assert.is_true(dups <= kills + losses, ("%d duplicates for %d kills and %d leases lost"):format(dups, kills, losses))
    -- in order per aggregate: a version never goes back, except to repeat the last one
    local last = {}
    for _, r in ipairs(rows) do
      local prev = last[r.agg]
      assert.is_true(prev == nil or r.ver == prev or r.ver == prev + 1,
        ("%s: version %d delivered after %s"):format(r.agg, r.ver, tostring(prev)))
      last[r.agg] = r.ver
    end
    -- the group's checkpoints reached the head
    local head = db:query(('SELECT max(global_position) AS p FROM "%s"'):format(T.events_table))[1].p
    assert.equal(head, checkpoint(db, T, "rx_recorder"))
    db:close()
  end)
end)
