#!/usr/bin/env bash
# Issue 13's gateway peers: what a gateway in front of llama-server adds.
# The llama-server stand-in (`cnse-dp llama-standin`: llama-server's wire
# format at a fixed pace, 20 ms to the first token, 5 ms per token) runs as
# its own process; in front of it, each on the same PROXY_CPUS cores:
#   nginx    proxy_pass, proxy_buffering off, HTTP/1.1 keep-alive upstream,
#            worker_processes = the number of PROXY_CPUS, a POST retried on a
#            new upstream connection when a reused one was closed
#   haproxy  mode http, keep-alive both sides, http-reuse always,
#            option http-no-delay, nbthread = the number of PROXY_CPUS,
#            retry-on conn-failure empty-response (the same retry)
#   cnse-dp  serve --backend llama --llama-url STAND-IN, --threads the same,
#            over its OpenAI HTTP front and over its binary protocol.
# The same load generator (`cnse-dp bench`, closed loop, one stream per
# connection, on LOAD_CPUS) drives the stand-in directly and each path at
# each connection count, the paths rotated per round. Reported per path:
# TTFT p50/p99 and what it adds over direct, inter-token gap p50/p99,
# tokens/s, and the proxy's CPU per streamed token: on-CPU time of every
# thread of the proxy's processes over the measured window
# (/proc/PID/task/*/schedstat, ns; /proc/PID/stat utime+stime in ticks
# beside it as a check) divided by the tokens the load received in it,
# with the kernel's share of it (stime over utime+stime) and, for the
# target, the no-code bound: cnse-dp's kernel time alone per token over
# the peer's whole CPU per token.
#
#   cargo build --release
#   bash scripts/gateway-bench.sh [SECS] [ROUNDS]
#
# Environment: CONNS (connection counts, default "4 64 256"), TOKENS (32),
# TTFT_US (20000), INTERVAL_US (5000), PROXY_CPUS (0), LOAD_CPUS (1; also
# the stand-in's), LOAD_THREADS (1), WARMUP (2 s), NGINX and HAPROXY
# (binaries to use instead of Debian's; scripts/device-gateway.sh carries
# them to a machine without packages), CLOSE (1: the stand-in closes the
# connection after every streamed answer, as llama-server does; 0 keeps it
# open), OUT (bench-results/gateway). Writes OUT/gateway.csv (one row per
# round, connection count and path) and OUT/gateway.md (medians over the
# rounds, ratios cnse-dp / nginx and / haproxy). Needs root for apt-get
# when nginx or haproxy is missing.
#
# Two more cnse-dp shapes, each an extra path in the same rounds:
#   BATCH_WAIT_US=N  a second cnse-dp with `serve --batch-wait-us N`
#                    (paths cnse-http-bwN and cnse-binary-bwN);
#   MUX=K            the binary protocol with K streams per connection
#                    (connections/K connections, `bench --inflight K`): the
#                    same number of streams, their tokens sharing sends
#                    (path cnse-binary-muxK, and cnse-binary-bwN-muxK).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/wait-ready.sh
secs=${1:-10} rounds=${2:-3}
conns_list=${CONNS:-"4 64 256"} tokens=${TOKENS:-32}
ttft_us=${TTFT_US:-20000} interval_us=${INTERVAL_US:-5000}
proxy_cpus=${PROXY_CPUS:-0} load_cpus=${LOAD_CPUS:-1} load_threads=${LOAD_THREADS:-1} warmup=${WARMUP:-2}
close=${CLOSE:-1} out=${OUT:-bench-results/gateway}
B=${CNSE_DP:-target/release/cnse-dp}
[ -x "$B" ] || { echo "gateway-bench: build first: cargo build --release" >&2; exit 1; }
B=$(cd "$(dirname "$B")" && pwd)/$(basename "$B")

# Threads or worker processes per proxy: as many as its cores.
ncpu=$(taskset -c "$proxy_cpus" nproc)

