#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60), one
# after the other, from its committed seeds (fuzz/seeds/TARGET, copied into
# the working corpus fuzz/corpus/TARGET, which is not committed). Fails on
# any finding (crash, failed assertion, timeout, out of memory), naming the
# input libFuzzer saved. Appends each target's executions to the table in
# docs/RELIABILITY.md and rewrites the totals above it.
#
#   scripts/fuzz.sh            # 60 s per target, no sanitizer (stable)
#   scripts/fuzz.sh 600        # longer
#   FUZZ_SANITIZER=address scripts/fuzz.sh   # ASan (RUSTC_BOOTSTRAP=1)
#   FUZZ_TARGETS="header decoder" scripts/fuzz.sh 30
#
# Installs cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
secs=${1:-60}
sanitizer=${FUZZ_SANITIZER:-none}
doc=$root/docs/RELIABILITY.md
log() { printf '\n==> %s\n' "$*"; }

case $secs in '' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, not '$secs'" >&2; exit 2 ;; esac
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
san=(--sanitizer "$sanitizer")
if [ "$sanitizer" != none ]; then
  # Sanitizers need nightly flags; the stable toolchain allows them so.
  export RUSTC_BOOTSTRAP=1
fi

cd fuzz
targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
log "build ($(echo $targets | wc -w) targets, sanitizer $sanitizer)"
cargo fuzz build "${san[@]}"

machine="$(nproc)-core $(uname -m)$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: */, /')"
day=$(date -u +%Y-%m-%d)
rows=()
failed=()
for t in $targets; do
  mkdir -p "corpus/$t"
  if [ -d "seeds/$t" ]; then
    cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
  fi
  out=$(mktemp)
  log "$t: ${secs} s"
  rc=0
  cargo fuzz run "${san[@]}" "$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 >"$out" 2>&1 || rc=$?
  # libFuzzer's final stats; "#N DONE" when stats are missing.
  execs=$(awk '/stat::number_of_executed_units:/ {n=$2} END {print n}' "$out")
  [ -n "$execs" ] || execs=$(awk '$2 == "DONE" {n=substr($1, 2)} END {print n}' "$out")
  [ -n "$execs" ] || execs=0
  if [ "$rc" -ne 0 ]; then
    result="FINDING"
    failed+=("$t")
    echo "fuzz.sh: $t found a problem (exit $rc); its output ends:" >&2
    tail -n 40 "$out" >&2
    grep -o 'artifact_prefix=[^;]*; Test unit written to [^ ]*' "$out" >&2 || true
  else
    result="clean"
  fi
  echo "$t: $execs executions in ${secs} s, $result"
  rows+=("| $day | $machine | \`$t\` | $sanitizer | $secs | $execs | $result |")
  rm -f "$out"
done

# Appends the rows to the log table (the file's last section) and rewrites
# the totals between the markers from every row of the log.
if [ -f "$doc" ]; then
  printf '%s\n' "${rows[@]}" >>"$doc"
  tmp=$(mktemp)
  awk '
    FNR == NR {
      if ($0 ~ /^\| 2[0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] \|/) {
        split($0, f, "|"); t = f[4]; gsub(/[ `]/, "", t)
        n[t] += f[7]; s[t] += f[6]; if (f[8] !~ /clean/) bad[t]++
        if (!(t in seen)) { seen[t] = 1; order[++k] = t }
      }
      next
    }
    /<!-- totals begin -->/ {
      print; print "| target | executions so far | seconds so far | runs with a finding |"
      print "|---|---:|---:|---:|"
      for (i = 1; i <= k; i++) { t = order[i]; printf "| `%s` | %.0f | %.0f | %.0f |\n", t, n[t], s[t], bad[t] + 0 }
      skip = 1; next
    }
    /<!-- totals end -->/ { skip = 0 }
    !skip { print }
  ' "$doc" "$doc" >"$tmp"
  cat "$tmp" >"$doc"
  rm -f "$tmp"
  echo "recorded in docs/RELIABILITY.md"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: findings in: ${failed[*]} (inputs under fuzz/artifacts/; reproduce with cargo fuzz run TARGET FILE)" >&2
  exit 1
fi
echo "fuzz.sh: every target clean"
