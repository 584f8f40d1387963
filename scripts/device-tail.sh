#!/usr/bin/env bash
# Issue 9's tail on the 16-core device machine: where an open-loop
# request's time goes. One server core (core 0), zero-delay generate (16
# tokens), the load on cores 8-15. For 256 and 64 connections x 4 in
# flight: the closed-loop peak (server without stage timing), then open
# loops at fractions of that peak against a fresh server with
# --stage-timing, printing the client's table (e2e = send_delay + rtt) and
# the server's stage table for each run.
#   bash scripts/device-tail.sh BIN [SECS] [FRACTIONS] [TICKS_US]
# SERVER_CPU (0), LOAD_CPUS (8-15) and LOAD_THREADS (8) move it elsewhere;
# SERVER_ARGS and CLIENT_ARGS go to every server and every bench (the
# peak and the open loops alike); SERVER_BIN serves instead of BIN (an
# older build: set STAGE= when it has no --stage-timing).
set -u
bin=$1 secs=${2:-4} fractions=${3:-0.5,0.7} ticks=${4:-100}
server_bin=${SERVER_BIN:-$1} stage=${STAGE---stage-timing}
server_cpu=${SERVER_CPU:-0} load_cpus=${LOAD_CPUS:-8-15} load_threads=${LOAD_THREADS:-8}
# One client thread per load core.
client_cpus=$(seq -s, $(echo "$load_cpus" | tr '-' ' '))
echo "== server $server_bin, cpu $server_cpu, args: ${SERVER_ARGS:-none}; client args: ${CLIENT_ARGS:-none}"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(uname -r)"
"$bin" --version >/dev/null 2>&1 || { echo "device-tail: $bin does not run here"; exit 1; }
log=$(mktemp)
serve() {
  taskset -c "$server_cpu" "$server_bin" serve --listen 127.0.0.1:0 --threads 1 \
    --synthetic-ttft-us 0 --synthetic-token-interval-us 0 ${SERVER_ARGS:-} "$@" >"$log" 2>&1 &
  SP=$!
  for _ in $(seq 100); do grep -q '^listening on' "$log" && break; sleep 0.05; done
  ADDR=$(sed -n 's/^listening on //p' "$log" | head -1 | cut -d' ' -f1)
  [ -n "$ADDR" ] || { echo "server did not start: $(cat "$log")"; exit 1; }
}
stop() { kill -INT "$SP"; wait "$SP" 2>/dev/null; }
bench() {
  taskset -c "$load_cpus" "$bin" bench --addr "$ADDR" --threads "$load_threads" --client-cpus "$client_cpus" --duration-secs "$secs" --warmup-secs 1 \
    --mode generate --max-tokens 16 ${CLIENT_ARGS:-} "$@" 2>&1 \
    | grep -E "^(generate|ping)|^latency|^e2e|^send_delay|^rtt|^requests|^problems|client cpu"
}
for c in 256 64; do
  serve
  echo "== closed-loop peak, ${c}x4"
  bench --connections "$c" --inflight 4 >"$log.peak"
  cat "$log.peak"
  peak=$(awk '/^requests/ {gsub(",","",$3); sub("/s","",$3); print $3}' "$log.peak")
  stop
  [ -n "$peak" ] || { echo "device-tail: no closed-loop peak for ${c}x4"; continue; }
  for tick in ${ticks//,/ }; do
    for f in ${fractions//,/ }; do
      rate=$(awk -v p="$peak" -v f="$f" 'BEGIN {printf "%d", p * f}')
      echo "== open loop ${c}x4 at $f of $peak/s = $rate/s, client tick ${tick} us"
      serve $stage
      bench --connections "$c" --inflight 4 --rate "$rate" --tick-us "$tick"
      stop
      sed -n '/^stage timing/,$p' "$log"
    done
  done
done
rm -f "$log" "$log.peak"
