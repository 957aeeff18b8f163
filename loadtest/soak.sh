#!/usr/bin/env bash
# Soak: one gateway (embedded bus) pinned to CPU 0 holds CONNS connections in
# ROOMS rooms under MSGS messages/s for SECS seconds; the load generator
# (CPU 1) samples the gateway every SAMPLE seconds: RSS, open fds, OS
# threads, runtime tasks (gateway_tasks_alive), deliveries/s, latency.
# Prints the curve as a Markdown table (for docs/benchmarks.md) and keeps
# the JSON in target-rel/soak.json. Everything on 127.0.0.1; bounded by SECS.
# The gateway keeps HISTORY messages per room (default 100 here, 1,000 in
# production): its memory grows until every room's history is full
# (ROOMS x HISTORY / MSGS seconds, 600 s with the defaults) and should be
# flat after that.
#
#   loadtest/soak.sh                                 # 19,000 conns, 3,000 rooms, 500 msg/s, 30 min
#   CONNS=2000 ROOMS=300 SECS=120 SAMPLE=20 loadtest/soak.sh   # a short try
source "$(dirname "$0")/lib.sh"
cargo build --release -p loadtest -p gateway
CONNS=${CONNS:-19000} ROOMS=${ROOMS:-3000} MSGS=${MSGS:-500} SECS=${SECS:-1800} SAMPLE=${SAMPLE:-60} HISTORY=${HISTORY:-100}
port=$(free_port)
taskset -c 0 "$bin/gateway" --listen "127.0.0.1:$port" --jwt-secret "$SECRET" \
  --no-rate-limits --node-id soak --history-size "$HISTORY" --log warn >"$dir/gw.log" 2>&1 &
pid=$!; pids+=("$pid")
wait_ready "http://127.0.0.1:$port/readyz" 100 || { cat "$dir/gw.log"; exit 1; }
out=$CARGO_TARGET_DIR/soak.json
echo "soak: $CONNS connections, $ROOMS rooms, $MSGS msg/s, history $HISTORY, $SECS s, a sample every $SAMPLE s (gateway pid $pid)" >&2
taskset -c 1 "$bin/loadtest" --json "$out" soak --url "ws://127.0.0.1:$port/ws" --server-pid "$pid" \
  --metrics-url "http://127.0.0.1:$port/metrics" --conns "$CONNS" --rooms "$ROOMS" --msgs "$MSGS" \
  --secs "$SECS" --sample-secs "$SAMPLE" --source-ips 5
python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\n{r['connected']}/{r['conns']} connections in {r['rooms']} rooms, {r['msgs_per_sec']:.0f} msg/s, connected in {r['connect_secs']:.0f} s\n")
print("| t (s) | RSS (MB) | fds | threads | tasks | connected | deliveries/s | p50 (ms) | p99 (ms) | lost |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in r["samples"]:
    st = s["step"]
    print(f"| {s['t_secs']:.0f} | {(s['rss_bytes'] or 0)/1e6:.1f} | {s['fds']} | {s['threads']} | {s['tasks']} | {s['connected']} "
          f"| {st['delivered_dps']:.0f} | {st['latency']['p50_ms']:.2f} | {st['latency']['p99_ms']:.2f} | {st['lost']} |")
PY
