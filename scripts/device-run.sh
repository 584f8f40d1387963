#!/usr/bin/env bash
# Runs on the GPU machine from the bundle made by scripts/device-bundle.sh.
#   gpu:   GPU tests (skip nothing), gpu info, gpu bench (issue 5 targets)
#   core:  core server peaks on 16 cores, sampling on the token path,
#          store verify scaling (issues 2, 3, 5)
#   llama: llama-server gateway overhead against the stand-in (issue 4)
#   verify: GPU tests, then issue 15: GPU SHA-256 kernel sweep, verified
#           loads (host vs GPU vs none), cold-cache loads, CLI transcript
set -u
cd "$(dirname "$0")"
what=${1:-all}
B=$(pwd)/cnse-dp
# Built on another machine: probe it here first. A plain cargo build targets
# baseline x86-64, so it runs on any CPU; a SIGILL means it was built with
# target-cpu flags this CPU lacks (rebuild with scripts/device-bundle.sh).
"$B" --version >/dev/null 2>&1; rc=$?
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq 132 ] && why="SIGILL: built for instructions this CPU lacks" || why="exit status $rc"
  echo "device-run: $B does not run on this machine ($why); rebuild it with scripts/device-bundle.sh" >&2
  exit 1
fi
baked=$(cat cnse-dp.path)
mkdir -p "$(dirname "$baked")" && cp cnse-dp "$baked"
export CNSE_REQUIRE_GPU=1
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
echo "== machine"; nproc; grep -m1 "model name" /proc/cpuinfo; uname -r
$B gpu info
# Waits for the server's `listening on` line, not a fixed sleep.
serve() {
  $B serve --listen 127.0.0.1:7070 "$@" > /tmp/srv.log 2>&1 &
  SP=$!
  for _ in $(seq 200); do grep -q '^listening on' /tmp/srv.log && return; sleep 0.05; done
  echo "device-run: server did not start: $(tail -n 3 /tmp/srv.log)"; exit 1
}
stop() { kill -INT $SP; wait $SP 2>/dev/null; }
bench() { taskset -c 8-15 $B bench --addr 127.0.0.1:7070 --duration-secs 4 --warmup-secs 1 "$@" 2>&1 | grep -vE "^\s*$"; }
if [ "$what" = all ] || [ "$what" = gpu ] || [ "$what" = verify ]; then
  for t in tests/*; do echo "== test $(basename "$t")"; "$t" --test-threads 1 2>&1 | grep -E "^test |test result|skipped|panicked"; done
  [ "$what" = verify ] || { echo "== gpu bench"; $B gpu bench; }
fi
if [ "$what" = verify ]; then
  echo "== gpu bench-verify ${VERIFY_ARGS:-}"; $B gpu bench-verify --cold ${VERIFY_ARGS:-}
  echo "== CLI: put, cold load right after put, verified loads, a flipped bit"
  S=/tmp/st15; rm -rf $S
  $B store put /tmp/cnse-gpu-bench.blob --name bench:4g --store $S | tail -1
  $B store inspect bench:4g --store $S | grep -E "chunks|leaves"
  sync; echo 3 > /proc/sys/vm/drop_caches
  $B gpu load bench:4g --store $S --verify gpu
  sync; echo 3 > /proc/sys/vm/drop_caches
  $B gpu load bench:4g --store $S --verify gpu --readahead
  $B gpu load bench:4g --store $S --verify gpu --check
  $B gpu load bench:4g --store $S --verify cpu
  $B gpu load bench:4g --store $S --no-verify
  $B gpu load bench:4g --store $S --verify gpu --threads 2
  $B gpu load bench:4g --store $S --no-verify --threads 2
  blob=$(ls $S/blobs/sha256/*); chmod u+w $blob
  printf '\x5a' | dd of=$blob bs=1 seek=$((100*16777216 + 3*65536 + 17)) conv=notrunc status=none
  $B gpu load bench:4g --store $S --verify gpu; echo "exit status $?"
  $B gpu load bench:4g --store $S --verify cpu; echo "exit status $?"
fi
if [ "$what" = all ] || [ "$what" = core ]; then
  echo "== sampling on the token path: server 4 threads, bench 8 threads on cores 8-15, 16 tokens, vocab 32768"
  for dev in cpu cpu-sampler cuda; do
    echo "-- synthetic-device $dev"
    serve --threads 4 --synthetic-ttft-us 0 --synthetic-token-interval-us 0 --synthetic-device $dev --synthetic-vocab 32768
    bench --mode generate --connections 64 --inflight 4 --threads 8 --max-tokens 16 --temperature 0.8
    stop
  done
  echo "== core, 1 server thread"
  serve --threads 1 --synthetic-ttft-us 0 --synthetic-token-interval-us 0
  bench --mode ping --connections 256 --inflight 1 --threads 4
  bench --mode ping --connections 256 --inflight 16 --threads 4
  bench --mode generate --connections 64 --inflight 4 --threads 4 --max-tokens 16
  stop
  echo "== core, 8 server threads"
  serve --threads 8 --synthetic-ttft-us 0 --synthetic-token-interval-us 0
  bench --mode ping --connections 256 --inflight 16 --threads 8
  bench --mode generate --connections 256 --inflight 4 --threads 8 --max-tokens 16
  stop
  echo "== store verify scaling"
  $B store bench --size-mib 1024 --runs 2 --threads-max "$(nproc)" --dir /tmp/sb 2>&1 | tail -30
fi
if [ "$what" = all ] || [ "$what" = llama ]; then
  for c in 4 64; do
    echo "== llama-compare, stand-in, $c streams"
    $B bench --target llama-compare --llama-standin --mode generate --connections $c --max-tokens 32 \
      --duration-secs 8 --warmup-secs 2 --rounds 3 2>&1
  done
fi
