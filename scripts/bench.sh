#!/usr/bin/env bash
# Issue 13's benchmark suite, one command: cnse-dp side by side with peer
# servers (tokio, tokio-uring, monoio in benches/; redis-server for PING),
# open-loop latency against offered load, inflight depth, ablations of
# cnse-dp's switches, micro-benchmarks; CSV per experiment, summary.md with
# ratios and the issue's targets, SVG plots.
#
#   scripts/bench.sh [--quick] [OUT_DIR]      (OUT_DIR default: bench-results)
#
# --quick is a smoke run (tiny windows, fewer points) that checks the whole
# suite end to end (scripts/test.sh runs it). Every server runs on
# SERVER_CPU (default 0) with one thread, the load generator on LOAD_CPUS
# (default: 1, or 0 on a one-core machine) with LOAD_THREADS threads
# (default 1); THREADS_LIST (default 1..cores) the server threads of that
# ablation; ABLATIONS="threads defer recv_buffer send_buffer recv_mode frames
# send_mode" a subset of the ablations, AB_ROUNDS the DEFER_TASKRUN on/off
# pairs run in turn (default 1), SEND_MODES the send modes (default "plain
# zc fixed zc-fixed"). ONLY="connections load inflight ablations redis http
# micro scale" runs a subset. ROUNDS=N (default 1) repeats the connections,
# inflight and redis steps N times, every server in turn within each round, and
# the summary quotes the rounds' medians; CONNS_LIST and INFLIGHT_LIST
# (full runs) replace their points. LOAD_POLL_US=N adds to the open-loop step a
# server of its own, cnse-dp-poll (`serve --busy-poll-us N`). The scale step holds IDLE_CONNS idle connections (default:
# what one process's open-file limit allows; 1,000 with --quick) on
# IDLE_SERVERS server processes sharing one SO_REUSEPORT address (default 1),
# from IDLE_SOURCES loopback source addresses (default 4), and runs
# ACTIVE_STREAMS (default 10,000; 500 with --quick) streams at a paced
# synthetic model (100 tokens/s each, 100 tokens; 10 with --quick) on
# ACTIVE_THREADS server threads (default 1) on ACTIVE_CPUS (default SERVER_CPU). BENCH_BIN_DIR=DIR uses prebuilt binaries from DIR (cnse-dp,
# tokio_peer, tokio_uring_peer, monoio_peer, micro, bench_report: see
# scripts/device-bench.sh) instead of building.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
. scripts/wait-ready.sh
quick=0
out=bench-results
for a in "$@"; do
  case $a in
    --quick) quick=1 ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) echo "bench.sh: unknown option $a" >&2; exit 2 ;;
    *) out=$a ;;
  esac
done
cores=$(nproc)
server_cpu=${SERVER_CPU:-0}
load_cpus=${LOAD_CPUS:-$((cores > 1 ? 1 : 0))}
load_threads=${LOAD_THREADS:-1}
only=${ONLY:-connections load inflight ablations redis http micro scale}
ablations=${ABLATIONS:-threads defer recv_buffer send_buffer recv_mode frames send_mode}
ab_rounds=${AB_ROUNDS:-1}
rounds=${ROUNDS:-1}
# The round `run` labels its CSV rows with (` r=N`, only with ROUNDS > 1).
round=
send_modes=${SEND_MODES:-plain zc fixed zc-fixed}
want() { [[ " $ablations " == *" $1 "* ]]; }
if [ "$quick" = 1 ]; then
  secs=0.5 warm=0.2 drain_ms=2000
  conns_list="16 256" fractions="0.1 0.7" inflight_list="1 16"
  payload_list="64 65536" frames_list="1 0"
  redis_conns="50" redis_n1=20000 redis_n16=200000
else
  secs=${SECS:-5} warm=${WARMUP:-1} drain_ms=5000
  conns_list=${CONNS_LIST:-16 64 256 1024} fractions="0.1 0.3 0.5 0.7 0.9 0.95" inflight_list=${INFLIGHT_LIST:-1 4 16 64}
  payload_list="64 1024 16384 65536 262144" frames_list="1 2 4 16 0"
  redis_conns="50 256" redis_n1=$((${SECS:-5} * 100000)) redis_n16=$((${SECS:-5} * 1000000))
