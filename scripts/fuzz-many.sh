#!/usr/bin/env bash
# Runs libFuzzer targets on many cores for the lifetime execution counts of
# issue 11 (bundled by scripts/device-fuzz.sh as .device/fuzz/run.sh):
#   PLAN="session:12 decoder:1 llama_http:3" SECS=300 .device/fuzz/run.sh OUT
# Each process fuzzes its own copy of the seeds, with libFuzzer seed
# SEED_BASE+i (default 1000: a new run wants a new base); "Done N runs"
# lines are summed per target; any crash/finding is reported and its
# input kept.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?out dir}
secs=${SECS:-300}
mkdir -p "$out/logs" "$out/artifacts"
pids=()
for item in ${PLAN:-session:12 decoder:1 llama_http:3}; do
  t=${item%%:*} n=${item##*:}
  for i in $(seq 1 "$n"); do
    c=$(mktemp -d /tmp/corpus-$t-XXXX)
    cp "$here/seeds/$t"/* "$c/"
    "$here/bin/$t" "$c" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -seed=$((${SEED_BASE:-1000} + i)) \
      -artifact_prefix="$out/artifacts/$t-$i-" -print_final_stats=1 >"$out/logs/$t-$i.log" 2>&1 &
    pids+=("$!:$t:$i")
  done
done
fail=0
for p in "${pids[@]}"; do
  pid=${p%%:*}; rest=${p#*:}
  if ! wait "$pid"; then echo "FINDING or error: $rest (see logs/${rest/:/-}.log)"; fail=1; fi
done
for item in ${PLAN:-session:12 decoder:1 llama_http:3}; do
  t=${item%%:*}
  total=$(cat "$out/logs/$t"-*.log | sed -n 's/^Done \([0-9]*\) runs.*/\1/p' | awk '{s+=$1} END {print s+0}')
  echo "target $t processes ${item##*:} seconds $secs executions $total"
done
exit $fail
