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

export CNSE_DP_BIN=${CNSE_DP_BIN:-$root/target/release/cnse-dp}
if [ ! -x "$CNSE_DP_BIN" ]; then
  log "build cnse-dp (release)"
  cargo build --release --bin cnse-dp
fi

# shellcheck source=scripts/python-env.sh
. "$root/scripts/python-env.sh"

log "pytest"
cd "$root/dataplane/python"
exec "$venv/bin/python" -m pytest -ra "$@"
