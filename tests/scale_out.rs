//! Issue 7: several keygate instances share each key's limits through one Redis.
//!
//! Every test starts its own `redis-server` on a free loopback port (no persistence) and real
//! keygate processes (the binary, as operators run it), and talks to them over real sockets.
//! `.ci/run` installs redis-server when the machine lacks it.

mod common;

use common::*;
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use http::StatusCode;

const KEY: &str = "partner-key-0123456789abcdefghijklmnop";
const NEW_KEY: &str = "partner-key-rotated-zyxwvutsrqponmlkjih";
const PROBE_KEY: &str = "probe-key-0123456789abcdefghijklmnopqr";

/// A redis-server of our own on a free loopback port; killed on drop.
struct RedisServer {
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer::start_with(Vec::new())
    }

    /// Starts with `extra` arguments (TLS, ACL users, ...).
    fn start_with(extra: Vec<String>) -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            extra,
            child: None,
        };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port, with an empty dataset, and waits for PONG.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        install_redis_once();
        let bin = ["/usr/bin/redis-server", "redis-server"]
            .into_iter()
            .find(|b| !b.starts_with('/') || std::path::Path::new(b).exists())
            .unwrap();
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pong() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pong(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        // A server that wants a password answers -NOAUTH: it is up all the same.
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut buf).is_ok()
            && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
    }

    /// Sends one command (as a RESP array) and returns the first line of the answer
    /// (`+OK`, `-ERR ...`, `:1`), as redis-cli would show it.
    fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("redis-server answers");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            s.read_exact(&mut byte)
                .expect("an answer from redis-server");
            line.push(byte[0]);
        }
        String::from_utf8_lossy(&line[..line.len() - 2]).into_owned()
    }

    /// Sends `sig` (`STOP`, `CONT`) to the server, to make it hang or resume.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} redis-server");
    }

    /// SIGKILL: the dataset is gone, as after a crash without persistence.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// On a fresh machine `cargo test` installs redis-server itself (Debian's package, as root),
/// so the README's test command is all the set-up there is; with it present, nothing happens.
fn install_redis_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let present = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if present {
            return;
        }
        eprintln!("redis-server is missing: installing Debian's package for the scale-out tests");
        let ok = Command::new("sh")
            .args([
                "-c",
                "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server",
            ])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not install redis-server (apt-get install redis-server, as root)");
    });
}

/// These tests run one at a time: each drives several keygate processes and a redis-server
/// against timing (a 100 ms store timeout, a 10 s rate window), which two cores shared by the
/// whole file would blur.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A free loopback port (bind :0, read it, release it): redis-server cannot take port 0.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One keygate process with its own config file (as each instance has its own copy).
struct Instance {
    process: Process,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Instance {
    fn start(upstream: &str, rest: &str) -> Instance {
        Instance::start_with_env(upstream, rest, &[])
    }

    fn start_with_env(upstream: &str, rest: &str, envs: &[(&str, &str)]) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("gateway.toml");
        std::fs::write(&path, config_text(upstream, rest)).unwrap();
        let mut envs = envs.to_vec();
        envs.push(("RUST_LOG", "info"));
        let process = spawn_keygate(&path, &envs);
        Instance {
            process,
            path,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.process.addr)
    }

