#!/usr/bin/env bash
# The report's scale on one machine (issue 16): TOTAL WebSocket connections
# (default 100,000) across 6 gateways and a 3-node nats-server cluster
# (JetStream, R3, sync_interval: always), all on loopback:
#   - every 10th connection is a member of one big room (10,000 members at
#     100,000) that receives RATE messages/s (default 100) from PUBLISHERS
#     connections (default 10) on gateway 1;
#   - every 100th (+1) is a heavy user in 2,000 rooms of a 10,000-room pool,
#     subscribed in one frame;
#   - the rest sit idle in rooms of 8.
# The load generator is WORKERS processes of the `scale` scenario (one process
# holds at most ~19,900 sockets here). A seventh gateway runs without
# clients. After MEASURE/2 seconds of traffic gateway 6 drains (SIGTERM: it
# closes its clients with 1012 over --drain-spread-ms); its clients move to
# the five others and the seventh and resubscribe with `since`, the way a
# rolling restart of one pod goes (5 gateways could not take 100,000 sockets
# here: ~19,900 each). Latency is measured on one big-room member in 10;
# the others read every 100 ms and count for loss only (reading 1,000,000
# deliveries/s one by one is beyond one core of load generator).
# Then the traffic stops and every big-room member is checked to hold every
# published message exactly once.
#
# Servers (nats-server, gateways) are pinned to CPU 0 and the load generator
# to CPU 1 (taskset). Prints a Markdown table per gateway and for NATS, and
# keeps the workers' JSON in $OUT (default target-rel/scale).
#
#   loadtest/scale.sh                          # 100,000 connections, 100 msg/s, 120 s of traffic
#   TOTAL=20000 MEASURE=30 loadtest/scale.sh   # a short try
source "$(dirname "$0")/lib.sh"
cargo build --release -p loadtest -p gateway
TOTAL=${TOTAL:-100000} RATE=${RATE:-100} MEASURE=${MEASURE:-120} GATEWAYS=6
WORKERS=${WORKERS:-$(( (TOTAL + 14999) / 15000 ))}
OUT=${OUT:-$CARGO_TARGET_DIR/scale}
rm -rf "$OUT"; mkdir -p "$OUT"

# --- NATS: 3 servers, JetStream, one cluster ---------------------------------
nats_cluster scale "$OUT"
urls=$nats_urls

# --- gateways ------------------------------------------------------------------
declare -a gport gw_pid
start_gateway() { # $1 = number
  gport[$1]=$(free_port)
  taskset -c 0 "$bin/gateway" --listen "127.0.0.1:${gport[$1]}" --jwt-secret "$SECRET" --no-rate-limits \
    --node-id "scale-$1" --nats "$urls" --nats-replicas 3 --max-connections 19900 --log warn \
    > "$OUT/gw-$1.log" 2>&1 &
  gw_pid[$1]=$!; pids+=($!)
  wait_ready "http://127.0.0.1:${gport[$1]}/readyz" || { echo "gateway $1 not ready: $OUT/gw-$1.log" >&2; exit 1; }
}
for g in $(seq $GATEWAYS); do start_gateway "$g"; done
# The gateway that takes the drained one's place starts now, without clients
# (its port could not be reserved for later: 100,000 client sockets use the
# whole ephemeral range).
next=$((GATEWAYS + 1)); start_gateway "$next"
ws() { echo "ws://127.0.0.1:${gport[$1]}/ws"; }
gw_urls=$(for g in $(seq $GATEWAYS); do printf '%s,' "$(ws "$g")"; done)
fail_urls=$(for g in $(seq $((GATEWAYS - 1))) $next; do printf '%s,' "$(ws "$g")"; done)

# --- samples: /proc of every server, NATS /varz, gateways' deliveries ---------
sample() { # $1 = label: one JSON line per process into $OUT/samples.jsonl
  python3 - "$1" "$OUT/samples.jsonl" "${mport[1]} ${mport[2]} ${mport[3]}" "${nats_pid[*]}" \
    "$(for g in $(seq $next); do [ -n "${gw_pid[$g]:-}" ] && printf '%s:%s:%s ' "$g" "${gw_pid[$g]}" "${gport[$g]}"; done)" \
    "${wpids[*]:-}" <<'PY'
import json, os, sys, time, urllib.request
label, out, mports, npids, gws, wpids = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), sys.argv[5].split(), sys.argv[6].split()
tick = os.sysconf("SC_CLK_TCK")
def proc(pid):
    try:
        st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        rss = int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"cpu_s": (int(st[11]) + int(st[12])) / tick, "rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except OSError:
        return None
