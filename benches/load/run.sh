#!/usr/bin/env bash
# Load harness: keygate vs nginx doing the same job, side by side, on this machine.
#
#   benches/load/run.sh [--duration 10] [--rounds 2] [--connections 64]
#
# Installs what it needs when missing (nginx-light, wrk from Debian), builds keygate in release
# mode, then runs harness.py, which starts the upstream, keygate and nginx, pins the proxies to
# CPU 0 and the load generator and upstream to CPU 1, and writes benches/load/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update
  apt-get install -y "${need[@]}"
fi

cargo build --release --quiet
exec python3 benches/load/harness.py --keygate target/release/keygate "$@"
