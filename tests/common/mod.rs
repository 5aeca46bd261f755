//! Shared test helpers: a real upstream, real gateways, real clients, certificates made here.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use keygate::{config::Config, keys::KeyHash, server::Gateway};
use tokio::net::TcpListener;

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body_len: u64,
}

/// A real HTTP upstream (HTTP/1.1 and h2c) recording what reaches it.
///
/// Routes: `/slow?ms=N` waits N ms before answering; `/download?bytes=N` streams N bytes;
/// `/abort?bytes=N` promises 2N bytes, sends N and closes; anything else reads the whole body
/// (counting, not storing) and answers 200 JSON `{"bytes":N}`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted so far.
    pub conns: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Stops accepting (the port is closed): later connects are refused.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type TestBody = BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).boxed()
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

/// A body of `total` bytes streamed in 64 KiB chunks, never held whole.
pub fn stream_body(total: u64) -> TestBody {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(chunk.len() as u64);
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..n as usize))),
                left - n,
            ))
        }
    });
    StreamBody::new(stream).boxed()
}

fn query_num(uri: &http::Uri, name: &str) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

async fn upstream_service(
    req: Request<Incoming>,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<TestBody>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if path.ends_with("/slow") {
        let ms = query_num(&parts.uri, "ms").unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if path.ends_with("/download") {
        let n = query_num(&parts.uri, "bytes").unwrap_or(0);
        record(&seen, &parts, 0);
        let mut resp = Response::new(stream_body(n));
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, n.into());
        return Ok(resp);
    }
    if path.ends_with("/abort") {
        let n = query_num(&parts.uri, "bytes").unwrap_or(1024);
        record(&seen, &parts, 0);
        let chunk = Bytes::from(vec![b'y'; n as usize]);
        let stream = futures_util::stream::iter(vec![
            Ok::<_, std::io::Error>(Frame::data(chunk)),
            Err(std::io::Error::other("upstream died mid-body")),
        ]);
        let body = StreamBody::new(stream).map_err(|_| unreachable!()).boxed();
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, (2 * n).into());
        return Ok(resp);
    }
    // Count the body without keeping it.
    let mut body = body;
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    len += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    record(&seen, &parts, len);
    let mut resp = Response::new(full(format!(
        "{{\"bytes\":{len},\"path\":{:?}}}",
        parts.uri.path()
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn record(seen: &Mutex<Vec<Seen>>, parts: &http::request::Parts, body_len: u64) {
    let mut seen = seen.lock().unwrap();
    if seen.len() > 1000 {
        seen.clear();
    }
    seen.push(Seen {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        body_len,
    });
}

pub async fn start_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_upstream_on(listener).await
}

pub async fn start_upstream_on(listener: TcpListener) -> Upstream {
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let conns = Arc::new(AtomicUsize::new(0));
    let (h, s, c) = (hits.clone(), seen.clone(), conns.clone());
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (h, s) = (h.clone(), s.clone());
            conns.spawn(async move {
                let svc = service_fn(move |req| upstream_service(req, h.clone(), s.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        hits,
        conns,
        seen,
        task,
    }
}

/// A key table entry for `key`, with extra TOML lines.
pub fn key_entry(id: &str, key: &str, extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nhash = \"{}\"\n{extra}\n",
        KeyHash::of(key.as_bytes()).to_config_string()
    )
}

/// A complete config: listen on port 0, the given upstream, then `rest` (sections, keys).
pub fn config_text(upstream: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[upstream]\nurl = \"{upstream}\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\n\n{rest}"
    )
}

/// A gateway running in this process with its config in a temporary directory.
pub struct TestGateway {
    pub gateway: Gateway,
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TestGateway {
    pub fn addr(&self) -> SocketAddr {
        self.gateway.local_addr()
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }
    /// The gateway's metrics, as `/metrics` shows them (read with [`sample`]).
    pub fn metrics(&self) -> String {
        let shared = self.gateway.shared();
        shared
            .metrics
            .encode(&shared.live.load().table, shared.limits.mode())
    }

    /// Replaces the config file the way editors do: write a temp file, rename over.
    pub fn rewrite_config(&self, text: &str) {
        write_atomically(&self.path, text);
    }
}

pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-edit");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes `text` as gateway.toml in a fresh directory and starts a gateway on it.
pub async fn start_gateway(text: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    start_gateway_in(dir, path).await
}

pub async fn start_gateway_in(dir: tempfile::TempDir, path: PathBuf) -> TestGateway {
    let config = Config::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    let gateway = Gateway::start(config).await.unwrap();
    TestGateway { gateway, dir, path }
}

/// A self-signed certificate for localhost/127.0.0.1, made here.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
}

pub fn make_cert() -> TestCert {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    TestCert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
        cert_der: ck.cert.der().to_vec(),
    }
}

/// Like [`make_cert`], valid for 400 days up to `not_after` (whole seconds);
/// returns it with `not_after` as Unix seconds.
pub fn make_cert_until(not_after: std::time::SystemTime) -> (TestCert, i64) {
    let secs = not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
    params.not_before = params.not_after - time::Duration::days(400);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let made = TestCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
    };
    (made, secs)
}

impl TestCert {
    /// Writes gateway.crt/gateway.key into `dir`; returns the TOML lines naming them.
    pub fn write_into(&self, dir: &Path) -> String {
        std::fs::write(dir.join("gateway.crt"), &self.cert_pem).unwrap();
        std::fs::write(dir.join("gateway.key"), &self.key_pem).unwrap();
        "tls_cert = \"gateway.crt\"\ntls_key = \"gateway.key\"\n".to_string()
    }

    /// A root store holding only this certificate.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from(
                self.cert_der.clone(),
            ))
            .unwrap();
        roots
    }

    /// A client config trusting only this certificate, with `provider`'s suites, `version` only.
    pub fn client_config(
        &self,
        provider: rustls::crypto::CryptoProvider,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(self.roots())
            .with_no_client_auth()
    }
}

