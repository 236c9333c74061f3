-- pup.json against lua-cjson (when installed: `apt-get install lua-cjson`), ns per call,
-- on the bench payload and a larger one. Run: build/pupsourcing bench/json.lua
local pup = require "pupsourcing"
local ok, cjson = pcall(require, "cjson")
local N = 300000
local docs = {
  bench = '{"email":"u@example.com","name":"User"}',
  order = '{"id":"a3c1e2","amount":12345,"price":19.99,"tags":["a","b","c"],'
    .. '"items":[{"sku":"X1","qty":2},{"sku":"Y2","qty":1}],"ok":true,"note":null}',
}
local function ns(f, x)
  local t = os.clock()
  for _ = 1, N do f(x) end
  return (os.clock() - t) / N * 1e9
end
for _, name in ipairs { "bench", "order" } do
  local text = docs[name]
  local d, e = ns(pup.json.decode, text), ns(pup.json.encode, pup.json.decode(text))
  if ok then
    local cd, ce = ns(cjson.decode, text), ns(cjson.encode, cjson.decode(text))
    print(string.format("%-6s decode %5.0f ns (cjson %5.0f, %.2fx)  encode %5.0f ns (cjson %5.0f, %.2fx)",
      name, d, cd, d / cd, e, ce, e / ce))
  else
    print(string.format("%-6s decode %5.0f ns  encode %5.0f ns  (lua-cjson not installed)", name, d, e))
  end
end