    /// Replaces the config file as editors do and waits for the reload to be logged.
    fn rewrite_config(&self, upstream: &str, rest: &str) {
        let before = self.count_logs("config reloaded");
        write_atomically(&self.path, &config_text(upstream, rest));
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.count_logs("config reloaded") == before {
            assert!(
                Instant::now() < deadline,
                "no reload: {}",
                self.process.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count_logs(&self, needle: &str) -> usize {
        self.process.logs().matches(needle).count()
    }
}

fn store_section(redis: &RedisServer, on_error: &str) -> String {
    format!(
        "[limits]\nstore = \"{}\"\non_store_error = \"{on_error}\"\n\n",
        redis.url()
    )
}

const SHARED: &str = "limits shared through the limit store";
const TRIPPED: &str = "limit store unavailable (";
const BACK: &str = "limit store answering again";

/// What a paced load saw, by status.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    limited: AtomicUsize,
    server_errors: AtomicUsize,
    other: AtomicUsize,
}

impl Tally {
    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }
    fn limited(&self) -> usize {
        self.limited.load(Ordering::SeqCst)
    }
    fn server_errors(&self) -> usize {
        self.server_errors.load(Ordering::SeqCst)
    }
    fn other(&self) -> usize {
        self.other.load(Ordering::SeqCst)
    }
}

/// `workers` clients per target URL, each sending one request per `every` with `key`, until
/// `until`; statuses are counted in `tally` as they arrive.
async fn paced_load(
    targets: Vec<String>,
    key: &'static str,
    workers: usize,
    every: Duration,
    until: tokio::time::Instant,
    tally: Arc<Tally>,
) {
    let mut set = tokio::task::JoinSet::new();
    for target in &targets {
        for _ in 0..workers {
            let (url, tally) = (target.clone(), Arc::clone(&tally));
            set.spawn(async move {
                let client = http1_client();
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                    let got = get(&client, &url, &[("x-api-key", key)]).await;
                    let counter = match got.status {
                        StatusCode::OK => &tally.ok,
                        StatusCode::TOO_MANY_REQUESTS => &tally.limited,
                        s if s.is_server_error() => &tally.server_errors,
                        _ => &tally.other,
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    }
    while set.join_next().await.is_some() {}
}

/// Sends `n` requests with `key`, alternating between the instances (and keys, when several
/// are given); returns how many were admitted.
async fn alternate(urls: &[String], keys: &[&str], n: usize) -> usize {
    let client = http1_client();
    let mut admitted = 0;
    for i in 0..n {
        let got = get(
            &client,
            &urls[i % urls.len()],
            &[("x-api-key", keys[i % keys.len()])],
        )
        .await;
        match got.status {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            s => panic!("unexpected {s}: {}", got.text()),
        }
    }
    admitted
}

/// Two instances, one Redis, one key, the load split across both for 10 s: the partner gets
/// one limit (rate × 10 s + burst, within ±5%), not one per instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_enforce_one_limit_within_5_percent() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let rest = format!(
        "{}{}",
        store_section(&redis, "local"),
        key_entry("partner", KEY, "rate = \"100/s\"\nburst = 50")
    );
    let a = Instance::start(&up.url(), &rest);
    let b = Instance::start(&up.url(), &rest);
    assert_eq!(a.count_logs(SHARED), 1, "{}", a.process.logs());
    assert_eq!(b.count_logs(SHARED), 1, "{}", b.process.logs());

    // 2 instances × 4 clients × 50 requests/s = 400 offered per second, 4× the rate.
    let tally = Arc::new(Tally::default());
    let run = Duration::from_secs(10);
    let start = tokio::time::Instant::now();
    paced_load(
        vec![a.url("/v1/guests"), b.url("/v1/guests")],
        KEY,
        4,
        Duration::from_millis(20),
        start + run,
        Arc::clone(&tally),
    )
    .await;

    let expected = 100.0 * run.as_secs_f64() + 50.0;
    let admitted = tally.ok() as f64;
    assert!(
        (admitted - expected).abs() <= expected * 0.05,
        "admitted {admitted} over 10 s across two instances, expected {expected} ± 5% \
         ({} refused with 429)",
        tally.limited()
    );
    assert!(
        tally.limited() > 1000,
        "the load should exceed the limit: {} refused",
        tally.limited()
    );
    assert_eq!(tally.server_errors() + tally.other(), 0);
    assert_eq!(
        up.hits(),
        tally.ok(),
        "only admitted requests reach the upstream"
    );
    for i in [&a, &b] {
        assert_eq!(
            i.count_logs(TRIPPED),
            0,
            "{}",
            store_lines(&i.process.logs())
        );
    }
}

/// The log lines about the limit store, for failure messages.
fn store_lines(logs: &str) -> String {
    logs.lines()
        .filter(|l| l.contains("limit store") || l.contains("limits shared"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Redis killed mid-run in "local" mode: no partner request gets a 5xx, each instance says so
/// once (not per request), and when Redis is back the limits are shared again by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_in_local_mode_has_no_5xx_and_sharing_resumes() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let mut redis = RedisServer::start();
    let rest = format!(
        "{}{}{}",
        store_section(&redis, "local"),
        key_entry("partner", KEY, "rate = \"50/s\"\nburst = 20"),
        key_entry("probe", PROBE_KEY, "rate = \"1/min\"\nburst = 10"),
    );
    let a = Instance::start(&up.url(), &rest);
    let b = Instance::start(&up.url(), &rest);
    let urls = [a.url("/v1/guests"), b.url("/v1/guests")];

    let tally = Arc::new(Tally::default());
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let load = tokio::spawn(paced_load(
        urls.to_vec(),
        KEY,
        2,
        Duration::from_millis(10),
        until,
        Arc::clone(&tally),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.kill();
    let ok_before_outage = tally.ok();
    load.await.unwrap();

    assert_eq!(tally.server_errors(), 0, "a 5xx while Redis was down");
    assert_eq!(tally.other(), 0);
    assert!(
        tally.ok() > ok_before_outage + 50,
        "requests kept being admitted during the outage ({} before, {} after)",
        ok_before_outage,
        tally.ok()
    );
    assert!(tally.limited() > 0, "the local limiters still limit");
    for i in [&a, &b] {
        assert_eq!(
            i.count_logs(TRIPPED),
            1,
            "one line per state change:\n{}",
            i.process.logs()
        );
        assert!(!i.process.logs().contains("ERROR"), "{}", i.process.logs());
    }

    redis.restart();
    for i in [&a, &b] {
        assert!(
            i.process.wait_for_log(BACK, Duration::from_secs(5)),
            "no return to Redis:\n{}",
            i.process.logs()
        );
        assert_eq!(i.count_logs(BACK), 1);
    }
    // Shared again: a burst of 10 is 10 across both instances (it would be 20 if each had
    // its own).
    assert_eq!(alternate(&urls, &[PROBE_KEY], 30).await, 10);
}

/// "deny" answers 503 limit_store_unavailable while Redis is down, and recovers on its own;
/// "allow" admits every request meanwhile, advertising no limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_mode_answers_503_and_allow_mode_admits_while_redis_is_down() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let mut redis = RedisServer::start();
    let key = key_entry("partner", KEY, "rate = \"1/min\"\nburst = 5");
    let deny = Instance::start(
        &up.url(),
        &format!("{}{key}", store_section(&redis, "deny")),
    );
    let allow = Instance::start(
        &up.url(),
        &format!("{}{key}", store_section(&redis, "allow")),
    );
    let c = http1_client();
    let hdr = [("x-api-key", KEY)];

    let got = get(&c, &deny.url("/v1/guests"), &hdr).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("ratelimit"), Some("\"default\";r=4;t=60"));

    redis.kill();
    let hits = up.hits();
    for _ in 0..3 {
        let got = get(&c, &deny.url("/v1/guests"), &hdr).await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(got.code(), "limit_store_unavailable");
    }
    // Past the burst of 5, and still admitted: the store is down and the operator chose allow.
    for _ in 0..8 {
        let got = get(&c, &allow.url("/v1/guests"), &hdr).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.header("ratelimit").is_none());
    }
    assert_eq!(up.hits(), hits + 8, "deny forwarded nothing");
    assert_eq!(deny.count_logs(TRIPPED), 1, "{}", deny.process.logs());

    redis.restart();
    let url = deny.url("/v1/guests");
    let back = eventually(Duration::from_secs(5), || {
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url, &[("x-api-key", KEY)]).await.status == StatusCode::OK }
    })
    .await;
    assert!(back, "deny mode did not return to Redis by itself");
    assert!(allow.process.wait_for_log(BACK, Duration::from_secs(5)));
    // The restarted Redis has a fresh budget, shared by both instances.
    let got = get(&c, &allow.url("/v1/guests"), &hdr).await;
    assert_eq!(got.header("ratelimit"), Some("\"default\";r=3;t=120"));
}

/// Budgets are keyed by key id: the old and the new hash of one id (a rotating key, here known
/// to one instance each) draw from one budget.
///
/// (The single-instance case, a rotation's grace, is `a_rotating_key_shares_one_redis_budget`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hashes_of_one_key_id_share_one_redis_budget() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let limit = "rate = \"1/min\"\nburst = 10";
    let old = Instance::start(
        &up.url(),
        &format!(
            "{}{}",
            store_section(&redis, "local"),
            key_entry("partner", KEY, limit)
        ),
    );
    let new = Instance::start(
        &up.url(),
        &format!(
            "{}{}",
            store_section(&redis, "local"),
            key_entry("partner", NEW_KEY, limit)
        ),
    );
    let admitted = alternate(
        &[old.url("/v1/guests"), new.url("/v1/guests")],
        &[KEY, NEW_KEY],
        30,
    )
    .await;
    assert_eq!(admitted, 10, "one budget for both hashes of the id");
}

/// A partner sees the same rate-limit fields whether one instance decides in process or the
/// shared store decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limits_answer_with_the_same_fields_as_in_process() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let key = key_entry("partner", KEY, "rate = \"1/min\"\nburst = 3");
    let local = Instance::start(&up.url(), &key);
    let shared = Instance::start(
        &up.url(),
        &format!("{}{key}", store_section(&redis, "local")),
    );
    let c = http1_client();
    let fields = |got: &Got| {
        (
            got.status,
            got.header("ratelimit-policy").map(str::to_string),
            got.header("ratelimit").map(str::to_string),
            got.header("retry-after").map(str::to_string),
        )
    };
    let mut seen = Vec::new();
    for inst in [&local, &shared] {
        let mut answers = Vec::new();
        for _ in 0..5 {
            answers.push(fields(
                &get(&c, &inst.url("/v1/guests"), &[("x-api-key", KEY)]).await,
            ));
        }
        seen.push(answers);
    }
    assert_eq!(seen[0], seen[1], "in process vs Redis");
    let policy = Some("\"default\";q=3;w=180".to_string());
    assert_eq!(
        seen[1][2],
        (
            StatusCode::OK,
            policy.clone(),
            Some("\"default\";r=0;t=180".into()),
            None
        )
    );
    assert_eq!(
        seen[1][3],
        (
            StatusCode::TOO_MANY_REQUESTS,
            policy,
            Some("\"default\";r=0;t=60".into()),
            Some("60".into())
        )
    );

