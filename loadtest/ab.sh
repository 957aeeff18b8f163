#!/usr/bin/env bash
# Two gateway binaries at the same fixed fan-out rates, alternated in one run
# (a regression check that does not depend on finding a ceiling): gateway on
# CPU 0, load generator on CPU 1, SUBS subscribers in one room, one step of
# SECS seconds per rate. Prints each step's line (p50/p99, loss, CPU).
#
#   loadtest/ab.sh OLD_GATEWAY NEW_GATEWAY [ROUNDS]
#   # e.g. a binary built from an older commit against target-rel/release/gateway
# Env: SUBS (1000), RATES (deliveries/s, comma-separated: 2000000,3000000,4000000,5000000), SECS (5).
[ $# -ge 2 ] || { sed -n 2,9p "$0"; exit 2; }
[ -x "$1" ] && [ -x "$2" ] || { echo "ab.sh: $1 and $2 must be gateway binaries" >&2; exit 2; }
old=$(realpath "$1") new=$(realpath "$2") rounds=${3:-5}
source "$(dirname "$0")/lib.sh"
cargo build --release -p loadtest
lt=$bin/loadtest
for round in $(seq "$rounds"); do
  for name in old new; do
    gw=$old; [ "$name" = new ] && gw=$new
    port=$(free_port)
    taskset -c 0 "$gw" --listen "127.0.0.1:$port" --jwt-secret "$SECRET" --no-rate-limits \
      --node-id "ab-$name" --log warn >/dev/null 2>&1 &
    pid=$!; pids+=("$pid")
    wait_ready "http://127.0.0.1:$port/readyz" 100 || { echo "$gw did not start" >&2; exit 1; }
    echo "== $name, round $round"
    LOADTEST_NO_PROGRESS=1 taskset -c 1 "$lt" fanout --url "ws://127.0.0.1:$port/ws" --server-pid "$pid" \
      --subs "${SUBS:-1000}" --rates "${RATES:-2000000,3000000,4000000,5000000}" --step-secs "${SECS:-5}" --no-stop 2>&1 \
      | grep '^  step' | awk '!seen[$0]++'
    kill "$pid"; wait "$pid" 2>/dev/null || true; forget_pid "$pid"
  done
done
