#!/usr/bin/env bash
# Runs testssl.sh (Debian package `testssl.sh`) against a keygate TLS listener and fails on any
# HIGH or CRITICAL finding about the listener's TLS set-up.
#
#   scripts/testssl.sh            # builds keygate, starts it with a fresh dev certificate
#   scripts/testssl.sh host:port  # checks a running listener instead
#
# Findings about trust in the certificate itself (a self-signed dev certificate is not in any
# trust store) are reported but do not fail the run: they describe the certificate you load,
# not keygate. Everything else (protocols, ciphers, vulnerabilities, renegotiation, ...) counts.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v testssl >/dev/null || { echo "install the Debian package testssl.sh first" >&2; exit 2; }

target="${1:-}"
work="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

if [ -z "$target" ]; then
  cargo build --quiet
  port=$((20000 + RANDOM % 20000))
  # A certificate with a real-world lifetime (90 days); `keygate certs dev` makes one that
  # never expires, which testssl rightly reports.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$work/gateway.key" -out "$work/gateway.crt" 2>/dev/null
  cat >"$work/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
tls_cert = "gateway.crt"
tls_key = "gateway.key"
[upstream]
url = "http://127.0.0.1:9"
TOML
  ./target/debug/keygate run --config "$work/gateway.toml" 2>"$work/keygate.log" &
  pid=$!
  for _ in $(seq 50); do
    grep -q "listening on" "$work/keygate.log" && break
    sleep 0.1
  done
  target="127.0.0.1:$port"
fi

testssl --quiet --warnings off --color 0 --sneaky --fast \
  --jsonfile "$work/findings.json" "$target" >"$work/testssl.out" || true

python3 - "$work/findings.json" <<'PY'
import json, sys
findings = json.load(open(sys.argv[1]))
ignored = ("cert_chain_of_trust", "cert_trust", "cert_caIssuers", "cert_ocspURL",
           "cert_crlDistributionPoints", "cert_revocation", "OCSP_stapling")
bad, trust = [], []
for f in findings:
    if f.get("severity") not in ("HIGH", "CRITICAL"):
        continue
    (trust if f["id"].startswith(ignored) else bad).append(f)
for f in trust:
    print(f"note (certificate trust, not counted): {f['id']}: {f['finding']}")
for f in bad:
    print(f"{f['severity']}: {f['id']}: {f['finding']}")
print(f"{len(findings)} findings checked, {len(bad)} high or critical")
sys.exit(1 if bad else 0)
PY
