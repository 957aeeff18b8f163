#!/usr/bin/env bash
# Runs every test of the workspace, then the Autobahn WebSocket conformance
# suite and the Helm chart checks. Installs what the tests need first
# (nats-server, autobahntestsuite, the embedded Helm and validators, into
# .tools/; Node 22, playwright-core and typescript into .tools/web and
# Debian's chromium for the browser client's tests), so it works on a fresh
# machine.
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER=$(scripts/ensure-nats.sh)
export NATS_SERVER
# The browser client's tests (gateway/tests/browser.rs) run this too; here it
# installs up front, with its output in the open.
scripts/ensure-web.sh >/dev/null
cargo test --workspace --all-targets "$@"
# WebSocket conformance of the gateway's own framing (Autobahn|Testsuite,
# about 2 minutes with the install); skipped when test filters were given.
if [ $# -eq 0 ]; then
  scripts/autobahn.sh
  # The Helm chart, offline: lint, render, schema-validate, drain facts.
  helm/test.sh
fi
