#!/usr/bin/env python3
"""keygate vs nginx (and HAProxy, when installed) as the same API-key gateway, measured side by
side (see run.sh).

Every contender proxies to one upstream (an nginx instance answering a small JSON body) over
keep-alive connections, checks the x-api-key header against the same 1,000 keys, applies a
per-key limit too high to trigger, removes the key header and adds an identity header.
Proxies run on CPU 0 with one worker (`--workers N`: N each, on CPUs 0..N-1); wrk and the
upstream run on CPU 1. For each run the proxy's CPU time (utime+stime of all its processes, from
/proc) is read before and after and divided by the requests completed.
"""
import argparse
import datetime
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import zlib

CLK = os.sysconf("SC_CLK_TCK")
KEYS = 1000
BODY = '{"ok":true,"guests":[{"id":"g-1001","name":"Ada Lovelace"}]}'


BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def mint_key():
    """A key in keygate's format: bbk_ + 32 base62 + 6-char base62 CRC32 of what precedes."""
    body = "bbk_" + "".join(secrets.choice(BASE62) for _ in range(32))
    n = zlib.crc32(body.encode())
    sum_ = ""
    for _ in range(6):
        sum_ = BASE62[n % 62] + sum_
        n //= 62
    return body + sum_


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except FileNotFoundError:
            pass
    return total


def process_tree(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [pid] + [int(p) for p in out.split()]


def blake3_hex(binary, key):
    out = subprocess.run([binary, "hash"], input=key, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def keys_and_entries(keygate):
    """The harness's 1,000 keys and keygate's `[[keys]]` for them (the hash `keygate hash`
    prints, an id and a tenant each); the other gateways' configs are made from the keys."""
    keys = [mint_key() for _ in range(KEYS)]
    entries = "".join(
        f'[[keys]]\nid = "partner-{i}"\nhash = "{blake3_hex(keygate, k)}"\ntenant = "hotel-{i % 50}"\n'
        for i, k in enumerate(keys)
    )
    return keys, entries


class Processes:
    """The processes a bench starts, each pinned to a CPU; all stopped on leaving the `with`
    (SIGTERM, which nginx and HAProxy take as a fast shutdown; killed after 10 s)."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, cpu, **kw):
        p = subprocess.Popen(["taskset", "-c", str(cpu)] + cmd, **kw)
        self.procs.append(p)
        return p

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in reversed(self.procs):
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def parse_latency(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def parse_wrk(out):
    """wrk --latency output: requests, req/s, p50 and p99 in ms, non-2xx count, socket errors."""
    total = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = parse_latency(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = parse_latency(re.search(r"\s99%\s+(\S+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests": total,
        "rps": rps,
        "p50": p50,
        "p99": p99,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "errors": errors.group(1).strip() if errors else "",
    }


def run_load(cmd, headers, url):
    """Runs the load generator `cmd` on CPU 1 with `headers` against `url`; returns its output
    and its own CPU time (seconds), from its rusage."""
    for h in headers:
        cmd = cmd + ["-H", h]
    p = subprocess.Popen(["taskset", "-c", "1"] + cmd + [url], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, _, usage = os.wait4(p.pid, 0)  # taskset execs the generator: same process
    return out, usage.ru_utime + usage.ru_stime


def run_wrk(url, args, headers):
    """One wrk run; also returns wrk's own CPU time (seconds), from its rusage."""
    out, cpu_s = run_load(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency"],
                          headers, url)
    r = parse_wrk(out)
    r["wrk_cpu_s"] = cpu_s
    return r


def run_h2load(url, args, headers, streams, log):
    """One h2load run (HTTP/2 over TLS, `streams` requests in flight on each of the connections),
    in run_wrk's shape: p50 and p99 from h2load's per-request log (`log`; h2load appends, so it
    is removed first), non-2xx from its status counts, its CPU time (seconds) from its rusage."""
    if os.path.exists(log):
        os.remove(log)
    out, cpu_s = run_load(["h2load", "-t1", f"-c{args.connections}", f"-m{streams}",
                           f"-D{args.duration}", "--log-file", log], headers, url)
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if not m or "Application protocol: h2" not in out:
        raise SystemExit(f"h2load against {url} did not run over h2:\n{out}")
    done = int(m.group(1))
    ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
    with open(log) as f:
        # start time (µs since the epoch), status, duration (µs), one request a line
        durations = sorted(int(line.split()[2]) for line in f if line.strip())
    pct = lambda q: durations[min(len(durations) - 1, int(q * len(durations)))] / 1000
    errors = ", ".join(f"{what} {n}" for what, n in zip(["failed", "errored", "timeout"], m.groups()[1:])
                       if n != "0")
    return {
        "requests": done,
        "rps": float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1)),
        "p50": pct(0.50),
        "p99": pct(0.99),
        "non2xx": done - ok,
        "errors": errors,
        "wrk_cpu_s": cpu_s,
    }


