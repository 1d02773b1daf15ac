#!/usr/bin/env bash
# Customer-create throughput and latency of a release ferry on SQLite and on
# PostgreSQL, next to pgbench's raw single-row insert rate on the same
# PostgreSQL cluster (1 KB rows), at 1, 8 and 32 concurrent clients.
#
#   scripts/bench-api.sh                       defaults: 10 s per run
#   BENCH_DURATION=30 BENCH_CLIENTS="8 32" scripts/bench-api.sh
#   BENCH_NO_BUILD=1 scripts/bench-api.sh      reuse target/release as built
#   BENCH_FERRY_BIN=/path/to/ferry ...         measure another build (same ferry-pg)
#
# Installs wrk (Debian) if missing; needs pgbench (postgresql-contrib / the
# Debian server packages). Everything runs on 127.0.0.1.
#
# Measured 2026-11-22 (BENCH_DURATION=10, release build, 2 shared cores that
# run wrk, ferry and PostgreSQL at once; fsync on everywhere):
#   clients  pgbench tps  ferry/sqlite rps (p50/p99 ms)  ferry/postgres rps (p50/p99 ms)
#   1        4381         1838 (0.47/124)                2330 (0.39/10.5)   53%
#   8        10772        2206 (3.25/20.5)               4507 (1.58/19.0)   42%
#   32       14280        2287 (13.5/21.3)               4853 (6.08/24.0)   34%
# At 32 clients the box is CPU-bound: per create PostgreSQL spends ~200 us
# (two rows, five index entries, JSONB) against ~100 us for pgbench's one
# row, ferry ~105 us, wrk the rest. SQLite is bound by its fsync per commit.
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"

DURATION="${BENCH_DURATION:-10}"
CLIENTS="${BENCH_CLIENTS:-1 8 32}"
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
ferry_bin="${BENCH_FERRY_BIN:-$CARGO_TARGET_DIR/release/ferry}"
pg_helper="$CARGO_TARGET_DIR/release/ferry-pg"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

threads_for() { if [ "$1" -lt 2 ]; then echo 1; else echo 2; fi; }

# A throw-away cluster (fsync on) for both pgbench and ferry's cluster mode.
mkfifo "$WORK/pg-stdin"
"$pg_helper" <"$WORK/pg-stdin" >"$WORK/pg-url" &
PIDS+=("$!")
exec 8>"$WORK/pg-stdin"
for _ in $(seq 1 300); do [ -s "$WORK/pg-url" ] && break; sleep 0.1; done
PG_URL="$(head -n1 "$WORK/pg-url")"
PG_PORT="$(echo "$PG_URL" | sed -E 's#.*:([0-9]+)/.*#\1#')"
PSQL=("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -q -v ON_ERROR_STOP=1)

"${PSQL[@]}" -d postgres -c "CREATE DATABASE pgbench"
"${PSQL[@]}" -d pgbench -c "CREATE TABLE bench (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, payload TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
echo "INSERT INTO bench (payload) VALUES (repeat('x', 1024));" >"$WORK/insert.sql"

declare -A RESULTS
for c in $CLIENTS; do
  step "pgbench: 1 KB single-row insert, $c clients, ${DURATION}s"
  tps="$("$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "$c" -j "$(threads_for "$c")" \
    -T "$DURATION" -f "$WORK/insert.sql" pgbench 2>&1 | sed -nE 's/^tps = ([0-9.]+).*/\1/p' | head -n1)"
  RESULTS["pgbench,$c"]="$(printf '%.0f' "$tps")"
  echo "tps=${RESULTS["pgbench,$c"]}"
done

# bench_ferry NAME DATABASE_URL
bench_ferry() {
  local name="$1" url="$2" port
  port="$(free_port)"
  FERRY_LISTEN="127.0.0.1:$port" FERRY_DATABASE_URL="$url" FERRY_DATABASE_MAX_CONNECTIONS=32 \
    FERRY_CONNECTORS_DIR="$WORK/no-connectors" RUST_LOG=warn \
    "$ferry_bin" serve >"$WORK/ferry-$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  for c in $CLIENTS; do
    step "ferry on $name: POST /api/v1/customers, $c clients, ${DURATION}s"
    local line
    line="$(wrk -t "$(threads_for "$c")" -c "$c" -d "${DURATION}s" -s "$LUA" "http://127.0.0.1:$port" | grep '^RESULT')"
    echo "$line"
    RESULTS["$name,$c"]="$line"
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

bench_ferry sqlite "sqlite://$WORK/bench.db"
bench_ferry postgres "$PG_URL"
exec 8>&-

step "summary (requests/s; p50/p99 in ms)"
printf '%-8s %-12s %-44s %-44s %s\n' clients pgbench_tps "ferry sqlite" "ferry postgres" "postgres/pgbench"
for c in $CLIENTS; do
  pg="${RESULTS["pgbench,$c"]}"
  lite="${RESULTS["sqlite,$c"]#RESULT }"
  post="${RESULTS["postgres,$c"]#RESULT }"
  rps="$(echo "$post" | sed -nE 's/^rps=([0-9]+).*/\1/p')"
  ratio="$(python3 -c "print(f'{$rps / $pg * 100:.0f}%')" 2>/dev/null || echo n/a)"
  printf '%-8s %-12s %-44s %-44s %s\n' "$c" "$pg" "${lite%% requests=*}" "${post%% requests=*}" "$ratio"
done
