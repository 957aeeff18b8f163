#!/usr/bin/env bash
# Builds the FROM-scratch image (Containerfile.scratch) with buildah, without a
# daemon: a fully static release binary (glibc with crt-static), then
# `buildah bud` with the vfs storage driver and chroot isolation, then runs the
# image's binary (`--version`, and a node serving /healthz for 2 s) with
# `buildah run`. Needs root and Debian's buildah (installed when missing).
# Not part of the test command: the static release build alone takes minutes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v buildah >/dev/null || apt-get install -y buildah >&2
target=${CARGO_TARGET_DIR:-$root/target-static}
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target" \
  cargo build --release --locked --target x86_64-unknown-linux-gnu -p gateway --bin gateway
bin="$target/x86_64-unknown-linux-gnu/release/gateway"
file "$bin" 2>/dev/null || true
ldd "$bin" 2>&1 | head -1 || true
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# The release profile keeps debug info (for profiling): not in the image.
strip -o "$ctx/gateway" "$bin"
cp Containerfile.scratch "$ctx/Containerfile"
version=$("$bin" --version | awk '{print $2}')
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
b=(buildah --storage-driver vfs)
"${b[@]}" bud --isolation chroot --build-arg VERSION="$version" --build-arg COMMIT="$commit" \
  -t localhost/gateway:scratch "$ctx"
"${b[@]}" images localhost/gateway:scratch
ls -l "$ctx/gateway"
"${b[@]}" inspect --format '{{.OCIv1.Config.User}} {{.OCIv1.Config.Labels}}' localhost/gateway:scratch
c=$("${b[@]}" from localhost/gateway:scratch)
trap '"${b[@]}" rm "$c" >/dev/null; rm -rf "$ctx"' EXIT
"${b[@]}" run --isolation chroot "$c" -- /gateway --version
# A node in the container's (host) network: listens, answers /healthz, exits on timeout.
port=$((20000 + RANDOM % 20000))
secret=image-check-secret-0123456789abcdef
"${b[@]}" run --isolation chroot "$c" -- /gateway --listen "127.0.0.1:$port" --jwt-secret "$secret" --log warn &
run=$!
ok=no
for _ in $(seq 50); do
  if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then ok=yes; break; fi
  sleep 0.2
done
kill -TERM "$run" 2>/dev/null || true
wait "$run" 2>/dev/null || true
echo "gateway in the scratch image served /healthz: $ok"
[ "$ok" = yes ]
