#!/usr/bin/env bash
# All tests, on a fresh Debian 12 machine with the Rust toolchain: installs
# what the tests need, starts the real services (nginx with WebDAV as the
# filer remote, llama-server with SmolLM2), runs every test, stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '\n==> %s\n' "$*"; }

log "system packages"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in nginx libnginx-mod-http-dav-ext openssl; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# 2,000-connection tests need descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

log "build (release, all targets)"
cargo build --release --workspace --all-targets

services=()
cleanup() {
  for s in "${services[@]}"; do "$root/scripts/$s" stop >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

if [ -x scripts/nginx-webdav.sh ]; then
  log "start nginx (WebDAV filer remote)"
  export CNSE_FILER_URL=$(scripts/nginx-webdav.sh start "$(mktemp -d /tmp/cnse-filer.XXXXXX)")
  services+=(nginx-webdav.sh)
  echo "CNSE_FILER_URL=$CNSE_FILER_URL"
fi
if [ -x scripts/llama-server.sh ]; then
  log "start llama-server (SmolLM2-135M)"
  export CNSE_LLAMA_URL=$(scripts/llama-server.sh start)
  services+=(llama-server.sh)
  echo "CNSE_LLAMA_URL=$CNSE_LLAMA_URL"
fi
export CNSE_REQUIRE_SERVICES=1

log "tests"
cargo test --release --workspace -- --test-threads=2
