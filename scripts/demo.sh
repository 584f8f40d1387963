#!/usr/bin/env bash
# The main job: a cnse-dp server with the embedded synthetic backend plus a
# load against it, printing the latency table. Extra arguments go to
# `cnse-dp demo` (see `cnse-dp demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin cnse-dp
exec ./target/release/cnse-dp demo "$@"