    // A quota's `t` is the exact time until it is whole again, in both: 3/h is one request
    // back every 1,200 s; two taken 1.2 s apart leave 2,398.8 s of it in use, t=2399 (2400
    // when Redis counted it from the whole requests remaining).
    let key = key_entry(
        "quota",
        PROBE_KEY,
        "rate = \"100/s\"\nburst = 100\nquota = \"3/h\"",
    );
    let local = Instance::start(&up.url(), &key);
    let shared = Instance::start(
        &up.url(),
        &format!("{}{key}", store_section(&redis, "local")),
    );
    let mut seen = Vec::new();
    for inst in [&local, &shared] {
        let url = inst.url("/v1/guests");
        let first = get(&c, &url, &[("x-api-key", PROBE_KEY)]).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let second = get(&c, &url, &[("x-api-key", PROBE_KEY)]).await;
        seen.push([first, second].map(|g| g.header("ratelimit").map(str::to_string)));
    }
    // The second answer's `t` is 2399 while the two requests reach the gateway less than 2 s
    // apart; a loaded machine may stretch that, so 2397-2399 (never the 2400 of whole
    // requests), and the two instances are compared without it.
    let split = |answer: &Option<String>| {
        let text = answer.as_deref().unwrap_or_default();
        let (rest, t) = text.rsplit_once(";t=").unwrap_or((text, ""));
        (rest.to_string(), t.parse::<u32>().unwrap_or(0))
    };
    assert_eq!(seen[0][0], seen[1][0], "in process vs Redis, first answer");
    let (local_second, local_t) = split(&seen[0][1]);
    let (shared_second, shared_t) = split(&seen[1][1]);
    assert_eq!(
        local_second, shared_second,
        "in process vs Redis, second answer"
    );
    assert!(shared_second.ends_with("\"quota\";r=1"), "{shared_second}");
    for t in [local_t, shared_t] {
        assert!((2397..=2399).contains(&t), "{seen:?}");
    }
}

