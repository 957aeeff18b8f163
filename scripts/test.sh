#!/usr/bin/env bash
# Runs every test of the workspace, then the Autobahn WebSocket conformance
# suite and the Helm chart checks. Installs what the tests need first
# (nats-server, Node.js 22, autobahntestsuite, the embedded Helm and validators, into
# .tools/), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER=$(scripts/ensure-nats.sh)
export NATS_SERVER
# Node.js 22's global WebSocket: the client of tests/compression.rs.
NODE=$(scripts/ensure-node.sh)
export NODE
cargo test --workspace --all-targets "$@"
# WebSocket conformance of the gateway's own framing and compression
# (Autobahn|Testsuite, about 12 minutes with 12.x/13.x, plus the install);
# skipped when test filters were given.
if [ $# -eq 0 ]; then
  scripts/autobahn.sh
  # The Helm chart, offline: lint, render, schema-validate, drain facts.
  helm/test.sh
fi
