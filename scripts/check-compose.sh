#!/usr/bin/env bash
# Checks the cluster stack without a Docker engine (none runs in CI):
# docker-compose.yaml must parse and validate with Debian's docker-compose,
# must run Kafka in KRaft mode (no ZooKeeper), and the Dockerfile's build
# commands must be the ones README.md and docs/deployment.md document, verbatim.
source "$(dirname "$0")/lib.sh"
cd "$FERRY_ROOT"

if ! command -v docker-compose >/dev/null; then
  step "installing Debian's docker-compose"
  # Without recommends: those would pull in the Docker engine itself.
  apt_get_install --no-install-recommends docker-compose
fi

fail() { printf 'check-compose: %s\n' "$*" >&2; exit 1; }

step "docker-compose config (docker-compose.yaml)"
# The file requires these two; any values do for validation. The resolved
# configuration (no comments, anchors merged) is what the checks below read.
resolved="$(
  FERRY_ADMIN_TOKEN=check-compose-admin-token \
    FERRY_MASTER_KEY=check-compose-master-key \
    docker-compose -f docker-compose.yaml config
)" || fail "docker-compose rejected docker-compose.yaml"

step "Kafka runs in KRaft mode"
if grep -qi zookeeper <<<"$resolved"; then
  fail "docker-compose.yaml uses ZooKeeper; Kafka must run in KRaft mode"
fi
grep -Eq '^[[:space:]]+KAFKA_PROCESS_ROLES:[[:space:]]*[^[:space:]]' <<<"$resolved" \
  || fail "docker-compose.yaml does not set KAFKA_PROCESS_ROLES for Kafka"
for service in postgres kafka ferry-1 ferry-2; do
  grep -Eq "^  ${service}:\$" <<<"$resolved" \
    || fail "docker-compose.yaml has no service ${service}"
done

step "Dockerfile build commands are documented in README.md and docs/deployment.md"
# Joins continued lines, keeps RUN instructions without their leading
# --flags (cache mounts), splits on && and keeps the commands that build.
mapfile -t build_commands < <(
  sed -e ':a' -e '/\\$/N; s/\\\n[[:space:]]*/ /; ta' Dockerfile \
    | sed -n 's/^RUN[[:space:]]\{1,\}\(--[a-z-]\{1,\}=[^[:space:]]*[[:space:]]\{1,\}\)*//p' \
    | sed 's/[[:space:]]*&&[[:space:]]*/\n/g' \
    | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' \
    | grep -E '^(rustup target add|cargo build|scripts/build-connectors\.sh)' || true
)
for wanted in 'rustup target add' 'cargo build' 'scripts/build-connectors.sh'; do
  printf '%s\n' "${build_commands[@]}" | grep -qF -- "$wanted" \
    || fail "no \`$wanted\` command found in Dockerfile's RUN instructions"
done
for command in "${build_commands[@]}"; do
  for doc in README.md docs/deployment.md; do
    grep -qF -- "$command" "$doc" \
      || fail "Dockerfile runs \`$command\` but $doc does not document it verbatim"
  done
  printf '    documented: %s\n' "$command"
done
