#!/usr/bin/env bash
# ferry beside @supabase/stripe-sync-engine: runs the shared side-by-side
# script (../shared/bench/stripe-sync-engine/run.sh) on this checkout's
# release build, and adds what that script does not print:
#   - the WAL each system wrote during its load (pg_stat_wal), per event;
#   - ferry's end-to-end rate as applied / (load + drain): the script's own
#     `end_to_end` also counts the time it spends generating the webhooks.
#
#   scripts/bench-peer.sh                       the shared script's cluster
#   BENCH_WARM_WAL=1 scripts/bench-peer.sh      the same, after one warm-up
#       write of ~650 MB and a checkpoint, so WAL segments are recycled, as
#       on a database that has been running, instead of created and
#       zero-filled while the load runs (docs/performance.md, round 5)
#   BENCH_NO_BUILD=1 ...                        reuse target/release as built
#   BENCH_PEER_DIR=/path/to/stripe-sync-engine  another copy of the shared script
#
# DURATION, CONNECTIONS, CUSTOMERS, EVENTS, SKIP_PEER and FERRY_ENV pass
# through to the shared script. The copy (and the peer's npm packages) live
# in $FERRY_CACHE_DIR/bench-peer.
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"

PEER_DIR="${BENCH_PEER_DIR:-$FERRY_ROOT/../shared/bench/stripe-sync-engine}"
[ -f "$PEER_DIR/run.sh" ] || { echo "no side-by-side script at $PEER_DIR/run.sh" >&2; exit 1; }
build_release_unless_told

COPY="$FERRY_CACHE_DIR/bench-peer"
mkdir -p "$COPY"
for file in gen_webhooks.py package.json package-lock.json server.mjs webhooks.lua run.sh; do
  install -m 644 "$PEER_DIR/$file" "$COPY/$file"
done
# Patch the copy at three anchors; fail loudly if the shared script moved them.
python3 - "$COPY/run.sh" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()

def patch(anchor, addition):
    global text
    if text.count(anchor) != 1:
        sys.exit(f"bench-peer.sh: the shared run.sh changed; anchor not found once: {anchor!r}")
    text = text.replace(anchor, anchor + addition)

patch('psql -c "CREATE DATABASE sse" -c "CREATE DATABASE ferry"\n', '''\
if [ -n "${BENCH_WARM_WAL:-}" ]; then
  psql -c "CREATE TABLE warm AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 600000) g" \\
    -c "DROP TABLE warm" -c "CHECKPOINT"
  echo "warm-up: $(ls "$work/pg/pg_wal" | grep -c '^[0-9A-F]*$') WAL segments ready for reuse" >&2
fi
''')
patch('  python3 "$here/gen_webhooks.py" "$EVENTS" "$CUSTOMERS" "$SECRET" "$work/wh.txt"\n', '''\
  psql -c "SELECT pg_stat_reset_shared('wal')" >/dev/null
''')
patch('-s "$here/webhooks.lua" "$1" | grep RESULT\n', '''\
  psql -c "SELECT 'WAL during the load: ' || wal_bytes || ' bytes, ' || wal_records || ' records, ' || wal_sync || ' syncs' FROM pg_stat_wal" >&2
''')
open(path, "w").write(text)
PY
chmod 755 "$COPY/run.sh"

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
FERRY_BIN="${FERRY_BIN:-$CARGO_TARGET_DIR/release/ferry}" \
  CONNECTORS_DIR="${CONNECTORS_DIR:-$CARGO_TARGET_DIR/release/connectors}" \
  "$COPY/run.sh" 2>&1 | tee "$out"
# WAL per acknowledged event, and applied / (load + drain) beside the
# script's own end-to-end figure.
python3 - "${DURATION:-15}" "$out" <<'PY'
import re, sys
duration, path = float(sys.argv[1]), sys.argv[2]
wal = None
for line in open(path):
    if m := re.search(r"^WAL during the load: ([0-9]+) bytes", line):
        wal = int(m.group(1))
    elif m := re.search(r"^([a-z-]+): RESULT .*requests=([0-9]+)", line):
        system, requests = m.group(1), int(m.group(2))
        if wal is not None and requests:
            print(f"{system}: {wal / requests:.0f} bytes of WAL per acknowledged event")
        wal = None
        if m := re.search(r"drain_s=([0-9.]+).*applied=([0-9]+)", line):
            drain, applied = float(m.group(1)), int(m.group(2))
            print(f"{system}: end to end, applied / (load + drain): {applied / (duration + drain):.0f}/s")
PY
