#!/usr/bin/env bash
# Instructions per proxied request, keygate vs nginx, under callgrind: noise-free A/B for changes
# to the request path (see instructions.py). Installs valgrind too when missing.
#
#   benches/load/instructions.sh [--requests 20000] [--connections 32] [--h2]
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v valgrind >/dev/null || { apt-get update && apt-get install -y valgrind; }
command -v h2load >/dev/null || { apt-get update && apt-get install -y nghttp2-client; }
. benches/prepare.sh
exec python3 benches/load/instructions.py --keygate target/release/keygate "$@"
