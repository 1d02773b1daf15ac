-- wrk script for scripts/bench-api.sh: POST /api/v1/customers with a unique
-- email per request and a body of about 1 KB (to compare with pgbench's 1 KB
-- single-row insert). Prints throughput, p50/p99 latency and failures.

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

local note = string.rep("n", 400)

function init(args)
  counter = 0
  failures = 0
  math.randomseed(os.time() * 1000 + tid)
  prefix = string.format("%d-%d-%d", tid, os.time(), math.random(1, 1000000000))
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"name":"Bench Customer %d","email":"bench-%s-%d@example.com","phone":"+1 555 0100",' ..
    '"address":{"line1":"1 Infinite Loop","city":"Cupertino","postal_code":"95014","country":"US"},' ..
    '"metadata":{"source":"wrk","note1":"%s","note2":"%s"}}',
    counter, prefix, counter, note, note)
  return wrk.format("POST", "/api/v1/customers", { ["Content-Type"] = "application/json" }, body)
end

function response(status, headers, body)
  if status ~= 201 then
    failures = failures + 1
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("failures")
  end
  local seconds = summary.duration / 1e6
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f requests=%d failed=%d errors=%d\n",
    summary.requests / seconds, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests, failed,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
