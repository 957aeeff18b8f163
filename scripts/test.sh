#!/usr/bin/env bash
# Runs every test of the workspace (the short chaos run among them:
# gateway/tests/chaos, network namespaces, needs root and iproute2), then
# the Autobahn WebSocket conformance suite, the Helm chart checks and every
# fuzz target for 15 s. Installs what the tests need first (nats-server,
# iproute2, autobahntestsuite, the embedded Helm and validators, cargo-fuzz,
# into .tools/ where possible), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER=$(scripts/ensure-nats.sh)
export NATS_SERVER
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  echo "installing iproute2 (ip, tc) for the chaos run" >&2
  apt-get install -y -qq iproute2 >&2 || { apt-get update -qq && apt-get install -y -qq iproute2; } >&2
fi
cargo test --workspace --all-targets "$@"
# WebSocket conformance of the gateway's own framing (Autobahn|Testsuite,
# about 2 minutes with the install); skipped when test filters were given.
if [ $# -eq 0 ]; then
  scripts/autobahn.sh
  # The Helm chart, offline: lint, render, schema-validate, drain facts.
  helm/test.sh
  # Every decoder of outside input under libFuzzer (cargo-fuzz on stable),
  # 15 s each on a copy of fuzz/corpus; the build is ~5-10 minutes cold.
  FUZZ_SECONDS=${FUZZ_SECONDS:-15} scripts/fuzz.sh
fi