def get(url):
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
rows = []
for i, (mp, pid) in enumerate(zip(mports, npids), 1):
    v = get(f"http://127.0.0.1:{mp}/varz")
    v = json.loads(v) if v else {}
    rows.append({"who": f"n{i}", "proc": proc(pid), "in_msgs": v.get("in_msgs"), "out_msgs": v.get("out_msgs"),
                 "in_bytes": v.get("in_bytes"), "out_bytes": v.get("out_bytes")})
for g in gws:
    num, pid, port = g.split(":")
    m = get(f"http://127.0.0.1:{port}/metrics") or ""
    val = lambda name: next((float(l.split()[-1]) for l in m.splitlines() if l.startswith(name + " ")), None)
    fan = {l.split('le="')[1].split('"')[0]: float(l.split()[-1])
           for l in m.splitlines() if l.startswith("gateway_fanout_seconds_bucket")}
    rows.append({"who": f"g{num}", "proc": proc(pid), "deliveries": val("gateway_deliveries_total"),
                 "conns": val("gateway_conns_active"), "fanout_buckets": fan})
for i, pid in enumerate(wpids):
    rows.append({"who": f"w{i}", "proc": proc(pid)})
with open(out, "a") as f:
    f.write(json.dumps({"label": label, "t": time.time(), "rows": rows}) + "\n")
PY
}

# --- workers --------------------------------------------------------------------
chunk=$(( (TOTAL + WORKERS - 1) / WORKERS ))
wpids=()
for w in $(seq 0 $((WORKERS - 1))); do
  first=$((w * chunk)); count=$chunk
  [ $((first + count)) -gt "$TOTAL" ] && count=$((TOTAL - first))
  rate=0; [ "$w" = 0 ] && rate=$RATE
  # Worker 0 also holds the publishers.
  taskset -c 1 "$bin/loadtest" --json "$OUT/worker-$w.json" scale --url "$(ws 1)" --urls "$gw_urls" \
    --failover-urls "$fail_urls" --total "$TOTAL" --first "$first" --count "$count" --worker "$w" \
    --publish-rate "$rate" --publishers "${PUBLISHERS:-10}" --dir "$dir" --source-ips 50 --connect-concurrency 100 \
    --max-secs $((1200 + MEASURE * 2)) > "$OUT/worker-$w.log" 2>&1 &
  wpids+=($!); pids+=($!)
done
echo "scale: $TOTAL connections, $WORKERS workers, $GATEWAYS gateways, 3 NATS servers; waiting for every worker" >&2
t0=$(date +%s)
wait_for() { # $1 = file prefix: every worker wrote one
  while [ "$(ls "$dir" | grep -c "^$1-" || true)" -lt "$WORKERS" ]; do
    for p in "${wpids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a worker exited early:" >&2; tail -5 "$OUT"/worker-*.log >&2; exit 1; }; done
    [ $(( $(date +%s) - t0 )) -gt 1200 ] && { echo "workers not at $1 after 1200 s" >&2; exit 1; }
    sleep 1
  done
}
wait_for conns
echo "scale: every connection but the heavy users' subscribed in $(( $(date +%s) - t0 )) s; the heavy users subscribe now" >&2
sleep 5
touch "$dir/heavy"
wait_for ready
echo "scale: all connected and subscribed in $(( $(date +%s) - t0 )) s; $RATE msg/s into the big room for $MEASURE s" >&2
sleep 5
# NATS's own traffic without the big room's (presence summaries, JetStream
# and cluster housekeeping), over as long as the first half of the traffic.
half=$((MEASURE / 2))
sample idle
sleep "$half"
sample ready
go_at=$(date +%s.%N)
touch "$dir/go"
sleep "$half"
sample before_drain
# The drain of gateway 6.
drain_at=$(date +%s.%N)
touch "$dir/drain"
kill -TERM "${gw_pid[$GATEWAYS]}"
echo "scale: gateway $GATEWAYS draining (SIGTERM)" >&2
settle=$(( (MEASURE - half) / 2 ))
sleep "$settle"
touch "$dir/settled"
sample settled
sleep $((MEASURE - half - settle))
sample end
stop_at=$(date +%s.%N)
touch "$dir/stop"
for p in "${wpids[@]}"; do wait "$p" || echo "worker $p exited with $?" >&2; forget_pid "$p"; done
wait "${gw_pid[$GATEWAYS]}" 2>/dev/null || true; forget_pid "${gw_pid[$GATEWAYS]}"
python3 - "$OUT" "$MEASURE" "$half" "$drain_at" "$go_at" "$stop_at" <<'PY'
import glob, json, sys
out, measure, half, drain_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
go_at, stop_at = float(sys.argv[5]), float(sys.argv[6])
ws = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/worker-*.json"))]
samples = {s["label"]: s for s in map(json.loads, open(f"{out}/samples.jsonl"))}
rows = lambda label: {r["who"]: r for r in samples[label]["rows"]}
ri, r0, r1, r2 = rows("idle"), rows("ready"), rows("before_drain"), rows("end")
dt0 = samples["ready"]["t"] - samples["idle"]["t"]
dt1 = samples["before_drain"]["t"] - samples["ready"]["t"]
pub = next(w["publisher"] for w in ws if w.get("publisher"))
chk = {k: sum(w["check"][k] for w in ws) for k in ("members", "complete", "missing", "duplicates")}
published, acked = ws[0]["check"]["published"], ws[0]["check"]["acknowledged"]
print(f"\n{sum(w['count'] for w in ws):,} connections ({sum(w['big'] for w in ws):,} in the big room, "
      f"{sum(w['heavy'] for w in ws):,} heavy users, {sum(w['idle'] for w in ws):,} idle); "
      f"connected and subscribed in {max(w['connect_secs'] for w in ws):.0f} s")
