-- W2 ceiling (pgbench -M prepared -n -c 1 -t 2000): per transaction one prepared statement
-- inserting the same 50 events as a W2 append as one multi-row VALUES list (new User
-- aggregate, random UUID id, versions 1..50) and upserting the head.
WITH a AS (SELECT gen_random_uuid()::text AS id),
ins AS (
  INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_id, event_type,
                      event_version, payload, metadata)
  SELECT v.* FROM a CROSS JOIN LATERAL (VALUES
  ('User', a.id, 1, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 2, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 3, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 4, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 5, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 6, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 7, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 8, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 9, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 10, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 11, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 12, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 13, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 14, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 15, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 16, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 17, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 18, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 19, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 20, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 21, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 22, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 23, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 24, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 25, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 26, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 27, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 28, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 29, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 30, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 31, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 32, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 33, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 34, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 35, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 36, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 37, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 38, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 39, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 40, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 41, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 42, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 43, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 44, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 45, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 46, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 47, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 48, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 49, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb),
  ('User', a.id, 50, gen_random_uuid(), 'UserCreated', 1, '{"email":"u@example.com","name":"User"}'::bytea, '{}'::jsonb)
  ) v
  RETURNING aggregate_id, aggregate_version)
INSERT INTO aggregate_heads (aggregate_type, aggregate_id, aggregate_version, updated_at)
SELECT 'User', min(aggregate_id), max(aggregate_version), now() FROM ins
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
  SET aggregate_version = EXCLUDED.aggregate_version, updated_at = EXCLUDED.updated_at;
