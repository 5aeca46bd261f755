#!/usr/bin/env bash
# Shared by the bench scripts (source it from the repo root): installs nginx-light, wrk and
# taskset from Debian when missing, then builds keygate in release mode.
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update
  apt-get install -y "${need[@]}"
fi
cargo build --release --quiet
