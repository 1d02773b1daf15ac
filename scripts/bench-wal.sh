#!/usr/bin/env bash
# Where ferry's write-ahead log goes per inbound event on PostgreSQL: ferry
# alone on a fresh throw-away cluster, the shared side-by-side load (the
# same pre-signed Stripe `customer.updated` webhooks, 32 connections), then
# `pg_waldump` over the log written from the load's start until the inbox is
# drained, grouped by relation and by record type (docs/performance.md,
# round 7); then how long the drain took and the statements that took the
# most database time over the same window (`pg_stat_statements`; round 9).
#
#   scripts/bench-wal.sh                    this checkout's release build
#   BENCH_NO_BUILD=1 FERRY_BIN=… scripts/bench-wal.sh   another build
#
# DURATION (s, default 15), BENCH_PEER_DIR (where gen_webhooks.py and
# webhooks.lua are, default ../shared/bench/stripe-sync-engine), PG_BIN
# (default /usr/lib/postgresql/15/bin).
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"

PEER_DIR="${BENCH_PEER_DIR:-$FERRY_ROOT/../shared/bench/stripe-sync-engine}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
DURATION="${DURATION:-15}"
SECRET=whsec_bench_wal
[ -f "$PEER_DIR/webhooks.lua" ] || { echo "no webhook load at $PEER_DIR" >&2; exit 1; }
build_release_unless_told
FERRY="${FERRY_BIN:-$CARGO_TARGET_DIR/release/ferry}"
CONNECTORS="${CONNECTORS_DIR:-$CARGO_TARGET_DIR/release/connectors}"
command -v wrk >/dev/null || apt_get_install wrk

# runuser lives in /sbin, off a minimal PATH (cron, some runners).
RUNUSER="$(command -v runuser || echo /sbin/runuser)"
as_pg() { if [ "$(id -u)" = 0 ]; then "$RUNUSER" -u postgres -- "$@"; else "$@"; fi; }
wait_port() { for _ in $(seq 1 300); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.2; done; return 1; }

work=$(mktemp -d)
chmod 755 "$work"
[ "$(id -u)" != 0 ] || chown postgres "$work"
ferry_pid=
cleanup() {
  [ -z "$ferry_pid" ] || kill "$ferry_pid" 2>/dev/null || true
  [ -f "$work/pg/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

pg_port=$(free_port)
as_pg "$PG_BIN/initdb" -D "$work/pg" -A trust >/dev/null
# A large max_wal_size: no checkpoint (and no full-page images) in the window.
as_pg "$PG_BIN/pg_ctl" -D "$work/pg" -l "$work/pg.log" \
  -o "-p $pg_port -k $work -c max_connections=200 -c shared_buffers=1GB -c max_wal_size=4GB \
      -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all" start >/dev/null
psql() { "$PG_BIN/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
psql -c "CREATE DATABASE ferry"
psql -d ferry -c "CREATE EXTENSION pg_stat_statements"

port=$(free_port)
env -u FERRY_BIN FERRY_LISTEN="127.0.0.1:$port" \
  FERRY_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/ferry" \
  FERRY_CONNECTORS_DIR="$CONNECTORS" RUST_LOG=warn \
  FERRY_CONNECTORS__STRIPE__SECRETS__API_KEY=sk_test_bench \
  FERRY_CONNECTORS__STRIPE__SECRETS__WEBHOOK_SECRET=$SECRET \
  FERRY_CONNECTORS__STRIPE__SETTINGS__API_BASE=http://127.0.0.1:9 \
  FERRY_ALLOW_PRIVATE_HOSTS=true "$FERRY" serve >"$work/ferry.log" 2>&1 &
ferry_pid=$!
wait_port "$port" || { tail -20 "$work/ferry.log" >&2; exit 1; }
python3 "$PEER_DIR/gen_webhooks.py" 300000 5000 "$SECRET" "$work/wh.txt"

psql -d ferry -c "CHECKPOINT"
start=$(psql -d ferry -c "SELECT pg_current_wal_insert_lsn()")
psql -d ferry -c "SELECT pg_stat_statements_reset()" >/dev/null
WEBHOOKS="$work/wh.txt" WEBHOOK_PATH=/webhooks/stripe \
  wrk -t2 -c32 -d"${DURATION}s" -s "$PEER_DIR/webhooks.lua" "http://127.0.0.1:$port" | grep RESULT
loaded=$(date +%s.%N)
while [ "$(psql -d ferry -c "SELECT count(*) FROM inbox WHERE state IN ('pending', 'retry')")" != 0 ]; do
  sleep 0.1
done
echo "drain: $(python3 -c "import time; print(f'{time.time() - $loaded:.1f}')") s after the load"
echo "statements by database time, from the load's start until drained (calls, total ms, ms a call, rows a call, buffers a call):"
psql -d ferry -F ' | ' -c "SELECT calls, round(total_exec_time::numeric), round((total_exec_time / calls)::numeric, 3), \
  round(rows::numeric / calls, 1), round((shared_blks_hit + shared_blks_read)::numeric / calls), \
  left(regexp_replace(query, '\s+', ' ', 'g'), 100) \
  FROM pg_stat_statements WHERE calls > 0 ORDER BY total_exec_time DESC LIMIT 12"
end=$(psql -d ferry -c "SELECT pg_current_wal_insert_lsn()")
events=$(psql -d ferry -c "SELECT count(*) FROM inbox")
psql -d ferry -c "SELECT relfilenode || ' ' || relname FROM pg_class WHERE relfilenode <> 0" >"$work/relations"
as_pg "$PG_BIN/pg_waldump" -p "$work/pg/pg_wal" -s "$start" -e "$end" >"$work/wal" 2>/dev/null || true
echo "relation sizes: $(psql -d ferry -c "SELECT string_agg(relname || ' ' || pg_size_pretty(pg_relation_size(oid)), ', ' ORDER BY relname) FROM pg_class WHERE relname IN ('inbox', 'outbox', 'sync_links', 'customers')")"

python3 - "$work/relations" "$work/wal" "$events" <<'PY'
import collections, re, sys
names = dict(line.rstrip("\n").split(" ", 1) for line in open(sys.argv[1]) if " " in line)
events = int(sys.argv[3])
by_relation, records, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
for line in open(sys.argv[2]):
    m = re.search(r"rmgr: (\w+)\s+len \(rec/tot\):\s*\d+/\s*(\d+).*desc: (\S+)", line)
    if not m:
        continue
    rel = re.search(r"rel \d+/\d+/(\d+)", line)
    name = names.get(rel.group(1), rel.group(1)) if rel else m.group(1)
    size = int(m.group(2))
    by_relation[name] += size
    records[name] += 1
    by_kind[f"{name} {m.group(1)} {m.group(3)}"] += size
total = sum(by_relation.values())
print(f"{events} events: {total / events:.0f} bytes and {sum(records.values()) / events:.1f} records of WAL per event")
print("\nby relation (bytes, records per event):")
for name, size in by_relation.most_common(20):
    print(f"  {name:32} {size / events:6.0f}  {records[name] / events:5.2f}")
print("\nby record (bytes per event):")
for kind, size in by_kind.most_common(20):
    print(f"  {kind:48} {size / events:6.0f}")
PY
