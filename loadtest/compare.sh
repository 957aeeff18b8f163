#!/usr/bin/env bash
# The side-by-side benchmark: the gateway and nats-server's WebSocket listener
# in one run, same client, same payloads, same latency clock.
#
# Builds the release binaries, gets nats-server the way the tests do
# (scripts/ensure-nats.sh), pins the servers to CPU 0 and the load generator to
# CPU 1, runs fan-out (1K and 10K subscribers), idle (19K connections) and
# storm (19K HS256 clients) against both, and prints one table with ratios.
# Results (JSON per scenario, server logs, compare.md) go to $OUT
# (default target/loadtest/compare-<time>). Extra arguments go to
# `loadtest compare` (e.g. --quick, --scenarios fanout-1k,idle, --systems nats).
# A full run takes about 10 minutes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

cargo build --release -p loadtest
if ! cargo build --release -p gateway; then
  echo "compare.sh: the gateway does not build; measuring nats-server only" >&2
fi
nats=$(scripts/ensure-nats.sh)
out=${OUT:-target/loadtest/compare-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"

# Each side may hold up to the hard open-file limit (20,000 here).
ulimit -n "$(ulimit -Hn)"

pin=()
server_cpus=""
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  pin=(taskset -c 1)
  server_cpus=0
else
  echo "compare.sh: fewer than 2 CPUs or no taskset; running unpinned" >&2
fi

{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "nats-server: $("$nats" --version 2>&1)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)"
  echo "command: loadtest/compare.sh $*"
} | tee "$out/machine.txt"

LOADTEST_NO_PROGRESS=${LOADTEST_NO_PROGRESS:-} "${pin[@]}" target/release/loadtest compare \
  --gateway-bin target/release/gateway \
  --nats-bin "$nats" \
  --out "$out" \
  --server-cpus "$server_cpus" \
  "$@"
