-- Issue 13: `pupsourcing run --once` exits as soon as its work is done. Its supervisor used
-- to look at the workers every 200 ms, so every run took at least that long; a worker that
-- ends now wakes it. The fastest of five runs (pup.runner{once = true}:run(), what `run
-- --once` calls, in this process: no process start-up in the measure) over a handful of
-- events must take under 190 ms: the old supervisor's first look came at 200 ms, so every
-- run took longer (the minimum keeps a busy machine's slow moments out of the measure).
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("run --once", function()
  local store, db, T, dir

  before_each(function()
    store, db, T = H.fresh_store("once_exit")
    dir = H.tmpdir()
    H.write_file(dir .. "/noop.lua", 'return { name = "once_exit", handle = function(tx, e) end }')
  end)

  after_each(function()
    db:close()
    H.rmdir(dir)
  end)

  it("exits as soon as the checkpoint is at the head, not at the supervisor's next look", function()
    assert(store:append(db, pup.any(), H.events(3, { aggregate_id = "once-1" })))
    local best = math.huge
    for i = 1, 5 do
      if i > 1 then assert(store:append(db, pup.any(), H.events(2, { aggregate_id = "once-" .. i }))) end
      local r = pup.runner { files = { dir .. "/noop.lua" }, once = true, database_url = H.url(), store = {
        events_table = T.events_table, aggregate_heads_table = T.aggregate_heads_table,
        checkpoints_table = T.checkpoints_table } }
      local t0 = pup.now()
      local res = assert(r:run())
      local dt = pup.now() - t0
      assert.equal(1, res.once_exit.partitions)
      best = math.min(best, dt)
    end
    local st = assert(pup.status(db, store))
    local head = assert(store:head(db))
    assert.equal(1, #st)
    for _, row in ipairs(st) do assert.equal(head, row.position) end
    io.stderr:write(("runner once: fastest of 5 runs %.0f ms\n"):format(best * 1000))
    assert.is_true(best < 0.19, ("run --once took %.0f ms at best (the supervisor's 200 ms look?)"):format(best * 1000))
  end)
end)