pub type PlainClient = Client<HttpConnector, TestBody>;
pub type TlsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, TestBody>;

/// A plain HTTP/1.1 client (keep-alive pool).
pub fn http1_client() -> PlainClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A plain-text HTTP/2 client (prior knowledge, h2c).
pub fn h2c_client() -> PlainClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A TLS client trusting only `cert`; HTTP/2 only when `h2`, else HTTP/1.1 only.
pub fn tls_client(cert: &TestCert, h2: bool) -> TlsClient {
    keygate::tls::install_crypto_provider();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(cert.roots())
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let mut b = Client::builder(TokioExecutor::new());
    if h2 {
        b.http2_only(true);
    }
    b.build(connector)
}

/// What a client got back.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
    /// The `error` code of a gateway JSON refusal.
    pub fn code(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Sends a request with `headers` and `body`, reads the whole answer.
pub async fn send<C>(
    client: &Client<C, TestBody>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> Got
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(body).unwrap())
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e:?}"));
    let version = resp.version();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("whole body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
        version,
    }
}

/// GET `url` with `headers`.
pub async fn get<C>(client: &Client<C, TestBody>, url: &str, headers: &[(&str, &str)]) -> Got
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    send(client, Method::GET, url, headers, empty()).await
}

/// The keygate binary running as its own process, its stderr collected.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub logs: Arc<Mutex<String>>,
}

impl Process {
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
    /// Waits for a log line containing `needle`, up to `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn keygate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keygate")
}

/// Starts `keygate run --config path` at `RUST_LOG=trace` (unless `envs` sets it) with `envs`;
/// waits for the "listening on" line.
pub fn spawn_keygate(path: &Path, envs: &[(&str, &str)]) -> Process {
    spawn(path, Some("trace"), envs)
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first socket address printed after `marker` in `logs` (text or json lines), skipping a
/// `scheme://` in front of it.
pub fn addr_after(logs: &str, marker: &str) -> Option<SocketAddr> {
    logs.lines().find_map(|line| {
        let rest = line.split(marker).nth(1)?;
        let rest = rest.split("://").nth(1).unwrap_or(rest);
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
            .collect();
        addr.parse().ok()
    })
}

/// Like [`spawn_keygate`], but `RUST_LOG` is left unset unless `envs` sets it.
pub fn spawn_keygate_plain_env(path: &Path, envs: &[(&str, &str)]) -> Process {
    spawn(path, None, envs)
}

/// The binary with `rust_log` (or none), then `envs`; its stderr collected; the listen address
/// read from its start-up line, in text or json logs.
fn spawn(path: &Path, rust_log: Option<&str>, envs: &[(&str, &str)]) -> Process {
    let mut cmd = Command::new(keygate_bin());
    cmd.args(["run", "--config"])
        .arg(path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(level) = rust_log {
        cmd.env("RUST_LOG", level);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn keygate");
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(String::new()));
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let addr = loop {
        if let Some(addr) = addr_after(&logs.lock().unwrap(), "listening on ") {
            break addr;
        }
        if std::time::Instant::now() > deadline {
            panic!("keygate did not start; logs:\n{}", logs.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Process { child, addr, logs }
}

impl Process {
    /// The admin listener's address, from its start-up line.
    pub fn admin_addr(&self) -> SocketAddr {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(addr) = addr_after(
                &self.logs(),
                "admin endpoints (/healthz /readyz /metrics) on ",
            ) {
                return addr;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no admin line in the logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The value of the exposition sample `series` (name and labels exactly as exposed).
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// Deterministic bytes that are not all alike (xorshift), so a dropped, repeated or reordered
/// piece shows.
pub fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}
