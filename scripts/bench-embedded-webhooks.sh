#!/usr/bin/env bash
# The side-by-side webhook load (../shared/bench/stripe-sync-engine/run.sh)
# against ferry's embedded default, SQLite, which that script cannot run:
# the same generator, the same wrk script, the same ferry settings, 15 s at
# 32 connections. Prints the acknowledged rate with p50/p99, what was still
# pending when the load stopped, the drain time, and the end-to-end rate
# (events applied ÷ (load time + drain time)).
#
#   scripts/bench-embedded-webhooks.sh
#   BENCH_NO_BUILD=1 DURATION=30 scripts/bench-embedded-webhooks.sh
#   BENCH_NO_BUILD=1 BENCH_FERRY_BIN=/path/to/other/ferry scripts/bench-embedded-webhooks.sh
#
# Needs `make connectors` and the shared bench folder beside the repository.
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"

DURATION=${DURATION:-15}
CONNECTIONS=${CONNECTIONS:-32}
CUSTOMERS=${CUSTOMERS:-5000}
EVENTS=${EVENTS:-300000}
SHARED=${SHARED_BENCH:-$FERRY_ROOT/../shared/bench/stripe-sync-engine}
SECRET=whsec_bench_side_by_side
[ -f "$SHARED/gen_webhooks.py" ] || { echo "no $SHARED/gen_webhooks.py (set SHARED_BENCH)" >&2; exit 1; }
command -v wrk >/dev/null || apt_get_install wrk
[ -f "$CARGO_TARGET_DIR/release/connectors/stripe.wasm" ] || "$FERRY_ROOT/scripts/build-connectors.sh"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
  step "building ferry (release)"
  cargo build --quiet --release -p ferry --bin ferry
fi

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
db="$work/ferry.db"
FERRY_LISTEN="127.0.0.1:$port" FERRY_DATABASE_URL="sqlite://$db" \
  FERRY_CONNECTORS_DIR="$CARGO_TARGET_DIR/release/connectors" RUST_LOG=warn \
  FERRY_CONNECTORS__STRIPE__SECRETS__API_KEY=sk_test_bench \
  FERRY_CONNECTORS__STRIPE__SECRETS__WEBHOOK_SECRET=$SECRET \
  FERRY_CONNECTORS__STRIPE__SETTINGS__API_BASE=http://127.0.0.1:9 \
  FERRY_ALLOW_PRIVATE_HOSTS=true \
  "${BENCH_FERRY_BIN:-$CARGO_TARGET_DIR/release/ferry}" serve >"$work/ferry.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done

count() { # SQL -> a number, read-only beside the running writer
  python3 - "$db" "$1" <<'PY'
import sqlite3, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
print(con.execute(sys.argv[2]).fetchone()[0])
PY
}
python3 "$SHARED/gen_webhooks.py" "$EVENTS" "$CUSTOMERS" "$SECRET" "$work/wh.txt"
result=$(WEBHOOKS="$work/wh.txt" WEBHOOK_PATH=/webhooks/stripe \
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" -s "$SHARED/webhooks.lua" "http://127.0.0.1:$port" | grep RESULT)
loaded=$(date +%s.%N)
pending_at_end=$(count "SELECT count(*) FROM inbox WHERE state IN ('pending','retry')")
while [ "$(count "SELECT count(*) FROM inbox WHERE state IN ('pending','retry')")" != 0 ]; do sleep 0.5; done
done_at=$(date +%s.%N)
applied=$(count "SELECT count(*) FROM inbox WHERE state IN ('applied','skipped')")
python3 - "$result" "$DURATION" "$loaded" "$done_at" "$applied" "$pending_at_end" <<'PY'
import sys
result, duration, loaded, done, applied, pending = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
drain = done - loaded
print(f"ferry (SQLite): {result}  pending_at_load_end={pending}  drain_s={drain:.1f}  "
      f"end_to_end={applied / (duration + drain):.0f}/s  applied={applied}")
PY
