#!/usr/bin/env bash
# Issue 10's in-process targets, side by side in one run (docs/SCHEDULER.md,
# "In the server: measured"):
#   bash scripts/steal-bench.sh [BIN] [SECS] [CORES] [ROUNDS]
# 1. Spreading CPU-bound work: every client on worker 0 (--accept-threads 1),
#    the CPU sampler as the synthetic model (zero delay: each token costs its
#    sampling), 4 slots per worker; 1 worker against CORES workers, rounds
#    alternated. Reports tokens/s and the ratio (target: 4 cores >= 3.6x).
# 2. Balanced load: every worker accepts, zero-delay hash backend, stealing
#    on against off, rounds alternated, with the default slots and with 16
#    per worker (so that requests do queue). Reports requests/s and the
#    ratio (target: on within 3 % of off).
# Workers are pinned to cores 0..CORES-1; the load runs on the cores above
# them when the machine has them (the device machine), else beside them.
set -u
bin=${1:-target/release/cnse-dp} secs=${2:-5} cores=${3:-4} rounds=${4:-2}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=wait-ready.sh
. "$here/wait-ready.sh"
n=$(nproc)
echo "== machine: $n cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(uname -r), $(date -u +%FT%TZ)"
"$bin" --version >/dev/null 2>&1 || { echo "steal-bench: $bin does not run here"; exit 1; }
ulimit -n 20000 2>/dev/null || true
if [ "$n" -ge $((cores * 2)) ]; then
  load_cpus=$(seq -s, "$cores" $((n - 1)))
  load_threads=$((n - cores))
else
  load_cpus=$(seq -s, 0 $((n - 1)))
  load_threads=2
fi
[ "$load_threads" -gt 8 ] && load_threads=8
log=$(mktemp)
serve() {
  "$bin" serve --listen 127.0.0.1:0 --stats-interval-ms 1000 "$@" >"$log" 2>&1 &
  SP=$!
  wait_ready "$log" '^listening on' 10
  ADDR=$(sed -n 's/^listening on //p' "$log" | head -1 | cut -d' ' -f1)
}
stop() {
  kill -INT "$SP"
  wait "$SP" 2>/dev/null
  grep '^steals' "$log" | tail -1
}
load() {
  "$bin" bench --addr "$ADDR" --threads "$load_threads" --client-cpus "$load_cpus" \
    --duration-secs "$secs" --warmup-secs 1 "$@" 2>&1
}
rate() { awk -v k="$1" '$1 == k { gsub(",", "", $3); sub("/s", "", $3); print $3 }'; }

echo "== 1. CPU-bound model, all clients on worker 0: 1 worker vs $cores"
declare -A tok
for r in $(seq "$rounds"); do
  for t in 1 "$cores"; do
    serve --threads "$t" --accept-threads 1 --synthetic-device cpu-sampler \
      --synthetic-slots $((4 * t)) --synthetic-ttft-us 0 --synthetic-token-interval-us 0
    out=$(load --mode generate --connections 32 --inflight 2 --max-tokens 64)
    v=$(echo "$out" | rate tokens)
    echo "round $r, $t worker(s): $v tokens/s; $(echo "$out" | grep -E '^client cpu')"
    stop
    tok[$t]="${tok[$t]:-} $v"
  done
done
echo "${tok[1]}" "|" "${tok[$cores]}" | awk -v c="$cores" '{
  split($0, h, "|"); n1 = split(h[1], a, " "); nc = split(h[2], b, " ");
  s1 = 0; for (i = 1; i <= n1; i++) s1 += a[i]; sc = 0; for (i = 1; i <= nc; i++) sc += b[i];
  printf "tokens/s: 1 worker %.0f, %d workers %.0f: %.2fx (target >= %.1fx for 4)\n", s1 / n1, c, sc / nc, (sc / nc) / (s1 / n1), 3.6 }'

echo "== 2. balanced load: stealing on vs off ($cores workers, all accepting)"
for slots in 0 $((16 * cores)); do
  declare -A req=()
  for r in $(seq "$rounds"); do
    for steal in off on; do
      serve --threads "$cores" --steal "$steal" --synthetic-slots "$slots" \
        --synthetic-ttft-us 0 --synthetic-token-interval-us 0
      out=$(load --mode generate --connections 256 --inflight 4 --max-tokens 16)
      v=$(echo "$out" | rate requests)
      echo "slots ${slots:-default} round $r, steal $steal: $v requests/s; $(stop)"
      req[$steal]="${req[$steal]:-} $v"
    done
  done
  echo "${req[off]}" "|" "${req[on]}" | awk -v s="$slots" '{
    split($0, h, "|"); n1 = split(h[1], a, " "); n2 = split(h[2], b, " ");
    s1 = 0; for (i = 1; i <= n1; i++) s1 += a[i]; s2 = 0; for (i = 1; i <= n2; i++) s2 += b[i];
    printf "slots %s: requests/s off %.0f, on %.0f: on/off %.3f (target >= 0.97)\n", (s == 0 ? "default" : s), s1 / n1, s2 / n2, (s2 / n2) / (s1 / n1) }'
done
rm -f "$log"
