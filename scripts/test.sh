#!/usr/bin/env bash
# All tests, on a fresh Debian 12 machine with the Rust toolchain: installs
# what the tests need, starts the real services (nginx with WebDAV as the
# filer remote, llama-server with SmolLM2; redis-server for the load
# generator's RESP test), runs every test (cargo, then the
# Python SDK's pytest), stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '\n==> %s\n' "$*"; }

log "system packages"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in nginx libnginx-mod-http-dav-ext openssl redis-server redis-tools; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# The Python SDK's tests need venv (a separate package on Debian's Python).
if ! python3 -m venv --help >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
fi

# 2,000-connection tests need descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

log "build (release, all targets)"
cargo build --release --workspace --all-targets

services=()
cleanup() {
  # An entry is a script and its arguments to stop (e.g. a port).
  local name args
  for s in "${services[@]}"; do
    read -r name args <<<"$s"
    # shellcheck disable=SC2086 # args are words on purpose
    "$root/scripts/$name" stop $args >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT

# Runs a service's start command, passing its progress through; prints what
# it prints (the service's URL). When it fails, stops the tests with one line
# naming the service and the reason (the start command's last message).
start_service() {
  local name="$1" err out rc=0
  shift
  err="$(mktemp)"
  # stdout is captured (fd 3); stderr goes through tee to the log and to
  # $err, and the pipeline ends only when tee has written all of it.
  out="$( { "$@" 2>&1 1>&3 3>&- | tee "$err" >&2; exit "${PIPESTATUS[0]}"; } 3>&1 )" || rc=$?
  if [ "$rc" -ne 0 ] || [ -z "$out" ]; then
    echo "test.sh: stopping: $name did not start: $(grep -v '^[[:space:]]*$' "$err" | tail -n 1 || echo "exit status $rc")" >&2
    rm -f "$err"
    exit 1
  fi
  rm -f "$err"
  echo "$out"
}

log "start nginx (WebDAV filer remote)"
services+=(nginx-webdav.sh)
CNSE_FILER_URL="$(start_service nginx scripts/nginx-webdav.sh start "$(mktemp -d /tmp/cnse-filer.XXXXXX)")"
export CNSE_FILER_URL
echo "CNSE_FILER_URL=$CNSE_FILER_URL"

log "start llama-server (SmolLM2-135M)"
t0=$(date +%s)
services+=(llama-server.sh)
CNSE_LLAMA_URL="$(start_service llama-server scripts/llama-server.sh start)"
export CNSE_LLAMA_URL
echo "CNSE_LLAMA_URL=$CNSE_LLAMA_URL (llama-server set-up took $(( $(date +%s) - t0 )) s)"
# Issue 14's routing tests need three servers (the binary is set up by now:
# seconds each).
CNSE_LLAMA_URLS="$CNSE_LLAMA_URL"
for port in 8082 8083; do
  services+=("llama-server.sh $port")
  CNSE_LLAMA_URLS="$CNSE_LLAMA_URLS,$(start_service "llama-server on $port" scripts/llama-server.sh start "$port")"
done
export CNSE_LLAMA_URLS
echo "CNSE_LLAMA_URLS=$CNSE_LLAMA_URLS"
export CNSE_REQUIRE_SERVICES=1

# The machines that run this differ in CPU: check the choice an AVX2-only
# CPU would make, on whatever CPU this is, by running every candidate under
# qemu-user as an EPYC-Milan (AVX2, no AVX-512). A fresh probe each time.
log "llama-server on an AVX2-only CPU (emulated EPYC-Milan)"
rm -f "${CNSE_CACHE:-$HOME/.cache/cnse-dp}/llama-server/choice-$(uname -m)-emulated-EPYC-Milan-auto"
if ! avx2_bin="$(CNSE_LLAMA_EMULATE_CPU=EPYC-Milan scripts/llama-server.sh which)"; then
  echo "test.sh: stopping: no llama-server runs on an AVX2-only CPU (the line above says why)" >&2
  exit 1
fi
echo "on an AVX2-only CPU: $avx2_bin"

log "tests"
cargo test --release --workspace -- --test-threads=2

log "Python SDK tests"
scripts/test-python.sh

log "HTTP front with the openai package, curl and prometheus_client"
scripts/test-http.sh

log "Work-stealing scheduler across MPI ranks (mpirun, shared memory and TCP)"
scripts/test-mpi.sh

log "Benchmark suite smoke run (scripts/bench.sh --quick: peers, redis, ablations, micro, report)"
scripts/bench.sh --quick "$(mktemp -d /tmp/cnse-bench-quick.XXXXXX)"

log "Soak, 2 minutes: mixed population against one server (scripts/soak.sh; docs/RELIABILITY.md, Soak)"
scripts/soak.sh 2 "$(mktemp -d /tmp/cnse-soak.XXXXXX)"

log "Fuzz targets, 60 s each (docs/RELIABILITY.md)"
scripts/fuzz.sh 60