need() { # binary package
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] && return 0
  [ "$(id -u)" = 0 ] || { echo "gateway-bench: $1 is missing and installing it needs root" >&2; exit 1; }
  echo "gateway-bench: installing $2" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2 ||
    { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2; }
}
[ -n "${NGINX:-}" ] || { need nginx nginx; NGINX=$(command -v nginx || echo /usr/sbin/nginx); }
[ -n "${HAPROXY:-}" ] || { need haproxy haproxy; HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy); }

mkdir -p "$out"
out=$(cd "$out" && pwd)
run=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP_RUN:-}" ] || rm -rf "$run"
}
trap cleanup EXIT
# A proxy that exits early shows its log.
check_alive() { kill -0 "$1" 2>/dev/null || { echo "gateway-bench: $2 exited: $(cat "$3")" >&2; exit 1; }; }

# free_port VAR: sets VAR to a loopback port nothing listens on (bash's
# /dev/tcp: no curl or python needed on the device machine) and that no
# earlier call handed out (a server binds its ports only later: two probes
# before either bind would find the same port free), below the kernel's
# range of ephemeral ports, which the runs' own connections take from.
eph_lo=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
handed=" "
free_port() {
  local p
  while :; do
    p=$((10000 + RANDOM % (eph_lo > 12000 ? eph_lo - 10000 : 2000)))
    [[ "$handed" != *" $p "* ]] || continue
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
    handed+="$p "
    printf -v "$1" %s "$p"
    return
  done
}
# GET /health answers 200.
healthy() {
  local line
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
  read -r -t 5 line <&3 || true
  exec 3<&-
  [[ $line == *" 200 "* ]]
}

# --- the stand-in
standin_args=(--ttft-us "$ttft_us" --token-interval-us "$interval_us")
[ "$close" = 1 ] && standin_args+=(--close-after-stream)
taskset -c "$load_cpus" "$B" llama-standin "${standin_args[@]}" >"$run/standin.log" 2>&1 &
pids+=($!)
wait_ready "$run/standin.log" '^listening on'
up=$(sed -n 's/^listening on http:\/\///p' "$run/standin.log")

# --- nginx
free_port nginx_port
mkdir -p "$run/nginx"
cat >"$run/nginx/nginx.conf" <<EOF
user root root;
daemon off;
worker_processes $ncpu;
pid $run/nginx/nginx.pid;
error_log $run/nginx/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; multi_accept on; }
http {
  access_log off;
  client_body_temp_path $run/nginx/body;
  proxy_temp_path $run/nginx/proxy;
  fastcgi_temp_path $run/nginx/fastcgi;
  uwsgi_temp_path $run/nginx/uwsgi;
  scgi_temp_path $run/nginx/scgi;
  upstream llama {
    server $up;
    keepalive 1024;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }
  server {
    listen 127.0.0.1:$nginx_port reuseport backlog=4096;
    keepalive_requests 1000000;
    tcp_nodelay on;
    location / {
      proxy_pass http://llama;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_cache off;
      proxy_read_timeout 300s;
      # llama-server closes the connection after every stream: a request
      # sent on a cached upstream connection it just closed is sent again
      # on a new one (a POST is not retried by default: 502).
      proxy_next_upstream error timeout non_idempotent;
    }
  }
}
EOF
taskset -c "$proxy_cpus" "$NGINX" -p "$run/nginx/" -e "$run/nginx/error.log" -c "$run/nginx/nginx.conf" >"$run/nginx.log" 2>&1 &
nginx_pid=$!
pids+=("$nginx_pid")

# --- haproxy
free_port haproxy_port
cat >"$run/haproxy.cfg" <<EOF
global
  nbthread $ncpu
  maxconn 8000
defaults
  mode http
  option http-keep-alive
  option http-no-delay
  http-reuse always
  # As nginx's proxy_next_upstream: a request on a reused connection that
  # the server had just closed goes again on a new one.
  retries 2
  retry-on conn-failure empty-response
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend fe
  bind 127.0.0.1:$haproxy_port
  default_backend be
backend be
  server llama $up maxconn 10000
EOF
taskset -c "$proxy_cpus" "$HAPROXY" -db -f "$run/haproxy.cfg" >"$run/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=("$haproxy_pid")

