#!/usr/bin/env bash
# Creates (once) the Python virtualenv the integration tests use for Stripe
# peers: localstripe (a stateful fake Stripe that sends signed webhooks), the
# official `stripe` library (drives localstripe and cross-checks webhook
# signatures) and schemathesis. Idempotent: a venv whose stamp matches the
# pinned set is reused as is. Prints the venv's python path on stdout.
set -euo pipefail

HOME="${HOME:-$(getent passwd "$(id -u)" 2>/dev/null | cut -d: -f6 || true)}"
if [ -z "$HOME" ] && [ -z "${FERRY_CACHE_DIR:-}" ]; then
  echo "error: HOME is not set and user $(id -u) has no passwd entry: set HOME" >&2
  exit 1
fi
CACHE_DIR="${FERRY_CACHE_DIR:-$HOME/.cache/ferry}"
PYTHON="${PYTHON:-python3}"

# Pinned: versions checked to install and run together on Python 3.11. What
# they pull in is pinned too (python-constraints.txt), and the stamp names
# that file's hash: a change to either builds the venv again.
REQUIREMENTS=(
  "localstripe==1.15.10"
  "stripe==16.1.0"
  "schemathesis==4.32.5"
)
CONSTRAINTS="$(cd "$(dirname "$0")" && pwd)/python-constraints.txt"
# And the interpreter: a venv made with Debian's python3 3.11 kept its
# packages under lib/python3.11, and after an upgrade to 3.13 (or another
# PYTHON) its stamp still matched and every run reused a venv that could not
# import them.
INTERPRETER="$("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
WANT="$(printf '%s\n' "${REQUIREMENTS[@]}" "$(sha256sum "$CONSTRAINTS" | cut -d' ' -f1)" "$INTERPRETER")"
# One venv per pinned set: a run whose pins changed builds its own beside
# the one another run (CI runs of several clones share the cache) is using,
# rather than deleting that one under it.
VENV="$CACHE_DIR/venv-$(printf '%s' "$WANT" | sha256sum | cut -c1-12)"
STAMP="$VENV/.ferry-requirements"

up_to_date() {
  [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] &&
    "$VENV/bin/python" -c 'import localstripe, stripe' 2>/dev/null
}

if up_to_date; then
  echo "$VENV/bin/python"
  exit 0
fi

mkdir -p "$CACHE_DIR"
# Parallel test binaries may call this at once: one installs, the others wait.
exec 9>"$VENV.lock"
flock 9
if ! up_to_date; then
  # The stamp is written last, so an interrupted install is redone from
  # scratch (no run uses a venv without it).
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --constraint "$CONSTRAINTS" "${REQUIREMENTS[@]}" >&2
  printf '%s' "$WANT" >"$STAMP"
fi
echo "$VENV/bin/python"
