#!/usr/bin/env python3
"""Where CPU 1's time goes per new TLS connection, behind each gateway (issue 5's one shortfall).

With a new TLS connection per request the proxies' core has time to spare and req/s is bound by
CPU 1, where wrk and the upstream run. This runs the harness's "TLS new connection per request"
load once against each gateway (keygate, nginx, and HAProxy when installed) while `perf record`
samples wrk and the upstream, and prints, per 1,000 requests, their samples in all and in the
kernel's wake-up and interrupt paths (`_raw_spin_unlock_irqrestore`, where a waker pays for
waking a sleeping task on the other core, `irqentry_exit_to_user_mode`, `finish_task_switch`).
A gateway whose core is idle part of the time has to be woken for more of its events, and CPU 1
pays for those wake-ups; a busy one takes events in bursts. The `sleeps` column counts it from
the gateway's side: how often its threads blocked waiting for events (voluntary context
switches, /proc), per request. Uses the harness's configs and helpers (harness.py).

    benches/load/wakeups.sh [--duration 8] [--connections 64]
"""
import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

WAKE = ["_raw_spin_unlock_irqrestore", "irqentry_exit_to_user_mode", "finish_task_switch"]
FREQ = 2000


def samples_by_symbol(data):
    """perf report of one recording: {symbol: samples}."""
    out = subprocess.run(
        ["perf", "report", "-i", data, "--no-children", "--sort", "sym", "-g", "none",
         "--stdio", "-F", "sample,sym"],
        capture_output=True, text=True, check=True,
    ).stdout
    counts = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+\[.\]\s+(\S+)", line)
        if m:
            counts[m.group(2)] = counts.get(m.group(2), 0) + int(m.group(1))
    return counts


def voluntary_switches(pids):
    """Times the processes' threads blocked (gave up the CPU waiting), from /proc."""
    total = 0
    for pid in pids:
        for task in glob.glob(f"/proc/{pid}/task/*/status"):
            with open(task) as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return total


def measure(url, key, args, up_pid, gw_pids, work, name):
    """One wrk run against `url` with perf on wrk and the upstream worker; per 1,000 requests,
    and the gateway's sleeps per request."""
    switches = voluntary_switches(gw_pids)
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
           "-H", f"x-api-key: {key}", "-H", "Connection: close", url]
    wrk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(0.2)  # taskset has exec'd wrk: same pid
    data = {who: os.path.join(work, f"{name}-{who}.data") for who in ["wrk", "upstream"]}
    perfs = [
        subprocess.Popen(["perf", "record", "-q", "-F", str(FREQ), "-p", str(pid), "-o", data[who]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for who, pid in [("wrk", wrk.pid), ("upstream", up_pid)]
    ]
    out = wrk.stdout.read()
    wrk.wait()
    for p in perfs:
        p.send_signal(signal.SIGINT)
        p.wait()
    switches = voluntary_switches(gw_pids) - switches
    r = harness.parse_wrk(out)
    per = 1000 / max(r["requests"], 1)
    row = {"rps": r["rps"], "non2xx": r["non2xx"], "sleeps": switches / max(r["requests"], 1)}
    for who in ["wrk", "upstream"]:
        counts = samples_by_symbol(data[who])
        row[who] = sum(counts.values()) * per
        row[who + "_wake"] = sum(v for k, v in counts.items() if any(k.startswith(w) for w in WAKE)) * per
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keygate", required=True)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    keygate = os.path.abspath(args.keygate)
    work = tempfile.mkdtemp(prefix="keygate-wakeups-")
    with harness.Processes() as procs:
        keys, entries = harness.keys_and_entries(keygate)
        up_port = harness.free_port()
        up = procs.start(["nginx", "-c", harness.upstream_conf(work, up_port)], 1)
        harness.wait_port(up_port)
        ports, pids = harness.start_gateways(procs, keygate, work, keys, entries, up_port)
        targets = [("keygate", "kg_tls"), ("nginx", "ng_tls")]
        if "haproxy" in pids:
            targets.append(("haproxy", "hp_tls"))
        up_worker = harness.process_tree(up.pid)[-1]
        print(f"TLS new connection per request, wrk -c{args.connections} -d{args.duration}s; "
              f"perf samples at {FREQ} Hz per 1,000 requests (one sample = {1e6 / FREQ:.0f} µs)")
        print(f"{'gateway':10} {'req/s':>8} {'wrk':>8} {'wake':>7} {'upstream':>9} {'wake':>7} "
              f"{'sleeps':>7} {'non-2xx':>8}")
        for name, port in targets:
            row = measure(f"https://127.0.0.1:{ports[port]}/v1/guests", keys[harness.KEYS // 2], args,
                          up_worker, harness.process_tree(pids.get(name) or pids[port]), work, name)
            print(f"{name:10} {row['rps']:>8.0f} {row['wrk']:>8.1f} {row['wrk_wake']:>7.1f} "
                  f"{row['upstream']:>9.1f} {row['upstream_wake']:>7.1f} {row['sleeps']:>7.2f} "
                  f"{row['non2xx']:>8}", flush=True)
        print("\nwake: samples in " + ", ".join(WAKE) + "; sleeps: the gateway's voluntary context "
              "switches per request")


if __name__ == "__main__":
    main()
