//! What sharing limits through Redis costs per request, against in-process limits and against
//! the upstream called directly, in one run on loopback.
//!
//! `cargo bench --bench store_overhead` (release build; needs `wrk` and `redis-server` on PATH).
//! It starts the demo's sample upstream in this process, a redis-server on a free port, and the
//! real keygate binary once per mode, then runs `wrk` twice per target:
//! - one connection (`-c1`): the latency of a lone request, p50 and p99, no queueing;
//! - 16 connections (`-c16`): throughput, and the CPU keygate (and Redis) spent per request,
//!   read from `/proc/<pid>/stat` before and after.
//!
//! `BENCH_SECS` sets each wrk run's length (default 5), `BENCH_ROUNDS` how many interleaved
//! rounds are run (default 3; the medians are reported).

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

const KEY: &str = "bench-key-0123456789abcdefghijklmnopqrs";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): state is field 3, utime 14.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // Linux reports in USER_HZ, 100 per second on every mainstream build.
    Duration::from_millis(ticks * 10)
}

#[derive(Clone)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    gw_cpu_us: f64,
    redis_cpu_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct WrkRun {
    requests: u64,
    p50_us: f64,
    p99_us: f64,
    rps: f64,
}

fn parse_latency(v: &str) -> f64 {
    let v = v.trim();
    let (n, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        (v, 1.0)
    };
    n.parse::<f64>().unwrap_or(f64::NAN) * mult
}

fn wrk(url: &str, conns: u32, secs: u64, with_key: bool) -> WrkRun {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t",
        if conns == 1 { "1" } else { "2" },
        "-c",
        &conns.to_string(),
        "-d",
        &format!("{secs}s"),
        "--latency",
    ]);
    if with_key {
        cmd.args(["-H", &format!("x-api-key: {KEY}")]);
    }
    let out = cmd.arg(url).output().expect("wrk runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = WrkRun {
        requests: 0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        rps: 0.0,
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => run.p50_us = parse_latency(v),
            ["99%", v] => run.p99_us = parse_latency(v),
            ["Requests/sec:", v] => run.rps = v.parse().unwrap_or(0.0),
            [n, "requests", "in", ..] => run.requests = n.parse().unwrap_or(0),
            ["Non-2xx", ..] => panic!("keygate refused requests during the bench:\n{text}"),
            _ => {}
        }
    }
    assert!(run.requests > 0, "wrk failed:\n{text}");
    run
}

/// A keygate process, its URL, and how many times it fell back from Redis (counted from its log).
fn spawn_keygate(
    dir: &Path,
    name: &str,
    upstream: SocketAddr,
    limits: &str,
) -> (Killed, String, Arc<AtomicUsize>) {
    let hash = keygate::keys::KeyHash::of(KEY.as_bytes()).to_config_string();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://{upstream}\"\n\
             {limits}\n[[keys]]\nid = \"bench\"\nhash = \"{hash}\"\nrate = \"1000000/s\"\n\
             burst = 1000000\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn,keygate::server=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keygate runs");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("keygate printed its address")
            .expect("stderr");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().to_string();
        }
    };
    let trips = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&trips);
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("limit store unavailable") {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    (Killed(child), format!("{addr}/v1/guests"), trips)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let upstream = rt.block_on(keygate::demo::start_sample_upstream()).unwrap();

    let redis_port = free_port();
    let redis = Killed(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs"),
    );
    std::thread::sleep(Duration::from_millis(300));

    let dir = tempfile::tempdir().unwrap();
    let (local, local_url, _) = spawn_keygate(dir.path(), "in-process", upstream, "");
    let (shared, shared_url, trips) = spawn_keygate(
        dir.path(),
        "redis",
        upstream,
        &format!("[limits]\nstore = \"redis://127.0.0.1:{redis_port}/0\"\n"),
    );
    let direct_url = format!("http://{upstream}/v1/guests");

    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let targets = [
        ("upstream direct", &direct_url, None),
        ("keygate in-process", &local_url, Some(local.0.id())),
        ("keygate + redis", &shared_url, Some(shared.0.id())),
    ];
    // Rounds interleave the targets, so a neighbour's burst of CPU use hits each alike; each
    // column is the median over the rounds.
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    for _ in 0..rounds {
        for (i, (_, url, pid)) in targets.iter().enumerate() {
            let lone = wrk(url, 1, secs, pid.is_some());
            let (cpu0, rcpu0) = (pid.map(cpu_time), cpu_time(redis.0.id()));
            let busy = wrk(url, 16, secs, pid.is_some());
            let (cpu1, rcpu1) = (pid.map(cpu_time), cpu_time(redis.0.id()));
            let per_req = |d: Duration| d.as_secs_f64() * 1e6 / busy.requests as f64;
            results[i].push(Sample {
                p50_us: lone.p50_us,
                p99_us: lone.p99_us,
                rps: busy.rps,
                gw_cpu_us: cpu0.zip(cpu1).map_or(f64::NAN, |(a, b)| per_req(b - a)),
                redis_cpu_us: per_req(rcpu1 - rcpu0),
            });
        }
    }

    println!(
        "store_overhead: {rounds} rounds, {secs} s per wrk run, loopback, release build, medians"
    );
    println!(
        "{:<20} {:>9} {:>9} {:>10} {:>14} {:>14}",
        "target", "p50 (c1)", "p99 (c1)", "req/s c16", "keygate CPU", "redis CPU"
    );
    let mut medians = Vec::new();
    for ((name, _, _), samples) in targets.iter().zip(&results) {
        let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let row = Sample {
            p50_us: m(|s| s.p50_us),
            p99_us: m(|s| s.p99_us),
            rps: m(|s| s.rps),
            gw_cpu_us: m(|s| s.gw_cpu_us),
            redis_cpu_us: m(|s| s.redis_cpu_us),
        };
        let cpu = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{v:.1}µs/req")
            }
        };
        println!(
            "{name:<20} {:>7.0}µs {:>7.0}µs {:>10.0} {:>14} {:>14}",
            row.p50_us,
            row.p99_us,
            row.rps,
            cpu(row.gw_cpu_us),
            cpu(row.redis_cpu_us)
        );
        medians.push(row);
    }
    let (local_row, redis_row) = (&medians[1], &medians[2]);
    println!(
        "added by redis vs in-process: p50 {:+.0} µs, p99 {:+.0} µs, keygate CPU {:+.1} µs/req, \
         plus redis-server {:.1} µs/req",
        redis_row.p50_us - local_row.p50_us,
        redis_row.p99_us - local_row.p99_us,
        redis_row.gw_cpu_us - local_row.gw_cpu_us,
        redis_row.redis_cpu_us,
    );
    // A call past the 100 ms store timeout switches to the local limiter for a moment; such
    // requests did not pay for Redis, so say how often it happened.
    println!(
        "fallbacks from redis during the run: {}",
        trips.load(Ordering::Relaxed)
    );
    drop((local, shared, redis));
}
