#!/usr/bin/env bash
# Server CPU seconds for the report's scenario 1 without traffic: 1,000 users
# connect and subscribe 2,000 rooms each (frames spread over 5 s), then leave
# when the load generator ends. Server pinned to CPU 0, load generator to CPU 1.
#   loadtest/join-cpu.sh GATEWAY_BIN [PORT]
# Env: NATS=1 runs the gateway in cluster mode against one JetStream
# nats-server (on CPU 1 with the load generator; $NATS_SERVER or .tools');
# LOADTEST (default target/release/loadtest).
# Prints the CPU seconds, the cost per joined room (connect and leave
# included) and the gateway's peak RSS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$1; port=${2:-23540}
lt=${LOADTEST:-$root/target/release/loadtest}
ulimit -n "$(ulimit -Hn)"
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"' EXIT
cluster=()
if [ "${NATS:-0}" = 1 ]; then
  nport=$((port + 1))
  taskset -c 1 "${NATS_SERVER:-$root/.tools/venv/bin/nats-server}" -p "$nport" -js -sd "$dir" >/dev/null 2>&1 &
  pids+=($!)
  cluster=(--nats "nats://127.0.0.1:$nport" --nats-replicas 1)
  sleep 1
fi
taskset -c 0 "$bin" --listen "127.0.0.1:$port" --jwt-secret loadtest-secret-0123456789abcdef0 \
  --no-rate-limits --node-id bench --log warn "${cluster[@]}" &
pid=$!
pids+=("$pid")
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
cpu() { awk '{print $14+$15}' "/proc/$pid/stat"; }
t0=$(cpu)
taskset -c 1 "$lt" rooms --url "ws://127.0.0.1:$port/ws" --server-pid "$pid" \
  --users 1000 --rooms-per-user 2000 --arrival-secs 5 --rate 0 --secs 1 >/dev/null
sleep 3
t1=$(cpu)
hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
python3 -c "t=($t1-$t0)/$(getconf CLK_TCK); print(f'{t:.2f} s CPU, {t/2e6*1e6:.2f} us per joined room (connect and leave included), peak RSS {$hwm/1024:.0f} MiB')"
