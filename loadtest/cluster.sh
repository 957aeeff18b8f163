#!/usr/bin/env bash
# Cross-gateway latency in cluster mode: a 3-node nats-server cluster with
# JetStream (R3, sync_interval: always) on loopback, two gateways joined by it,
# subscribers on gateway B, publishers on gateway A. Runs the `cluster`
# scenario at 1,000 and 10,000 messages/s and prints the latency percentiles.
# Everything binds to 127.0.0.1 and stops by itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -p loadtest -p gateway
nats=$(scripts/ensure-nats.sh)
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -a cport rport
for i in 1 2 3; do cport[$i]=$(free_port); rport[$i]=$(free_port); done
routes="nats-route://127.0.0.1:${rport[1]},nats-route://127.0.0.1:${rport[2]},nats-route://127.0.0.1:${rport[3]}"
for i in 1 2 3; do
  cat > "$dir/n$i.conf" <<CONF
server_name: n$i
listen: "127.0.0.1:${cport[$i]}"
jetstream { store_dir: "$dir/n$i", sync_interval: ${SYNC:-always} }
cluster { name: bench, listen: "127.0.0.1:${rport[$i]}", routes: [$(echo "$routes" | sed 's/\([^,]*\)/"\1"/g')] }
CONF
  taskset -c 0 "$nats" -c "$dir/n$i.conf" > "$dir/n$i.log" 2>&1 &
  pids+=($!)
done
urls="nats://127.0.0.1:${cport[1]},nats://127.0.0.1:${cport[2]},nats://127.0.0.1:${cport[3]}"
sleep 3
gwa=$(free_port); gwb=$(free_port)
for n in a b; do
  port=$gwa; [ $n = b ] && port=$gwb
  taskset -c 0 target/release/gateway --listen "127.0.0.1:$port" --jwt-secret loadtest-secret-0123456789abcdef0 --no-rate-limits \
    --node-id "bench-$n" --nats "$urls" --nats-replicas 3 --log warn > "$dir/gw-$n.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$gwa/readyz" >/dev/null 2>&1 && curl -sf "http://127.0.0.1:$gwb/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
subs=${SUBS:-10}
for msgs in ${RATES:-1000 10000}; do
  echo "== $msgs messages/s to $subs subscribers on the other gateway"
  taskset -c 1 target/release/loadtest cluster --url "ws://127.0.0.1:$gwb/ws" --pub-url "ws://127.0.0.1:$gwa/ws" \
    --subs "$subs" --rate $((msgs * subs)) --publishers "${PUBLISHERS:-50}" --secs "${SECS:-10}" \
    ${OUT:+--json "$OUT/cluster-$msgs.json"}
done
