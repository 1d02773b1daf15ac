# Sourced by the other scripts: where caches live and how to log.
set -euo pipefail
FERRY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Some CI agents (systemd units, `env -i`) start without HOME: under `set -u`
# every script died at the next line, saying only "HOME: unbound variable".
# cargo, rustup and pip need it too: it is the user's home from passwd.
if [ -z "${HOME:-}" ]; then
  HOME="$(getent passwd "$(id -u)" 2>/dev/null | cut -d: -f6 || true)"
  if [ -z "$HOME" ]; then
    echo "error: HOME is not set and user $(id -u) has no passwd entry: set HOME" >&2
    exit 1
  fi
  export HOME
fi
export FERRY_CACHE_DIR="${FERRY_CACHE_DIR:-$HOME/.cache/ferry}"
# CI starts from a clean clone each time; keep the build outside the clone so a
# second run on the same machine reuses it. Developers keep ./target.
if [ "${CI:-}" = "true" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="$FERRY_CACHE_DIR/target"
fi
# A clean clone gains nothing from incremental state, which only grows the
# cached target directory (tens of GB over many runs).
if [ "${CI:-}" = "true" ]; then
  export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FERRY_ROOT/target}"
step() { printf '\n==> %s\n' "$*"; }

# Under CI, runs of several clones share the cached target dir. Cargo's lock
# covers a build, not the tests run from it: a second run relinked binaries
# (and swapped the recorder's variants) under the first. One run at a time
# holds it; the scripts a run calls see it held and do not wait on it. The
# lock is fd 7: steps that start peers (PostgreSQL, brokers) run with it
# closed (`7>&-`), so a peer left running cannot keep it past the run.
hold_target_dir() {
  [ "${CI:-}" = "true" ] && [ -z "${CI_TARGET_DIR_HELD:-}" ] || return 0
  mkdir -p "$(dirname "$CARGO_TARGET_DIR")"
  exec 7>"$CARGO_TARGET_DIR.lock"
  if ! flock -n 7; then
    step "waiting for another run using $CARGO_TARGET_DIR"
    # Bounded: a process left holding it fails this run, not hangs it;
    # within CI's 90 minutes, so the reason is printed (a cold run takes
    # under an hour, a warm one a quarter).
    flock -w 3600 7 || { echo "error: $CARGO_TARGET_DIR.lock still held after an hour (a run left a process holding fd 7?)" >&2; exit 1; }
  fi
  export CI_TARGET_DIR_HELD=1
  trim_target_dir
}

# The cached target dir grows by every run's new artifacts of the
# workspace's own packages (test binaries of 100 MB and more, kept under a
# new hash for each change: 30 GB in a day), until the disk is full. Past
# FERRY_TARGET_DIR_CAP_MB those packages are cleaned (the dependencies stay
# built: the next build takes minutes, not the cold build's 45), and the
# whole dir if that is not enough.
trim_target_dir() {
  local cap="${FERRY_TARGET_DIR_CAP_MB:-20000}" size packages
  [ -d "$CARGO_TARGET_DIR" ] || return 0
  size=$(du -sm "$CARGO_TARGET_DIR" | cut -f1)
  [ "$size" -gt "$cap" ] || return 0
  step "$CARGO_TARGET_DIR holds $size MB, more than $cap: cleaning the workspace's own artifacts"
  # A failure here falls through to removing the whole dir.
  packages=$( (cd "$FERRY_ROOT" && cargo metadata --no-deps --format-version 1 --offline \
    | python3 -c 'import json, sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))') \
    2>/dev/null || true)
  if [ -n "$packages" ]; then
    # shellcheck disable=SC2086 # one word per option
    (cd "$FERRY_ROOT" && for profile in "" --release; do
      cargo clean -q $profile $packages && cargo clean -q $profile --target wasm32-wasip2 $packages
    done) || true
  fi
  size=$(du -sm "$CARGO_TARGET_DIR" | cut -f1)
  if [ "$size" -gt "$cap" ]; then
    step "$CARGO_TARGET_DIR still holds $size MB: removed whole"
    rm -rf "$CARGO_TARGET_DIR"
  fi
}

# Installs Debian packages `$@` (through sudo unless root). A run killed
# while dpkg worked leaves it "interrupted" (`dpkg --audit` lists what it
# left), which every install after refuses until `dpkg --configure -a`;
# another install running holds dpkg's lock, which apt then waits for
# rather than failing (dpkg itself would not wait: it runs only when
# something is left to configure).
apt_get_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  # Through env: sudo resets the environment a prefix would set.
  if [ -n "$(dpkg --audit 2>/dev/null)" ]; then
    $sudo env DEBIAN_FRONTEND=noninteractive dpkg --configure -a
  fi
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@"
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The release binary and the connectors, unless BENCH_NO_BUILD is set
# (benchmarks then measure the build already there, or FERRY_BIN).
build_release_unless_told() {
  [ -z "${BENCH_NO_BUILD:-}" ] || return 0
  step "building ferry (release) and the connectors"
  cargo build --quiet --release -p ferry --bin ferry
  "$FERRY_ROOT/scripts/build-connectors.sh"
}
