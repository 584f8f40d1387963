#!/usr/bin/env bash
# The loop's floor against the loop: benches/loop_floor.rs (a bare io_uring
# responder: canned TOKENS + END per REQUEST, no session) and `cnse-dp
# serve` (zero-delay synthetic backend), each on core 0, driven from core 1
# closed loop and open loop at 100k/200k/300k requests/s (64 x 4, 16
# tokens); prints requests/s and requests per server CPU-second.
#   cargo build --release && cargo bench --no-run --bench loop_floor
#   bash scripts/loop-floor.sh        (SRVS="floor cnse", PORT=7900)
set -u
cd "$(dirname "$0")/.."
. scripts/wait-ready.sh
slog="${TMPDIR:-/tmp}/loop-floor-server.log"
F=$(ls -t target/release/deps/loop_floor-* | grep -v '\.d$' | head -1)
B=target/release/cnse-dp
port=${PORT:-7900}
for srv in ${SRVS:-floor cnse}; do
  port=$((port + 1))   # a fresh port each: the last one's connections linger in TIME_WAIT
  if [ $srv = floor ]; then taskset -c 0 "$F" --listen 127.0.0.1:$port > "$slog" 2>&1 & else taskset -c 0 "$B" serve --listen 127.0.0.1:$port --threads 1 --synthetic-ttft-us 0 --synthetic-token-interval-us 0 > "$slog" 2>&1 & fi
  SP=$!
  wait_ready "$slog" '^listening on' 
  for r in "" "--rate 100000" "--rate 200000" "--rate 300000"; do
    out=$(taskset -c 1 "$B" bench --addr 127.0.0.1:$port --threads 1 --duration-secs 3 --warmup-secs 0.5 --mode generate --connections 64 --inflight 4 --max-tokens 16 $r --server-pid $SP 2>&1)
    echo "$srv ${r:-closed}: $(echo "$out" | grep -E '^requests' | awk '{print $3}') wall, $(echo "$out" | sed -n 's/.*: \([0-9,]*\) requests.*per server CPU-second.*/\1/p') per server CPU-s, $(echo "$out" | sed -n 's/^server cpu *\([0-9.]* s (.*of one core\).*/\1/p'), p99 $(echo "$out" | awk '$1 == "e2e" {print $7}'), problems: $(echo "$out" | grep -c problems)"
  done
  kill -INT $SP 2>/dev/null; wait $SP 2>/dev/null
done
