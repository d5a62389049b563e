# sfunnel container image: one static binary in an otherwise empty image.
#
#   docker build -t sfunnel .
#
# With no verb the binary behaves like the original sfunnel container: it
# loads the rules from $SFUNNEL_RULESET (else /etc/sfunnel/ruleset) on
# $IFACES in $DIRECTION, or removes them with CLEAN=1 (README: Container
# environment).  Nothing is compiled at run time.
#
# The build is x86_64 only (docs/development.md: The static binary); on another host add
# `--platform linux/amd64`.

# ---- build: the static binary, as docs/development.md documents ----
FROM rust:1-bookworm AS build

# Build-time tools only: clang/llvm compile bpf/*.bpf.c into the embedded
# skeletons; libelf, zlib (static archives) and pkg-config are for libbpf-sys.
# Versions are not pinned: bookworm's security and point releases replace the
# exact versions, so pinned ones would stop installing; the stable suite is
# pin enough for build-only tools that never reach the final image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      clang llvm libelf-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the build reads, so that editing docs or tests reuses the cache.
# benches/ is needed because Cargo.toml declares the benchmarks.
COPY Cargo.toml Cargo.lock build.rs ./
COPY bpf bpf
COPY grammar grammar
COPY src src
COPY benches benches

RUN RUSTFLAGS='-C target-feature=+crt-static' \
    LIBBPF_SYS_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu \
    cargo build --release --locked --features static --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/sfunnel /sfunnel

# ---- final: nothing but the binary ----
FROM scratch

LABEL org.opencontainers.image.title="sfunnel" \
      org.opencontainers.image.description="Multi-port session affinity for Kubernetes with eBPF: one static binary" \
      org.opencontainers.image.licenses="Apache-2.0 AND (GPL-2.0-only OR BSD-2-Clause)"

COPY --from=build /sfunnel /sfunnel

# Root is required (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, or CAP_SYS_ADMIN: see README:
# Requirements); the image sets no USER, so the runtime's default (root)
# with the capabilities the pod grants applies.
ENTRYPOINT ["/sfunnel"]
