#!/usr/bin/env bash
# Installs (once) tansu, the Apache Kafka-protocol broker the outbound sync
# tests run as a real peer, into $FERRY_CACHE_DIR/tools/tansu. Built from
# crates.io with cargo (about 25 minutes on two cores the first time); an install whose
# stamp matches the pinned version and features is reused as is. Prints the
# binary's path on stdout.
source "$(dirname "$0")/lib.sh"

ROOT="$FERRY_CACHE_DIR/tools/tansu"
BIN="$ROOT/bin/tansu"
# Pinned: the version tests/support/src/kafka.rs was checked against.
VERSION="0.6.0"
# libsql: the SQLite storage engine (`sqlite://`), the only one that keeps
# topics, records and committed offsets across a broker restart without an
# outside server. dynostore: the `memory://` engine.
FEATURES="dynostore,libsql"
STAMP="$ROOT/.ferry-install"
WANT="tansu $VERSION features $FEATURES"

up_to_date() { [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; }

if ! up_to_date; then
  mkdir -p "$ROOT"
  # Parallel callers (two setups on one machine) must not build twice: one
  # builds, the others wait and then find the binary.
  exec 9>"$ROOT.lock"
  flock 9
  if ! up_to_date; then
    step "installing tansu $VERSION ($FEATURES) into $ROOT (takes several minutes)" >&2
    # Not the workspace's target dir (lib.sh exports it): a build there
    # would hold its lock for minutes. cargo uses a throw-away one instead.
    env -u CARGO_TARGET_DIR cargo install tansu --version "$VERSION" --locked \
      --no-default-features --features "$FEATURES" --root "$ROOT" --force >&2
    printf '%s' "$WANT" >"$STAMP"
  fi
fi
echo "$BIN"