def nginx_conf(work, name, body, workers=1):
    path = os.path.join(work, f"{name}.conf")
    with open(path, "w") as f:
        f.write(
            f"""worker_processes {workers};
daemon off;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
{body}
}}
"""
        )
    return path


def upstream_conf(work, port):
    """The upstream every contender proxies to: nginx answering BODY."""
    return nginx_conf(
        work,
        "upstream",
        f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type application/json; return 200 '{BODY}'; }}
    }}""",
    )


def keygate_conf(port, up_port, entries, tls=None, access_log=False, workers=1):
    """keygate's gateway.toml for the harness: one worker (or `workers`), a limit too high to trigger, no
    access lines (as nginx's `access_log off`; set in the config, as an operator would), or
    with `access_log` its access lines (level info; the harness sends stderr to a file)."""
    tls_lines = f'tls_cert = "{tls[0]}"\ntls_key = "{tls[1]}"\n' if tls else ""
    return f"""[server]
listen = "127.0.0.1:{port}"
{tls_lines}workers = {workers}

[upstream]
url = "http://127.0.0.1:{up_port}"

[limits]
rate = "1000000/s"
burst = 1000000

[log]
level = "{'info' if access_log else 'warn'}"

{entries}"""


def nginx_gateway_conf(work, keys, up_port, plain_port, tls=None, access_log=False, workers=1):
    """nginx as the equivalent gateway: `map` over the keys, `limit_req` per key id, key header
    removed, identity and forwarding headers added, keep-alive upstream; listeners `deferred`
    (TCP_DEFER_ACCEPT, as keygate's); `tls` is (port, cert, key) for a TLS listener beside the
    plain one; with `access_log`, access lines to a file, buffered as an operator would
    (`buffer=64k flush=1s`)."""
    key_map = "\n".join(f'        "{k}" "partner-{i}";' for i, k in enumerate(keys))
    tenant_map = "\n".join(f'        "{k}" "hotel-{i % 50}";' for i, k in enumerate(keys))
    logging = (
        f"        access_log {work}/gateway-access.log combined buffer=64k flush=1s;\n"
        if access_log
        else ""
    )
    location = f"""{logging}        default_type application/json;
        if ($key_id = "") {{
            return 401 '{{"error":"invalid_api_key","message":"The API key is not valid."}}';
        }}
        limit_req zone=perkey burst=1000000 nodelay;
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Api-Key "";
        proxy_set_header X-Keygate-Key-Id $key_id;
        proxy_set_header X-Keygate-Tenant $tenant;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;
        proxy_set_header X-Request-Id $request_id;
        add_header X-Request-Id $request_id always;"""
    tls_server = ""
    if tls:
        tls_server = f"""
    server {{
        listen 127.0.0.1:{tls[0]} ssl http2 backlog=4096 deferred;
        ssl_certificate {tls[1]};
        ssl_certificate_key {tls[2]};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
{location}
        }}
    }}"""
    return nginx_conf(
        work,
        "gateway",
        f"""    map_hash_bucket_size 128;
    map_hash_max_size 4096;
    map $http_x_api_key $key_id {{
        default "";
{key_map}
    }}
    map $http_x_api_key $tenant {{
        default "";
{tenant_map}
    }}
    limit_req_zone $key_id zone=perkey:10m rate=1000000r/s;
    upstream backend {{
        server 127.0.0.1:{up_port};
        keepalive 128;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{plain_port} backlog=4096 deferred;
        location / {{
{location}
        }}
    }}{tls_server}""",
    )


def haproxy_conf(work, keys, up_port, plain_port, tls=None, access_log=False, workers=1):
    """HAProxy as the equivalent gateway: `map` files over the keys, a stick table tracking
    each key id's request rate with a limit too high to trigger, key header removed, identity
    and forwarding headers added, a request id (a UUID) both ways, idle upstream connections
    reused (`http-reuse always`); binds with `defer-accept` (as keygate's listener); one
    thread. `tls` is (port, cert, key) for a TLS listener
    beside the plain one (HAProxy takes the certificate and key in one PEM); with `access_log`,
    HTTP log lines to stdout, which the harness sends to a file."""
    with open(os.path.join(work, "keys.map"), "w") as f:
        f.writelines(f"{k} partner-{i}\n" for i, k in enumerate(keys))
    with open(os.path.join(work, "tenants.map"), "w") as f:
        f.writelines(f"{k} hotel-{i % 50}\n" for i, k in enumerate(keys))
    tls_bind = ""
    if tls:
        pem = os.path.join(work, "haproxy.pem")
        with open(pem, "w") as out:
            for part in tls[1:]:
                with open(part) as f:
                    out.write(f.read())
        tls_bind = f"\n    bind 127.0.0.1:{tls[0]} defer-accept ssl crt {pem} ssl-min-ver TLSv1.2 alpn h2,http/1.1"
    logging = "    log stdout format raw local0\n    option httplog\n" if access_log else ""
    path = os.path.join(work, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(
            f"""global
    nbthread {workers}
    maxconn 8000

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
{logging}
backend per_key
    stick-table type string len 64 size 10k expire 60s store http_req_rate(1s)

backend upstream
    http-reuse always
    server upstream 127.0.0.1:{up_port}

frontend gateway
    bind 127.0.0.1:{plain_port} defer-accept{tls_bind}
    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
    http-request set-var(txn.key_id) req.hdr(x-api-key),map({work}/keys.map)
    http-request set-var(txn.tenant) req.hdr(x-api-key),map({work}/tenants.map)
    http-request return status 401 content-type application/json string '{{"error":"invalid_api_key","message":"The API key is not valid."}}' if !{{ var(txn.key_id) -m found }}
    http-request track-sc0 var(txn.key_id) table per_key
    http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 1000000 }}
    http-request del-header x-api-key
    http-request set-header X-Keygate-Key-Id %[var(txn.key_id)]
    http-request set-header X-Keygate-Tenant %[var(txn.tenant)]
    option forwardfor
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-response set-header X-Request-Id %[unique-id]
    default_backend upstream