/// An instance started while Redis is unreachable serves with its own limiter and switches to
/// the shared budget by itself when Redis comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_before_redis_switches_over_when_it_answers() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let mut redis = RedisServer::start();
    redis.kill();
    let rest = format!(
        "{}{}",
        store_section(&redis, "local"),
        key_entry("partner", KEY, "rate = \"1/min\"\nburst = 4")
    );
    let a = Instance::start(&up.url(), &rest);
    assert!(
        a.process.logs().contains("unavailable at start-up"),
        "{}",
        a.process.logs()
    );
    let c = http1_client();
    let got = get(&c, &a.url("/v1/guests"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK, "served from the local limiter");

    redis.restart();
    assert!(
        a.process.wait_for_log(BACK, Duration::from_secs(5)),
        "{}",
        a.process.logs()
    );
    let b = Instance::start(&up.url(), &rest);
    assert_eq!(
        alternate(&[a.url("/v1/guests"), b.url("/v1/guests")], &[KEY], 12).await,
        4
    );
}

/// A relay on 127.0.0.1 in front of `port` that holds each of Redis's answers back for the
/// current `delay_ms` (a slow link or an overloaded Redis that still answers). Returns its URL.
async fn slow_relay(port: u16, delay_ms: Arc<AtomicUsize>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}/0", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let delay_ms = Arc::clone(&delay_ms);
            let (mut client_rd, mut client_wr) = client.into_split();
            let (mut server_rd, mut server_wr) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = server_rd.read(&mut buf).await {
                    let ms = delay_ms.load(Ordering::SeqCst) as u64;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    if client_wr.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    url
}

