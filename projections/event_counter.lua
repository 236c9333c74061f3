-- Per-event-type counter: how many events of each type the log holds.
--
--   pupsourcing run projections/event_counter.lua
--   SELECT * FROM event_type_counts ORDER BY event_type;
--
-- Not idempotent on purpose (count = count + 1): it is exact only because the processor
-- commits the read-model writes and the checkpoint in one transaction, so every event is
-- counted exactly once even across crashes and restarts.
--
-- Partitions: several partitions counting the same event type would fight over one row
-- (and could deadlock on rows locked in opposite orders). So counts live in shards keyed by
-- a hash of the aggregate id (64 shards); with 1, 2, 4, ... 64 partitions no two partitions
-- ever touch the same shard. `event_type_counts` is a view that sums the shards.

local pup = require "pupsourcing"

local SHARDS = 64

local P = {
  name = "event_counter",
  batch_size = 200,
}

function P.setup(tx)
  assert(tx:query("SELECT pg_advisory_xact_lock(hashtext('pupsourcing.projection.event_type_counts'))"))
  assert(tx:exec([[
    CREATE TABLE IF NOT EXISTS event_type_count_shards (
      event_type    TEXT NOT NULL,
      shard         INT NOT NULL,
      count         BIGINT NOT NULL DEFAULT 0,
      last_position BIGINT NOT NULL,
      updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
      PRIMARY KEY (event_type, shard)
    )]]))
  assert(tx:exec([[
    CREATE OR REPLACE VIEW event_type_counts AS
      SELECT event_type, sum(count)::bigint AS count, max(last_position) AS last_position,
             max(updated_at) AS updated_at
      FROM event_type_count_shards GROUP BY event_type]]))
end

function P.handle(tx, event)
  assert(tx:exec([[
    INSERT INTO event_type_count_shards (event_type, shard, count, last_position, updated_at)
    VALUES ($1, $2, 1, $3, now())
    ON CONFLICT (event_type, shard) DO UPDATE SET
      count = event_type_count_shards.count + 1,
      last_position = GREATEST(event_type_count_shards.last_position, EXCLUDED.last_position),
      updated_at = now()]],
    event.event_type, pup.partition_of(event.aggregate_id, SHARDS), event.global_position))
end

function P.reset(tx)
  P.setup(tx)
  assert(tx:exec("DELETE FROM event_type_count_shards"))
end

return P
