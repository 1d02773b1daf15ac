# syntax=docker/dockerfile:1
# ferry's image: the `ferry` binary and the bundled connector components.
# Built by docker-compose.yaml; see docs/deployment.md. Needs BuildKit (the
# default builder since Docker Engine 23) for the cache mounts below.
# scripts/check-compose.sh checks that the build commands here are the ones
# docs/deployment.md documents: change both together.

FROM rust:1.95-bookworm AS build

# librdkafka is compiled from source by the rdkafka crate (mklove
# `./configure` + `make`, no CMake). gcc, make and binutils come with the
# base image; its configure runs python3 for the linker script, and links
# OpenSSL (TLS, SASL/SCRAM) found through pkg-config, so install those
# rather than rely on what the base image happens to carry.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
RUN rustup target add wasm32-wasip2

WORKDIR /src
COPY . .
# scripts/lib.sh honours an exported CARGO_TARGET_DIR.
ENV CARGO_TARGET_DIR=/src/target

# The registry and target directories are cache mounts so a rebuild after a
# source change recompiles only what changed. A cache mount is not part of
# the image, so each step copies its output out in the same RUN.
RUN --mount=type=cache,id=ferry-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=ferry-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p ferry \
    && install -D -m 0755 /src/target/release/ferry /out/ferry

# Builds the wasm32-wasip2 components into target/release/connectors/ and
# copies them out of the cache mount, into the install layout ferry finds
# them in: ../share/ferry/connectors relative to the executable.
RUN --mount=type=cache,id=ferry-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=ferry-target,target=/src/target,sharing=locked \
    scripts/build-connectors.sh \
    && mkdir -p /out/connectors && cp /src/target/release/connectors/*.wasm /out/connectors/

FROM debian:bookworm-slim

# curl is here only for the compose health check (`curl -f .../readyz`):
# ferry has no health subcommand, and curl checks the HTTP status with a
# time limit in one readable command, where a bash /dev/tcp request would
# need hand-written HTTP and status parsing.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric id, so orchestrators that require a non-root user
# (Kubernetes `runAsNonRoot`) can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 ferry \
    && useradd --system --uid 10001 --gid ferry --home-dir /var/lib/ferry \
        --create-home --shell /usr/sbin/nologin ferry

COPY --from=build /out/ferry /usr/local/bin/ferry
# Found without configuration: ferry looks beside itself, then in
# ../share/ferry/connectors.
COPY --from=build /out/connectors/ /usr/local/share/ferry/connectors/

# Listening on all interfaces makes FERRY_ADMIN_TOKEN mandatory: ferry
# refuses to start an open API on a non-loopback address.
ENV FERRY_LISTEN=0.0.0.0:8080
WORKDIR /var/lib/ferry
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["ferry"]
CMD ["serve"]