# --- cnse-dp: start_cnse NAME [serve flags...] sets NAME_port, NAME_http_port
# and NAME_pid once its HTTP front listens.
start_cnse() {
  local name=$1 port http_port
  shift
  free_port port
  free_port http_port
  taskset -c "$proxy_cpus" "$B" serve --listen 127.0.0.1:"$port" --http-listen 127.0.0.1:"$http_port" \
    --threads "$ncpu" --no-pin --backend llama --llama-url "http://$up" --llama-inflight 1024 \
    --max-tokens-limit "$tokens" --admission-queue-max 4096 "$@" >"$run/$name.log" 2>&1 &
  pids+=($!)
  printf -v "${name}_pid" %s $!
  printf -v "${name}_port" %s "$port"
  printf -v "${name}_http_port" %s "$http_port"
  wait_ready "$run/$name.log" '^http listening on'
}
start_cnse cnse
bw=${BATCH_WAIT_US:-} mux=${MUX:-}
[ -z "$bw" ] || start_cnse bw --batch-wait-us "$bw"

# Every proxy answers /health (through to the stand-in) before the runs.
for port in "$nginx_port" "$haproxy_port" "$cnse_http_port" ${bw:+"$bw_http_port"}; do
  for i in $(seq 200); do
    healthy "$port" 2>/dev/null && break
    [ "$i" = 200 ] && { echo "gateway-bench: nothing answers /health on port $port" >&2; exit 1; }
    sleep 0.05
  done
done
check_alive "$nginx_pid" nginx "$run/nginx.log"
check_alive "$haproxy_pid" haproxy "$run/haproxy.log"
check_alive "$cnse_pid" cnse-dp "$run/cnse.log"
[ -z "$bw" ] || check_alive "$bw_pid" "cnse-dp --batch-wait-us" "$run/bw.log"

# A process and its children (nginx's workers).
tree() { echo "$1"; awk -v p="$1" '$4 == p {print $1}' /proc/[0-9]*/stat 2>/dev/null || true; }
# On-CPU ns of a process tree, every thread (schedstat); where the kernel
# has no schedstat (gVisor), utime+stime ticks at 100 per second.
cpu_ns() {
  local p t total=0
  for p in $(tree "$1"); do
    for t in /proc/"$p"/task/*; do
      if [ -r "$t/schedstat" ]; then
        total=$((total + $(cut -d' ' -f1 "$t/schedstat" 2>/dev/null || echo 0)))
      else
        total=$((total + $(awk '{print ($14 + $15) * 10000000}' "$t/stat" 2>/dev/null || echo 0)))
      fi
    done
  done
  echo "$total"
}
# utime+stime, and stime alone, in clock ticks of the same tree (a check
# on cpu_ns, and the kernel's share of it). The fields are counted after
# the command name's closing parenthesis (a name may hold spaces).
cpu_ticks() {
  local p total=0 sys=0 u s
  for p in $(tree "$1"); do
    read -r u s < <(sed 's/.*) //' /proc/"$p"/stat 2>/dev/null | awk '{print $12, $13}') || true
    total=$((total + ${u:-0} + ${s:-0})) sys=$((sys + ${s:-0}))
  done
  echo "$total $sys"
}

csv="$out/gateway.csv"
echo "round,connections,path,ttft_p50_us,ttft_p99_us,gap_p50_us,gap_p99_us,tokens,tokens_per_s,requests,problems,proxy_cpu_ns,proxy_cpu_ticks,client_cpu_s,proxy_sys_ticks" >"$csv"
# One path at one connection count: the load, with the proxy's CPU read at
# the edges of the measured window.
one() { # round conns path mode port pid [streams per connection]
  local r=$1 c=$2 name=$3 mode=$4 port=$5 pid=$6 k=${7:-1} lcsv="$run/load.csv" a0 a1 t0 t1 s0 s1 usage=()
  # Every HTTP path reports usage (the stand-in always, cnse-dp's front when
  # asked), so tokens that one event carries together are counted.
  [ "$mode" = http ] && usage=(--http-include-usage)
  taskset -c "$load_cpus" "$B" bench --mode "$mode" --addr 127.0.0.1:"$port" --connections $((c / k)) --inflight "$k" \
    --threads "$load_threads" \
    --max-tokens "$tokens" --duration-secs "$secs" --warmup-secs "$warmup" --csv "$lcsv" "${usage[@]}" >"$run/load.out" 2>&1 &
  local lp=$!
  if [ -n "$pid" ]; then
    sleep "$warmup"
    a0=$(cpu_ns "$pid")
    read -r t0 s0 < <(cpu_ticks "$pid")
    sleep "$secs"
    a1=$(cpu_ns "$pid")
    read -r t1 s1 < <(cpu_ticks "$pid")
  fi
  wait "$lp" || { echo "gateway-bench: the load against $name failed:" >&2; cat "$run/load.out" >&2; }
  # The load's CSV: run,metric,unit,count,mean,p50,p90,p99,p99_9,max.
  local probs client
  probs=$(sed -n 's/^problems: //p' "$run/load.out" | tr -d ',"')
  client=$(sed -n 's/^client cpu *\([0-9.]*\) s.*/\1/p' "$run/load.out")
  awk -F, -v r="$r" -v c="$c" -v name="$name" -v probs="$probs" -v cpu=$((${a1:-0} - ${a0:-0})) \
    -v ticks=$((${t1:-0} - ${t0:-0})) -v sys=$((${s1:-0} - ${s0:-0})) -v client="$client" '
    $2 == "ttft" { t50 = $6; t99 = $8 } $2 == "inter_token" { g50 = $6; g99 = $8 }
    $2 == "tokens" { tok = $4; tps = $5 } $2 == "requests" { req = $4 }
    END { printf "%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,\"%s\",%s,%s,%s,%s\n", r, c, name, t50, t99, g50, g99, tok, tps, req, probs, cpu, ticks, client, sys }
  ' "$lcsv" >>"$csv"
  tail -1 "$csv" >&2
}

