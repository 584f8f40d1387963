#!/usr/bin/env bash
# The HTTP front's tests with clients nobody here wrote (tests/http/): the
# official `openai` package, curl and prometheus_client, in the Python
# venv of scripts/python-env.sh, against the real cnse-dp binary.
#
#   scripts/test-http.sh [PYTEST ARGS...]
#
# Environment: CNSE_DP_BIN (default target/release/cnse-dp, built when
# missing), CNSE_CACHE (the venv's folder), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '\n==> %s\n' "$*"; }

export CNSE_DP_BIN=${CNSE_DP_BIN:-$root/target/release/cnse-dp}
if [ ! -x "$CNSE_DP_BIN" ]; then
  log "build cnse-dp (release)"
  cargo build --release --bin cnse-dp
fi
command -v curl >/dev/null || { apt-get install -y -qq curl >/dev/null; }

extra_pip="openai>=1.40,<4 prometheus_client>=0.20,<1"
# shellcheck source=scripts/python-env.sh
. "$root/scripts/python-env.sh"

log "HTTP front: openai, curl, prometheus_client"
exec "$venv/bin/python" -m pytest -ra tests/http "$@"
