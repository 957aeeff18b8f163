#!/usr/bin/env bash
# Installs what the browser client's tests need when missing, then prints the
# path of a Node.js 22+ binary (the client's Node target has a global
# WebSocket from 22 on). Used by gateway/tests/browser.rs (so by the test
# command) and usable by hand.
#
# - Node.js 22+: the one scripts/ensure-node.sh finds or installs (also the
#   client of the compression test), so the test command installs it once.
# - npm: the machine's; Debian's npm is installed when there is none (apt).
# - playwright-core, puppeteer-core and typescript (npm, pinned), into
#   .tools/web. puppeteer-core drives Firefox over WebDriver BiDi, which
#   Playwright cannot do with a stock Firefox build; it downloads no browser.
# - Chromium and Firefox ESR: Debian's packages (apt), at /usr/bin/chromium
#   and /usr/bin/firefox-esr.
# Everything it prints besides the path goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
web="$root/.tools/web"
PLAYWRIGHT=1.65.1
PUPPETEER=25.16.0
TYPESCRIPT=5.9.3

apt_install() {
  echo "installing $* (apt)" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-web: need root to apt-get install $*" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# npm installs a pinned package into .tools/web unless that version is there.
npm_ensure() {
  local name=$1 version=$2
  local have
  have=$(grep -m1 -o '"version": *"[^"]*"' "$web/node_modules/$name/package.json" 2>/dev/null | sed 's/.*"\([^"]*\)"$/\1/' || true)
  if [ "$have" != "$version" ]; then
    echo "installing $name@$version into $web (npm)" >&2
    mkdir -p "$web"
    [ -f "$web/package.json" ] || echo '{"private":true}' >"$web/package.json"
    npm install --prefix "$web" --no-audit --no-fund --loglevel=error "$name@$version" >&2
  fi
}

command -v npm >/dev/null 2>&1 || apt_install nodejs npm
node=$("$root/scripts/ensure-node.sh")
npm_ensure playwright-core "$PLAYWRIGHT"
npm_ensure puppeteer-core "$PUPPETEER"
npm_ensure typescript "$TYPESCRIPT"
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/firefox-esr ] || missing+=(firefox-esr)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
"$node" --version >&2
echo "$node"
