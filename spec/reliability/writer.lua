-- A writer process of the reliability specs, run by the host binary:
--   pupsourcing spec/reliability/writer.lua --mode M --log FILE --events-table T
--     --aggregate-heads-table H --checkpoints-table C [mode options]
-- Every attempted append is logged, one line each, before the next one starts:
--   ok <agg> <from_version> <to_version> <pos,pos,...> <eid,eid,...>
--   reject <code> <agg> <expected|any> <eid,eid,...>          (nothing may be stored)
--   rolledback <agg> <eid,eid,...>                              (rolled back on purpose)
--   nobegin <code> <agg> <eid,eid,...> <message>   (connection lost before BEGIN: nothing sent)
--   aborted <code> <agg> <eid,eid,...> <message>   (connection lost inside the transaction, before
--                                                    COMMIT was sent: nothing may be stored)
--   unknown <code> <agg> <eid,eid,...> <message>   (connection lost at COMMIT: all or nothing)
--   connect_error <code> <message>
-- Modes:
--   exact   --appends N --aggregates A --prefix P: N acknowledged appends of 1..3 events to
--           random aggregates P1..PA with exact(version read just before); a conflict is
--           logged and retried with the version read again.
--   ooo     same, but each append runs in a transaction that sleeps (pg_sleep, 0..--max-sleep
--           seconds) after the append and before commit; --rollback F of them roll back.
--   loop    appends 3 events with any() to P<1..A> in a transaction that sleeps --max-sleep
--           before commit, until the file --stop exists; reconnects after connection errors.
local pup = require "pupsourcing"
local a = pup.args(arg)
local mode = a.mode or "exact"
local logf = assert(io.open(assert(a.log, "--log"), "w"))
logf:setvbuf("line")
local store = pup.store { events_table = a["events-table"], aggregate_heads_table = a["aggregate-heads-table"],
                          checkpoints_table = a["checkpoints-table"] }
local names = store:names()
local naggs = tonumber(a.aggregates or "20")
local prefix = a.prefix or "hot-"
local max_sleep = tonumber(a["max-sleep"] or "0")
local rollback = tonumber(a.rollback or "0")
math.randomseed(tonumber(a.seed or "") or math.floor(pup.now() * 1000000) % 1000000007)

local function log(...) logf:write(table.concat({ ... }, " "), "\n") end

local db, cerr
local function connect()
  while true do
    db, cerr = pup.connect(a["database-url"])
    if db then return end
    log("connect_error", cerr.code, (tostring(cerr.message):gsub("%s+", " ")))
    if mode ~= "loop" then os.exit(3) end
    pup.sleep(0.1)
  end
end
connect()

local function version_of(agg)
  local rows, err = db:query(('SELECT aggregate_version AS v FROM "%s" WHERE aggregate_type = $1 AND aggregate_id = $2')
    :format(names.aggregate_heads_table), "Hot", agg)
  if not rows then return nil, err end
  return rows[1] and rows[1].v or 0
end

local function make_events(agg, k, seq)
  local evs, ids = {}, {}
  for i = 1, k do
    local id = pup.uuid()
    ids[i] = id
    evs[i] = { aggregate_type = "Hot", aggregate_id = agg, event_type = "Inc", event_id = id,
               payload = { x = seq * 10 + i, w = a.id or "w" } }
  end
  return evs, table.concat(ids, ",")
end

local function oneline(e) return (tostring(e and e.message or e):gsub("%s+", " ")) end

if mode == "exact" or mode == "ooo" then
  local n = tonumber(a.appends or "500")
  for seq = 1, n do
    local agg = prefix .. math.random(1, naggs)
    local k = math.random(1, 3)
    while true do
      local v = assert(version_of(agg))
      local evs, ids = make_events(agg, k, seq)
      local res, err
      if mode == "exact" then
        res, err = store:append(db, pup.exact(v), evs)
      else
        local tx = assert(db:begin())
        res, err = store:append(tx, pup.exact(v), evs)
        if res then
          assert(tx:exec("SELECT pg_sleep($1)", math.random() * max_sleep))
          if math.random() < rollback then
            assert(tx:rollback())
            log("rolledback", agg, ids)
            res, err = nil, "rolledback"
          else
            local ok, e2 = tx:commit()
            if not ok then res, err = nil, e2 end
          end
        else
          tx:rollback()
        end
      end
      if res then
        log("ok", agg, res.from_version, res.to_version, table.concat(res.global_positions, ","), ids)
        break
      elseif err ~= "rolledback" then
        log("reject", err.code, agg, v, ids)
        if err.code ~= "optimistic_concurrency" then os.exit(4) end
      end
    end
  end
  log("done")
  os.exit(0)
elseif mode == "loop" then
  local stop = assert(a.stop, "--stop")
  local seq = 0
  while not io.open(stop) do
    seq = seq + 1
    local agg = prefix .. math.random(1, naggs)
    local evs, ids = make_events(agg, 3, seq)
    -- stage: where it failed. "begin": nothing was sent; "tx": the transaction never got to
    -- COMMIT, so nothing may be stored; "commit": the outcome is unknown (all or nothing).
    local res, err, stage
    local tx
    tx, err = db:begin()
    stage = "begin"
    if tx then
      stage = "tx"
      res, err = store:append(tx, pup.any(), evs)
      if res then
        local ok, e2 = tx:exec("SELECT pg_sleep($1)", math.random() * max_sleep)
        if ok then
          stage = "commit"
          ok, e2 = tx:commit()
        end
        if not ok then res, err = nil, e2 end
      end
      if not res then pcall(tx.rollback, tx) end
    end
    if res then
      log("ok", agg, res.from_version, res.to_version, table.concat(res.global_positions, ","), ids)
    elseif err.code == "connection" then
      log(({ begin = "nobegin", tx = "aborted", commit = "unknown" })[stage], err.code, agg, ids, oneline(err))
      pcall(db.close, db)
      pup.sleep(0.05)
      connect()
    else
      log("reject", err.code, agg, "any", ids, oneline(err))
      if err.code ~= "optimistic_concurrency" then
        -- any other code is a finding: keep going so the spec sees it in the log
        pcall(db.close, db)
        connect()
      end
    end
  end
  log("done")
  os.exit(0)
end
error("unknown --mode " .. mode)
