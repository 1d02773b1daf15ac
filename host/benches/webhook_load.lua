-- wrk script for scripts/bench-webhooks.sh: POST /webhooks/stripe with
-- pre-signed Stripe events, a distinct event id per request (read from the
-- file in WEBHOOK_DATA: one "signature<TAB>body" per line; thread k of n
-- takes lines k, k+n, ...). Prints throughput, p50/p99 and failures.

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  failures = 0
  events = {}
  local n = tonumber(os.getenv("WRK_THREADS") or "2")
  local i = 0
  for line in io.lines(os.getenv("WEBHOOK_DATA")) do
    if i % n == tid - 1 then
      local tab = line:find("\t", 1, true)
      table.insert(events, { line:sub(1, tab - 1), line:sub(tab + 1) })
    end
    i = i + 1
  end
  cursor = 0
end

function request()
  cursor = cursor % #events + 1
  local event = events[cursor]
  return wrk.format("POST", "/webhooks/stripe",
    { ["Content-Type"] = "application/json", ["Stripe-Signature"] = event[1] }, event[2])
end

function response(status, headers, body)
  if status ~= 200 then
    failures = failures + 1
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("failures")
  end
  local seconds = summary.duration / 1e6
  io.write(string.format("RESULT rps=%.0f p50=%.2fms p99=%.2fms requests=%d failed=%d\n",
    summary.requests / seconds, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests, failed))
end
