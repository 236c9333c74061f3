-- W3-set ceiling: the W3 read model built by PostgreSQL alone, one set-based upsert per
-- :batch positions of the W3 seed, each batch its own transaction (a server-side loop: no
-- client, no reads sent over the wire, no Lua).
--   psql -v batch=1000 -f bench/ceiling_w3_set.sql URL   (on a copy of the seeded database)
\set ON_ERROR_STOP on
SELECT set_config('pupbench.batch', :'batch', false) \gset
\timing on
DO $$
DECLARE
  b bigint := current_setting('pupbench.batch')::bigint;
  lo bigint;
  hi bigint;
BEGIN
  SELECT min(global_position), max(global_position) INTO lo, hi FROM events;
  WHILE lo <= hi LOOP
    INSERT INTO user_stats (user_id, last_event, n)
    SELECT aggregate_id, max(global_position), count(*) FROM events
     WHERE global_position >= lo AND global_position < lo + b GROUP BY aggregate_id
    ON CONFLICT (user_id) DO UPDATE SET last_event = EXCLUDED.last_event, n = user_stats.n + EXCLUDED.n;
    COMMIT;
    lo := lo + b;
  END LOOP;
END
$$;
