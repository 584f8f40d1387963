#!/usr/bin/env bash
# Issue 2's targets on this machine: one server worker pinned to core 0, the
# load generator pinned to core 1 (zero-delay synthetic backend).
#   [RATES=r1,r2,...] scripts/bench-core.sh [DURATION_SECS] [OUT_DIR]
# Prints each table and writes one CSV per run into OUT_DIR (default
# target/bench-core). Numbers go to docs/BENCHMARKS.md with the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
out=${2:-target/bench-core}
mkdir -p "$out"
cargo build --release --bin cnse-dp
bin=./target/release/cnse-dp
cores=$(nproc)
client_cpu=$(( cores > 1 ? 1 : 0 ))
ulimit -n 65536 2>/dev/null || true

log=$(mktemp)
taskset -c 0 "$bin" serve --listen 127.0.0.1:0 --threads 1 \
  --synthetic-ttft-us 0 --synthetic-token-interval-us 0 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 50); do grep -q '^listening on' "$log" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$log" | head -1)
[ -n "$addr" ] || { echo "server did not start: $(cat "$log")" >&2; exit 1; }

bench() {
  local name=$1; shift
  echo
  echo "== $name (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  taskset -c "$client_cpu" "$bin" bench --addr "$addr" --client-cpus "$client_cpu" --server-pid "$server" \
    --duration-secs "$secs" --warmup-secs 2 --csv "$out/$name.csv" "$@"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
bench ping-k1 --mode ping --payload-bytes 64 --connections 256 --inflight 1
bench ping-k16 --mode ping --payload-bytes 64 --connections 256 --inflight 16
bench generate-peak-then-70pct --mode generate --max-tokens 16 --connections 256 --inflight 16 \
  --peak-fraction 0.7
# Open loop at fixed rates (RATES="r1,r2,..."): where latency bends, e.g.
# around 70 % of the peak when the machine is shared and the peak moves.
if [ -n "${RATES:-}" ]; then
  bench generate-open-sweep --mode generate --max-tokens 16 --connections 256 --inflight 16 \
    --sweep-rates "$RATES"
fi
