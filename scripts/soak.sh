#!/usr/bin/env bash
# The 10-minute soak, run by hand before a release: the release keygate binary under load from
# four clients, a reload every second (one key removed, one added, a broken file in between),
# RSS sampled every 5 s. Fails on any 5xx, any refusal of a valid key, any admission of a
# removed key, or memory that keeps growing.
#
#   scripts/soak.sh          # 600 s
#   scripts/soak.sh 120      # a shorter run
set -euo pipefail
cd "$(dirname "$0")/.."
KEYGATE_SOAK_SECS="${1:-600}" cargo test --release --test hardening \
  soak_with_key_churn_and_reloads_keeps_memory_flat_and_errors_at_zero -- --ignored --nocapture