/// A Redis that answers, but slower than requests wait (300 ms against 100): the instance
/// trips to the fallback once and stays there (its probe wants the script run within the
/// request path's deadline), instead of being taken back and tripping again every few hundred
/// milliseconds; it returns once the store is fast again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_trips_once_and_the_instance_stays_in_fallback() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let delay_ms = Arc::new(AtomicUsize::new(0));
    let relay = slow_relay(redis.port, Arc::clone(&delay_ms)).await;
    let a = Instance::start(
        &up.url(),
        &format!(
            "[limits]\nstore = \"{relay}\"\non_store_error = \"local\"\n\n{}",
            key_entry("partner", KEY, "rate = \"100/s\"\nburst = 100")
        ),
    );
    assert!(a.process.logs().contains(SHARED), "{}", a.process.logs());
    let c = http1_client();
    let url = a.url("/v1/guests");

    delay_ms.store(300, Ordering::SeqCst);
    for _ in 0..30 {
        assert_eq!(
            get(&c, &url, &[("x-api-key", KEY)]).await.status,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = store_lines(&a.process.logs());
    assert_eq!(a.count_logs(TRIPPED), 1, "{logs}");
    assert_eq!(a.count_logs(BACK), 0, "{logs}");

    delay_ms.store(0, Ordering::SeqCst);
    assert!(
        a.process.wait_for_log(BACK, Duration::from_secs(5)),
        "{}",
        store_lines(&a.process.logs())
    );
    assert_eq!(
        get(&c, &url, &[("x-api-key", KEY)]).await.status,
        StatusCode::OK
    );
    assert_eq!(a.count_logs(TRIPPED), 1);
}

/// The current `keygate_limit_store_mode` of the instance (the mode whose gauge reads 1), from
/// its admin listener's /metrics.
async fn store_mode(inst: &Instance) -> String {
    let url = format!("http://{}/metrics", inst.process.admin_addr());
    let m = get(&http1_client(), &url, &[]).await.text();
    let on: Vec<&str> = ["in_process", "shared", "fallback"]
        .into_iter()
        .filter(|mode| {
            sample(&m, &format!("keygate_limit_store_mode{{mode=\"{mode}\"}}")) == Some(1.0)
        })
        .collect();
    assert_eq!(on.len(), 1, "one mode at a time:\n{m}");
    on[0].to_string()
}

/// A Redis that answers PING (and SCRIPT LOAD) but refuses writes, as a read-only replica after
/// a failover, `maxmemory` with `noeviction`, or a read-only ACL user do (here
/// `min-replicas-to-write 1` with no replica: NOREPLICAS on every write): the instance trips to
/// the fallback once and stays there under steady traffic, instead of being taken back by a
/// probe that only pinged and tripping again a few times a second; once writes are accepted
/// again it returns to the shared budget by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_answers_ping_but_refuses_writes_trips_once_and_stays_in_fallback() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let a = Instance::start(
        &up.url(),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}{}",
            store_section(&redis, "local"),
            key_entry("partner", KEY, "rate = \"100/s\"\nburst = 100")
        ),
    );
    assert_eq!(
        a.count_logs(SHARED),
        1,
        "{}",
        store_lines(&a.process.logs())
    );
    assert_eq!(store_mode(&a).await, "shared");
    let c = http1_client();
    let url = a.url("/v1/guests");
    assert_eq!(
        get(&c, &url, &[("x-api-key", KEY)]).await.status,
        StatusCode::OK
    );

    assert_eq!(
        redis.command(&["CONFIG", "SET", "min-replicas-to-write", "1"]),
        "+OK"
    );
    assert_eq!(redis.command(&["PING"]), "+PONG", "still answers PING");
    // Steady traffic for 3 s (a request every 50 ms), reading the mode before each request
    // once the first one has tripped (a probe that took the store back shows there).
    let mut modes = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if a.count_logs(TRIPPED) > 0 {
            modes.push(store_mode(&a).await);
        }
        let got = get(&c, &url, &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK, "served by the local limiter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = store_lines(&a.process.logs());
    assert_eq!(a.count_logs(TRIPPED), 1, "one trip, not a flap:\n{logs}");
    assert!(logs.contains("NOREPLICAS"), "{logs}");
    assert_eq!(
        a.count_logs(BACK),
        0,
        "taken back while writes fail:\n{logs}"
    );
    assert!(!modes.is_empty());
    assert!(
        modes.iter().all(|m| m == "fallback"),
        "the mode left fallback while writes failed: {modes:?}\n{logs}"
    );
    assert_eq!(store_mode(&a).await, "fallback");

    assert_eq!(
        redis.command(&["CONFIG", "SET", "min-replicas-to-write", "0"]),
        "+OK"
    );
    assert!(
        a.process.wait_for_log(BACK, Duration::from_secs(5)),
        "{}",
        store_lines(&a.process.logs())
    );
    assert_eq!(store_mode(&a).await, "shared");
    let got = get(&c, &url, &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(store_mode(&a).await, "shared", "and it stays shared");
    assert_eq!(
        a.count_logs(TRIPPED),
        1,
        "{}",
        store_lines(&a.process.logs())
    );
    assert_eq!(a.count_logs(BACK), 1);
}

/// A Redis that hangs (no error, no answer) costs a request at most the store timeout; then the
/// instance stops waiting for it, and returns to it once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_at_most_the_timeout_then_nothing() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let a = Instance::start(
        &up.url(),
        &format!(
            "{}{}",
            store_section(&redis, "local"),
            key_entry("partner", KEY, "rate = \"100/s\"\nburst = 100")
        ),
    );
    let c = http1_client();
    let url = a.url("/v1/guests");
    assert_eq!(
        get(&c, &url, &[("x-api-key", KEY)]).await.status,
        StatusCode::OK
    );

    redis.signal("STOP");
    let started = Instant::now();
    let got = get(&c, &url, &[("x-api-key", KEY)]).await;
    let first = started.elapsed();
    assert_eq!(got.status, StatusCode::OK, "answered by the local limiter");
    assert!(
        first < Duration::from_secs(1),
        "waited {first:?} for a hung Redis"
    );
    assert!(
        a.process
            .wait_for_log("no answer within 100ms", Duration::from_secs(2)),
        "{}",
        store_lines(&a.process.logs())
    );
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(
            get(&c, &url, &[("x-api-key", KEY)]).await.status,
            StatusCode::OK
        );
    }
    // Twenty waits for the 100 ms timeout would take 2 s.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "20 requests in fallback took {:?}: they still wait for Redis",
        started.elapsed()
    );

    redis.signal("CONT");
    assert!(
        a.process.wait_for_log(BACK, Duration::from_secs(5)),
        "{}",
        store_lines(&a.process.logs())
    );
    assert_eq!(
        a.count_logs(TRIPPED),
        1,
        "{}",
        store_lines(&a.process.logs())
    );
}

