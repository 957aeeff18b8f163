# The gateway's image: a release build in a Rust stage, then only the binary
# on a distroless base (glibc, CA certificates, no shell, no package manager),
# running as the unprivileged user 65532 on a read-only root filesystem (the
# gateway writes nothing to disk). No HEALTHCHECK: Kubernetes probes
# /healthz and /readyz (helm/gateway). Linted with hadolint by scripts/test.sh.
#
#   docker build -t gateway:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg COMMIT="$(git rev-parse HEAD)" .
#
# A FROM-scratch variant for a fully static binary, and what was built and run
# on the development machines: helm/README.md ("Image").
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The release profile keeps debug info for profiling; the image gets a
# stripped binary (about 12 MB instead of 89 MB, measured on the static build).
COPY . .
RUN cargo build --release --locked -p gateway --bin gateway \
 && strip -o /gateway target/release/gateway

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG COMMIT=unknown
LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="WebSocket fan-out gateway for chat (RFC 6455, JetStream cluster mode)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${COMMIT}"
COPY --from=build /gateway /usr/local/bin/gateway
USER 65532:65532
# /ws, /healthz, /readyz (and /metrics unless --metrics-listen); 9090: the chart's metrics port.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/gateway"]
