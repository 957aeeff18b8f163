#!/usr/bin/env bash
# The chaos run (gateway/tests/chaos): 3 JetStream servers (R3,
# sync_interval: always) and 3 gateway processes in network namespaces this
# run creates, subscribers resuming with `since`, keyed publishers with
# retries, and seeded faults (kill -9, SIGSTOP, link-down partitions,
# tc tbf, delay/stall/cut through a proxy) for SECONDS; then the checker's
# counts. The test command runs it for 40 s; this is the long run. The same
# test binary also runs the lagging-replica test (gateway/tests/chaos/lagging.rs,
# ~30 s, debug gateway binary).
#
#   scripts/chaos.sh [SECONDS] [SEED]        # default 600 s, a random seed
#
# Env: CHAOS_CLIENTS (200), CHAOS_PUBLISHERS (6), CHAOS_RATE (8 publishes/s
# each), CHAOS_ROOMS (24), CHAOS_HISTORY (30 messages kept per room),
# CHAOS_RELEASE=1 (release gateway binary). Needs root and iproute2.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  echo "installing iproute2 (ip, tc) for the chaos run" >&2
  apt-get install -y -qq iproute2 >&2 || { apt-get update -qq && apt-get install -y -qq iproute2; } >&2
fi
NATS_SERVER=$(scripts/ensure-nats.sh)
export NATS_SERVER
export CHAOS_SECS=${1:-600}
[ -n "${2:-}" ] && export CHAOS_SEED=$2
if [ "${CHAOS_RELEASE:-0}" = 1 ]; then
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-rel} cargo build --release -p gateway --bin gateway
  export CHAOS_GATEWAY=${CARGO_TARGET_DIR:-$root/target-rel}/release/gateway
fi
cargo test -p gateway --test chaos -- --nocapture 2>&1 | grep --line-buffered -E '^chaos|^lagging|panicked|test result|FAILED|^thread'
