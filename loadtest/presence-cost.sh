#!/usr/bin/env bash
# Presence's NATS cost, measured: one JetStream nats-server, two gateways
# (A on CPU 0, B on CPU 1) with the default 1 s presence interval; a NATS
# subscriber counts the bytes on gw.presence.> per second while USERS users
# join ROOMS rooms each (pool POOL) on gateway A over 5 s and leave (with no
# traffic the load generator ends once subscribed); SECS sets how long the
# count runs (SECS + 30 s).
#   loadtest/presence-cost.sh GATEWAY_BIN LOADTEST_BIN USERS ROOMS POOL SECS
# Prints one line per second: t messages bytes largest-message, then the total.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$1; lt=$2; users=$3; rooms=$4; pool=$5; secs=$6
ulimit -n "$(ulimit -Hn)"
dir=$(mktemp -d); np=23581
"${NATS_SERVER:-$root/.tools/venv/bin/nats-server}" -p $np -js -sd "$dir" >/dev/null 2>&1 &
npid=$!
sleep 1
common=(--jwt-secret loadtest-secret-0123456789abcdef0 --no-rate-limits --log warn --nats nats://127.0.0.1:$np --nats-replicas 1)
taskset -c 0 "$bin" --listen 127.0.0.1:23582 --node-id gw-a "${common[@]}" & a=$!
taskset -c 1 "$bin" --listen 127.0.0.1:23583 --node-id gw-b "${common[@]}" & b=$!
trap 'kill $a $b $npid 2>/dev/null || true; rm -rf "$dir"' EXIT
for i in $(seq 50); do curl -sf http://127.0.0.1:23582/readyz >/dev/null && curl -sf http://127.0.0.1:23583/readyz >/dev/null && break; sleep 0.2; done
python3 "$root/loadtest/natscount.py" $np 'gw.presence.>' $((secs + 30)) > "$dir/count.txt" &
cnt=$!
sleep 3
"$lt" rooms --url ws://127.0.0.1:23582/ws --users "$users" --rooms-per-user "$rooms" --pool "$pool" \
  --arrival-secs 5 --rate 0 --secs "$secs" >/dev/null
wait $cnt
cat "$dir/count.txt"