/// `rediss://user:password@`: TLS verified against the roots keygate trusts (here a certificate
/// made by the test, given as SSL_CERT_FILE), an ACL user, one shared budget, and no password in
/// any log line, also when the password is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_user_and_password_shares_limits_and_never_logs_the_password() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let certs = tempfile::tempdir().unwrap();
    let cert = make_cert();
    let (cert_file, key_file) = (
        certs.path().join("redis.crt"),
        certs.path().join("redis.key"),
    );
    std::fs::write(&cert_file, &cert.cert_pem).unwrap();
    std::fs::write(&key_file, &cert.key_pem).unwrap();
    let tls_port = free_port();
    let args = [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        cert_file.to_str().unwrap(),
        "--tls-key-file",
        key_file.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
        "--user",
        "default",
        "off",
        "--user",
        "keygate",
        "on",
        ">s3cret-pw",
        "~keygate:*",
        "+@all",
    ];
    let _redis = RedisServer::start_with(args.iter().map(|a| a.to_string()).collect());
    let section = |password: &str| {
        format!(
            "[limits]\nstore = \"rediss://keygate:{password}@127.0.0.1:{tls_port}/0\"\n\n{}",
            key_entry("partner", KEY, "rate = \"1/min\"\nburst = 6")
        )
    };
    let env = [("SSL_CERT_FILE", cert_file.to_str().unwrap())];
    let a = Instance::start_with_env(&up.url(), &section("s3cret-pw"), &env);
    let b = Instance::start_with_env(&up.url(), &section("s3cret-pw"), &env);
    let wrong = Instance::start_with_env(&up.url(), &section("wrong-pw"), &env);
    for i in [&a, &b] {
        assert_eq!(
            i.count_logs(SHARED),
            1,
            "{}",
            store_lines(&i.process.logs())
        );
        assert!(i
            .process
            .logs()
            .contains(&format!("rediss://keygate:***@127.0.0.1:{tls_port}/0")));
    }
    assert!(
        wrong.process.logs().contains("unavailable at start-up"),
        "{}",
        store_lines(&wrong.process.logs())
    );
    assert_eq!(
        alternate(&[a.url("/v1/guests"), b.url("/v1/guests")], &[KEY], 12).await,
        6
    );
    for i in [&a, &b, &wrong] {
        let logs = i.process.logs();
        assert!(
            !logs.contains("s3cret-pw") && !logs.contains("wrong-pw"),
            "{logs}"
        );
    }
}

