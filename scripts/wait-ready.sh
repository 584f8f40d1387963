# Sourced by the benchmark scripts: waits until a server's log shows its
# readiness line (no fixed sleeps), or stops the script with that log.
#   wait_ready LOG PATTERN [SECONDS]
wait_ready() {
  local log=$1 pattern=$2 limit=${3:-10} i
  for ((i = 0; i < limit * 20; i++)); do
    grep -q "$pattern" "$log" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "not ready after ${limit} s (waited for /$pattern/ in $log): $(head -c 2000 "$log")" >&2
  exit 1
}
