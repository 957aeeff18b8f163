#!/usr/bin/env bash
# Runs every test of the workspace (the chaos run among them, 40 s of faults
# with a random seed it prints: gateway/tests/chaos; scripts/chaos.sh runs it
# long), then the
# Autobahn WebSocket conformance suite, the Helm chart checks, the alert rules
# (promtool), the Dockerfile lint and every fuzz target for 15 s. Installs what
# the tests need first (nats-server, autobahntestsuite, the embedded
# Helm and validators, hadolint, cargo-fuzz and Node.js 22 into .tools/; Node
# 22, playwright-core and typescript into .tools/web; Debian's chromium and
# prometheus packages; iproute2 and curl for the chaos run's network
# namespaces, which need root), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# The chaos run (gateway/tests/chaos) builds network namespaces: it needs root,
# iproute2 (ip, tc) and curl.
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the chaos run creates network namespaces and needs root" >&2
  exit 1
fi
missing=()
command -v ip >/dev/null && command -v tc >/dev/null || missing+=(iproute2)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (apt) for the chaos run" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2
fi
NATS_SERVER=$(scripts/ensure-nats.sh)
export NATS_SERVER
# The browser client's tests (gateway/tests/browser.rs) run this too; here it
# installs up front, with its output in the open.
scripts/ensure-web.sh >/dev/null
# A real Prometheus for gateway/tests/prometheus.rs (fails there if missing).
PROMETHEUS="$(scripts/ensure-prometheus.sh)/prometheus"
export PROMETHEUS
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
  # Alert rules: promtool check rules, and a unit test of every alert.
  helm/promtool.sh
  # Dockerfile and Containerfile.scratch: hadolint, warnings fail.
  scripts/lint-dockerfile.sh
  # Every decoder of outside input under libFuzzer (cargo-fuzz on stable),
  # 15 s each on a copy of fuzz/corpus; the build is ~5-10 minutes cold.
  FUZZ_SECONDS=${FUZZ_SECONDS:-15} scripts/fuzz.sh
fi