fi
ulimit -n 65536 2>/dev/null || true

# Binaries: built here in release, or prebuilt in BENCH_BIN_DIR. A bench's
# executable is the one cargo names (a test of the same name would match
# a glob over target/release/deps).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bench_exe() { sed -n "s|.*Executable benches/$1.rs (\(.*\))|\1|p" "$tmp/build.log" | head -1; }
if [ -n "${BENCH_BIN_DIR:-}" ]; then
  d=$(cd "$BENCH_BIN_DIR" && pwd)
  # Programs carried in the bundle (redis, for a machine with no registry) come first.
  [ ! -d "$d/redis/bin" ] || PATH=$d/redis/bin:$PATH
  B=$d/cnse-dp TOKIO=$d/tokio_peer URING=$d/tokio_uring_peer MONOIO=$d/monoio_peer MICRO=$d/micro REPORT=$d/bench_report
else
  echo "== build (release)"
  cargo build --release --bin cnse-dp
  cargo bench --no-run --bench tokio_peer --bench tokio_uring_peer --bench monoio_peer --bench micro --bench bench_report \
    --bench axum_peer 2>&1 | tee "$tmp/build.log"
  B=$root/target/release/cnse-dp
  TOKIO=$root/$(bench_exe tokio_peer) URING=$root/$(bench_exe tokio_uring_peer) MONOIO=$root/$(bench_exe monoio_peer)
  MICRO=$root/$(bench_exe micro) REPORT=$root/$(bench_exe bench_report)
fi
for x in "$B" "$TOKIO" "$URING" "$MONOIO" "$MICRO" "$REPORT"; do
  [ -x "$x" ] || { echo "bench.sh: missing binary $x" >&2; exit 1; }
done

rm -rf "$out" && mkdir -p "$out"
out=$(cd "$out" && pwd)
SP=""
stop_server() {
  if [ -n "$SP" ]; then kill -TERM "$SP" 2>/dev/null || true; wait "$SP" 2>/dev/null || true; SP=""; fi
}
RP=""
trap 'stop_server; [ -z "$RP" ] || kill "$RP" 2>/dev/null || true; rm -rf "$tmp"' EXIT
# LOAD_CPUS as a list for --client-cpus (taskset takes ranges as they are).
client_cpus=$(echo "$load_cpus" | tr ',' '\n' | while IFS=- read -r a b; do seq "$a" "${b:-$a}"; done | paste -sd,)
failures=0

