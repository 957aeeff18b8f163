#!/usr/bin/env bash
# The in-node tier, split versus inline, in one run: one gateway process per
# setting, the same 10,000-member room, 5 messages/s (50,000 deliveries/s),
# alternating ROUNDS times so both see the same machine. Server and load
# generator both on CPUs 0-1 (the server uses both cores, as in production).
# Prints each step's p50/p99, server CPU per delivery and the generator's CPU;
# JSON per run goes to $OUT (default target/loadtest/tree-<time>).
#
#   loadtest/tree.sh [ROUNDS]   # default 3; ~1 min per round
# Latency is measured on one member in MEASURE_EVERY (default 10, spread over
# the room's join order and so over its shards); the others read what they
# hold once the measured ones have each message, and count for loss only.
# Reading all 10,000 sockets as each message arrives would cost the one-thread
# generator 46-58 ms per message, and that, not the server, was the p50 of
# both settings (MEASURE_EVERY=1 shows it).
# Env: SUBS (10000), RATE (deliveries/s, 50000), SECS (per step, 10),
#      SPLIT_ARGS (the split gateway's flags, default
#      "--tree-threshold 5000 --tree-degree 16": shards of at most 313 members).
source "$(dirname "$0")/lib.sh"
cargo build --release -p gateway -p loadtest
rounds=${1:-3}
subs=${SUBS:-10000}
rate=${RATE:-50000}
secs=${SECS:-10}
split_args=${SPLIT_ARGS:---tree-threshold 5000 --tree-degree 16}
out=${OUT:-target/loadtest/tree-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"

run() { # name, extra gateway flags...
  local name=$1; shift
  local log="$out/$name-$round.log"
  taskset -c 0,1 "$bin/gateway" --listen 127.0.0.1:0 --jwt-secret "$SECRET" --no-rate-limits \
    --node-id "bench-$name" "$@" >"$log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  local addr=""
  for _ in $(seq 100); do
    addr=$(grep -o 'listening on ws://[0-9.:]*' "$log" | head -1 | sed 's|.*ws://||' || true)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "gateway $name did not start:"; cat "$log"; kill "$pid" 2>/dev/null; exit 1; }
  LOADTEST_NO_PROGRESS=1 taskset -c 0,1 "$bin/loadtest" --json "$out/$name-$round.json" fanout \
    --url "ws://$addr/ws" --server-pid "$pid" --subs "$subs" --rates "$rate" --step-secs "$secs" \
    --no-stop --measure-every "${MEASURE_EVERY:-10}" >/dev/null
  curl -s "http://$addr/metrics" | grep -E '^gateway_(tree|deliveries|fanout_seconds)' >"$out/$name-$round.metrics" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true; forget_pid "$pid"
  python3 - "$out/$name-$round.json" "$name" "$round" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s = r["steps"][0]; lat = s["latency"]
cpu = s.get("server_cpu") or 0.0
us_per_delivery = cpu * s["secs"] / max(s["delivered"], 1) * 1e6
print(f'{sys.argv[2]:6} round {sys.argv[3]}: p50 {lat["p50_ms"]:.1f} ms, p99 {lat["p99_ms"]:.1f} ms, '
      f'delivered {s["delivered"]}/{s["expected"]} (lost {s["lost"]}, dup {s["duplicates"]}), '
      f'server CPU {cpu:.2f} cores = {us_per_delivery:.2f} us/delivery, loadgen CPU {s["loadgen_cpu"]:.2f} cores')
PY
}

for round in $(seq "$rounds"); do
  run inline --tree-threshold 1000000
  # shellcheck disable=SC2086
  run split $split_args
done
echo "results in $out"
