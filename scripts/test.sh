#!/usr/bin/env bash
# Runs every test of the workspace. Installs what the tests need first
# (nats-server, into .tools/), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER=$(scripts/ensure-nats.sh)
export NATS_SERVER
cargo test --workspace --all-targets "$@"
