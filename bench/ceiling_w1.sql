-- W1 ceiling (pgbench -M prepared -n -c 1 -t 20000): per transaction one prepared
-- statement inserting the same event as W1 (new User aggregate, random UUID id, version 1,
-- global_position from the schema's default) and upserting its head.
WITH a AS (SELECT gen_random_uuid()::text AS id),
ins AS (
  INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_id, event_type,
                      event_version, payload, metadata)
  SELECT 'User', a.id, 1, gen_random_uuid(), 'UserCreated', 1,
         '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb
    FROM a
  RETURNING aggregate_id, aggregate_version)
INSERT INTO aggregate_heads (aggregate_type, aggregate_id, aggregate_version, updated_at)
SELECT 'User', aggregate_id, aggregate_version, now() FROM ins
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
  SET aggregate_version = EXCLUDED.aggregate_version, updated_at = EXCLUDED.updated_at;
