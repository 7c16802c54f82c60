# syntax=docker/dockerfile:1
# sidecache container image.
#
#   docker build -t sidecache .
#   docker run --rm -p 6380:6380 -p 9180:9180 \
#     -e SIDECACHE_LISTEN=0.0.0.0:6380 -e SIDECACHE_ADMIN_LISTEN=0.0.0.0:9180 \
#     -e SIDECACHE_UPSTREAM=redis://redis.example:6379 sidecache
#
# The baked-in configuration is config/sidecache.toml, which listens on 127.0.0.1: right for a
# Kubernetes sidecar (the app reaches it over the Pod's localhost), which is what
# config/k8s/ shows. A standalone container needs the two SIDECACHE_*LISTEN overrides above.

# ---- build ----------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# Dependency layer: build every dependency against stub sources, so that changing src/ does not
# rebuild them. benches/ is copied because Cargo.toml declares bench targets by path.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources; touch so cargo does not trust the stub's timestamps.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && cp target/release/sidecache /sidecache

# ---- runtime --------------------------------------------------------------------------------
# distroless/cc: glibc, libgcc, CA certificates and a non-root user (65532), no shell or
# package manager. The binary is built on the same Debian release (bookworm = debian12).
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=build /sidecache /usr/local/bin/sidecache
COPY config/sidecache.toml /etc/sidecache/sidecache.toml

USER 65532:65532
# 6380: Redis clients (RESP); 9180: admin HTTP (/metrics, /livez, /readyz).
EXPOSE 6380 9180
# SIGTERM drains in-flight commands for shutdown_grace (10 s) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sidecache", "--config", "/etc/sidecache/sidecache.toml"]