echo "== gateway-bench $(date -u +%FT%TZ): $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/gateway.log"
echo "== proxies on cpus $proxy_cpus ($ncpu each), load and stand-in on $load_cpus, $tokens tokens at ${ttft_us}/${interval_us} µs, stand-in closes after a stream: $close, $secs s x $rounds rounds${bw:+, batch wait $bw µs}${mux:+, $mux streams per connection}" | tee -a "$out/gateway.log"
"$NGINX" -v 2>&1 | tee -a "$out/gateway.log"
"$HAPROXY" -v | sed -n 1p | tee -a "$out/gateway.log"
paths=("direct http $(cut -d: -f2 <<<"$up") -" "nginx http $nginx_port $nginx_pid" "haproxy http $haproxy_port $haproxy_pid"
  "cnse-http http $cnse_http_port $cnse_pid" "cnse-binary generate $cnse_port $cnse_pid")
[ -z "$mux" ] || paths+=("cnse-binary-mux$mux generate $cnse_port $cnse_pid $mux")
if [ -n "$bw" ]; then
  paths+=("cnse-http-bw$bw http $bw_http_port $bw_pid" "cnse-binary-bw$bw generate $bw_port $bw_pid")
  [ -z "$mux" ] || paths+=("cnse-binary-bw$bw-mux$mux generate $bw_port $bw_pid $mux")
fi
for r in $(seq "$rounds"); do
  for c in $conns_list; do
    for k in "${!paths[@]}"; do
      read -r name mode port pid per <<<"${paths[$(((k + r) % ${#paths[@]}))]}"
      [ "$pid" = - ] && pid=""
      # K streams per connection need K streams at least.
      [ "${per:-1}" -le "$c" ] || continue
      one "$r" "$c" "$name" "$mode" "$port" "$pid" "${per:-1}"
    done
  done
done
if command -v python3 >/dev/null; then
  python3 scripts/gateway-table.py "$csv" | tee "$out/gateway.md"
else
  echo "gateway-bench: no python3 here: make the table with scripts/gateway-table.py $csv" >&2
fi
