#!/usr/bin/env bash
# `make run`: build the bundled connectors and start ferry in embedded mode
# (SQLite file ./ferry.db, in-process bus, http://127.0.0.1:8080).
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"
"$FERRY_ROOT/scripts/setup.sh"
"$FERRY_ROOT/scripts/build-connectors.sh"
step "starting ferry (Ctrl-C stops it)"
exec cargo run --quiet -p ferry -- serve "$@"
