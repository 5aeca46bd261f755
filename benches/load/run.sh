#!/usr/bin/env bash
# Load harness: keygate vs nginx doing the same job, side by side, on this machine.
#
#   benches/load/run.sh [--duration 10] [--rounds 2] [--connections 64] [--workers 1]
#                       [--modes plain,tls,new] (also h2, h2mux: HTTP/2 over TLS with h2load)
#
# Installs what it needs when missing (nginx-light, wrk, haproxy and nghttp2-client's h2load
# from Debian), builds keygate in release mode, then runs harness.py, which starts the upstream, keygate, nginx and HAProxy,
# pins the proxies to CPU 0 and the load generator and upstream to CPU 1, and writes
# benches/load/results.md (`--no-haproxy` leaves HAProxy out).
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v h2load >/dev/null || need+=(nghttp2-client)
if [ ${#need[@]} -gt 0 ]; then apt-get update && apt-get install -y "${need[@]}"; fi
. benches/prepare.sh
exec python3 benches/load/harness.py --keygate target/release/keygate "$@"
