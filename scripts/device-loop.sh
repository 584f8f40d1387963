#!/usr/bin/env bash
# Issue 9's loop measurements on the 16-core device machine, old binary
# against new, side by side in one run: one server core (core 0), zero-delay
# synthetic backend, the load on cores 8-15.
#   bash scripts/device-loop.sh OLD_BIN NEW_BIN [SECS]
# ROUNDS (2) sets the closed-loop rounds; OPEN=0 skips the open loops.
# Client threads are pinned one per core (8-15).
# Closed-loop peaks (PING 256x1, 256x16; generate 16 tokens 256x4) alternate
# old/new twice; then each binary's open-loop p99 at 50k, 100k and 200k
# requests/s (256 x 4) and at 70 % of its own closed-loop peak for 256 and
# 64 connections.
set -u
old=$1 new=$2 secs=${3:-4} rounds=${ROUNDS:-2}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(uname -r)"
for b in "$old" "$new"; do
  "$b" --version >/dev/null 2>&1 || { echo "device-loop: $b does not run here (exit $?)"; exit 1; }
done
log=$(mktemp)
serve() {
  taskset -c 0 "$1" serve --listen 127.0.0.1:0 --threads 1 \
    --synthetic-ttft-us 0 --synthetic-token-interval-us 0 >"$log" 2>&1 &
  SP=$!
  for _ in $(seq 100); do grep -q '^listening on' "$log" && break; sleep 0.05; done
  ADDR=$(sed -n 's/^listening on //p' "$log" | head -1 | cut -d' ' -f1)
  [ -n "$ADDR" ] || { echo "server did not start: $(cat "$log")"; exit 1; }
}
stop() { kill -INT "$SP"; wait "$SP" 2>/dev/null; }
bench() {
  taskset -c 8-15 "$new" bench --addr "$ADDR" --threads 8 --client-cpus 8,9,10,11,12,13,14,15 --duration-secs "$secs" --warmup-secs 1 "$@" 2>&1 \
    | grep -E "^(generate|ping)|^e2e|^requests|^frames_out|^open loop|rate|bend|^ *[0-9]" | head -40
}
for round in $(seq "$rounds"); do
  for b in "$old" "$new"; do
    name=$([ "$b" = "$old" ] && echo old || echo new)
    echo "== round $round, $name: closed-loop peaks"
    serve "$b"
    echo "-- ping 256x1"; bench --mode ping --connections 256 --inflight 1
    echo "-- ping 256x16"; bench --mode ping --connections 256 --inflight 16
    echo "-- generate 16 tokens 256x4"; bench --mode generate --connections 256 --inflight 4 --max-tokens 16
    stop
  done
done
[ "${OPEN:-1}" = 0 ] && { rm -f "$log"; exit 0; }
for b in "$old" "$new"; do
  name=$([ "$b" = "$old" ] && echo old || echo new)
  serve "$b"
  echo "== $name: open loop, generate 16 tokens, 256x4, at 50k/100k/200k req/s"
  bench --mode generate --connections 256 --inflight 4 --max-tokens 16 --sweep-rates 50000,100000,200000
  echo "== $name: open loop at 70 % of the closed-loop peak, 256x4"
  bench --mode generate --connections 256 --inflight 4 --max-tokens 16 --peak-fraction 0.7
  echo "== $name: open loop at 70 % of the closed-loop peak, 64x4"
  bench --mode generate --connections 64 --inflight 4 --max-tokens 16 --peak-fraction 0.7
  stop
done
rm -f "$log"
