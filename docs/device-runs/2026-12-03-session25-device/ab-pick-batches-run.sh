#!/bin/bash
# Side-by-side A/B (old = main before, chunk = picker batches of 256 rows): session_turn
# at once on two cores, 5 rounds alternating cores; then servers at once (cores 0/1,
# loads on 4-7 and 8-11), 3 rounds per shape.
cd "$(dirname "$0")"
ulimit -n 20000
vs=(old chunk)
echo "== micro session_turn (concurrent, cores 2/3 alternated)"
for r in 1 2 3 4 5; do
  for i in 0 1; do v=${vs[$i]}; c=$((2 + (i + r) % 2)); taskset -c $c ./micro-$v --bench session --sample-count 300 >micro.$v.$r 2>&1 & done; wait
  for v in "${vs[@]}"; do echo "round $r $v: $(grep '─ (' micro.$v.$r | sed 's/│/|/g' | awk -F'|' '{split($1,a,"─ "); split(a[2],q,")"); printf "%s) fastest %s med %s; ", q[1], substr(a[2], length(q[1])+2), $3}')"; done
done
echo "== servers at once"
loads=(4-7 8-11)
for shape in "64 64" "64 4" "256 4"; do
  set -- $shape
  for r in 1 2 3; do
    pids=()
    for i in 0 1; do v=${vs[$i]}; c=$(((i + r) % 2)); port=$((7100 + i))
      taskset -c $c ./cnse-$v serve --threads 1 --listen 127.0.0.1:$port --synthetic-ttft-us 0 --synthetic-token-interval-us 0 >srv.$v 2>&1 & pids+=($!); done
    sleep 0.5
    for i in 0 1; do v=${vs[$i]}; port=$((7100 + i))
      taskset -c ${loads[$i]} ./cnse-old bench --addr 127.0.0.1:$port --mode generate --max-tokens 16 --connections $1 --inflight $2 --threads 4 --duration-secs 4 --server-pid ${pids[$i]} >load.$v 2>&1 & done
    sleep 1; while pgrep -f "cnse-old bench" >/dev/null; do sleep 0.2; done
    for i in 0 1; do v=${vs[$i]}; echo "$1x$2 round $r $v (core $(((i + r) % 2))): $(grep -E '^requests' load.$v | awk '{print $3}') req/s; $(grep 'server cpu' load.$v | sed 's/.*): //')"; done
    kill "${pids[@]}"; wait 2>/dev/null
  done
done
