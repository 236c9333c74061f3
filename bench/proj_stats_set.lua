-- W3-set: the W3 read model (user_stats) with one statement per batch: handle_batch gets
-- the batch's events in order and upserts every user once, with its count and last position.
-- The ids are UUIDs (no quoting needed in an array literal).
local SQL = "INSERT INTO user_stats (user_id, last_event, n)"
  .. " SELECT id, max(pos), count(*) FROM unnest($1::text[], $2::bigint[]) AS u(id, pos) GROUP BY id"
  .. " ON CONFLICT (user_id) DO UPDATE SET last_event = EXCLUDED.last_event, n = user_stats.n + EXCLUDED.n"

local concat = table.concat
return {
  name = "bench_user_stats",
  handle_batch = function(tx, events)
    local ids, pos = {}, {}
    for i = 1, #events do
      local e = events[i]
      ids[i], pos[i] = e.aggregate_id, e.global_position
    end
    tx:exec(SQL, "{" .. concat(ids, ",") .. "}", "{" .. concat(pos, ",") .. "}")
  end,
}
