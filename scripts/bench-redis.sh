# Sourced by scripts/bench.sh: PING against redis-server, the reference
# event loop. Installs redis-server and redis-tools from Debian when they
# are missing (root and apt-get). Against a redis-server on the server CPU
# it runs, on the load CPUs, `cnse-dp bench --mode resp` (RESP PING from
# the same load generator, threads and connections that measure cnse-dp:
# rows of server "redis") and, for reference, `redis-benchmark -t ping`
# (server "redis-benchmark"), each without and with 16 PINGs in flight per
# connection (`-P 16`); then `cnse-dp bench --mode ping` against cnse-dp at
# the same counts. Rows go to $out/redis.csv in the suite's format; why
# redis was skipped, if it was, to $out/redis.note.

redis_install() {
  command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "redis-server/redis-benchmark missing and no root apt-get to install them" >"$out/redis.note"
    return 1
  fi
  echo "   installing redis-server and redis-tools (apt-get)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools; } \
    >"$tmp/apt.log" 2>&1; then
    echo "apt-get install redis-server redis-tools failed: $(tail -1 "$tmp/apt.log")" >"$out/redis.note"
    return 1
  fi
}

# CPU time (µs) of a process so far, from /proc/PID/stat.
proc_cpu_us() {
  awk -v hz="$(getconf CLK_TCK)" '{printf "%d", ($14 + $15) * 1e6 / hz}' "/proc/$1/stat"
}

# CPU time (µs) of this shell's finished children so far, into $kids_us.
# `times` must run in this shell, not in a pipe or $(...): a forked
# subshell has no finished children of its own.
children_cpu() {
  times >"$tmp/times.txt"
  kids_us=$(tail -1 "$tmp/times.txt" | awk '{
    t = 0
    for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
    printf "%d", t * 1e6
  }')
}

# One redis-benchmark run: C connections, pipeline P, N requests.
redis_run() {
  local port=$1 c=$2 p=$3 n=$4 label cpu0 cpu1 kid0 kid1 t0 t1 kids_us
  label="ping c=$c P=$p threads=$load_threads"
  children_cpu
  cpu0=$(proc_cpu_us "$RP") kid0=$kids_us t0=$(date +%s%N)
  if ! taskset -c "$load_cpus" redis-benchmark -h 127.0.0.1 -p "$port" -t ping -c "$c" -n "$n" -P "$p" \
    --threads "$load_threads" --csv \
    >"$tmp/redis.out" 2>&1; then
    echo "   FAILED: redis-benchmark -c $c -P $p: $(tail -1 "$tmp/redis.out")"
    failures=$((failures + 1))
    return 0
  fi
  t1=$(date +%s%N)
  children_cpu
  kid1=$kids_us cpu1=$(proc_cpu_us "$RP")
  # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
  tr -d '"' <"$tmp/redis.out" | awk -F, -v s="redis-benchmark,pipeline,$p,$label" -v n="$n" \
    -v cpu="$((cpu1 - cpu0))" -v kid="$((kid1 - kid0))" -v ns="$((t1 - t0))" '
    $1 == "PING_MBULK" {
      secs = ns / 1e9
      printf "%s,requests,per_s,%d,%.1f,,,,,,\n", s, n, $2
      printf "%s,e2e,us,%d,%.1f,%.0f,,%.0f,%.0f,,%.0f\n", s, n, $3 * 1000, $5 * 1000, $6 * 1000, $7 * 1000, $8 * 1000
      printf "%s,server_cpu,per_s,%d,%.1f,,,,,,\n", s, cpu, cpu / secs
      printf "%s,load_cpu,per_s,%d,%.1f,,,,,,\n", s, kid, kid / secs
      printf "   %-16s %-8s %-8s %14s req/s  p99 %.0f µs (its own figures)\n", "redis-benchmark", "pipeline", "'"$p"'", $2, $7 * 1000 > "/dev/stderr"
    }' >>"$out/redis.csv"
}

