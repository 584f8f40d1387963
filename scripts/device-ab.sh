#!/usr/bin/env bash
# Side-by-side A/B of cnse-dp builds on a many-core machine (the device):
# the builds run at the same time, each on its own core, under loads of
# their own, and swap cores every round, so that what the machine does
# meanwhile (another tenant, the instance's speed) falls on all of them.
#
#   here:  mkdir .device-ab; strip --strip-debug -o .device-ab/cnse-old OLD/cnse-dp
#          (the same for cnse-new, and optionally micro-old, micro-new: the
#          `cargo bench --bench micro` executables); copy this script and
#          wait-ready.sh in; carry .device-ab
#   there: bash .device-ab/device-ab.sh old new [more names...]
#
# First, with micro-NAME present for every name, `session_turn` of each at
# once (cores 2.., 5 rounds: fastest and median per shape; a build that has
# `peer_session_turn` prints the peers' code's shapes first); then servers
# at once on cores 0.. with `cnse-dp bench --mode generate --max-tokens 16`
# loads of 4 threads on 4-core groups from core 4 up, ROUNDS (3) rounds
# per shape of SHAPES ("64x64 64x4 256x4"), SECS (3) each. The load is
# the first name's binary. Prints one line per build and round.
set -u
cd "$(dirname "$0")"
ulimit -n 20000
names=("$@")
n=${#names[@]}
[ "$n" -ge 2 ] || { echo "usage: device-ab.sh NAME NAME [NAME...]" >&2; exit 2; }
[ $((4 + 4 * n)) -le "$(nproc)" ] || { echo "device-ab: $n builds need $((4 + 4 * n)) cores" >&2; exit 1; }
# wait_ready, copied in beside this script (or the checkout's).
if [ -f wait-ready.sh ]; then . ./wait-ready.sh; else . ../scripts/wait-ready.sh; fi
# Built on another machine: each build must run on this CPU (a build for
# baseline x86-64, as scripts/bundle-prog.sh's bundle_cnse makes, does).
for name in "${names[@]}"; do
  "./cnse-$name" --version >/dev/null 2>&1 || {
    rc=$?
    echo "device-ab: cnse-$name does not run here (exit $rc$([ $rc = 132 ] && echo ': SIGILL, built for instructions this CPU lacks'))" >&2
    exit 1
  }
done
nproc; grep -m1 "model name" /proc/cpuinfo
if ls "${names[@]/#/micro-}" >/dev/null 2>&1; then
  echo "== session_turn at once (cores 2.., rotated)"
  for r in 1 2 3 4 5; do
    for i in "${!names[@]}"; do
      taskset -c $((2 + (i + r) % n)) "./micro-${names[$i]}" --bench session_turn --sample-count 300 >"micro.$i" 2>&1 &
    done
    wait
    for i in "${!names[@]}"; do
      # "   │  ├─ (64, 4)  FASTEST │ SLOWEST │ MEDIAN │ ...": from the shape on.
      echo "round $r ${names[$i]}: $(grep '─ (' "micro.$i" | sed 's/^[^(]*//; s/│/|/g' |
        awk -F'|' '{split($1, q, ")"); gsub(/ +/, " ", q[2]); gsub(/ +/, " ", $3); printf "%s) fastest%smed%s; ", q[1], q[2], $3}')"
    done
  done
fi
echo "== servers at once (cores 0.., rotated; loads of 4 threads from core 4)"
for shape in ${SHAPES:-64x64 64x4 256x4}; do
  conns=${shape%x*} inflight=${shape#*x}
  for r in $(seq 1 "${ROUNDS:-3}"); do
    pids=()
    for i in "${!names[@]}"; do
      taskset -c $(((i + r) % n)) "./cnse-${names[$i]}" serve --threads 1 --listen 127.0.0.1:0 \
        --synthetic-ttft-us 0 --synthetic-token-interval-us 0 >"srv.$i" 2>&1 &
      pids+=($!)
    done
    loads=()
    for i in "${!names[@]}"; do
      wait_ready "srv.$i" '^listening on [0-9]'
      addr=$(sed -n 's/^listening on \([0-9.:]*\).*/\1/p' "srv.$i" | head -1)
      taskset -c $((4 + 4 * i))-$((7 + 4 * i)) "./cnse-${names[0]}" bench --addr "$addr" --mode generate \
        --max-tokens 16 --connections "$conns" --inflight "$inflight" --threads 4 --duration-secs "${SECS:-3}" \
        --server-pid "${pids[$i]}" >"load.$i" 2>&1 &
      loads+=($!)
    done
    # The loads, not the servers: those run until killed.
    wait "${loads[@]}"
    for i in "${!names[@]}"; do
      echo "${shape} round $r ${names[$i]} (core $(((i + r) % n))): $(awk '/^requests / {print $3}' "load.$i") req/s;" \
        "$(grep 'server cpu' "load.$i" | sed 's/.*): //')"
    done
    kill "${pids[@]}" 2>/dev/null
    wait 2>/dev/null
  done
done
