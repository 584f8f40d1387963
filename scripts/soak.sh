#!/usr/bin/env bash
# The soak run of issue 11: one `cnse-dp serve` (synthetic backend at a
# model's pace) against a mixed population for MINUTES (good streamers
# checked token by token, cancellers, slow readers, garbage senders,
# connection churn), sampling the server's RSS, descriptors, connections and
# counters every second. Writes OUTDIR/soak.csv (a row a second),
# OUTDIR/soak.svg (the curve), OUTDIR/summary.txt (the table it prints) and
# OUTDIR/server.log; exits non-zero, one line per reason, when a good stream
# was lost, duplicated or wrong, or something grew without bound or did not
# come back (rules: docs/RELIABILITY.md, "Soak").
#
#   scripts/soak.sh 2                  # CI (scripts/test.sh)
#   scripts/soak.sh 30 soak-30min      # the long run
#   SOAK_SEED=7 scripts/soak.sh 2      # replay a population (timing aside)
#   CNSE_BIN=/path/cnse-dp scripts/soak.sh 30   # a binary built elsewhere
#
# Builds the release binary when CNSE_BIN is not given.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-}
out=${2:-soak-results}
case $minutes in
  '' | *[!0-9]* | 0) echo "soak.sh: usage: scripts/soak.sh MINUTES [OUTDIR] (MINUTES a whole number >= 1, not '$minutes')" >&2; exit 2 ;;
esac
bin=${CNSE_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --bin cnse-dp
  bin=target/release/cnse-dp
fi
# The population holds few connections at once, but churn leaves many in
# TIME_WAIT on the client side; descriptors are cheap to raise.
ulimit -n 20000 2>/dev/null || true
seed=()
if [ -n "${SOAK_SEED:-}" ]; then seed=(--seed "$SOAK_SEED"); fi
exec "$bin" soak --duration-secs $((minutes * 60)) --out "$out" "${seed[@]}"
