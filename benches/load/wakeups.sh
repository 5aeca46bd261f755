#!/usr/bin/env bash
# CPU 1's wake-up cost per new TLS connection behind each gateway (see wakeups.py). Installs
# linux-perf (and what the harness needs) when missing, builds keygate in release mode.
#
#   benches/load/wakeups.sh [--duration 8] [--connections 64]
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v perf >/dev/null || { apt-get update && apt-get install -y linux-perf; }
command -v haproxy >/dev/null || { apt-get update && apt-get install -y haproxy; }
. benches/prepare.sh
exec python3 benches/load/wakeups.py --keygate target/release/keygate "$@"
