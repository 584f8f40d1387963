#!/usr/bin/env bash
# Issue 12's side-by-side run: cnse-dp's HTTP front, its binary protocol
# and the hyper/axum peer (benches/axum_peer.rs), each server on one core
# (SERVER_CPU, default 0), the load generator on LOAD_CPUS (default 1) with
# LOAD_THREADS threads, zero-delay synthetic tokens, 16 per request, ROUNDS
# alternating rounds of SECS seconds. Prints requests/s and requests per
# server CPU-second for each.
#   cargo build --release && cargo bench --no-run --bench axum_peer
#   bash scripts/http-bench.sh [ROUNDS] [SECS]
# B=path/to/cnse-dp and A=path/to/axum_peer run other builds (a device run).
set -u
cd "$(dirname "$0")/.."
. scripts/wait-ready.sh
rounds=${1:-2} secs=${2:-3}
server_cpu=${SERVER_CPU:-0} load_cpus=${LOAD_CPUS:-1} load_threads=${LOAD_THREADS:-1}
conns=${CONNECTIONS:-64} inflight=${INFLIGHT:-4}
B=${B:-target/release/cnse-dp}
A=${A:-$(ls -t target/release/deps/axum_peer-* 2>/dev/null | grep -v '\.d$' | head -1)}
[ -x "$B" ] && [ -n "$A" ] || { echo "http-bench: build first (see the header)"; exit 1; }
log=$(mktemp)
port=$(( 20000 + RANDOM % 20000 ))
taskset -c "$server_cpu" "$B" serve --listen 127.0.0.1:$port --http-listen 127.0.0.1:$((port + 1)) --threads 1 \
  --synthetic-ttft-us 0 --synthetic-token-interval-us 0 >"$log" 2>&1 &
SP=$!
taskset -c "$server_cpu" "$A" --listen 127.0.0.1:$((port + 2)) >"$log.peer" 2>&1 &
AP=$!
wait_ready "$log" '^http listening on'
wait_ready "$log.peer" '^listening on' 
run() { # name mode port pid
  out=$(taskset -c "$load_cpus" "$B" bench --addr 127.0.0.1:"$3" --mode "$2" --connections "$conns" --inflight "$inflight" \
    --max-tokens 16 --threads "$load_threads" --duration-secs "$secs" --warmup-secs 0.5 --server-pid "$4" 2>&1)
  printf '%-14s %12s req/s %12s per server CPU-second %s\n' "$1" \
    "$(echo "$out" | awk '/^requests/ {print $3}')" \
    "$(echo "$out" | sed -n 's/.*: \([0-9,]*\) requests.*per server CPU-second.*/\1/p')" \
    "$(echo "$out" | grep -q problems && echo "($(echo "$out" | grep problems))")"
}
echo "== $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), load average $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  echo "-- round $r"
  run "cnse http" http $((port + 1)) $SP
  run "cnse binary" generate $port $SP
  run "axum peer" http $((port + 2)) $AP
done
kill -INT $SP; kill $AP; wait 2>/dev/null
rm -f "$log" "$log.peer"
