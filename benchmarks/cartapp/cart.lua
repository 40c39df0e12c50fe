-- The request mix of `python -m benchmarks.cart` for wrk: CART_ADD_PERCENT% adds, the rest views.
-- A request picks a user uniformly among CART_USERS and, for an add, one of CART_ITEMS items.
local users = tonumber(os.getenv("CART_USERS") or "1000")
local items = tonumber(os.getenv("CART_ITEMS") or "20")
local add_percent = tonumber(os.getenv("CART_ADD_PERCENT") or "10")
local threads = {}
local counter = 1

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(id * 7919 + os.time())
  failed = 0
end

function request()
  local user = math.random(users)
  if math.random(100) <= add_percent then
    return wrk.format("POST", "/cart/u" .. user .. "/add?item=i" .. math.random(items))
  end
  return wrk.format("GET", "/cart/u" .. user)
end

function response(status, headers, body)
  if status ~= 200 then
    failed = failed + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("failed")
  end
  io.write(string.format("CART_RESULT requests=%d failed=%d errors=%d p50_us=%d p99_us=%d max_us=%d duration_us=%d\n",
    summary.requests, total, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, summary.duration))
end