/// A reload neither refills nor forgets a shared budget, and revoking the key refuses it at
/// once, as with in-process limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_the_shared_budget_and_revocation_still_refuses() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let limit = "rate = \"1/min\"\nburst = 3";
    let store = store_section(&redis, "local");
    let rest = format!("{store}{}", key_entry("partner", KEY, limit));
    let a = Instance::start(&up.url(), &rest);
    let b = Instance::start(&up.url(), &rest);
    let urls = [a.url("/v1/guests"), b.url("/v1/guests")];
    assert_eq!(alternate(&urls, &[KEY], 5).await, 3);

    // Another key added on both: the spent budget stays spent.
    let rest = format!(
        "{store}{}{}",
        key_entry("partner", KEY, limit),
        key_entry("other", PROBE_KEY, limit)
    );
    a.rewrite_config(&up.url(), &rest);
    b.rewrite_config(&up.url(), &rest);
    assert_eq!(alternate(&urls, &[KEY], 4).await, 0);
    assert_eq!(alternate(&urls, &[PROBE_KEY], 4).await, 3);

    // Revoked on one instance: refused there at once, whatever the budget.
    a.rewrite_config(
        &up.url(),
        &format!(
            "{store}{}",
            key_entry("partner", KEY, &format!("{limit}\ndisabled = true"))
        ),
    );
    let got = get(&http1_client(), &urls[0], &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_eq!(got.code(), "invalid_api_key");
}

/// Rotation (issue 3) with a shared store: during the grace, the old and the new key of one
/// entry draw from one Redis budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotating_key_shares_one_redis_budget() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let old_hash = keygate::keys::KeyHash::of(KEY.as_bytes()).to_config_string();
    let entry = key_entry(
        "partner",
        NEW_KEY,
        &format!(
            "rate = \"1/min\"\nburst = 10\nprevious_hash = \"{old_hash}\"\nprevious_expires = 2999-01-01T00:00:00Z"
        ),
    );
    let inst = Instance::start(
        &up.url(),
        &format!("{}{entry}", store_section(&redis, "local")),
    );
    let url = inst.url("/v1/guests");
    let admitted = alternate(&[url.clone(), url], &[KEY, NEW_KEY], 30).await;
    assert_eq!(admitted, 10, "one budget for the old and the new key");
    assert!(
        inst.process.logs().contains(SHARED),
        "{}",
        inst.process.logs()
    );
}

