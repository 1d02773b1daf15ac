#!/usr/bin/env bash
# Installs what building and testing ferry need, idempotently: the wasm
# target, Debian packages (PostgreSQL 15 server, chromium and its
# WebDriver for the console's tests), a Python venv with
# localstripe, the official stripe library and schemathesis, and the tansu
# broker.
# Usage: scripts/setup.sh [--test]
source "$(dirname "$0")/lib.sh"
want_test=false
[ "${1:-}" = "--test" ] && want_test=true

# The oldest Rust the locked dependencies build with (wasmtime 48; the
# workspace's `rust-version`): an older toolchain would stop at the first
# build with a message about a crate, not about this.
min_rust=1.95
have_rust=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$min_rust" "$have_rust" | sort -V | head -n1)" != "$min_rust" ]; then
  if command -v rustup >/dev/null; then
    step "updating Rust $have_rust to stable (ferry needs $min_rust or newer)"
    rustup update stable
    # A default pinned to an older toolchain stays as it was.
    have_rust=$(rustc --version | awk '{print $2}')
    if [ "$(printf '%s\n%s\n' "$min_rust" "$have_rust" | sort -V | head -n1)" != "$min_rust" ]; then
      echo "error: Rust $have_rust is still older than $min_rust (a pinned default or rust-toolchain file?): run 'rustup default stable'" >&2
      exit 1
    fi
  else
    echo "error: Rust $have_rust is older than $min_rust, which ferry's dependencies need" >&2
    exit 1
  fi
fi

if ! command -v rustup >/dev/null; then
  # A toolchain from the distribution or Nix: its wasm32-wasip2 standard
  # library is its own to provide.
  if [ ! -d "$(rustc --print sysroot)/lib/rustlib/wasm32-wasip2" ]; then
    echo "error: this Rust toolchain has no wasm32-wasip2 target, and there is no rustup to add it" >&2
    exit 1
  fi
# grep reads the whole list: `-q` stops at the first match, and rustup
# writing into the closed pipe would fail the pipeline under pipefail.
elif ! rustup target list --installed | grep -x wasm32-wasip2 >/dev/null; then
  step "adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi
# The suite checks formatting and lints first; a toolchain installed with
# rustup's minimal profile has neither.
if $want_test && command -v rustup >/dev/null \
  && ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  step "adding rustfmt and clippy"
  rustup component add rustfmt clippy
fi

# Debian packages missing, installed at once.
missing=()
apt_install() {
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    apt_get_install "${missing[@]}"
    missing=()
  fi
}

# librdkafka and SQLite are built from source with the crates that bind
# them: a C compiler and make, and OpenSSL's headers found through
# pkg-config (librdkafka's TLS and SASL/SCRAM for a secured Kafka).
{ command -v cc >/dev/null && command -v make >/dev/null; } || missing+=(build-essential)
command -v pkg-config >/dev/null || missing+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
apt_install

if $want_test; then
  [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
  # Root starts PostgreSQL as its user with runuser (in /sbin, off other
  # users' PATH: only root needs it).
  if [ "$(id -u)" = 0 ]; then
    command -v runuser >/dev/null || [ -x /sbin/runuser ] || missing+=(util-linux)
  fi
  # The console's browser tests: a real headless chromium over WebDriver.
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  # schemathesis.sh waits for ferry with it.
  command -v curl >/dev/null || missing+=(curl)
  # The test venv (python-deps.sh): Debian's python3 leaves ensurepip,
  # which `python3 -m venv` needs, to this package.
  python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
  apt_install
  "$FERRY_ROOT/scripts/python-deps.sh"
  # The Kafka-protocol broker the cluster-mode tests start (built once per
  # machine, cached under $FERRY_CACHE_DIR/tools).
  "$FERRY_ROOT/scripts/tansu.sh" >/dev/null
fi
