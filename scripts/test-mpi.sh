#!/usr/bin/env bash
# MPI tests of the work-stealing scheduler (issue 10): builds cnse-dp with
# --features mpi and runs `bench-scaling` under mpirun -np 4 --oversubscribe,
# on shared memory and again over TCP (`--mca btl tcp,self`, the path
# between machines). Installs OpenMPI when missing (root, Debian).
# Prints "N passed, N failed" last; exits non-zero on any failure.
#
#   scripts/test-mpi.sh            # both transports
#   NP=8 scripts/test-mpi.sh       # more ranks
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
np=${NP:-4}
log() { printf '\n==> %s\n' "$*"; }

if ! command -v mpirun >/dev/null || ! dpkg -s libopenmpi-dev >/dev/null 2>&1 || ! dpkg -s libclang-dev >/dev/null 2>&1; then
  log "installing OpenMPI and libclang (mpi-sys runs bindgen)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev clang >/dev/null
fi

log "build (release, --features mpi)"
target=${CARGO_TARGET_DIR:-$root/target-mpi}
CARGO_TARGET_DIR=$target cargo build --release --features mpi --bin cnse-dp
bin=$target/release/cnse-dp

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
passed=0
failed=0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# run NAME MCA... -- ARGS...: one mpirun, output in $out/NAME.log, bounded time.
run() {
  local name=$1; shift
  local mca=()
  while [ "$1" != -- ]; do mca+=("$1"); shift; done
  shift
  timeout 300 mpirun -np "$np" --oversubscribe "${mca[@]}" "$bin" bench-scaling "$@" >"$out/$name.log" 2>&1
}

check() {
  local name=$1 what=$2; shift 2
  if "$@"; then
    echo "ok   $name: $what"; passed=$((passed + 1))
  else
    echo "FAIL $name: $what"; failed=$((failed + 1))
    sed 's/^/     | /' "$out/$name.log" | tail -30
  fi
}

# per_rank LOG POLICY FIELD: the FIELD value of each rank's line, one a line.
per_rank() {
  awk -v p="$2" -v f="$3" '$1 == p && $2 == "rank" { for (i = 1; i < NF; i++) if ($i == f) print $(i + 1) }' "$1"
}

all_positive() { [ "$(per_rank "$@" | wc -l)" -eq "$np" ] && ! per_rank "$@" | grep -qx 0; }
sum_field() { per_rank "$@" | awk '{ s += $1 } END { print s + 0 }'; }
export -f per_rank sum_field
export np

for transport in shm tcp; do
  mca=()
  [ "$transport" = tcp ] && mca=(--mca btl tcp,self)
  log "transport $transport: ${mca[*]:-default (shared memory)}"

  n=$transport-once-uniform
  check "$n" "every task runs exactly once (uniform arrivals, all policies, exp service)" \
    run "$n" "${mca[@]}" -- --tasks 3000 --task-us 300 --service exp --arrival uniform --policy all --check --csv "$out/$n.csv"
  check "$n" "CSV has the header and one row per policy" \
    bash -c "head -1 '$out/$n.csv' | grep -q 'policy,ranks,cores_per_rank,tasks,task_us,.*throughput_tasks_s,efficiency,.*p50_us,p95_us,p99_us' && [ \$(wc -l < '$out/$n.csv') -eq 4 ]"

  n=$transport-rank0
  check "$n" "every task runs exactly once (all arrivals at rank 0, bimodal)" \
    run "$n" "${mca[@]}" -- --tasks 3000 --task-us 500 --service bimodal --arrival rank0 --policy steal --check
  check "$n" "rank-0 arrivals spread over all $np ranks (each ran tasks)" all_positive "$out/$n.log" steal ran
  check "$n" "tasks crossed ranks (stolen in > 0 on every rank but 0)" \
    bash -c "[ \$(per_rank '$out/$n.log' steal in | tail -n +2 | grep -cvx 0) -eq $((np - 1)) ]"

  n=$transport-cores2
  check "$n" "two cores per rank (local and remote stealing together, streaming, cancels): each task once" \
    run "$n" "${mca[@]}" -- --tasks 4000 --task-us 500 --cores 2 --service bimodal --arrival rank0 --policy all \
      --results-per-task 3 --cancel-every 13 --check

  n=$transport-stream
  check "$n" "streamed results of stolen tasks reach the owner in order, each once (8 per task, with cancels)" \
    run "$n" "${mca[@]}" -- --tasks 2000 --task-us 800 --arrival rank0 --policy steal --results-per-task 8 --cancel-every 11 --check
  check "$n" "streamed results crossed ranks" \
    bash -c "[ \$(per_rank '$out/$n.log' steal out | head -1) -gt 0 ] && [ \$(per_rank '$out/$n.log' steal streamed | head -1) -gt 7000 ]"

  n=$transport-cancel
  check "$n" "cancellation with stealing: every task answered once" \
    run "$n" "${mca[@]}" -- --tasks 3000 --task-us 1000 --arrival rank0 --policy steal --cancel-every 7 --check
  check "$n" "cancels crossed ranks (rank 0 sent, others received)" \
    bash -c "[ \$(sum_field '$out/$n.log' steal sent) -gt 0 ] && [ \$(sum_field '$out/$n.log' steal received) -gt 0 ]" 
  
  n=$transport-hung-rank
  check "$n" "a hung rank does not hang the others (its tasks end Lost, the run completes)" \
    run "$n" "${mca[@]}" -- --tasks 2000 --task-us 1000 --arrival rank0 --policy steal --check \
      --test-freeze-rank $((np - 1)) --test-freeze-ms 3000 --dead-after-ms 800
  check "$n" "rank 0 reports the given-up rank and its lost tasks" \
    bash -c "grep -q 'rank(s) given up' '$out/$n.log' && [ \$(per_rank '$out/$n.log' steal lost | head -1) -gt 0 ]"
done

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
