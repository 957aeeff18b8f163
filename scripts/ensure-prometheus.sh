#!/usr/bin/env bash
# Makes sure Prometheus and promtool are installed (Debian's `prometheus`
# package: the server and promtool), installing the package with apt-get when
# either is missing, and prints the directory holding both. Used by the test
# command (alert rule tests, the Prometheus scrape test), so nothing is
# installed by hand. Fails (exit 1) when they cannot be installed: a check
# that cannot run must not pass.
set -euo pipefail
if [ -n "${PROMETHEUS:-}" ] && [ -x "$PROMETHEUS" ] && [ -x "$(dirname "$PROMETHEUS")/promtool" ]; then
  dirname "$PROMETHEUS"; exit 0
fi
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing Debian's prometheus package (server and promtool)" >&2
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y --no-install-recommends prometheus >&2 \
    || { "${sudo[@]}" apt-get update >&2 && "${sudo[@]}" apt-get install -y --no-install-recommends prometheus >&2; }
  # The package starts a system service on port 9090; the tests run their own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    "${sudo[@]}" systemctl stop prometheus >&2 || true
  fi
fi
command -v prometheus >/dev/null && command -v promtool >/dev/null || {
  echo "ensure-prometheus.sh: prometheus/promtool not available after install" >&2; exit 1; }
prometheus --version 2>&1 | head -1 >&2
dirname "$(command -v prometheus)"
