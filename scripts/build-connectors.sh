#!/usr/bin/env bash
# Builds the bundled connectors (and the test guests) as wasm32-wasip2
# components, and puts the bundled ones in a `connectors/` folder beside
# where cargo puts the `ferry` executable (debug and release), which is
# where `ferry serve` looks for them whatever its working directory.
# A file is only replaced when its bytes changed.
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"
hold_target_dir
# The wasm32-wasip2 target, if missing (idempotent, quick).
"$FERRY_ROOT/scripts/setup.sh"
step "building connectors (wasm32-wasip2 components)"
built="$CARGO_TARGET_DIR/wasm32-wasip2/release"
# The recorder test guest's variants first (the connector-plane tests upload
# them), each copied aside: the plain build below writes the default file.
for variant in version-2 version-3 rebuilt invalid-manifest no-customer version-5; do
  cargo build --quiet --target wasm32-wasip2 --release -p ferry-test-recorder --features "$variant"
  cmp -s "$built/ferry_test_recorder.wasm" "$built/ferry_test_recorder-$variant.wasm" \
    || cp "$built/ferry_test_recorder.wasm" "$built/ferry_test_recorder-$variant.wasm"
done
cargo build --quiet --target wasm32-wasip2 --release \
  -p ferry-connector-stripe -p ferry-connector-salesforce -p ferry-test-hostile -p ferry-test-recorder
for profile in debug release; do
  dir="$CARGO_TARGET_DIR/$profile/connectors"
  mkdir -p "$dir"
  for name in stripe salesforce; do
    cmp -s "$built/ferry_connector_$name.wasm" "$dir/$name.wasm" \
      || cp "$built/ferry_connector_$name.wasm" "$dir/$name.wasm"
  done
done
ls -l "$CARGO_TARGET_DIR/release/connectors" | sed 's/^/    /'
