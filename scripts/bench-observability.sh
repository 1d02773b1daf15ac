#!/usr/bin/env bash
# The cost of metrics and logs on the API create benchmark: a release ferry
# on PostgreSQL, 32 clients posting customers, in three modes:
#   off      FERRY_METRICS=false, RUST_LOG=warn
#   metrics  FERRY_METRICS=true (/metrics scraped every second), RUST_LOG=warn
#   on       metrics, and RUST_LOG=info with FERRY_LOG_FORMAT=json written to
#            a file: one access-log line per request
# in rotating windows of the same run, each on a fresh database, so the
# machine's noise hits all of them alike.
#
#   scripts/bench-observability.sh                 3 rounds of 10 s windows
#   BENCH_ROUNDS=5 BENCH_DURATION=20 scripts/bench-observability.sh
#   BENCH_NO_BUILD=1 scripts/bench-observability.sh  reuse the release build
#
# Installs wrk (Debian) if missing.
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"

DURATION="${BENCH_DURATION:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
CLIENTS="${BENCH_CLIENTS:-32}"
PG_BIN="${FERRY_PG_BIN:-/usr/lib/postgresql/15/bin}"
LUA="$FERRY_ROOT/host/benches/api_load.lua"

if ! command -v wrk >/dev/null; then
  step "installing wrk (Debian package)"
  apt_get_install wrk
fi
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
  rm -rf "$WORK"
}
trap cleanup EXIT

mkfifo "$WORK/pg-stdin"
"$pg_helper" <"$WORK/pg-stdin" >"$WORK/pg-url" &
PIDS+=("$!")
exec 8>"$WORK/pg-stdin"
for _ in $(seq 1 300); do [ -s "$WORK/pg-url" ] && break; sleep 0.1; done
PG_URL="$(head -n1 "$WORK/pg-url")"
PG_PORT="$(echo "$PG_URL" | sed -E 's#.*:([0-9]+)/.*#\1#')"
PSQL=("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -q -v ON_ERROR_STOP=1)

# window MODE N: one window on a fresh database; prints wrk's RESULT line.
window() {
  local mode="$1" n="$2" port db url pid scraper=""
  port="$(free_port)"
  db="w_${mode}_$n"
  "${PSQL[@]}" -d postgres -c "CREATE DATABASE $db"
  url="${PG_URL%/*}/$db"
  if [ "$mode" = on ]; then
    FERRY_LISTEN="127.0.0.1:$port" FERRY_DATABASE_URL="$url" FERRY_DATABASE_MAX_CONNECTIONS=32 \
      FERRY_CONNECTORS_DIR="$WORK/no-connectors" FERRY_METRICS=true FERRY_LOG_FORMAT=json RUST_LOG=info \
      "$ferry_bin" serve >"$WORK/ferry-$db.log" 2>&1 &
  elif [ "$mode" = metrics ]; then
    FERRY_LISTEN="127.0.0.1:$port" FERRY_DATABASE_URL="$url" FERRY_DATABASE_MAX_CONNECTIONS=32 \
      FERRY_CONNECTORS_DIR="$WORK/no-connectors" FERRY_METRICS=true RUST_LOG=warn \
      "$ferry_bin" serve >"$WORK/ferry-$db.log" 2>&1 &
  else
    FERRY_LISTEN="127.0.0.1:$port" FERRY_DATABASE_URL="$url" FERRY_DATABASE_MAX_CONNECTIONS=32 \
      FERRY_CONNECTORS_DIR="$WORK/no-connectors" FERRY_METRICS=false RUST_LOG=warn \
      "$ferry_bin" serve >"$WORK/ferry-$db.log" 2>&1 &
  fi
  pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  if [ "$mode" != off ]; then
    (while true; do curl -fsS "http://127.0.0.1:$port/metrics" >/dev/null 2>&1; sleep 1; done) &
    scraper=$!
  fi
  wrk -t 2 -c "$CLIENTS" -d "${DURATION}s" -s "$LUA" "http://127.0.0.1:$port" | grep '^RESULT'
  [ -n "$scraper" ] && kill "$scraper" 2>/dev/null
  if [ "$mode" = on ]; then
    echo "log lines: $(wc -l <"$WORK/ferry-$db.log")" >&2
  fi
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

declare -a OFF METRICS ON
for n in $(seq 1 "$ROUNDS"); do
  # Rotate which mode goes first.
  case $((n % 3)) in
    1) order="off metrics on" ;;
    2) order="metrics on off" ;;
    *) order="on off metrics" ;;
  esac
  for mode in $order; do
    step "round $n: $mode, $CLIENTS clients, ${DURATION}s"
    line="$(window "$mode" "$n")"
    echo "$line"
    case "$mode" in
      on) ON+=("$line") ;;
      metrics) METRICS+=("$line") ;;
      *) OFF+=("$line") ;;
    esac
  done
done
exec 8>&-

step "summary (median of $ROUNDS windows each)"
python3 - "${OFF[@]}" "---" "${METRICS[@]}" "---" "${ON[@]}" <<'PY'
import re, statistics, sys
args = sys.argv[1:]
first = args.index("---")
second = args.index("---", first + 1)
def parse(lines):
    out = []
    for line in lines:
        f = dict(re.findall(r"(\w+)=([0-9.]+)", line))
        out.append((float(f["rps"]), float(f["p50_ms"]), float(f["p99_ms"])))
    return out
off, metrics, on = parse(args[:first]), parse(args[first + 1:second]), parse(args[second + 1:])
med = lambda rows, i: statistics.median(r[i] for r in rows)
for name, rows in (("off", off), ("metrics", metrics), ("on", on)):
    print(f"{name:8} rps {med(rows, 0):8.0f}  p50 {med(rows, 1):6.2f} ms  p99 {med(rows, 2):6.2f} ms"
          f"  throughput x{med(rows, 0) / med(off, 0):.3f} of off")
PY
