-- luacheck configuration (Debian lua-check). Run by scripts/test.sh as the `luacheck` test.
std = "lua54"
-- SQL strings and test tables read better unbroken; length is left to review.
max_line_length = false
-- Handlers and hooks are called with arguments they need not use (tx, event, ...).
unused_args = false
files["spec/"] = { std = "+busted" }
files["spec/helpers.lua"] = { std = "+busted" }
exclude_files = { "spec/fixtures/bad/syntax_error.lua" } -- a syntax error on purpose
