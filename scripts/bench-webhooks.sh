#!/usr/bin/env bash
# Webhook ingest: verified (in the sandbox) and durably stored Stripe
# webhooks per second, with p50/p99, on SQLite and PostgreSQL, with wrk on
# loopback sending pre-signed events (distinct event ids); then how long the
# apply stage takes to drain what was stored.
#
#   scripts/bench-webhooks.sh                 10 s at 32 connections
#   BENCH_DURATION=30 BENCH_CONNECTIONS=64 scripts/bench-webhooks.sh
#   BENCH_NO_BUILD=1 scripts/bench-webhooks.sh   reuse the release build
#   BENCH_BACKENDS=postgres BENCH_PG_PROFILE=1 scripts/bench-webhooks.sh
#       PostgreSQL only, and print pg_stat_statements' top statements by
#       total time over the run (load and drain)
#
# Needs `make connectors` (the Stripe component). Installs wrk if missing.
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"

DURATION="${BENCH_DURATION:-10}"
CONNECTIONS="${BENCH_CONNECTIONS:-32}"
EVENTS="${BENCH_EVENTS:-400000}"
PG_BIN="${FERRY_PG_BIN:-/usr/lib/postgresql/15/bin}"
LUA="$FERRY_ROOT/host/benches/webhook_load.lua"
SECRET="whsec_bench_0123456789abcdef"

if ! command -v wrk >/dev/null; then
  step "installing wrk (Debian package)"
  apt_get_install wrk
fi
[ -f "$CARGO_TARGET_DIR/release/connectors/stripe.wasm" ] || "$FERRY_ROOT/scripts/build-connectors.sh"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
  step "building ferry and ferry-pg (release)"
  cargo build --quiet --release -p ferry --bin ferry -p ferry-test-support --bin ferry-pg
fi
ferry_bin="$CARGO_TARGET_DIR/release/ferry"
pg_helper="$CARGO_TARGET_DIR/release/ferry-pg"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${BENCH_KEEP:-}" ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# events.tsv: "Stripe-Signature<TAB>body" per line, signed now (Stripe's
# tolerance is 300 s, so generate right before the runs).
gen_events() {
  python3 - "$WORK/events.tsv" "$EVENTS" "$SECRET" "$1" <<'PY'
import hashlib, hmac, json, sys, time
path, count, secret, run = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
t = int(time.time())
with open(path, "w") as out:
    for i in range(count):
        body = json.dumps({
            "id": f"evt_{run}_{i}", "object": "event", "type": "customer.created", "created": t,
            "data": {"object": {"id": f"cus_{run}_{i}", "object": "customer",
                                "email": f"bench-{run}-{i}@example.com", "name": f"Bench {i}",
                                "phone": "+15555550100", "metadata": {}}}}, separators=(",", ":"))
        sig = hmac.new(secret, f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
        out.write(f"t={t},v1={sig}\t{body}\n")
PY
}

# pending_count BACKEND URL: inbox events not yet applied.
pending_count() {
  if [ "$1" = sqlite ]; then
    python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"SELECT count(*) FROM inbox WHERE state IN ('pending','retry')\").fetchone()[0])" "${2#sqlite://}"
  else
    "$PG_BIN/psql" "$2" -tAc "SELECT count(*) FROM inbox WHERE state IN ('pending','retry')"
  fi
}

bench() {
  local name="$1" url="$2" port
  port="$(free_port)"
  FERRY_LISTEN="127.0.0.1:$port" FERRY_DATABASE_URL="$url" FERRY_DATABASE_MAX_CONNECTIONS=32 \
    RUST_LOG=warn \
    FERRY_CONNECTORS__STRIPE__SECRETS__API_KEY=sk_test_bench \
    FERRY_CONNECTORS__STRIPE__SECRETS__WEBHOOK_SECRET="$SECRET" \
    FERRY_CONNECTORS__STRIPE__SETTINGS__API_BASE=http://127.0.0.1:9 \
    "$ferry_bin" serve >"$WORK/ferry-$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  gen_events "$name$(date +%s)"
  step "ferry on $name: POST /webhooks/stripe, $CONNECTIONS connections, ${DURATION}s"
  WRK_THREADS=2 WEBHOOK_DATA="$WORK/events.tsv" \
    wrk -t 2 -c "$CONNECTIONS" -d "${DURATION}s" -s "$LUA" "http://127.0.0.1:$port" | grep '^RESULT'
  local start pending
  start="$(date +%s.%N)"
  pending="$(pending_count "$name" "$url")"
  echo "apply stage: $pending events still pending when the load stopped"
  while [ "$(pending_count "$name" "$url")" -gt 0 ]; do sleep 0.5; done
  python3 -c "import sys; print(f'apply stage drained them in {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$start" "$(date +%s.%N)"
  if [ "$name" = postgres ] && [ -n "${BENCH_PG_PROFILE:-}" ]; then
    step "pg_stat_statements: top statements by total time"
    "$PG_BIN/psql" "$url" -P pager=off -c "SELECT calls, round(total_exec_time::numeric, 0) AS total_ms,
        round(mean_exec_time::numeric, 3) AS mean_ms, rows,
        left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS query
      FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      ORDER BY total_exec_time DESC LIMIT 15"
  fi
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

mkfifo "$WORK/pg-stdin"
PG_OPTIONS=""
if [ -n "${BENCH_PG_PROFILE:-}" ]; then
  PG_OPTIONS="-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all"
fi
# Only the cluster gets it: ferry refuses FERRY_ variables it does not know.
FERRY_PG_OPTIONS="$PG_OPTIONS" "$pg_helper" <"$WORK/pg-stdin" >"$WORK/pg-url" &
PIDS+=("$!")
exec 8>"$WORK/pg-stdin"
for _ in $(seq 1 300); do [ -s "$WORK/pg-url" ] && break; sleep 0.1; done
PG_URL="$(head -n1 "$WORK/pg-url")"

if [ -n "${BENCH_PG_PROFILE:-}" ]; then
  "$PG_BIN/psql" "$PG_URL" -qc "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
fi
for backend in ${BENCH_BACKENDS:-sqlite postgres}; do
  case "$backend" in
    sqlite) bench sqlite "sqlite://$WORK/bench.db" ;;
    postgres) bench postgres "$PG_URL" ;;
  esac
done
exec 8>&-
