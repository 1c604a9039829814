# wa-pair container image.
#
# Stage 1 builds the release binary with default features only. The
# `sandbox` feature (which pulls whatsapp-rust's
# `danger-skip-cert-chain-verify`) must never be enabled here.
# Stage 2 is a slim Debian with CA certificates and the binary: TLS is
# rustls and SQLite is bundled, so nothing else is needed at runtime.

############################
# Builder
############################
# The exact toolchain release/symbol-order.txt was made with: symbol names
# carry a hash of the compiler's version, so another release of it leaves
# the functions in rustc's own layout (more idle memory, nothing worse).
FROM rust:1.95.0-slim-bookworm AS builder

WORKDIR /build

# make: the bundled jemalloc (the binary's allocator) builds with it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

# 1. Dependencies only. Copy the manifests (the root package and the
#    `crates/fake-wa` workspace member, which cargo needs to load the
#    workspace even though the release binary does not use it), give every
#    target an empty stub, and build. This layer is reused until
#    Cargo.toml, Cargo.lock or crates/fake-wa/Cargo.toml change.
COPY Cargo.toml Cargo.lock ./
COPY crates/fake-wa/Cargo.toml crates/fake-wa/Cargo.toml
RUN mkdir -p src crates/fake-wa/src benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/pairing.rs \
    && echo 'fn main() {}' > benches/soak.rs \
    && echo 'fn main() {}' > benches/auth.rs \
    && echo 'fn main() {}' > benches/startup.rs \
    && echo 'fn main() {}' > benches/retention.rs \
    && : > src/lib.rs \
    && : > crates/fake-wa/src/lib.rs \
    && cargo build --release --locked --bin wa-pair \
    && rm -rf src crates/fake-wa/src benches

# 2. The real sources. COPY keeps the files' original modification times,
#    which can be older than the stub build, so touch the crate roots to make
#    sure cargo rebuilds wa-pair instead of reusing the stub.
COPY src ./src
COPY crates/fake-wa/src ./crates/fake-wa/src
# Cargo reads every declared target's path, the benchmark's included.
COPY benches ./benches
# build.rs lays the binary's functions out in release/symbol-order.txt's
# order (less code resident in an idle service). Copied only here, so a
# new order relinks wa-pair without rebuilding the dependencies.
COPY build.rs ./
COPY release/symbol-order.txt ./release/symbol-order.txt
# `install -s` drops the symbol table the release profile keeps for
# release/symbol-order.sh: it is not loaded at run time, only shipped.
RUN touch src/main.rs src/lib.rs crates/fake-wa/src/lib.rs \
    && cargo build --release --locked --bin wa-pair \
    && install -s -m 0755 target/release/wa-pair /usr/local/bin/wa-pair

############################
# Runtime
############################
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Unprivileged user; /data holds one SQLite device store per linked phone.
RUN groupadd --system --gid 10001 wa-pair \
    && useradd --system --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin wa-pair \
    && mkdir -p /data \
    && chown 10001:10001 /data \
    && chmod 0700 /data

COPY --from=builder /usr/local/bin/wa-pair /usr/local/bin/wa-pair

# Railway injects its own PORT at runtime; 8080 is the default elsewhere.
# Mount a Railway volume at /data to keep linked sessions across deploys.
# Railway mounts volumes owned by root: with a volume attached, set the
# service variable RAILWAY_RUN_UID=0 or the service cannot write /data.
ENV HOST=0.0.0.0 \
    PORT=8080 \
    DATA_DIR=/data

WORKDIR /data
USER 10001:10001
EXPOSE 8080

# The binary handles SIGTERM itself (graceful shutdown within
# SHUTDOWN_GRACE_SECS), so it runs directly as PID 1.
ENTRYPOINT ["/usr/local/bin/wa-pair"]
