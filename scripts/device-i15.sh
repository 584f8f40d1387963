#!/usr/bin/env bash
# Issue 15 on the GPU machine, from the bundle of scripts/device-bundle.sh
# (this script copied beside it): every GPU test with CNSE_REQUIRE_GPU=1
# (the early-abort test on a 3 GiB blob among them), then side by side in
# one process the page-cache loads (unverified / host / GPU verified, per
# mover, 16 and 2 workers, with per-thread CPU time: how many threads were
# busy), the registered page cache, and cold loads against a plain
# sequential read in alternating rounds; then `dd` against a CLI load after
# dropping caches, and the CLI's early abort on a flipped bit. `resident`:
# the resident-blob tests (gpu_resident, full output) and the bench rows of
# blobs registered once and loaded again (`bench-verify --resident-only`:
# first registering loads per piece size / threads / prefault, then repeated
# unverified and GPU-verified loads per mover and 1-2 threads, against a
# 16-thread staging load in the same process), then `gpu load --resident-gib`.
#   bash .device/device-i15.sh [tests|bench|cold|cli|resident]...   (default:
#   tests bench cold cli; cold only together with bench)
# With the earlier parts: bash .device/device-i15.sh tests bench resident (the
# resident part is estimated at 2-3 minutes, not yet timed on a device).
set -u
cd "$(dirname "$0")"
B=$(pwd)/cnse-dp
"$B" --version >/dev/null 2>&1 || { echo "device-i15: $B does not run on this machine"; exit 1; }
baked=$(cat cnse-dp.path)
mkdir -p "$(dirname "$baked")" && cp cnse-dp "$baked"
export CNSE_REQUIRE_GPU=1
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
parts=${*:-tests bench cold cli}
has() { case " $parts " in *" $1 "*) return 0;; esac; return 1; }
echo "== device-i15 ($parts), $(cat commit.txt 2>/dev/null || echo "commit unknown"), $(date -u)"
nproc; grep -m1 "model name" /proc/cpuinfo; uname -r; df -h /tmp | tail -1
"$B" gpu info
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
if has tests; then
  for t in tests/*; do
    echo "== test $(basename "$t")"
    "$t" --test-threads 1 --nocapture 2>&1 | grep -E "^test |test result|skipped|panicked|assert|left:|right:|stopped after|warm"
  done
fi
if has resident; then
  echo "== resident: tests (CNSE_REQUIRE_GPU=1, full output)"
  for t in tests/gpu_resident-*; do "$t" --test-threads 1 --nocapture 2>&1; echo "exit status $?"; done
  for t in tests/cnse_kernels-*; do "$t" --test-threads 1 resident 2>&1 | grep -E "^test |test result|panicked"; done
  A="--no-kernel --leaf-kib 64 --threads 16 --reps ${RESIDENT_REPS:-5} --resident-only"
  echo "== gpu bench-verify $A"; "$B" gpu bench-verify $A 2>&1; echo "exit status $?"
  echo "== CLI: gpu load --resident-gib (one process: the first load registers, cold since put writes with O_DIRECT; --repeat loads again)"
  S=/tmp/st15r; rm -rf $S
  "$B" store put /tmp/cnse-gpu-bench.blob --name bench:4g --store $S 2>&1 | tail -1
  "$B" gpu load bench:4g --store $S --verify gpu --resident-gib 8 --repeat 4 --check 2>&1; echo "exit status $?"
  "$B" gpu load bench:4g --store $S --verify gpu --resident-gib 1 2>&1; echo "exit status $? (over budget)"
  rm -rf $S
fi
if has bench; then
  A="--leaf-kib 64 --window-mib 64,512 --threads 16,2 --reps 5"
  has cold && A="$A --cold --cold-rounds 3"
  # The resident part measures the resident rows on its own.
  has resident && A="$A --no-resident"
  echo "== gpu bench-verify $A"; "$B" gpu bench-verify $A 2>&1
fi
if has cli; then
  echo "== CLI: put, the first load right after it (cold: put writes with O_DIRECT)"
  S=/tmp/st15; rm -rf $S
  "$B" store put /tmp/cnse-gpu-bench.blob --name bench:4g --store $S | tail -1
  blob=$(ls $S/blobs/sha256/*)
  drop; "$B" gpu load bench:4g --store $S --verify gpu | grep -E "copy|total"
  echo "== cold page cache: dd against GPU-verified loads without and with read-ahead, in turn"
  for r in 1 2 3; do
    drop; echo "-- round $r: dd bs=16M"; dd if="$blob" of=/dev/null bs=16M 2>&1 | tail -1
    drop; echo "-- round $r: dd bs=16M iflag=direct"; dd if="$blob" of=/dev/null bs=16M iflag=direct 2>&1 | tail -1
    drop; echo "-- round $r: gpu load --verify gpu"; "$B" gpu load bench:4g --store $S --verify gpu | grep -E "copy|total"
    drop; echo "-- round $r: gpu load --verify gpu --readahead"; "$B" gpu load bench:4g --store $S --verify gpu --readahead | grep -E "copy|total"
  done
  echo "== warm: GPU-verified without and with --readahead (mincore passes cached steps), in turn; host-verified; unverified"
  "$B" gpu load bench:4g --store $S --verify gpu --check
  for r in 1 2 3; do
    "$B" gpu load bench:4g --store $S --verify gpu | grep -E "copy|total"
    "$B" gpu load bench:4g --store $S --verify gpu --readahead | grep -E "copy|total"
  done
  "$B" gpu load bench:4g --store $S --verify cpu | grep -E "copy|total"
  "$B" gpu load bench:4g --store $S --no-verify | grep -E "copy|total"
  echo "-- one byte of chunk 3 (leaf 3) changed: the GPU load stops early"
  chmod u+w "$blob"
  printf '\x5a' | dd of="$blob" bs=1 seek=$((3*16777216 + 3*65536 + 17)) conv=notrunc status=none
  "$B" gpu load bench:4g --store $S --verify gpu; echo "exit status $?"
  "$B" gpu load bench:4g --store $S --verify gpu; echo "exit status $?"
fi
date -u
