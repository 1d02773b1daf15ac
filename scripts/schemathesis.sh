#!/usr/bin/env bash
# Property-based API tests: schemathesis generates requests from ferry's own
# /openapi.json and checks that no response is a server error and that every
# response matches the documented status codes and schemas. Runs against a
# ferry on SQLite (temp file) and on a throw-away PostgreSQL cluster, each
# started here on a free port with an admin token.
#
#   scripts/schemathesis.sh                 both backends
#   ST_MAX_EXAMPLES=200 ST_SEED=7 scripts/schemathesis.sh
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"

MAX_EXAMPLES="${ST_MAX_EXAMPLES:-50}"
CHECKS="not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
TOKEN="schemathesis-admin-token-0123456789"

step "building ferry and ferry-pg (debug)"
cargo build --quiet -p ferry --bin ferry -p ferry-test-support --bin ferry-pg
ferry_bin="$CARGO_TARGET_DIR/debug/ferry"
pg_helper="$CARGO_TARGET_DIR/debug/ferry-pg"
PYTHON="$("$FERRY_ROOT/scripts/python-deps.sh")"
ST="$(dirname "$PYTHON")/schemathesis"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The bundled connectors when built (make test builds them first), so the
# connector routes are exercised past their 404: `stripe` is the schema's
# example name. Secrets need a master key.
CONNECTORS="$CARGO_TARGET_DIR/debug/connectors"
[ -f "$CONNECTORS/stripe.wasm" ] || CONNECTORS="$WORK/no-connectors"

# run_backend NAME DATABASE_URL
run_backend() {
  local name="$1" url="$2" port log
  port="$(free_port)"
  log="$WORK/ferry-$name.log"
  FERRY_LISTEN="127.0.0.1:$port" FERRY_DATABASE_URL="$url" FERRY_ADMIN_TOKEN="$TOKEN" \
    FERRY_MASTER_KEY=schemathesis-master-key-0123456789abcdef \
    FERRY_CONNECTORS_DIR="$CONNECTORS" RUST_LOG=warn \
    "$ferry_bin" serve >"$log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  # Up to a minute: ferry migrates and compiles the bundled connectors
  # before it listens. One that never came up is said so, not fuzzed.
  local ready=""
  for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      ready=1
      break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$ready" ]; then
    echo "error: ferry on $name did not become ready; its log ends:" >&2
    tail -n 30 "$log" >&2
    return 1
  fi
  step "schemathesis on $name (max $MAX_EXAMPLES examples per operation)"
  local status=0
  "$ST" run "http://127.0.0.1:$port/openapi.json" \
    --url "http://127.0.0.1:$port" \
    --header "Authorization: Bearer $TOKEN" \
    --checks "$CHECKS" \
    --max-examples "$MAX_EXAMPLES" \
    --seed "${ST_SEED:-1}" || status=$?
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ "$status" -ne 0 ]; then
    echo "schemathesis failed on $name; ferry's log:" >&2
    tail -n 50 "$log" >&2
    return "$status"
  fi
}

run_backend sqlite "sqlite://$WORK/ferry.db"

# ferry-pg prints a database URL and keeps its cluster until stdin closes.
mkfifo "$WORK/pg-stdin"
"$pg_helper" <"$WORK/pg-stdin" >"$WORK/pg-url" &
PIDS+=("$!")
exec 8>"$WORK/pg-stdin"
for _ in $(seq 1 300); do
  [ -s "$WORK/pg-url" ] && break
  sleep 0.1
done
PG_URL="$(head -n1 "$WORK/pg-url")"
[ -n "$PG_URL" ] || { echo "ferry-pg did not start PostgreSQL" >&2; exit 1; }
run_backend postgres "$PG_URL"
exec 8>&-
echo "schemathesis: both backends passed"
