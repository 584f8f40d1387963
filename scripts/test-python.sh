#!/usr/bin/env bash
# The Python SDK's tests (dataplane/python): a virtual environment with
# maturin and pytest, the `cnse` wheel built from the repository and
# installed into it, then pytest against the real cnse-dp binary.
#
#   scripts/test-python.sh [PYTEST ARGS...]
#
# Environment:
#   CNSE_DP_BIN            the server binary (default target/release/cnse-dp,
#                          built with `cargo build --release --bin cnse-dp`
#                          when missing)
#   CNSE_LLAMA_URL         a running llama-server for the llama test; without
#                          it the test starts one with scripts/llama-server.sh
#   CNSE_REQUIRE_SERVICES  1: the llama test fails instead of skipping
#   CNSE_CACHE             cache folder (default ~/.cache/cnse-dp): the venv
#   PYTHON                 interpreter for the venv (default python3)
# Exits non-zero on any failure; pytest's summary line is the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '\n==> %s\n' "$*"; }

cache=${CNSE_CACHE:-$HOME/.cache/cnse-dp}
venv=$cache/py-venv
python=${PYTHON:-python3}

export CNSE_DP_BIN=${CNSE_DP_BIN:-$root/target/release/cnse-dp}
if [ ! -x "$CNSE_DP_BIN" ]; then
  log "build cnse-dp (release)"
  cargo build --release --bin cnse-dp
fi

log "virtual environment ($venv)"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$cache"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  'maturin>=1.9.4,<2' 'pytest>=8,<10'

log "build and install the cnse wheel"
# maturin's build backend runs the `maturin` of the environment.
export PATH=$venv/bin:$PATH
# The SDK crate is outside the workspace; its build output stays under the
# workspace's target/ so rebuilds are incremental and nothing else is
# touched.
export CARGO_TARGET_DIR=$root/target/python
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --force-reinstall --no-deps "$root/dataplane/python"
"$venv/bin/python" -c 'import cnse, sys; print("cnse", cnse.__version__, "on Python", sys.version.split()[0])'

log "pytest"
cd "$root/dataplane/python"
exec "$venv/bin/python" -m pytest -ra "$@"
