# syntax=docker/dockerfile:1
#
# The Roster image: a static binary (musl) on an empty base, running as a non-root user.
#
#   docker build --build-arg COMMIT=$(git rev-parse HEAD) -t <registry>/roster:0.1.0 .
#
# Reproducible: the toolchain is pinned by ARG, dependencies by Cargo.lock (--locked), and
# paths are remapped so the build directory does not leak into the binary. Pin the base
# images by digest in your own pipeline for byte-identical rebuilds.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-alpine AS build
# musl-dev: the C runtime that ring and the std library link statically; make: jemalloc's
# build (the controller's allocator, src/main.rs).
RUN apk add --no-cache musl-dev make
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    RUSTFLAGS="--remap-path-prefix=/src=/roster --remap-path-prefix=/usr/local/cargo=/cargo"

# The dependency layer: rebuilt only when a manifest or Cargo.lock changes. Built against stub
# sources, so the layer does not depend on src/. The workspace's other member, the benchmark,
# is never built here, but cargo reads its manifest. (By hand rather than with cargo-chef: two
# manifests, three stub files, and no extra tool to install and pin.)
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml ./bench/
RUN mkdir -p src bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin roster \
    && rm -rf src

COPY src ./src
COPY hack/control-plane-assets.sh ./hack/
COPY examples/instance.yaml ./examples/
COPY crds ./crds
# The stubs' build is older than these sources only by mtime; touch makes cargo rebuild them.
ARG COMMIT=unknown
# The build command. tests/packaging/dockerfile.rs runs this exact line, so it cannot drift.
RUN touch src/main.rs src/lib.rs && ROSTER_COMMIT="${COMMIT}" cargo build --release --locked --bin roster

FROM scratch
COPY --from=build /src/target/release/roster /roster
# The nonroot user of distroless images; the chart runs as it too.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/roster"]
CMD ["controller", "--http-addr=0.0.0.0:8080"]
