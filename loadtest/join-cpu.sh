#!/usr/bin/env bash
# Server CPU seconds for the report's scenario 1 without traffic: 1,000 users
# connect and subscribe 2,000 rooms each (frames spread over 5 s), then leave
# when the load generator ends. Server pinned to CPU 0, load generator to CPU 1.
#   loadtest/join-cpu.sh GATEWAY_BIN [PORT]
# Prints the CPU seconds and the cost per joined room (connect and leave included).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$1; port=${2:-23540}
ulimit -n "$(ulimit -Hn)"
taskset -c 0 "$bin" --listen "127.0.0.1:$port" --jwt-secret loadtest-secret-0123456789abcdef0 \
  --no-rate-limits --node-id bench --log warn &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
sleep 1
cpu() { awk '{print $14+$15}' "/proc/$pid/stat"; }
t0=$(cpu)
taskset -c 1 "$root/target/release/loadtest" rooms --url "ws://127.0.0.1:$port/ws" --server-pid "$pid" \
  --users 1000 --rooms-per-user 2000 --arrival-secs 5 --rate 0 --secs 1 >/dev/null
sleep 2
t1=$(cpu)
python3 -c "t=($t1-$t0)/$(getconf CLK_TCK); print(f'{t:.2f} s CPU, {t/2e6*1e6:.2f} us per joined room (connect and leave included)')"