{
  echo "date:     $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "command:  scripts/bench.sh $* (ONLY=\"$only\")"
  # Prebuilt binaries name the commit they were built from (a copy of the
  # tree elsewhere may carry another commit's git metadata).
  if [ -n "${BENCH_BIN_DIR:-}" ] && [ -f "$BENCH_BIN_DIR/commit.txt" ]; then
    echo "commit:   $(cat "$BENCH_BIN_DIR/commit.txt") (binaries in $BENCH_BIN_DIR)"
  else
    echo "commit:   $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  fi
  echo "machine:  $cores cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/^Mem/ {print $2}') GiB, Linux $(uname -r)"
  echo "pinning:  servers on CPU $server_cpu (one thread), load generator on CPUs $load_cpus ($load_threads thread(s))"
  echo "windows:  ${secs} s measured after ${warm} s warm-up per run$([ "$quick" = 1 ] && echo ' (--quick: a smoke run, not a measurement)')"
  echo "load avg: $(cut -d' ' -f1-3 /proc/loadavg) at the start"
} >"$out/machine.txt"
cat "$out/machine.txt"

# start_server NAME [THREADS [CPUS [cnse-dp serve flags...]]]: sets SP and ADDR.
starts=0
start_server() {
  # A new log per start: the background command's redirection truncates
  # its file only once that process runs, so a reused log could still show
  # the previous server's address to the wait below.
  starts=$((starts + 1))
  local name=$1 threads=${2:-1} cpus=${3:-$server_cpu} log=$tmp/server.$starts.log
  shift $(($# < 3 ? $# : 3))
  # cnse-dp-poll is cnse-dp polling its ring (LOAD_POLL_US).
  [ "$name" != cnse-dp-poll ] || set -- --busy-poll-us "$LOAD_POLL_US" "$@"
  case $name in
    cnse-dp | cnse-dp-poll) taskset -c "$cpus" "$B" serve --listen 127.0.0.1:0 --threads "$threads" \
      --synthetic-ttft-us 0 --synthetic-token-interval-us 0 "$@" >"$log" 2>&1 & ;;
    tokio) taskset -c "$cpus" "$TOKIO" --listen 127.0.0.1:0 --threads "$threads" --cpus "$cpus" >"$log" 2>&1 & ;;
    tokio-uring) taskset -c "$cpus" "$URING" --listen 127.0.0.1:0 --threads "$threads" --cpus "$cpus" >"$log" 2>&1 & ;;
    monoio) taskset -c "$cpus" "$MONOIO" --listen 127.0.0.1:0 --threads "$threads" --cpus "$cpus" >"$log" 2>&1 & ;;
  esac
  SP=$!
  # The address itself, not only the start of the line.
  wait_ready "$log" '^listening on [0-9]'
  ADDR=$(sed -n 's/^listening on \([0-9.:]*\).*/\1/p' "$log" | head -1)
  [ -n "$ADDR" ] || { echo "bench.sh: $name printed no address: $(head -c 500 "$log")" >&2; exit 1; }
}

# run EXP SERVER PARAM VALUE [bench flags...]: one load run against the
# running server; its CSV rows go to $out/EXP.csv behind server,param,value.
run() {
  local exp=$1 server=$2 param=$3 value=$4 csv=$tmp/run.csv
  shift 4
  rm -f "$csv"
  if ! taskset -c "$load_cpus" "$B" bench --addr "$ADDR" --server-pid "$SP" --threads "$load_threads" \
    --client-cpus "$client_cpus" --duration-secs "$secs" --warmup-secs "$warm" --drain-timeout-ms "$drain_ms" \
    --csv "$csv" "$@" >"$tmp/run.out" 2>&1; then
    # A protocol break or a lost connection fails the suite; a server that
    # completed nothing in the window (starved on a busy machine) fails a
    # full run but is only marked in a --quick smoke run.
    if [ "$quick" = 1 ] && ! grep -qE 'bad frames|connections lost|running the load' "$tmp/run.out"; then
      echo "   STARVED (not counted in --quick): $exp $server $param=$value: $(grep -E 'problems|error' "$tmp/run.out" | head -2 | tr '\n' ' ')"
    else
      echo "   FAILED: $exp $server $param=$value: $(grep -E 'problems|error' "$tmp/run.out" | head -2 | tr '\n' ' ')"
      failures=$((failures + 1))
    fi
  fi
  [ -f "$csv" ] || return 0
  [ -f "$out/$exp.csv" ] || echo "server,param,value,$(head -1 "$csv")" >"$out/$exp.csv"
  tail -n +2 "$csv" | sed "${round:+s|^\([^,]*\),|\1 r=$round,|;}s|^|$server,$param,$value,|" >>"$out/$exp.csv"
  printf '   %-12s %-12s %-8s %14s req/s  p99 %s%s\n' "$server" "$param" "$value" \
    "$(awk '/^requests / {print $3}' "$tmp/run.out")" \
    "$(awk '$1 == "e2e_all" {v = $7} $1 == "e2e" && v == "" {e = $7} END {print (v != "" ? v : e)}' "$tmp/run.out")" \
    "$(grep -q '^problems' "$tmp/run.out" && echo "  ($(grep '^problems' "$tmp/run.out"))")"
}

peak_of() { awk -F, '$2 == "requests" && $3 == "per_s" {printf "%d", $5}' "$tmp/run.csv" 2>/dev/null; }

