# syntax=docker/dockerfile:1
#
# vncgate container image: a release build on Debian 12, run as an unprivileged user from
# debian:bookworm-slim. Configuration and TLS material are mounted, secrets come from the
# environment; nothing environment-specific is baked in.
#
#   docker build -t vncgate:$(git rev-parse --short HEAD) .
#   docker run --rm -p 8443:8443 -p 9600:9600 \
#     -v "$PWD/vncgate.yaml:/etc/vncgate/vncgate.yaml:ro" -v "$PWD/tls:/etc/vncgate/tls:ro" \
#     -e VNCGATE_ADMIN_TOKEN -e VNCGATE_REDIS_URL --stop-timeout 330 vncgate:TAG
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below.
# tests/deploy.rs checks this file against conf/production.yaml and deploy/ (ports, health
# check, config path, user).

# Builder and runtime are the same Debian release: the binary links against the builder's glibc.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# cmake: libz-ng-sys (Pingora's compression) builds zlib-ng with it. gcc for ring and zstd-sys
# is in the rust image already. Package versions are not pinned (hadolint DL3008): the Debian
# release is, and its point releases only bring security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the build reads (.dockerignore allows nothing else into the context). bench/ is a
# workspace member: its manifest and sources must be present for Cargo to load the workspace,
# though only the vncgate package is built.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
COPY bench/src bench/src
COPY src src
# The registry and target directories are cache mounts, so a rebuild after a source change
# recompiles vncgate, not its few hundred dependencies. They are not part of the image: the
# binary is copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p vncgate \
 && install -D -m 0755 target/release/vncgate /out/vncgate

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: the JWKS endpoint (https://) and a rediss:// store are verified against the
# system roots. Nothing else: see HEALTHCHECK for why there is no curl.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid, so Kubernetes can check runAsNonRoot and set fsGroup without a name lookup.
# /run/vncgate holds server.pid_file and server.upgrade_sock (with a read-only root filesystem,
# mount a writable volume there); /etc/vncgate is where the config and tls/ are mounted.
RUN groupadd --system --gid 10001 vncgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vncgate \
 && install -d -o 10001 -g 10001 -m 0750 /run/vncgate \
 && install -d -m 0755 /etc/vncgate /etc/vncgate/tls
COPY --from=builder /out/vncgate /usr/local/bin/vncgate
# No web/: production serves no pages (web_root: null); the platform's web app embeds noVNC.

USER 10001:10001
# The TLS listener and the admin listener of conf/production.yaml. No plain listener.
EXPOSE 8443 9600
# vncgate drains on SIGTERM: it stops accepting, keeps live sessions for server.drain_seconds,
# closes the rest with 1001 and exits 0. Give `docker stop` more than that (--stop-timeout,
# compose's stop_grace_period); Docker's default of 10 s would cut the drain short.
STOPSIGNAL SIGTERM
# GET /healthz on the admin listener, from inside the container. The slim image has no curl,
# and installing it would add libcurl and a dozen libraries (LDAP, Kerberos, SSH, RTMP) that
# vncgate never uses, each one more line in every image scan. bash (essential in Debian) can
# speak the one request itself: open the port with /dev/tcp, send the request, and require a
# 200 status line. Hangs are cut by --timeout. If you move admin.addr off port 9600, override
# this with `docker run --health-cmd` (Kubernetes ignores it and uses the Deployment's probes).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9600 && printf 'GET /healthz HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n' >&3 && IFS= read -r status <&3 && [[ $status == 'HTTP/1.'?' 200 '* ]]"]
ENTRYPOINT ["vncgate"]
CMD ["run", "--config", "/etc/vncgate/vncgate.yaml"]
