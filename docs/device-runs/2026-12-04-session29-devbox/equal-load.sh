#!/bin/bash
# equal offered load: cnse-dp vs tokio peer, 64x4 generate 16 tokens
cd /work/main
B=target/release/cnse-dp; TOKIO=target/release/deps/tokio_peer-b2eb1f671eb46ed1
rates=${RATES:-"100000 150000 200000"}
for r in 1 2; do
for rate in $rates; do
for s in cnse tokio; do
  if [ $s = cnse ]; then taskset -c 0 $B serve --listen 127.0.0.1:0 --threads 1 --synthetic-ttft-us 0 --synthetic-token-interval-us 0 $SERVE_ARGS >/tmp/ol/s.log 2>&1 &
  else taskset -c 0 $TOKIO --listen 127.0.0.1:0 --threads 1 --cpus 0 >/tmp/ol/s.log 2>&1 & fi
  SP=$!
  for i in $(seq 100); do grep -q "^listening on [0-9]" /tmp/ol/s.log && break; sleep 0.05; done
  ADDR=$(sed -n 's/^listening on \([0-9.:]*\).*/\1/p' /tmp/ol/s.log | head -1)
  taskset -c 1 $B bench --addr $ADDR --server-pid $SP --threads 1 --client-cpus 1 --duration-secs ${SECS:-4} --warmup-secs 1 --mode generate --max-tokens 16 --connections 64 --inflight 4 --rate $rate $BENCH_ARGS > /tmp/ol/b.out 2>&1
  kill $SP; wait $SP 2>/dev/null
  printf "r%s %-6s %7s  " $r $s $rate
  grep -E "^e2e |server cpu|never sent|completed" /tmp/ol/b.out | tr -s ' ' | tr '\n' '|' ; echo
done; done; done