/// The quota (issue 3) lives in Redis too: two instances share it, a quota refusal is 429
/// quota_exceeded, and a request the rate refuses is not charged to the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_is_shared_through_redis_and_never_double_charged() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let quota_remaining = |got: &Got| -> Option<u32> {
        let field = got.header("ratelimit")?;
        let item = field.split(", ").find(|i| i.starts_with("\"quota\""))?;
        item.split(';')
            .find_map(|p| p.strip_prefix("r=")?.parse().ok())
    };

    // Shared: 6 per hour across both instances, whatever the rate allows.
    let entry = key_entry(
        "partner",
        KEY,
        "rate = \"100/s\"\nburst = 100\nquota = \"6/h\"",
    );
    let rest = format!("{}{entry}", store_section(&redis, "local"));
    let a = Instance::start(&up.url(), &rest);
    let b = Instance::start(&up.url(), &rest);
    let c = http1_client();
    let mut admitted = 0;
    let mut codes = Vec::new();
    for i in 0..12 {
        let inst = if i % 2 == 0 { &a } else { &b };
        let got = get(&c, &inst.url("/v1/guests"), &[("x-api-key", KEY)]).await;
        if got.status == StatusCode::OK {
            admitted += 1;
        } else {
            assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS);
            assert!(got.header("retry-after").is_some());
            codes.push(got.code());
        }
    }
    assert_eq!(admitted, 6, "one quota for both instances");
    assert!(codes.iter().all(|c| c == "quota_exceeded"), "{codes:?}");

    // Not double charged: rate 1/s burst 1 beside a quota of 5/h.
    let entry = key_entry(
        "tight",
        NEW_KEY,
        "rate = \"1/s\"\nburst = 1\nquota = \"5/h\"",
    );
    let inst = Instance::start(
        &up.url(),
        &format!("{}{entry}", store_section(&redis, "local")),
    );
    let url = inst.url("/v1/guests");
    let first = get(&c, &url, &[("x-api-key", NEW_KEY)]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        quota_remaining(&first),
        Some(4),
        "{:?}",
        first.header("ratelimit")
    );
    for _ in 0..4 {
        let got = get(&c, &url, &[("x-api-key", NEW_KEY)]).await;
        assert_eq!(got.code(), "rate_limited");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = get(&c, &url, &[("x-api-key", NEW_KEY)]).await;
    assert_eq!(later.status, StatusCode::OK);
    assert_eq!(
        quota_remaining(&later),
        Some(3),
        "rate refusals were charged to the quota: {:?}",
        later.header("ratelimit")
    );
}

/// Redis's clock stepped back (or a failover landed on a replica whose clock is behind): the
/// budgets Redis holds are points in time (`keygate:<id>:rate` and `:quota` hold a theoretical
/// arrival time in microseconds since the epoch, per Redis's `TIME`), so they read as a day in
/// the future. Simulated by writing such states directly. A refusal then lasts no longer than
/// the limit's own window, and the key is admitted again once the Retry-After it was given has
/// passed; not refused for the size of the step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_clock_step_back_refuses_no_longer_than_the_limits_window() {
    let _serial = serial().await;
    let up = start_upstream().await;
    let redis = RedisServer::start();
    let a = Instance::start(
        &up.url(),
        &format!(
            "{}{}{}",
            store_section(&redis, "local"),
            // Window: burst 3 × 1 s.
            key_entry("partner", KEY, "rate = \"1/s\"\nburst = 3"),
            // Window: the hour; one request back every second.
            key_entry(
                "quota",
                PROBE_KEY,
                "rate = \"100/s\"\nburst = 100\nquota = \"3600/h\""
            ),
        ),
    );
    assert!(a.process.logs().contains(SHARED), "{}", a.process.logs());
    let day_us = 86_400_000_000u128;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    for key in ["keygate:partner:rate", "keygate:quota:quota"] {
        let state = (now_us + day_us).to_string();
        assert_eq!(
            redis.command(&["SET", key, &state, "PX", "172800000"]),
            "+OK"
        );
    }

    let c = http1_client();
    let url = a.url("/v1/guests");
    for (key, code, window) in [
        (KEY, "rate_limited", 3u64),
        (PROBE_KEY, "quota_exceeded", 3600),
    ] {
        let got = get(&c, &url, &[("x-api-key", key)]).await;
        let retry_after: u64 = got
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // The stored state is read as a budget spent whole now: refused, for one t.
        assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS, "{code}");
        {
            assert_eq!(got.code(), code);
            assert!(
                retry_after <= window,
                "{code}: Retry-After {retry_after} s after a clock step of a day, longer than \
                 the limit's {window} s window"
            );
            // Waiting what it was told is enough (not refused again and again).
            assert!(retry_after <= 10, "{code}: Retry-After {retry_after} s");
            tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(500)).await;
            let again = get(&c, &url, &[("x-api-key", key)]).await;
            assert_eq!(
                again.status,
                StatusCode::OK,
                "{code}: refused again after waiting its Retry-After of {retry_after} s: {:?}",
                again.header("retry-after")
            );
        }
    }
    assert!(a.process.logs().contains(SHARED));
    assert_eq!(
        a.count_logs(TRIPPED),
        0,
        "{}",
        store_lines(&a.process.logs())
    );
}
