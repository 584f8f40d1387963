#!/bin/bash
# poll.sh OUT: non-pipelined PING, cnse-dp and redis-server in turn, the
# load with and without --busy-poll (its threads never sleep, so the
# servers' sends wake no client), 3 rounds; server user/system from /proc.
cd "$(dirname "$0")"; out=$1; ulimit -n 20000
. ./wait-ready.sh
for r in 1 2 3; do
for poll in "" "--busy-poll"; do
for c in 50 256; do
for name in cnse redis; do
  case $name in
    cnse) taskset -c 0 ./cnse-dp serve --listen 127.0.0.1:0 --threads 1 --synthetic-ttft-us 0 --synthetic-token-interval-us 0 > srv.log 2>&1 &
      sp=$!; wait_ready srv.log '^listening on [0-9]'; addr=$(sed -n 's/^listening on \([0-9.:]*\).*/\1/p' srv.log | head -1)
      mode="--mode ping --payload-bytes 0" ;;
    redis) taskset -c 0 ./lib/ld-linux-x86-64.so.2 --library-path ./lib ./redis/bin/real/redis-server --port 16379 --bind 127.0.0.1 --save "" --appendonly no --loglevel warning > srv.log 2>&1 &
      sleep 0.5; sp=$(pgrep -f "real/redis-server" | head -1); addr=127.0.0.1:16379; mode="--mode resp" ;;
  esac
  read u0 s0 < <(awk '{print $14, $15}' /proc/$sp/stat)
  taskset -c 8-15 ./cnse-dp bench --addr $addr --server-pid $sp --threads 4 --duration-secs 3 --warmup-secs 1 $mode --connections $c --inflight 1 $poll > $out/load.txt 2>&1
  read u1 s1 < <(awk '{print $14, $15}' /proc/$sp/stat)
  kill $sp; wait $sp 2>/dev/null; sleep 0.3
  echo "r=$r ${poll:-sleeping} $name c=$c: user $((u1-u0)) sys $((s1-s0)) ticks; $(grep -E '^requests' $out/load.txt | awk '{print $3}') req/s; $(grep -E 'server cpu' $out/load.txt | sed 's/.*: //')"
done; done; done; done
