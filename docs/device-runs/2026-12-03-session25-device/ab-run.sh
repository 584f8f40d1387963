#!/bin/bash
# Side-by-side A/B of old/new/box: the session micro-benchmark, then servers at once.
cd "$(dirname "$0")"
ulimit -n 20000
nproc; lscpu | grep "Model name"
vs=(old new box)
echo "== micro (concurrent, cores 2-4 rotated)"
for r in 1 2 3; do
  for i in 0 1 2; do v=${vs[$i]}; c=$((2 + (i + r) % 3)); taskset -c $c ./micro-$v --bench session --sample-count 300 >micro.$v.$r 2>&1 & done; wait
  for v in "${vs[@]}"; do echo "round $r $v: $(grep '─ (' micro.$v.$r | sed 's/│/|/g' | awk -F'|' '{split($1,a,"─ "); split(a[2],q,")"); printf "%s) med %s; ", q[1], $3}')"; done
done
echo "== servers at once (server cores 0-2 rotated, loads 4 threads each on 3-6, 7-10, 11-14)"
loads=(3-6 7-10 11-14)
for shape in "64 64" "64 4" "256 16"; do
  set -- $shape
  for r in 1 2 3; do
    pids=()
    for i in 0 1 2; do v=${vs[$i]}; c=$(((i + r) % 3)); port=$((7100 + i))
      taskset -c $c ./cnse-$v serve --threads 1 --listen 127.0.0.1:$port --synthetic-ttft-us 0 --synthetic-token-interval-us 0 >srv.$v 2>&1 & pids+=($!); done
    sleep 0.5
    for i in 0 1 2; do v=${vs[$i]}; port=$((7100 + i))
      taskset -c ${loads[$i]} ./cnse-old bench --addr 127.0.0.1:$port --mode generate --max-tokens 16 --connections $1 --inflight $2 --threads 4 --duration-secs 4 --server-pid ${pids[$i]} >load.$v 2>&1 & done
    wait ${!} 2>/dev/null; sleep 0.2; while pgrep -f "cnse-old bench" >/dev/null; do sleep 0.2; done
    for i in 0 1 2; do v=${vs[$i]}; echo "$1x$2 round $r $v (core $(((i + r) % 3))): $(grep -E '^requests' load.$v | awk '{print $3}') req/s; $(grep 'server cpu' load.$v | sed 's/.*): //')"; done
    kill "${pids[@]}"; wait 2>/dev/null
  done
done
