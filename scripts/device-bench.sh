#!/usr/bin/env bash
# Builds the benchmark suite's binaries here (release, baseline x86-64) and
# copies them, stripped, into .device/bench/ (git-ignored) for a machine
# without a toolchain, such as the 16-core GPU machine. There, from the
# checkout root (with .device carried along), the suite runs on them:
#
#   BENCH_BIN_DIR=.device/bench SERVER_CPU=0 LOAD_CPUS=8-15 LOAD_THREADS=4 \
#     THREADS_LIST="1 2 4 8" ONLY="connections load inflight ablations micro" \
#     scripts/bench.sh "$OUT/bench-results"
#
# (servers on core 0, the load generator with 4 threads on cores 8-15).
# That machine reaches no package mirror, so Debian's redis-server,
# redis-benchmark and redis-cli travel too, with their libraries
# (.device/bench/redis, see scripts/bundle-prog.sh); bench.sh puts them
# first on PATH, and ONLY=redis runs there. scripts/device-bundle.sh starts
# with `rm -rf .device`: run it first when both bundles are wanted.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bundle-prog.sh
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
log=$(mktemp)
cargo bench --no-run --bench tokio_peer --bench tokio_uring_peer --bench monoio_peer --bench micro --bench bench_report \
  2>&1 | tee "$log"
rm -rf .device/bench && mkdir -p .device/bench
bundle_cnse .device/bench
for b in tokio_peer tokio_uring_peer monoio_peer micro bench_report; do
  # The executable cargo names (a test of the same name shares the glob).
  f=$(sed -n "s|.*Executable benches/$b.rs (\(.*\))|\1|p" "$log" | head -1)
  [ -n "$f" ] || { echo "device-bench: cargo named no executable for $b" >&2; exit 1; }
  strip --strip-debug -o ".device/bench/$b" "$f"
done
rm -f "$log"
# The commit the binaries are built from, for bench.sh's summary (uncommitted
# changes marked).
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!docs' || echo '+changes')" >.device/bench/commit.txt
if ! { command -v redis-server && command -v redis-benchmark && command -v redis-cli; } >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools
fi
for prog in redis-server redis-benchmark redis-cli; do
  bundle_prog .device/bench/redis "$prog"
done
.device/bench/redis/bin/redis-server --version
du -sh .device/bench
