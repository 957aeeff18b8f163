# shellcheck shell=bash
# Sourced by the benchmark scripts of loadtest/ (never run by itself). After
#   source "$(dirname "$0")/lib.sh"
# a script has:
#   $root    the repository, also the working directory
#   $bin     the release binaries' folder ($CARGO_TARGET_DIR/release;
#            CARGO_TARGET_DIR defaults to target-rel, apart from the tests'
#            debug builds in target/)
#   $SECRET  the HS256 secret the gateways and the load generator share
#   $dir     a temporary folder, removed at exit
#   pids     an array: every process added to it is killed at exit (a
#            script that stops one itself calls forget_pid)
#   the open-file limit raised to the hard limit (20,000 here: TOOLING.md)
# and the functions below. Every server it starts binds to 127.0.0.1.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-rel}
bin=$CARGO_TARGET_DIR/release
SECRET=loadtest-secret-0123456789abcdef0
ulimit -n "$(ulimit -Hn)"
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

# forget_pid PID: PID was stopped and waited for by the script; the clean-up
# must not signal the number again (it may belong to another process by then).
forget_pid() {
  local keep=() p
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

# free_port: prints a TCP port of 127.0.0.1 that was free a moment ago.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_ready URL [TRIES]: polls URL every 0.1 s until it answers 2xx, at most
# TRIES times (default 300, 30 s); returns 1 if it never did.
wait_ready() {
  local _
  for _ in $(seq "${2:-300}"); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# nats_cluster NAME LOGDIR: three nats-server processes (scripts/ensure-nats.sh)
# in one cluster NAME with JetStream (store in $dir, sync_interval $SYNC,
# default always; max_payload 8 MB), pinned to CPU 0, logs LOGDIR/nI.log.
# Sets cport[1..3] (client ports), mport[1..3] (monitoring), nats_pid[1..3]
# and nats_urls (the three client URLs, comma-separated); returns once all
# three answer /healthz (JetStream included: the cluster has a meta leader),
# or prints the log and exits 1.
nats_cluster() {
  local name=$1 logs=$2 nats i routes=""
  nats=$(scripts/ensure-nats.sh)
  declare -ga cport mport nats_pid
  local -a rport
  for i in 1 2 3; do cport[i]=$(free_port); rport[i]=$(free_port); mport[i]=$(free_port); done
  for i in 1 2 3; do routes+="\"nats-route://127.0.0.1:${rport[i]}\","; done
  for i in 1 2 3; do
    cat > "$dir/n$i.conf" <<CONF
server_name: n$i
listen: "127.0.0.1:${cport[i]}"
http: "127.0.0.1:${mport[i]}"
max_payload: 8MB
jetstream { store_dir: "$dir/n$i", sync_interval: ${SYNC:-always} }
cluster { name: $name, listen: "127.0.0.1:${rport[i]}", routes: [${routes%,}] }
CONF
    taskset -c 0 "$nats" -c "$dir/n$i.conf" > "$logs/n$i.log" 2>&1 &
    nats_pid[i]=$!; pids+=($!)
  done
  nats_urls="nats://127.0.0.1:${cport[1]},nats://127.0.0.1:${cport[2]},nats://127.0.0.1:${cport[3]}"
  for i in 1 2 3; do
    wait_ready "http://127.0.0.1:${mport[i]}/healthz" 600 \
      || { echo "nats-server n$i not healthy after 60 s:" >&2; tail -20 "$logs/n$i.log" >&2; exit 1; }
  done
}
