#!/bin/bash
# Servers at once: old (7e820a5 + io_mut) vs new (HEAD), cores 0/1 alternated, loads 4 threads on 4-7 / 8-11.
cd "$(dirname "$0")"
ulimit -n 20000
vs=(old new)
loads=(4-7 8-11)
for shape in "64 4" "256 4" "64 64"; do
  set -- $shape
  for r in 1 2 3; do
    pids=()
    for i in 0 1; do v=${vs[$i]}; c=$(((i + r) % 2)); port=$((7100 + i))
      taskset -c $c ./cnse-$v serve --threads 1 --listen 127.0.0.1:$port --synthetic-ttft-us 0 --synthetic-token-interval-us 0 >srv.$v 2>&1 & pids+=($!); done
    sleep 0.5
    for i in 0 1; do v=${vs[$i]}; port=$((7100 + i))
      taskset -c ${loads[$i]} ./cnse-old bench --addr 127.0.0.1:$port --mode generate --max-tokens 16 --connections $1 --inflight $2 --threads 4 --duration-secs 3 --server-pid ${pids[$i]} >load.$v 2>&1 & done
    sleep 1; while pgrep -f "cnse-old bench" >/dev/null; do sleep 0.2; done
    for i in 0 1; do v=${vs[$i]}; echo "$1x$2 round $r $v (core $(((i + r) % 2))): $(grep -E '^requests' load.$v | awk '{print $3}') req/s; $(grep 'server cpu' load.$v | sed 's/.*): //')"; done
    kill "${pids[@]}"; wait 2>/dev/null
  done
done
