#!/usr/bin/env bash
# The Python SDK's benchmark (issue 16): one Python process streaming with
# the official `openai` package from an OpenAI-compatible endpoint (the
# llama-server stand-in, `cnse-dp llama-standin`) and with the `cnse` SDK
# from cnse-dp, side by side in one run. Arguments go to
# dataplane/python/bench/openai_vs_cnse.py (--streams, --max-tokens,
# --ttft-us, --token-interval-us, --duration, --rounds, ...).
#
#   scripts/bench-python.sh --token-interval-us 1000 --ttft-us 1000 --rounds 4
#
# Builds target/release/cnse-dp when missing; the venv and wheel as in
# scripts/test-python.sh, plus `openai`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '\n==> %s\n' "$*" >&2; }

export CNSE_DP_BIN=${CNSE_DP_BIN:-$root/target/release/cnse-dp}
if [ ! -x "$CNSE_DP_BIN" ]; then
  log "build cnse-dp (release)"
  cargo build --release --bin cnse-dp
fi
extra_pip="openai>=1,<4"
# shellcheck source=scripts/python-env.sh
. "$root/scripts/python-env.sh"

log "benchmark"
exec "$venv/bin/python" "$root/dataplane/python/bench/openai_vs_cnse.py" "$@"
