-- W3/W4 projection: the upsert of issue 6 into user_stats, one per event.
-- $2 (last_event) is the event's global position.
local SQL = "INSERT INTO user_stats (user_id, last_event, n) VALUES ($1, $2, 1)"
  .. " ON CONFLICT (user_id) DO UPDATE SET last_event = EXCLUDED.last_event, n = user_stats.n + 1"

return {
  name = "bench_user_stats",
  handle = function(tx, event)
    tx:exec(SQL, event.aggregate_id, event.global_position)
  end,
}
