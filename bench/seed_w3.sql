-- W3/W4 seed: :per UserCreated events for each of :aggs User aggregates, interleaved
-- (version 1 of every aggregate, then version 2, ...), set-based, plus their heads and
-- the empty read model. Aggregate ids are md5(k)::uuid for k = 1..:aggs, so the pgbench
-- ceiling scripts can name the same rows without reading them.
--   psql -v aggs=10000 -v per=10 -f bench/seed_w3.sql URL   (after `pupsourcing migrate`)
\set ON_ERROR_STOP on
\timing on
INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_id, event_type,
                    event_version, payload, metadata)
SELECT 'User', md5(a::text)::uuid::text, v, gen_random_uuid(), 'UserCreated', 1,
       convert_to('{"email":"u@example.com","name":"User"}', 'UTF8'), '{}'::jsonb
  FROM generate_series(1, :per) v, generate_series(1, :aggs) a
 ORDER BY v, a;
INSERT INTO aggregate_heads (aggregate_type, aggregate_id, aggregate_version)
SELECT 'User', md5(a::text)::uuid::text, :per FROM generate_series(1, :aggs) a;
\timing off
CREATE TABLE user_stats (
  user_id    TEXT PRIMARY KEY,
  last_event BIGINT NOT NULL,
  n          BIGINT NOT NULL
);
VACUUM ANALYZE;
