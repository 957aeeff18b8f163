#!/usr/bin/env bash
# Checks the alert rules with promtool (Debian's prometheus package, installed
# by scripts/ensure-prometheus.sh when missing): `check rules` on the plain
# rules file, then `test rules` with a unit test of every alert
# (helm/alerts-test.yaml). Fails when an alert has no unit test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$("$root/scripts/ensure-prometheus.sh")
rules="$root/helm/gateway/files/alerts.yaml"
tests="$root/helm/alerts-test.yaml"
"$bin/promtool" check rules "$rules"
# Every alert must be tested.
missing=$(comm -23 \
  <(sed -n 's/^ *- alert: *//p' "$rules" | sort -u) \
  <(sed -n 's/^ *alertname: *//p' "$tests" | sort -u))
if [ -n "$missing" ]; then
  echo "alerts without a promtool unit test: $missing" >&2
  exit 1
fi
cd "$root/helm"
"$bin/promtool" test rules "$tests"
