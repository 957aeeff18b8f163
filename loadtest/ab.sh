#!/usr/bin/env bash
# Two gateway binaries at the same fixed fan-out rates, alternated in one run
# (a regression check that does not depend on finding a ceiling): gateway on
# CPU 0, load generator on CPU 1, SUBS subscribers in one room, one step of
# SECS seconds per rate. Prints each step's line (p50/p99, loss, CPU).
#
#   loadtest/ab.sh OLD_GATEWAY NEW_GATEWAY [ROUNDS]
#   # e.g. a binary built from an older commit against target-rel/release/gateway
# Env: SUBS (1000), RATES (deliveries/s, comma-separated: 2000000,3000000,4000000,5000000), SECS (5).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ $# -ge 2 ] || { sed -n 2,9p "$0"; exit 2; }
old=$1 new=$2 rounds=${3:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-rel}
cargo build --release -p loadtest
lt=$CARGO_TARGET_DIR/release/loadtest
ulimit -n "$(ulimit -Hn)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for round in $(seq "$rounds"); do
  for name in old new; do
    bin=$old; [ "$name" = new ] && bin=$new
    port=$(free_port)
    taskset -c 0 "$bin" --listen "127.0.0.1:$port" --jwt-secret loadtest-secret-0123456789abcdef0 --no-rate-limits \
      --node-id "ab-$name" --log warn >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    echo "== $name, round $round"
    LOADTEST_NO_PROGRESS=1 taskset -c 1 "$lt" fanout --url "ws://127.0.0.1:$port/ws" --server-pid "$pid" \
      --subs "${SUBS:-1000}" --rates "${RATES:-2000000,3000000,4000000,5000000}" --step-secs "${SECS:-5}" --no-stop 2>&1 \
      | grep '^  step' | awk '!seen[$0]++'
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
