#!/usr/bin/env bash
# Instructions per loop turn of the micro benchmarks' session turns, counted
# by valgrind (cachegrind, no cache simulation): a count that does not move
# with the machine's speed, for comparing builds of the session layer on a
# noisy VM. A turn's count is the difference between runs of 21 and 1
# samples of one iteration, over 20.
#
#   scripts/session-ir.sh MICRO [divan filter args...]
#   scripts/session-ir.sh target/release/deps/micro-HASH --skip http --skip peer session_turn
#
# MICRO is a `cargo bench --bench micro --no-run` executable. Divide by the
# requests of a turn (64 x 64 = 4096 for the (64, 64) shape) for a
# request's count.
set -euo pipefail
micro=$1
shift
command -v valgrind >/dev/null || { echo "session-ir: needs valgrind (apt-get install -y valgrind)" >&2; exit 1; }
ir() {
  valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null "$micro" --bench --sample-size 1 \
    --sample-count "$1" "${@:2}" 2>&1 | awk '/I +refs/ {gsub(",", "", $4); print $4}'
}
one=$(ir 1 "$@")
many=$(ir 21 "$@")
[ -n "$one" ] && [ -n "$many" ] || { echo "session-ir: valgrind printed no count" >&2; exit 1; }
echo "$(( (many - one) / 20 )) instructions per turn: $micro $*"
