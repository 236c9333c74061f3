-- Revenue per user, from OrderPlaced events (aggregate type "Order", payload
-- {user_id=, amount=}). An example-local projection file next to the shared ones.
--   SELECT * FROM user_revenue ORDER BY total DESC;
-- Counts with `orders = orders + 1`: exact because the row update and the checkpoint
-- commit together (every event is applied exactly once).
return {
  name = "revenue_tracker",
  aggregate_types = { "Order" },
  event_types = { "OrderPlaced" },
  batch_size = 50, -- smaller batches than the other projections, on purpose

  setup = function(tx)
    assert(tx:query("SELECT pg_advisory_xact_lock(hashtext('pupsourcing.projection.user_revenue'))"))
    assert(tx:exec([[
      CREATE TABLE IF NOT EXISTS user_revenue (
        user_id    TEXT PRIMARY KEY,
        orders     BIGINT NOT NULL,
        total      NUMERIC(14, 2) NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
      )]]))
  end,

  handle = function(tx, event)
    local order = event.data
    assert(tx:exec([[
      INSERT INTO user_revenue (user_id, orders, total) VALUES ($1, 1, round($2::numeric, 2))
      ON CONFLICT (user_id) DO UPDATE SET orders = user_revenue.orders + 1,
        total = user_revenue.total + EXCLUDED.total, updated_at = now()]],
      tostring(order.user_id), ("%.2f"):format(order.amount)))
    io.stdout:write(("%s [revenue] Order placed: $%.2f by user %s\n")
      :format(os.date("%H:%M:%S"), order.amount, tostring(order.user_id):sub(1, 8)))
  end,

  reset = function(tx)
    assert(tx:exec("DELETE FROM user_revenue"))
  end,
}