hs = [w["heavy_subscribe"] for w in ws if w["heavy_subscribe"]["count"]]
print(f"heavy users ({sum(h['count'] for h in hs):,}, arriving over 5 s once every other connection was subscribed; "
      f"all subscribed {max(w['heavy_secs'] for w in ws):.0f} s after the first), 2,000 rooms each in one frame: subscribe p50 "
      f"{sum(h['p50_ms'] * h['count'] for h in hs) / max(sum(h['count'] for h in hs), 1):,.0f} ms, "
      f"p99 {max((h['p99_ms'] for h in hs), default=0):,.0f} ms (worst worker)")
print("\nSteady state (traffic on, before the drain), per process:\n")
def quantile(a, b, q):
    # From the delta of two cumulative Prometheus histograms (le -> count).
    if not a or not b: return None
    les = sorted((float(k), k) for k in b if k != "+Inf")
    total = b.get("+Inf", 0) - a.get("+Inf", 0)
    if total <= 0: return None
    for v, k in les:
        if b[k] - a.get(k, 0) >= q * total:
            return v
    return float("inf")
print("| process | connections | RSS (MB) | CPU (cores) | deliveries/s (server) | fan-out p50/p99 (ms, server) | big-room p50 (ms) | p99 (ms) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
lat = {}
for w in ws:
    for u in w["per_url"]:
        lat.setdefault(u["url"], []).append(u)
def merged(url, key="latency"):
    us = [u[key] for u in lat.get(url, []) if u[key]["count"]]
    n = sum(u["count"] for u in us)
    if not n: return "-", "-"
    # Across workers: the count-weighted mean of their p50s, the worst p99.
    p50 = sum(u["p50_ms"] * u["count"] for u in us) / n
    p99 = max(u["p99_ms"] for u in us)
    return f"{p50:.1f}", f"{p99:.1f}"
urls = [u["url"] for u in ws[0]["per_url"]]
for who in sorted((k for k in r1 if not k.startswith("w")), key=lambda k: (k[0], int(k[1:]))):
    a, b = r0[who], r1[who]
    cpu = (b["proc"]["cpu_s"] - a["proc"]["cpu_s"]) / dt1 if a["proc"] and b["proc"] else float("nan")
    if who.startswith("g"):
        n = int(who[1:]); url = urls[n - 1] if n <= len(urls) else None
        dps = ((b["deliveries"] or 0) - (a["deliveries"] or 0)) / dt1
        p50, p99 = merged(url) if url else ("-", "-")
        f50, f99 = (quantile(a.get("fanout_buckets"), b.get("fanout_buckets"), q) for q in (0.5, 0.99))
        fan = f"≤{f50*1e3:g} / ≤{f99*1e3:g}" if f50 is not None else "-"
        print(f"| gateway {n} | {int(b['conns'] or 0):,} | {b['proc']['rss']/1e6:.0f} | {cpu:.2f} | {dps:,.0f} | {fan} | {p50} | {p99} |")
    else:
        print(f"| nats {who} | - | {b['proc']['rss']/1e6:.0f} | {cpu:.2f} | - | - | - | - |")
wk = [k for k in r1 if k.startswith("w") and r0[k]["proc"] and r1[k]["proc"]]
wcpu = sum(r1[k]["proc"]["cpu_s"] - r0[k]["proc"]["cpu_s"] for k in wk) / dt1
wrss = sum(r1[k]["proc"]["rss"] for k in wk) / 1e6
print(f"| load generator ({len(wk)} processes) | {sum(w['count'] for w in ws):,} | {wrss:.0f} | {wcpu:.2f} | - | - | - | - |")
rate = lambda a, b, key, dt: sum(b[k][key] - a[k][key] for k in b if k.startswith("n")) / dt
bg_in, bg_out = rate(ri, r0, "in_msgs", dt0), rate(ri, r0, "out_msgs", dt0)
tr_in, tr_out = rate(r0, r1, "in_msgs", dt1), rate(r0, r1, "out_msgs", dt1)
# The publishers ran from `go` to `stop` (the traffic time plus the samples).
msg_rate = pub["published"] / (stop_at - go_at)
print(f"\nNATS, summed over the 3 servers (varz in_msgs/out_msgs: clients, routes, JetStream replication and API): "
      f"{bg_in:,.0f} in / {bg_out:,.0f} out per second before the traffic, {tr_in:,.0f} / {tr_out:,.0f} with it; "
      f"the difference per published message ({msg_rate:.0f}/s): {(tr_in - bg_in) / msg_rate:.1f} in, "
      f"{(tr_out - bg_out) / msg_rate:.1f} out")
moved = sum(w["moved"] for w in ws); back = sum(w["moved_back"] for w in ws)
mc = sum(w["moved_clients"] for w in ws); bc = sum(w["moved_back_clients"] for w in ws)
# (1001: the drain's timeout closed the rest)
mt = [w["moved_time"] for w in ws if w["moved_time"]["count"]]
print(f"\nDrain of gateway 6: {moved:,} connection ends (1012, 1001 or any end after the drain began) of {mc:,} clients, "
      f"{back:,} resubscribes on another gateway ({bc:,} clients back); "
      f"close-to-resubscribed p50 {max((m['p50_ms'] for m in mt), default=0):.0f} ms, max {max((m['max_ms'] for m in mt), default=0):,.0f} ms "
      f"(the drain spreads its closes over 2 s); rooms answered recovered:false: {sum(w['not_recovered'] for w in ws)}")
hr = [w["heavy_resume"] for w in ws if w["heavy_resume"]["count"]]
if hr:
    print(f"heavy users' resubscribe with since (2,000 rooms): p50 {max(h['p50_ms'] for h in hr):.0f} ms, p99 {max(h['p99_ms'] for h in hr):.0f} ms (worst worker)")
print(f"\nBig room: {published:,} messages published ({acked:,} acknowledged, nacks {pub['nacks']}); "
      f"{chk['complete']:,}/{chk['members']:,} members hold every one; missing {chk['missing']}, duplicated {chk['duplicates']}")
rs = rows("settled")
dts = samples["end"]["t"] - samples["settled"]["t"]
print(f"\nAfter the drain, per gateway: while the clients move (the {samples['settled']['t'] - drain_at:.0f} s after "
      f"the SIGTERM) and after that (to the end of the check; CPU over the {dts:.0f} s to the end of the traffic):\n")
print("| gateway | connections at the end | RSS (MB) | big-room p50 / p99 while moving (ms) | after (ms) | CPU after (cores) |")
print("|---|---:|---:|---:|---:|---:|")
for who in sorted(r2, key=lambda k: (k[0], int(k[1:]))):
    if not who.startswith("g") or not r2[who]["proc"]:
        continue
    n = int(who[1:]); url = urls[n - 1] if n <= len(urls) else None
    m50, m99 = merged(url, "latency_after_drain") if url else ("-", "-")
    s50, s99 = merged(url, "latency_settled") if url else ("-", "-")
    cpu = (r2[who]["proc"]["cpu_s"] - rs[who]["proc"]["cpu_s"]) / dts if rs.get(who, {}).get("proc") else float("nan")
    print(f"| gateway {n} | {int(r2[who]['conns'] or 0):,} | {r2[who]['proc']['rss']/1e6:.0f} | {m50} / {m99} | {s50} / {s99} | {cpu:.2f} |")
from collections import Counter
fails, discs = Counter(), Counter()
for w in ws:
    fails.update(w["failures"]); discs.update(w["disconnects"])
print(f"\nconnection attempts failed: {dict(fails)}; connections ended: {dict(discs)}; "
      f"subscribe entries refused: {sum(w.get('refused_rooms', 0) for w in ws)}")
PY