servers="cnse-dp tokio tokio-uring monoio"
gen=(--mode generate --max-tokens 16)
# Every point runs the servers one after the other, each freshly started,
# so that what other work does to the machine meanwhile falls on all of
# them alike rather than on whichever server's turn it was.
if [[ " $only " == *" connections "* ]]; then
  echo "== throughput vs connections (closed loop)"
  for r in $(seq 1 "$rounds"); do
    [ "$rounds" = 1 ] || { round=$r; echo "   round $r of $rounds"; }
    for c in $conns_list; do
      for s in $servers; do
        start_server "$s"
        run connections "$s" connections "$c" --mode ping --payload-bytes 64 --connections "$c" --inflight 16
        run connections "$s" connections "$c" "${gen[@]}" --connections "$c" --inflight 4
        stop_server
      done
    done
  done
  round=
fi

if [[ " $only " == *" load "* ]]; then
  echo "== latency vs offered load (open loop at fractions of each server's own closed-loop peak)"
  declare -A peaks
  # LOAD_POLL_US=N adds cnse-dp with `serve --busy-poll-us N` as a server
  # of its own (its own peak and fractions; the peers do not spin).
  load_servers="$servers${LOAD_POLL_US:+ cnse-dp-poll}"
  for s in $load_servers; do
    start_server "$s"
    run load "$s" load peak "${gen[@]}" --connections 64 --inflight 4
    peaks[$s]=$(peak_of)
    stop_server
  done
  for f in $fractions; do
    for s in $load_servers; do
      peak=${peaks[$s]:-0}
      [ -n "$peak" ] && [ "$peak" -gt 0 ] || continue
      start_server "$s"
      run load "$s" load "$f" "${gen[@]}" --connections 64 --inflight 4 \
        --rate "$(awk -v p="$peak" -v f="$f" 'BEGIN {printf "%d", p * f}')"
      stop_server
    done
  done
  # Where cnse-dp's time goes at 70 % of its peak: issue 9's per-stage
  # timestamps (a separate run: stamping costs a few clock reads a request).
  peak=${peaks[cnse-dp]:-0}
  if [ -n "$peak" ] && [ "$peak" -gt 0 ]; then
    start_server cnse-dp 1 "$server_cpu" --stage-timing
    stage_log=$tmp/server.$starts.log
    run stages cnse-dp load 0.7 "${gen[@]}" --connections 64 --inflight 4 \
      --rate "$(awk -v p="$peak" 'BEGIN {printf "%d", p * 0.7}')"
    stop_server
    sed -n '/^stage timing/,$p' "$stage_log" >"$out/stages.txt"
  fi
fi

if [[ " $only " == *" inflight "* ]]; then
  echo "== throughput and p99 vs inflight depth (closed loop, 64 connections)"
  for r in $(seq 1 "$rounds"); do
    [ "$rounds" = 1 ] || { round=$r; echo "   round $r of $rounds"; }
    for k in $inflight_list; do
      for s in $servers; do
        start_server "$s"
        run inflight "$s" inflight "$k" "${gen[@]}" --connections 64 --inflight "$k"
        stop_server
      done
    done
  done
  round=
fi