"""
        )
    return path


def start_gateways(procs, keygate, work, keys, entries, up_port, haproxy=True, access_log=False,
                   workers=1):
    """Starts every contender as the same gateway over the upstream on `up_port`: keygate twice
    (plain and TLS), nginx and, when installed and `haproxy`, HAProxy (each with a plain and a
    TLS listener), pinned to CPUs 0..workers-1, and waits until all listen. Returns the ports
    by listener (kg_plain, kg_tls, ng_plain, ng_tls, hp_plain, hp_tls) and the pids by
    listener for keygate, by name for nginx (its master) and HAProxy."""
    subprocess.run([keygate, "certs", "dev", "--out", work], check=True, capture_output=True)
    cert, key = f"{work}/gateway.crt", f"{work}/gateway.key"
    cpus = "0" if workers == 1 else f"0-{workers - 1}"
    haproxy = shutil.which("haproxy") if haproxy else None
    names = ["kg_plain", "kg_tls", "ng_plain", "ng_tls"] + (["hp_plain", "hp_tls"] if haproxy else [])
    ports = {name: free_port() for name in names}
    pids = {}
    for name, tls in [("kg_plain", False), ("kg_tls", True)]:
        path = os.path.join(work, f"{name}.toml")
        with open(path, "w") as f:
            f.write(keygate_conf(ports[name], up_port, entries, (cert, key) if tls else None,
                                 access_log, workers))
        # No access lines, as nginx's access_log off; set in the config as an operator
        # would (RUST_LOG would also replace keygate's default filter).
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        log = open(os.path.join(work, f"{name}.log"), "w") if access_log else subprocess.DEVNULL
        pids[name] = procs.start([keygate, "run", "--config", path], cpus, env=env, stderr=log).pid
    ng_conf = nginx_gateway_conf(
        work, keys, up_port, ports["ng_plain"], (ports["ng_tls"], cert, key), access_log, workers
    )
    pids["nginx"] = procs.start(["nginx", "-c", ng_conf], cpus).pid
    if haproxy:
        hp_conf = haproxy_conf(
            work, keys, up_port, ports["hp_plain"], (ports["hp_tls"], cert, key), access_log, workers
        )
        subprocess.run([haproxy, "-c", "-q", "-f", hp_conf], check=True)
        hp_log = open(os.path.join(work, "haproxy.log"), "w") if access_log else subprocess.DEVNULL
        pids["haproxy"] = procs.start([haproxy, "-db", "-f", hp_conf], cpus, stdout=hp_log).pid
    for p in ports.values():
        wait_port(p)
    time.sleep(0.5)
    return ports, pids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keygate", required=True)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--out", help="default benches/load/results.md (results-workers-N.md with --workers N)")
    ap.add_argument("--modes", default="plain,tls,new",
                    help="subset of plain,tls,new,h2,h2mux (h2 and h2mux: HTTP/2 over TLS with "
                         "h2load, 1 or 10 streams in flight per connection)")
    ap.add_argument("--access-log", action="store_true",
                    help="the gateways write access lines to a file (nginx buffered)")
    ap.add_argument("--no-haproxy", action="store_true",
                    help="leave HAProxy out even when it is installed")
    ap.add_argument("--workers", type=int, default=1,
                    help="each proxy's workers (keygate `workers`, nginx worker_processes, HAProxy "
                         "nbthread), pinned to CPUs 0..N-1; wrk and the upstream stay on CPU 1")
    args = ap.parse_args()
    if args.out is None:
        args.out = ("benches/load/results.md" if args.workers == 1
                    else f"benches/load/results-workers-{args.workers}.md")
    keygate = os.path.abspath(args.keygate)
    work = tempfile.mkdtemp(prefix="keygate-load-")
    with Processes() as procs:
        # Keys: the same 1,000 for every gateway.
        keys, entries = keys_and_entries(keygate)
        up_port = free_port()
        up = procs.start(["nginx", "-c", upstream_conf(work, up_port)], 1)
        wait_port(up_port)
        ports, pids = start_gateways(procs, keygate, work, keys, entries, up_port,
                                     not args.no_haproxy, args.access_log, args.workers)

        key_header = f"x-api-key: {keys[KEYS // 2]}"
        # (label, scheme, listener, extra request headers, HTTP/2 streams per connection:
        # None is wrk over HTTP/1.1, a number h2load over h2)
        all_modes = {
            "plain": ("HTTP/1.1 keep-alive", "http", "plain", [], None),
            "tls": ("TLS keep-alive", "https", "tls", [], None),
            "new": ("TLS new connection per request", "https", "tls", ["Connection: close"], None),
            "h2": ("HTTP/2 over TLS, 1 stream per connection", "https", "tls", [], 1),
            "h2mux": ("HTTP/2 over TLS, 10 streams per connection", "https", "tls", [], 10),
        }
        modes = [all_modes[m] for m in args.modes.split(",")]
        results = {}
        for rnd in range(args.rounds):
            for mode, scheme, kind, extra, streams in modes:
                targets = [("keygate", f"kg_{kind}"), ("nginx", f"ng_{kind}")]
                if "haproxy" in pids:
                    targets.append(("haproxy", f"hp_{kind}"))
                if rnd % 2:
                    targets.reverse()
                if kind == "plain":
                    targets.insert(0, ("direct upstream", None))
                for target, port_name in targets:
                    if port_name is None:
                        url, measured = f"http://127.0.0.1:{up_port}/v1/guests", []
                    else:
                        url = f"{scheme}://127.0.0.1:{ports[port_name]}/v1/guests"
                        measured = process_tree(pids.get(target) or pids[port_name])
                    up_pids = process_tree(up.pid)
                    before, up_before = cpu_ticks(measured), cpu_ticks(up_pids)
                    if streams is None:
                        r = run_wrk(url, args, [key_header] + extra)
                    else:
                        log = os.path.join(work, "h2load.log")
                        r = run_h2load(url, args, [key_header] + extra, streams, log)
                    after, up_after = cpu_ticks(measured), cpu_ticks(up_pids)
                    n = max(r["requests"], 1)
                    r["cpu_us"] = (after - before) / CLK * 1e6 / n if measured else None
                    # CPU 1's work per request: the load generator's and the upstream's.
                    r["cpu1_us"] = (r["wrk_cpu_s"] + (up_after - up_before) / CLK) * 1e6 / n
                    results.setdefault((mode, target), []).append(r)
                    cpu = f"{r['cpu_us']:.1f}" if r["cpu_us"] is not None else "-"
                    print(
                        f"round {rnd + 1} {mode:32} {target:16} {r['rps']:>10.0f} req/s  "
                        f"p50 {r['p50']:.3f} ms  p99 {r['p99']:.3f} ms  cpu {cpu} us/req  "
                        f"cpu1 {r['cpu1_us']:.1f} us/req (wrk {r['wrk_cpu_s'] * 1e6 / n:.1f})  "
                        f"non-2xx {r['non2xx']} {r['errors']}",
                        flush=True,
                    )
        report(args, results, modes)


def haproxy_version():
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "unknown"


def ratio(k, n, field):
    """keygate's mean over the peer's, and the range of the per-round ratios."""
    text = f"{mean(k, field) / mean(n, field):.2f}x"
    rounds = [a[field] / b[field] for a, b in zip(k, n)]
    if len(rounds) > 1:
        text += f" ({min(rounds):.2f}–{max(rounds):.2f})"
    return text


def mean(rs, field):
    vals = [r[field] for r in rs if r[field] is not None]
    return sum(vals) / len(vals) if vals else None


def report(args, results, modes):
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu_model = m.group(1) if m else cpu_model
    except OSError:
        pass
    lines = [
        "# Load harness results",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.node()}, {os.cpu_count()} cores, {cpu_model}, Linux {platform.release()}",
        f"- command: `benches/load/run.sh --duration {args.duration} --rounds {args.rounds} --connections {args.connections}"
        f"{' --modes ' + args.modes if args.modes != 'plain,tls,new' else ''}{' --access-log' if args.access_log else ''}"
        f"{f' --workers {args.workers}' if args.workers != 1 else ''}`",
        f"- load: wrk{' (h2load for the HTTP/2 modes)' if any(m[4] for m in modes) else ''}, 1 thread, {args.connections} connections, {args.duration} s per run, {args.rounds} interleaved rounds (means shown); "
        + ("proxies pinned to CPU 0 with one worker" if args.workers == 1
           else f"proxies pinned to CPUs 0-{args.workers - 1} with {args.workers} workers each (one of them shares CPU 1)")
        + ", wrk and the upstream (nginx returning a small JSON body) on CPU 1",
        f"- every gateway: {KEYS} keys, per-key limit too high to trigger, key header removed, identity (key id, tenant), "
        "X-Forwarded-* and X-Request-Id headers added, keep-alive upstream; "
        + ("access lines to a file (keygate: its log thread; nginx: `buffer=64k flush=1s`)"
           if args.access_log else "no access logs")
        + ("; HAProxy " + haproxy_version() + (", one thread" if args.workers == 1 else f", {args.workers} threads")
           + ", `map` files and a stick table per key id"
           if any(t == "haproxy" for _, t in results) else ""),
        "",
        ("CPU µs/req is the proxy's (CPU 0)" if args.workers == 1 else "CPU µs/req is the proxy's (all its threads)")
        + "; CPU 1 µs/req is the load generator's and the upstream's together, the side that",
        "limits req/s when the proxy's core has time to spare.",
        "",
        "| mode | target | req/s | p50 ms | p99 ms | CPU µs/req | CPU 1 µs/req | non-2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, *_ in modes:
        for target in ["direct upstream", "keygate", "nginx", "haproxy"]:
            rs = results.get((mode, target))
            if not rs:
                continue
            cpu = mean(rs, "cpu_us")
            lines.append(
                f"| {mode} | {target} | {mean(rs, 'rps'):.0f} | {mean(rs, 'p50'):.3f} | {mean(rs, 'p99'):.3f} | "
                f"{'-' if cpu is None else f'{cpu:.1f}'} | {mean(rs, 'cpu1_us'):.1f} | {sum(r['non2xx'] for r in rs)} |"
            )
    for peer in ["nginx", "haproxy"]:
        rows = []
        for mode, *_ in modes:
            k, n = results.get((mode, "keygate")), results.get((mode, peer))
            if not k or not n:
                continue
            rows.append(f"| {mode} | " + " | ".join(ratio(k, n, field) for field in ["cpu_us", "rps", "p99"]) + " |")
        if rows:
            lines += ["", f"Ratios keygate / {peer} (CPU: lower is better; req/s: higher is better; p99: lower is better;",
                      "in brackets the lowest and highest of the rounds, each keygate's run against the peer's in the same round):",
                      "", "| mode | CPU per request | req/s | p99 |", "|---|---:|---:|---:|"] + rows
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
