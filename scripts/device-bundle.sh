#!/usr/bin/env bash
# Builds the release binary and the GPU test executables here and copies
# them, stripped, into .device/ (git-ignored) together with
# scripts/device-run.sh, for a machine that has a GPU but no toolchain.
# Then, on that machine, from the checkout root: bash .device/device-run.sh [all|gpu|core|llama]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bundle-prog.sh
# The tests too run on another machine, whose CPU may lack this one's
# extensions: build for baseline x86-64 whatever RUSTFLAGS say here.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
tests=$( (cargo test --release --no-run -p cnse-kernels --lib --tests 2>&1;
  cargo test --release --no-run -p cnse-dp --test gpu_sampling --test gpu_load --test gpu_cli --test gpu_synthetic --test gpu_sha256 --test gpu_verify_merkle --test gpu_resident 2>&1) \
  | grep -oE 'target/release/deps/[a-z0-9_]+-[0-9a-f]+' | sort -u)
[ -n "$tests" ] || { echo "device-bundle: no test executables built" >&2; exit 1; }
rm -rf .device && mkdir -p .device/tests
bundle_cnse .device
for t in $tests; do strip --strip-debug -o ".device/tests/$(basename "$t")" "$t"; done
# The test executables run the binary at the path cargo baked into them.
echo "$(pwd)/target/release/cnse-dp" > .device/cnse-dp.path
cp scripts/device-run.sh scripts/device-i15.sh .device/
git log -1 --format="commit %h (%s)" > .device/commit.txt 2>/dev/null || true
du -sh .device