# One ablation setting: a server started with FLAGS, a pipelined PING run
# and a generate run.
ablate() {
  local exp=$1 value=$2 threads=$3 cpus=$4
  shift 4
  start_server cnse-dp "$threads" "$cpus" "$@"
  run "$exp" cnse-dp setting "$value" --mode ping --payload-bytes 64 --connections 256 --inflight 16
  run "$exp" cnse-dp setting "$value" "${gen[@]}" --connections 64 --inflight 4
  stop_server
}
if [[ " $only " == *" ablations "* ]]; then
  echo "== ablations (cnse-dp)"
  if want threads; then
    for t in ${THREADS_LIST:-$(seq 1 "$cores")}; do ablate ablation_threads "$t" "$t" "0-$((t - 1))"; done
  fi
  # AB_ROUNDS > 1 repeats the on/off pair in turn (values on/1, off/1, ...)
  # so that one run's drift is not read as an effect.
  if want defer; then
    for r in $(seq 1 "$ab_rounds"); do
      tag=$([ "$ab_rounds" = 1 ] || echo "/$r")
      ablate ablation_defer_taskrun "on$tag" 1 "$server_cpu"
      ablate ablation_defer_taskrun "off$tag" 1 "$server_cpu" --no-defer-taskrun
    done
  fi
  if want recv_buffer; then
    for b in 4096 16384 65536; do ablate ablation_recv_buffer "$b" 1 "$server_cpu" --recv-buffer-bytes "$b"; done
  fi
  if want send_buffer; then
    for b in 8192 65536 1048576; do ablate ablation_send_buffer "$b" 1 "$server_cpu" --send-buffer-bytes "$b"; done
  fi
  if want recv_mode; then
    for m in bufring plain; do ablate ablation_recv_mode "$m" 1 "$server_cpu" --recv-mode "$m"; done
  fi
  # 0: as many frames as fit the send buffer (the default).
  if want frames; then
    for n in $frames_list; do ablate ablation_frames_per_send "$n" 1 "$server_cpu" --max-frames-per-send "$n"; done
  fi
  # SEND, SEND_ZC and registered (fixed) send buffers by payload size:
  # pipelined PINGs whose PONGs carry P bytes back (the server's sends), 64
  # connections x 4 in flight. The modes take turns at each payload, each
  # server freshly started, so drift on a shared machine falls on all.
  if want send_mode; then
    for p in $payload_list; do
      for m in $send_modes; do
        start_server cnse-dp 1 "$server_cpu" --send-mode "$m"
        run ablation_send_mode cnse-dp setting "$m/$p" --mode ping --payload-bytes "$p" --connections 64 --inflight 4
        stop_server
      done
    done
  fi
fi

if [[ " $only " == *" redis "* ]]; then
  . scripts/bench-redis.sh
  bench_redis
fi

if [[ " $only " == *" http "* ]]; then
  # Issue 12's side-by-side run as it is (cnse-dp's HTTP front, its binary
  # protocol and the hyper/axum peer), its output kept as text.
  echo "== HTTP front against the axum peer (scripts/http-bench.sh)"
  if [ -n "${BENCH_BIN_DIR:-}" ]; then
    echo "   skipped: http-bench.sh needs the build tree (BENCH_BIN_DIR is set)"
  else
    if [ "$quick" = 1 ]; then http_args=(1 0.5); else http_args=(3 3); fi
    # It picks a random port: a second try when another program had it.
    for try in 1 2; do
      if SERVER_CPU=$server_cpu LOAD_CPUS=$load_cpus LOAD_THREADS=$load_threads \
        bash scripts/http-bench.sh "${http_args[@]}" >"$out/http.txt" 2>&1; then
        break
      elif [ "$try" = 2 ] || ! grep -q 'Address already in use' "$out/http.txt"; then
        echo "   FAILED: http-bench.sh: $(tail -1 "$out/http.txt")"
        failures=$((failures + 1))
        break
      fi
    done
  fi
  [ -f "$out/http.txt" ] && sed 's/^/   /' "$out/http.txt"
fi

if [[ " $only " == *" micro "* ]]; then
  echo "== micro-benchmarks"
  # --bench: without it a divan binary only checks that each benchmark runs.
  if [ "$quick" = 1 ]; then micro_args=(--sample-count 3 --sample-size 1); else micro_args=(); fi
  if ! taskset -c "$server_cpu" "$MICRO" --bench "${micro_args[@]}" >"$out/micro.txt" 2>"$tmp/micro.err"; then
    echo "   FAILED: micro: $(tail -3 "$tmp/micro.err")"
    failures=$((failures + 1))
  fi
fi

