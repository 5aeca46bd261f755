#!/usr/bin/env bash
# Key-table scale: RSS per key at 1M keys, idle RSS at 10k, and a 1M-key reload under load.
#
#   benches/scale.sh [--keys 1000000] [--duration 10] [--connections 16]
#
# Installs nginx-light and wrk when missing, builds keygate in release mode, then runs
# benches/scale.py, which prints the numbers and writes benches/scale-results.md.
set -euo pipefail
cd "$(dirname "$0")/.."

. benches/prepare.sh
exec python3 benches/scale.py --keygate target/release/keygate "$@"