# Starts redis-server on the server CPU and waits until it answers PING:
# sets RP and port, or writes why not to redis.note and returns 1. The port
# is drawn below the kernel's ephemeral range (the load's thousands of
# client connections, and their TIME_WAITs, live there); one that is taken
# anyway (redis exits: bind failed) is replaced by another, up to 5 times.
redis_start() {
  local low i why
  low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  ((low > 11000)) || low=32768
  for _ in 1 2 3 4 5; do
    port=$((10000 + RANDOM % (low - 10000)))
    taskset -c "$server_cpu" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize no --loglevel warning >"$tmp/redis.log" 2>&1 &
    RP=$!
    for ((i = 0; ; i++)); do
      redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && return 0
      kill -0 "$RP" 2>/dev/null || break
      if ((i >= 200)); then
        echo "redis-server on port $port did not answer PING within 10 s; its log: $(head -c 2000 "$tmp/redis.log")" >"$out/redis.note"
        kill "$RP" 2>/dev/null || true
        wait "$RP" 2>/dev/null || true
        RP=""
        return 1
      fi
      sleep 0.05
    done
    wait "$RP" 2>/dev/null || true
    RP=""
    grep -q "Address already in use" "$tmp/redis.log" || break
  done
  why="exited before answering PING"
  ! grep -q "Address already in use" "$tmp/redis.log" || why="found no free port in 5 tries"
  echo "redis-server $why; its log: $(head -c 2000 "$tmp/redis.log")" >"$out/redis.note"
  return 1
}

bench_redis() {
  echo "== PING: redis-server against cnse-dp"
  redis_install || { echo "   skipped: $(cat "$out/redis.note")"; return 0; }
  echo "redis $(redis-server --version | grep -o 'v=[0-9.]*'). \"redis\" rows: \`cnse-dp bench --mode resp\` (PING_MBULK in RESP, $load_threads load thread(s)), the generator and shape that measure cnse-dp. \"redis-benchmark\" rows, for reference: redis-benchmark -t ping with --threads $load_threads, its own rate and latencies (p50, p95, p99, max; with -P 16 a latency is that of the 16-request batch)." >"$out/redis.note"
  local port r
  [ -f "$out/redis.csv" ] || echo "server,param,value,run,metric,unit,count,mean,p50,p90,p95,p99,p99_9,max" >"$out/redis.csv"
  # ROUNDS=N: redis and cnse-dp in turn N times, the summary quoting the
  # rounds' medians (a single pair decides nothing on a noisy VM);
  # redis-benchmark's reference rows are taken once, in the first round.
  for r in $(seq 1 "$rounds"); do
    [ "$rounds" = 1 ] || { round=$r; echo "   round $r of $rounds"; }
    if ! redis_start; then
      echo "   stopped in round $r: $(cat "$out/redis.note")"
      round=
      return 0
    fi
    if [ "$r" = 1 ]; then
      for c in $redis_conns; do
        redis_run "$port" "$c" 1 "$redis_n1"
        redis_run "$port" "$c" 16 "$redis_n16"
      done
    fi
    # The same generator as cnse-dp's rows below (run reads ADDR and SP).
    ADDR=127.0.0.1:$port SP=$RP
    for c in $redis_conns; do
      run redis redis pipeline 1 --mode resp --connections "$c" --inflight 1
      run redis redis pipeline 16 --mode resp --connections "$c" --inflight 16
    done
    kill "$RP" 2>/dev/null || true
    wait "$RP" 2>/dev/null || true
    RP=""
    start_server cnse-dp
    for c in $redis_conns; do
      run redis cnse-dp pipeline 1 --mode ping --payload-bytes 0 --connections "$c" --inflight 1
      run redis cnse-dp pipeline 16 --mode ping --payload-bytes 0 --connections "$c" --inflight 16
    done
    stop_server
  done
  round=
}