if [[ " $only " == *" scale "* ]]; then
  echo "== scale: paced active streams, then idle connections (cnse-dp)"
  if [ "$quick" = 1 ]; then active=${ACTIVE_STREAMS:-500}; else active=${ACTIVE_STREAMS:-10000}; fi
  # Paced streams first (the idle step's closes leave its source ports in
  # TIME_WAIT): 100 tokens/s each, 100 tokens, closed loop; every
  # connection keeps one stream open, so about ACTIVE_STREAMS are active.
  log=$tmp/scale.active.log
  at=${ACTIVE_THREADS:-1} acpus=${ACTIVE_CPUS:-$server_cpu}
  # Room for twice the streams: each thread takes an equal share of
  # --max-connections and SO_REUSEPORT's hash does not split evenly.
  taskset -c "$acpus" "$B" serve --listen 127.0.0.1:0 --threads "$at" --max-connections $((2 * active + 100)) \
    --synthetic-ttft-us 10000 --synthetic-token-interval-us 10000 >"$log" 2>&1 &
  SP=$!
  wait_ready "$log" '^listening on [0-9]'
  ADDR=$(sed -n 's/^listening on \([0-9.:]*\).*/\1/p' "$log" | head -1)
  if [ "$quick" = 1 ]; then tokens=10; else tokens=100; fi
  run scale_active "cnse-dp/$at" streams "$active" --mode generate --max-tokens "$tokens" --connections "$active" --inflight 1
  stop_server
  fd_limit=$(ulimit -n)
  if [ "$quick" = 1 ]; then idle=${IDLE_CONNS:-1000}; else idle=${IDLE_CONNS:-$((fd_limit - 1000))}; fi
  nsrv=${IDLE_SERVERS:-1}
  per_srv=$(( (idle + nsrv - 1) / nsrv ))
  srcs=$(seq 1 "${IDLE_SOURCES:-4}" | sed 's/^/127.0.0./' | paste -sd,)
  # Server processes on one address: SO_REUSEPORT spreads the connections;
  # each may hold up to its own open-file limit. The first picks the port.
  pids=() addr=127.0.0.1:0
  for i in $(seq 1 "$nsrv"); do
    log=$tmp/scale.$i.log
    taskset -c "$server_cpu" "$B" serve --listen "$addr" --threads 1 --max-connections $((fd_limit - 100)) \
      --idle-timeout-ms 600000 $([ "$i" = 1 ] || echo --join-listen) >"$log" 2>&1 &
    pids+=($!)
    wait_ready "$log" '^listening on [0-9]'
    addr=$(sed -n 's/^listening on \([0-9.:]*\).*/\1/p' "$log" | head -1)
  done
  if taskset -c "$load_cpus" "$B" bench-idle --addr "$addr" --connections "$idle" --source-ips "$srcs" \
    --server-pid "$(IFS=,; echo "${pids[*]}")" >"$out/scale.txt" 2>&1; then :; else
    echo "   FAILED: bench-idle: $(tail -1 "$out/scale.txt")"
    failures=$((failures + 1))
  fi
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  echo "   $idle idle connections on $nsrv server process(es) ($per_srv each at most):"
  grep -E '^(connected|still|server|RSS)' "$out/scale.txt" | sed 's/^/     /'
fi

echo "load avg: $(cut -d' ' -f1-3 /proc/loadavg) at the end" >>"$out/machine.txt"
"$REPORT" "$out"
# The smoke run's point: every part of the suite produced its output.
if [ "$quick" = 1 ] && [ "$only" = "connections load inflight ablations redis http micro scale" ]; then
  for f in summary.md throughput_vs_connections.svg latency_vs_load.svg inflight.svg ablation_threads.svg \
    ablation_defer_taskrun.svg ablation_recv_buffer.svg ablation_send_buffer.svg ablation_recv_mode.svg \
    ablation_frames_per_send.svg ablation_send_mode.svg ablation_send_mode_cpu.svg micro.txt stages.txt http.txt scale.txt scale_active.csv; do
    [ -s "$out/$f" ] || { echo "bench.sh: --quick: $f is missing or empty" >&2; failures=$((failures + 1)); }
  done
  grep -q 'redis-benchmark ping' "$out/redis.csv" 2>/dev/null || [ -s "$out/redis.note" ] ||
    { echo "bench.sh: --quick: no redis rows and no reason" >&2; failures=$((failures + 1)); }
fi
echo "== $out: $(ls "$out" | paste -sd' ')"
if [ "$failures" -gt 0 ]; then
  echo "bench.sh: $failures run(s) failed (see FAILED above)" >&2
  exit 1
fi
