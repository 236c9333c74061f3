-- Lua-handler overhead: W3 with a handler that does nothing (reads, Lua calls and
-- checkpoints only).
return {
  name = "bench_noop",
  handle = function(tx, event) end,
}
