#!/usr/bin/env bash
# Bundles fuzz targets for a machine without a toolchain (the 16-core GPU
# machine) into .device/fuzz/ (git-ignored): stripped libFuzzer binaries,
# their committed seeds, and run.sh, which fuzzes on many cores at once and
# sums the executions per target (issue 11's lifetime counts):
#
#   scripts/device-fuzz.sh [TARGET...]            # here (default: all targets)
#   PLAN="session:12 decoder:1 llama_http:3" SECS=300 \
#     bash .device/fuzz/run.sh "$OUT/fuzz"        # there; exits 1 on a finding
#
# Record what it prints as rows of docs/RELIABILITY.md's run table (seconds
# are process-seconds); scripts/fuzz.sh recomputes the totals from the rows.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cd fuzz
targets=${*:-$(cargo fuzz list)}
# One target per build: cargo-fuzz 0.13 takes at most one.
for t in $targets; do
  cargo fuzz build --sanitizer none "$t" 2>&1 | tail -n 1
done
rm -rf "$root/.device/fuzz" && mkdir -p "$root/.device/fuzz/bin" "$root/.device/fuzz/seeds"
for t in $targets; do
  strip --strip-debug -o "$root/.device/fuzz/bin/$t" "target/x86_64-unknown-linux-gnu/release/$t"
  cp -r "seeds/$t" "$root/.device/fuzz/seeds/"
done
cp "$root/scripts/fuzz-many.sh" "$root/.device/fuzz/run.sh"
du -sh "$root/.device/fuzz"
