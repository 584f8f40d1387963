#!/usr/bin/env bash
# Issues 12 and 13 on the 16-core device machine, which has no package
# registry: the gateway peers (scripts/gateway-bench.sh: nginx, HAProxy,
# cnse-dp's HTTP front and binary protocol in front of the llama-server
# stand-in) and the added TTFT of `bench --target llama-compare` against
# the stand-in (the model does not fit the device's carry limit).
#
#   here:  bash scripts/device-gateway.sh bundle
#          copies into .device-gw/ (git-ignored): cnse-dp (release, baseline
#          x86-64, stripped), Debian's nginx and haproxy with every shared
#          library they load and the dynamic loader (run through it, so the
#          device's own libraries do not matter), and the scripts.
#   there: bash .device-gw/scripts/device-gateway.sh gateway|compare|all
#          results go to $OUT (the device tool's folder) or .device-gw/out;
#          PROXY_CPUS, LOAD_CPUS, LOAD_THREADS, CONNS, SECS, ROUNDS override
#          the gateway run's shape (defaults: 0-3, 8-15, 4, "4 64 256", 6, 2).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-}

bundle() {
  cd "$here"
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt-get install -y -q nginx
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || apt-get install -y -q haproxy
  local d=.device-gw
  rm -rf "$d" && mkdir -p "$d/scripts"
  . scripts/bundle-prog.sh
  bundle_cnse "$d"
  bundle_prog "$d" nginx
  bundle_prog "$d" haproxy
  cp scripts/gateway-bench.sh scripts/gateway-table.py scripts/wait-ready.sh scripts/device-gateway.sh "$d/scripts/"
  "$d/bin/nginx" -v && "$d/bin/haproxy" -v | sed -n 1p
  du -sh "$d"
}

gateway() { # issue 13: 4 cores per proxy, load and stand-in on 8-15
  CNSE_DP="$here/cnse-dp" NGINX="$here/bin/nginx" HAPROXY="$here/bin/haproxy" \
    PROXY_CPUS=${PROXY_CPUS:-0-3} LOAD_CPUS=${LOAD_CPUS:-8-15} LOAD_THREADS=${LOAD_THREADS:-4} \
    CONNS=${CONNS:-"4 64 256"} OUT="$out" \
    bash "$here/scripts/gateway-bench.sh" "${SECS:-6}" "${ROUNDS:-2}"
}

compare() { # issue 12: added TTFT through the HTTP front and the binary protocol
  local c close spares
  for close in "" --standin-close-after-stream; do
    for c in 4 64; do
      # Against the closing stand-in, also without connections opened
      # ahead (--llama-spare-conns 0: each request connects on its own).
      for spares in 1 ${close:+0}; do
        echo "== llama-compare --llama-standin $close --llama-spare-conns $spares --connections $c ($(date -u +%FT%TZ))"
        "$here/cnse-dp" bench --target llama-compare --llama-standin $close --llama-spare-conns "$spares" \
          --mode generate --connections "$c" --max-tokens 32 --duration-secs 6 --warmup-secs 2 --rounds 2 2>&1 |
          grep -v '^round '
      done
    done
  done
}

case "$what" in
  bundle) bundle ;;
  gateway | compare | all)
    out=${OUT:-$here/out}
    mkdir -p "$out"
    echo "== $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), kernel $(uname -r)"
    [ "$what" = compare ] || gateway
    [ "$what" = gateway ] || compare | tee "$out/llama-compare.txt"
    ;;
  *) echo "usage: device-gateway.sh bundle | gateway | compare | all" >&2; exit 2 ;;
esac
