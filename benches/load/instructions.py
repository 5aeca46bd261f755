#!/usr/bin/env python3
"""Instructions per proxied request, keygate vs nginx, under callgrind (issue 5's profiling).

Wall-clock CPU on a shared VM moves by ±1 µs between runs; instruction counts do not, so this
is how a change to the request path is judged before the load harness confirms it. The same
upstream, keys and gateway configs as harness.py (HTTP/1.1 keep-alive only); each proxy runs
alone under `valgrind --tool=callgrind` pinned to CPU 0, is warmed up with 4,000 requests, then
counts exactly --requests requests from a fixed-count keep-alive client on CPU 1. Counts user
space only (the kernel's share is the same for both: same syscalls per request).

With --h2 the requests are HTTP/2 over TLS (h2load, one stream in flight per connection) to
each proxy's TLS listener; the count then includes the connections' TLS handshakes (about
1,000 instructions a request at 40,000 requests over 32 connections).

    benches/load/instructions.sh [--requests 20000] [--connections 32] [--h2]
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    KEYS, free_port, keygate_conf, keys_and_entries, nginx_gateway_conf, upstream_conf, wait_port,
)


async def drive(port, key, total, conns):
    """Sends `total` GETs over `conns` keep-alive connections; returns how many were not 200."""
    req = (f"GET /v1/guests HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-api-key: {key}\r\n"
           "User-Agent: instructions\r\nAccept: */*\r\n\r\n").encode()
    bad = 0

    async def one(n):
        nonlocal bad
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(n):
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            bad += not head.startswith(b"HTTP/1.1 200")
            length = next((int(l.split(b":")[1]) for l in head.lower().split(b"\r\n")
                           if l.startswith(b"content-length:")), 0)
            await r.readexactly(length)
        w.close()

    await asyncio.gather(*(one(total // conns) for _ in range(conns)))
    return bad


def count(cmd, port, key, args, work, name):
    """Instructions per request of the server `cmd` listening on `port`."""
    out = os.path.join(work, f"{name}.callgrind")
    proc = subprocess.Popen(
        ["taskset", "-c", "0", "valgrind", "--tool=callgrind", "--instr-atstart=no",
         f"--callgrind-out-file={out}"] + cmd,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "RUST_LOG"},
    )
    try:
        wait_port(port, timeout=120)
        if args.h2:
            client = lambda n: ["taskset", "-c", "1", "h2load", "-t1", f"-c{args.connections}",
                                "-m1", f"-n{n}", "-H", f"x-api-key: {key}",
                                f"https://127.0.0.1:{port}/v1/guests"]
        else:
            client = lambda n: ["taskset", "-c", "1", sys.executable, __file__, "--drive",
                                str(port), key, str(n), str(args.connections)]
        subprocess.run(client(4000), check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                       capture_output=True)
        measured = subprocess.run(client(args.requests), check=True, capture_output=True, text=True)
        if args.h2 and f"{args.requests} succeeded" not in measured.stdout:
            raise SystemExit(f"h2load: not every request succeeded:\n{measured.stdout}")
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                       capture_output=True)
    finally:
        proc.terminate()
        proc.wait()
    total = sum(int(l.split()[1]) for l in open(out) if l.startswith("totals:"))
    return total / (args.requests if args.h2 else args.requests // args.connections * args.connections)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--drive":
        port, key, n, conns = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        bad = asyncio.run(drive(int(port), key, n, conns))
        sys.exit(1 if bad else 0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--keygate", required=True)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--h2", action="store_true",
                    help="HTTP/2 over TLS with h2load (nghttp2-client) instead of HTTP/1.1")
    args = ap.parse_args()
    keygate = os.path.abspath(args.keygate)
    work = tempfile.mkdtemp(prefix="keygate-instr-")
    keys, entries = keys_and_entries(keygate)
    up_port, kg_port, ng_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", upstream_conf(work, up_port)])
    try:
        wait_port(up_port)
        kg_path = os.path.join(work, "keygate.toml")
        tls = None
        if args.h2:
            subprocess.run([keygate, "certs", "dev", "--out", work], check=True, capture_output=True)
            tls = (f"{work}/gateway.crt", f"{work}/gateway.key")
        with open(kg_path, "w") as f:
            f.write(keygate_conf(kg_port, up_port, entries, tls))
        if args.h2:
            # nginx's plain listener on a port nobody uses, its TLS one (with http2) measured.
            ng_path = nginx_gateway_conf(work, keys, up_port, free_port(), (ng_port,) + tls)
        else:
            ng_path = nginx_gateway_conf(work, keys, up_port, ng_port)
        with open(ng_path) as f:
            ng_text = f.read()
        with open(ng_path, "w") as f:
            f.write(ng_text.replace("daemon off;", "daemon off;\nmaster_process off;"))
        key = keys[KEYS // 2]
        kg = count([keygate, "run", "--config", kg_path], kg_port, key, args, work, "keygate")
        ng = count(["nginx", "-c", ng_path], ng_port, key, args, work, "nginx")
    finally:
        upstream.terminate()
        upstream.wait()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    kind = "HTTP/2 (TLS)" if args.h2 else "HTTP/1.1 keep-alive"
    print(f"{stamp}, {args.requests} {kind} requests over {args.connections} connections")
    print(f"keygate: {kg:,.0f} instructions/request")
    print(f"nginx:   {ng:,.0f} instructions/request")
    print(f"ratio keygate/nginx: {kg / ng:.2f}x (user space only)")


if __name__ == "__main__":
    main()
