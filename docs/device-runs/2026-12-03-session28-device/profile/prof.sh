#!/bin/bash
# prof.sh OUT: perf of cnse-dp and redis-server under non-pipelined PING at
# 50 and 256 connections (server core 0, load 4 threads on 8-15), plus each
# server's user/system split from /proc.
cd "$(dirname "$0")"; out=$1; ulimit -n 20000
. ./wait-ready.sh
P="./bin/perf"
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
  taskset -c 8-15 ./cnse-dp bench --addr $addr --server-pid $sp --threads 4 --duration-secs 5 --warmup-secs 1 $mode --connections $c --inflight 1 > $out/load-$name-$c.txt 2>&1 &
  lp=$!
  sleep 2
  $P record -F 2000 -g -p $sp -o $out/perf.data -- sleep 3 > /dev/null 2>&1
  wait $lp
  read u1 s1 < <(awk '{print $14, $15}' /proc/$sp/stat)
  kill $sp; wait $sp 2>/dev/null; sleep 0.3
  echo "$name c=$c: user $((u1-u0)) sys $((s1-s0)) ticks; $(grep -E '^requests' $out/load-$name-$c.txt)"
  $P report -i $out/perf.data --no-children --sort dso --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" > $out/dso-$name-$c.txt
  $P report -i $out/perf.data --children --percent-limit 1.5 --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" > $out/children-$name-$c.txt
  $P report -i $out/perf.data --no-children --percent-limit 0.5 --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" > $out/top-$name-$c.txt
  rm -f $out/perf.data
done; done
