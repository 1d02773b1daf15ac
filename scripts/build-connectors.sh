#!/usr/bin/env bash
# Builds the bundled connectors (and the test guests) as wasm32-wasip2
# components and copies them to dist/, where `ferry serve` loads them from.
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"
step "building connectors (wasm32-wasip2 components)"
cargo build --quiet --target wasm32-wasip2 --release \
  -p ferry-connector-stripe -p ferry-connector-salesforce -p ferry-test-hostile -p ferry-test-recorder
mkdir -p dist/connectors dist/test-guests
cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/ferry_connector_stripe.wasm" dist/connectors/stripe.wasm
cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/ferry_connector_salesforce.wasm" dist/connectors/salesforce.wasm
cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/ferry_test_hostile.wasm" dist/test-guests/hostile.wasm
cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/ferry_test_recorder.wasm" dist/test-guests/recorder.wasm
ls -l dist/connectors dist/test-guests | sed 's/^/    /'
