#!/usr/bin/env bash
# loadtest/join-cpu.sh in cluster mode: one JetStream nats-server (CPU 1 with the load
# generator), the gateway on CPU 0 with --nats. Prints the gateway's CPU.
#   loadtest/join-cpu-nats.sh GATEWAY_BIN LOADTEST_BIN [PORT]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$1; lt=$2; port=${3:-23560}; nport=$((port+1))
ulimit -n "$(ulimit -Hn)"
dir=$(mktemp -d)
taskset -c 1 "${NATS_SERVER:-$root/.tools/venv/bin/nats-server}" -p $nport -js -sd "$dir" >/dev/null 2>&1 &
npid=$!
sleep 1
taskset -c 0 "$bin" --listen "127.0.0.1:$port" --jwt-secret loadtest-secret-0123456789abcdef0 \
  --no-rate-limits --node-id bench --log warn --nats nats://127.0.0.1:$nport --nats-replicas 1 &
pid=$!
trap 'kill $pid $npid 2>/dev/null || true; rm -rf "$dir"' EXIT
for i in $(seq 50); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
cpu() { awk '{print $14+$15}' "/proc/$pid/stat"; }
t0=$(cpu)
taskset -c 1 "$lt" rooms --url "ws://127.0.0.1:$port/ws" --server-pid "$pid" \
  --users 1000 --rooms-per-user 2000 --arrival-secs 5 --rate 0 --secs 1 >/dev/null
sleep 3
t1=$(cpu)
hwm=$(awk '/VmHWM/{print $2}' /proc/$pid/status)
python3 -c "t=($t1-$t0)/$(getconf CLK_TCK); print(f'{t:.2f} s CPU, {t/2e6*1e6:.2f} us per joined room, peak RSS {$hwm/1024:.0f} MiB')"
