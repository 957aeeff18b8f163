#!/usr/bin/env bash
# Cross-gateway latency in cluster mode: a 3-node nats-server cluster with
# JetStream (R3, sync_interval: always) on loopback, two gateways joined by it,
# subscribers on gateway B, publishers on gateway A. Runs the `cluster`
# scenario at 1,000 and 10,000 messages/s and prints the latency percentiles.
# Everything binds to 127.0.0.1 and stops by itself.
source "$(dirname "$0")/lib.sh"
cargo build --release -p loadtest -p gateway
nats_cluster bench "$dir"
urls=$nats_urls
gwa=$(free_port); gwb=$(free_port)
for n in a b; do
  port=$gwa; [ $n = b ] && port=$gwb
  taskset -c 0 "$bin"/gateway --listen "127.0.0.1:$port" --jwt-secret "$SECRET" --no-rate-limits \
    --node-id "bench-$n" --nats "$urls" --nats-replicas 3 --log warn > "$dir/gw-$n.log" 2>&1 &
  pids+=($!)
done
for port in $gwa $gwb; do
  wait_ready "http://127.0.0.1:$port/readyz" || { cat "$dir"/gw-*.log; exit 1; }
done
subs=${SUBS:-10}
for msgs in ${RATES:-1000 10000}; do
  echo "== $msgs messages/s to $subs subscribers on the other gateway"
  taskset -c 1 "$bin"/loadtest cluster --url "ws://127.0.0.1:$gwb/ws" --pub-url "ws://127.0.0.1:$gwa/ws" \
    --subs "$subs" --rate $((msgs * subs)) --publishers "${PUBLISHERS:-50}" --secs "${SECS:-10}" \
    ${OUT:+--json "$OUT/cluster-$msgs.json"}
done
