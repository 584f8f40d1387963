#!/usr/bin/env bash
# Old binary against new on this machine, side by side: ROUNDS alternating
# rounds of PING 256x1, PING 256x16 and zero-delay generate 256x4 (16
# tokens), server on core 0 and the load (the new binary's bench, one
# thread) on core 1; prints requests/s and requests per server CPU-second.
#   bash scripts/loop-compare.sh OLD_BIN NEW_BIN [ROUNDS]
set -u
old=$(realpath "$1") new=$(realpath "$2") rounds=${3:-3}
cd "$(dirname "$0")/.."
. scripts/wait-ready.sh
slog="${TMPDIR:-/tmp}/loop-compare-server.log"
for r in $(seq $rounds); do
 for b in old new; do
  bin=$([ $b = old ] && echo $old || echo $new)
  taskset -c 0 $bin serve --listen 127.0.0.1:7801 --threads 1 --synthetic-ttft-us 0 --synthetic-token-interval-us 0 > "$slog" 2>&1 &
  SP=$!
  wait_ready "$slog" '^listening on' 
  for m in "ping 256 1" "ping 256 16" "generate 256 4"; do
    set -- $m
    out=$(taskset -c 1 $new bench --addr 127.0.0.1:7801 --threads 1 --duration-secs 3 --warmup-secs 0.5 --mode $1 --connections $2 --inflight $3 --max-tokens 16 --server-pid $SP 2>&1)
    wall=$(echo "$out" | awk '/^requests/ {gsub(",","",$3); sub("/s","",$3); print $3}')
    cpu=$(echo "$out" | sed -n 's/.*: \([0-9,]*\) requests.*per server CPU-second.*/\1/p' | tr -d ,)
    echo "round $r $b $1-$2x$3 wall $wall cpu $cpu"
  done
  kill -INT $SP; wait $SP 2>/dev/null
 done
done
