-- wrk script for the manifest scenario of benches/run.sh.
-- BENCH_METHOD (GET or HEAD), BENCH_ACCEPT (the Accept header) and BENCH_CLOSE=1 (one connection
-- per request, as skopeo and podman do) come from the environment. At the end it prints one line,
-- "BENCH_JSON {...}", with the request count, duration, latency percentiles (microseconds) and
-- error counts; benches/bench.py reads it.

wrk.method = os.getenv("BENCH_METHOD") or "GET"
wrk.headers["Accept"] = os.getenv("BENCH_ACCEPT")
if os.getenv("BENCH_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
    '"status_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
