#!/usr/bin/env bash
# `make test`: the whole suite, as CI runs it. Installs what it needs, builds
# the components, checks formatting and lints, runs every test against real
# peers (throw-away PostgreSQL, localstripe, a tansu Kafka broker), then
# schemathesis on both backends. docker-compose.yaml is checked with a parser
# (no Docker engine runs here).
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"
"$FERRY_ROOT/scripts/setup.sh" --test
"$FERRY_ROOT/scripts/check-compose.sh"
# After setup: an installer's daemon (a packaged PostgreSQL started by its
# postinst) must not inherit the lock.
hold_target_dir
"$FERRY_ROOT/scripts/build-connectors.sh"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --quiet --workspace --all-targets -- -D warnings

step "cargo doc (ferry-sdk, warnings denied: what a connector author reads)"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet -p ferry-sdk --no-deps --features testkit

step "cargo test (workspace)"
cargo test --workspace --no-fail-fast 7>&-

step "schemathesis against /openapi.json (SQLite and PostgreSQL)"
"$FERRY_ROOT/scripts/schemathesis.sh" 7>&-
