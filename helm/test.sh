#!/usr/bin/env bash
# Checks the Helm chart in helm/gateway without a cluster or a helm binary:
# helm lint --strict and helm template through the Helm v4 SDK embedded in
# PyPI's helm-python-sdk, kubernetes-validate --strict on every rendered
# manifest (Kubernetes 1.30 and 1.37 schemas), yamllint, and assertions on
# the rendered objects (paced drains, probes, security, node ids, failures).
#
# Installs what is missing into .tools/venv (like scripts/ensure-nats.sh), so
# nothing is installed by hand. Exits non-zero and names every failed check.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/venv"
need=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 yamllint==1.38.0)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
missing=()
for spec in "${need[@]}"; do
  name=${spec%%==*} version=${spec##*==}
  have=$("$venv/bin/pip" show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
  [ "$have" = "$version" ] || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${missing[@]}" >&2
fi
exec "$venv/bin/python" "$root/helm/chart_test.py" "$root/helm/gateway" "$venv/bin"
