-- "Idle costs nothing" (README): a `pupsourcing run` with nothing to do uses no CPU to speak
-- of and sends no statement between polls; an append wakes it (NOTIFY) long before its
-- --poll-interval.
local pup = require "pupsourcing"
local H = require "spec.helpers"

local TICK = 100 -- clock ticks per second of /proc/PID/stat (getconf CLK_TCK)

-- utime + stime of a process (all its threads), in seconds.
local function cpu_seconds(pid)
  local s = H.read_file("/proc/" .. pid .. "/stat")
  local fields = {}
  for w in s:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = w end
  -- fields after "(comm)": state is 3 in proc(5) numbering, utime 14, stime 15
  return (tonumber(fields[14 - 2]) + tonumber(fields[15 - 2])) / TICK
end

describe("an idle processor", function()
  local f, store, db, T

  before_each(function()
    f = H.processor_fixture("idle", "idle_counter")
    store, db, T = f.store, f.db, f.T
  end)

  after_each(function() f:close() end)

  local function start(poll_ms) return f:run(poll_ms) end
  local function seen() return f:seen() end


  for _, poll in ipairs { 1000, 60000 } do
    it(("uses < 1%% CPU over 3 s and runs one transaction per poll, nothing else (--poll-interval %d)"):format(poll), function()
      assert(store:append(db, pup.any(), { H.event { aggregate_id = "idle-1" } }))
      local p = start(poll)
      H.wait_until("the first event handled", 20, function()
        assert.is_nil(H.exit_code(p), H.stderr_of(p))
        return seen() == 1
      end, 0.02)
      pup.sleep(0.3) -- past the batch that found nothing more
      local c0, t0 = cpu_seconds(p.pid), pup.now()
      -- every statement of its backend has a new query_start, every transaction (a poll is
      -- one) a new xact_start: sample them (sampling can miss some, never add any)
      local starts, xacts, bpid = {}, {}, nil
      while pup.now() - t0 < 3 do
        local rows = assert(db:query([[SELECT a.pid, a.query_start::text AS qs, a.xact_start::text AS xs FROM pg_stat_activity a
            JOIN pg_locks l USING (pid) WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
            AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)]],
          "pupsourcing/" .. T.checkpoints_table .. "/idle_counter/0/1"))
        assert.equal(1, #rows, "the processor's backend")
        bpid = bpid or rows[1].pid
        assert.equal(bpid, rows[1].pid, "the processor reconnected")
        starts[rows[1].qs] = true
        if rows[1].xs ~= pup.null then xacts[rows[1].xs] = true end
        pup.sleep(0.01)
      end
      local wall = pup.now() - t0
      local cpu = cpu_seconds(p.pid) - c0
      local n, nx = 0, 0
      for _ in pairs(starts) do n = n + 1 end
      for _ in pairs(xacts) do nx = nx + 1 end
      io.stderr:write(("idle --poll-interval %d: %.3f s CPU in %.2f s, %d statement(s) and %d transaction(s) seen\n")
        :format(poll, cpu, wall, n, nx))
      assert.is_true(cpu / wall < 0.01, ("%.3f s of CPU in %.2f s idle"):format(cpu, wall))
      assert.is_true(nx <= math.ceil(wall * 1000 / poll), nx .. " transactions in " .. wall .. " s")
      if poll > wall * 1000 then -- no statement at all: the one seen is the last before the window
        assert.equal(1, n, "statements started while idle")
      end
      -- and an append wakes it at once, not at the next poll
      local t1 = pup.now()
      assert(store:append(db, pup.any(), { H.event { aggregate_id = "idle-1" } }))
      H.wait_until("the second event handled", 5, function() return seen() == 2 end, 0.005)
      assert.is_true(pup.now() - t1 < 0.5, ("woke after %.2f s"):format(pup.now() - t1))
      H.signal(p, "TERM")
      assert.equal(0, H.wait_exit(p, 5), H.stderr_of(p))
    end)
  end
end)
