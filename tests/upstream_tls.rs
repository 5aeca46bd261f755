//! The `https://` upstream, end to end: a TLS upstream on 127.0.0.1 whose certificate (for the
//! IP address 127.0.0.1) comes from a CA made here, and keygate pointed at it with
//! `[upstream] ca_file` naming that CA. Each test asserts what a partner sees through keygate
//! (status, headers, body bytes, trailers, keygate's JSON refusals), what reaches the upstream,
//! and how many TLS connections the upstream accepted.
//!
//! Two upstreams: hyper behind tokio-rustls (ALPN `http/1.1`) for ordinary traffic, and a raw
//! scripted one over the same TLS for what hyper will not do on request: a response with
//! trailers (hyper's server sends trailers only to a request with `TE: trailers`, a hop-by-hop
//! field keygate does not forward), and closing an idle connection with `close_notify` at a
//! moment the test chooses.
//!
//! keygate's log lines are read from a process-wide tracing subscriber that this test binary
//! installs once; a test finds its own lines by the request id it sent.

mod common;

use std::{
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, Once,
    },
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

const KEY: &str = "partner-key-0123456789abcdefghijklmnop";

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A certificate authority made here.
struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn make_ca(name: &str) -> Ca {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        der: cert.der().clone(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// A server certificate and its key.
struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Ca {
    /// A server certificate for `san` (an IP address or a DNS name) signed by this CA.
    fn leaf(&self, san: &str) -> Leaf {
        let params = rcgen::CertificateParams::new(vec![san.to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain: vec![cert.der().clone(), self.der.clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }
}

/// A client certificate (for TLS client authentication) and its key, as PEM text.
struct ClientLeaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    /// A client certificate for the subject `cn`, signed by this CA.
    fn client_leaf(&self, cn: &str) -> ClientLeaf {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ClientLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// The upstream's rustls config: `leaf`, ALPN `http/1.1` only, no client certificate asked.
fn server_tls(leaf: Leaf) -> TlsAcceptor {
    server_tls_for(leaf, None)
}

/// The upstream's rustls config: `leaf`, ALPN `http/1.1` only; with `clients`, every client
/// must show a certificate that CA signed (mutual TLS).
fn server_tls_for(leaf: Leaf, clients: Option<&Ca>) -> TlsAcceptor {
    keygate::tls::install_crypto_provider();
    let builder = rustls::ServerConfig::builder();
    let builder = match clients {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(leaf.chain, leaf.key).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// keygate's log lines
// ---------------------------------------------------------------------------------------------

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogSink;

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the process-wide subscriber that collects every test's log lines (once).
fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| LogSink)
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

/// The log lines that mention `needle` (a request id this test sent).
fn log_lines(needle: &str) -> Vec<String> {
    logs()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The TLS upstream
// ---------------------------------------------------------------------------------------------

/// A request as the upstream read it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which TLS connection (1-based) carried it.
    conn: usize,
    method: Method,
    /// Path and query.
    target: String,
    headers: HeaderMap,
}

/// How an upstream serves each TLS connection.
#[derive(Clone)]
enum Serve {
    /// hyper's HTTP/1.1 server with [`hyper_service`].
    Hyper,
    /// Reads request heads (and Content-Length bodies), writes `answer(target)` for each;
    /// closes the connection when told to ([`TlsUpstream::close_idle`]), or right behind the
    /// answer to a target ending in `/then-close-notify`.
    Raw(Arc<Answer>),
}

/// The raw upstream's answer (whole response bytes) to a request target.
type Answer = dyn Fn(&str) -> Vec<u8> + Send + Sync;

/// How the raw upstream closes an idle connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// Not told to yet.
    No,
    /// `close_notify`, then the TCP connection is shut and closed.
    NotifyAndFin,
    /// `close_notify` only; the TCP connection stays open until keygate closes it.
    NotifyOnly,
}

struct TlsUpstream {
    addr: SocketAddr,
    /// TCP connections accepted.
    accepts: Arc<AtomicUsize>,
    /// TLS handshakes completed.
    handshakes: Arc<AtomicUsize>,
    /// The ALPN protocol of each completed handshake.
    alpn: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    /// The certificate (DER) the client showed in each completed handshake, if any.
    client_certs: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections the raw upstream closed on [`close_idle`](Self::close_idle).
    closed: Arc<AtomicUsize>,
    close: watch::Sender<Close>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn client_certs(&self) -> Vec<Option<Vec<u8>>> {
        self.client_certs.lock().unwrap().clone()
    }
    fn last(&self) -> Seen {
        self.seen().pop().expect("the upstream saw a request")
    }
    /// Makes the raw upstream close every connection it holds (all are idle between the
    /// test's requests) the `how` way, and waits until it has.
    async fn close_idle(&self, how: Close) {
        let before = self.closed.load(Ordering::SeqCst);
        let open = self.handshakes() - before;
        self.close.send_replace(how);
        let closed = eventually(Duration::from_secs(5), || async {
            self.closed.load(Ordering::SeqCst) == before + open
        })
        .await;
        assert!(closed, "the upstream did not close its connections");
        self.close.send_replace(Close::No);
        // Time for the close_notify (and the FIN) to reach keygate's socket and for its runtime
        // to see the socket readable; a close that crosses a request on its way is the
        // keep-alive race the retry of idempotent requests is for, not what this checks.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_upstream(acceptor: TlsAcceptor, serve: Serve) -> TlsUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let alpn = Arc::new(Mutex::new(Vec::new()));
    let client_certs = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let closed = Arc::new(AtomicUsize::new(0));
    let (close, _) = watch::channel(Close::No);
    let (a, h, al, cc, s, c, cl) = (
        accepts.clone(),
        handshakes.clone(),
        alpn.clone(),
        client_certs.clone(),
        seen.clone(),
        closed.clone(),
        close.clone(),
    );
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            a.fetch_add(1, Ordering::SeqCst);
            // As servers do: without it, a small record written right behind another waits for
            // the first one's ACK (Nagle).
            tcp.set_nodelay(true).unwrap();
            let (acceptor, h, al, cc, s, c, serve) = (
                acceptor.clone(),
                h.clone(),
                al.clone(),
                cc.clone(),
                s.clone(),
                c.clone(),
                serve.clone(),
            );
            let close = cl.subscribe();
            conns.spawn(async move {
                // A failed handshake (keygate refusing the certificate) ends the connection.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let conn = h.fetch_add(1, Ordering::SeqCst) + 1;
                let session = tls.get_ref().1;
                al.lock()
                    .unwrap()
                    .push(session.alpn_protocol().map(<[u8]>::to_vec));
                let shown = session.peer_certificates().and_then(|c| c.first());
                cc.lock().unwrap().push(shown.map(|c| c.to_vec()));
                match serve {
                    Serve::Hyper => {
                        let svc = service_fn(move |req| hyper_service(req, conn, s.clone()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    }
                    Serve::Raw(answer) => serve_raw(tls, conn, &*answer, &s, close, &c).await,
                }
            });
        }
    });
    TlsUpstream {
        addr,
        accepts,
        handshakes,
        alpn,
        client_certs,
        seen,
        closed,
        close,
        task,
    }
}

type UpBody = BoxBody<Bytes, hyper::Error>;

fn up_full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn query_num(uri: &http::Uri, name: &str) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Routes: `/upload` reads the body and answers `{"bytes":N,"blake3":"<hex>"}`;
/// `/download?bytes=N&seed=S` streams `pattern(N, S)` chunked (no length); `/echo` answers with
/// the request body as it streams in; `/status?code=N` answers N; anything else reads the body
/// and answers 200 JSON naming the path and the connection, with `x-upstream: tls`.
async fn hyper_service(
    req: Request<Incoming>,
    conn: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<UpBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    seen.lock().unwrap().push(Seen {
        conn,
        method: parts.method.clone(),
        target: target.clone(),
        headers: parts.headers.clone(),
    });
    let path = parts.uri.path();
    if path.ends_with("/echo") {
        return Ok(Response::new(body.boxed()));
    }
    if path.ends_with("/download") {
        let n = query_num(&parts.uri, "bytes").unwrap_or(0) as usize;
        let seed = query_num(&parts.uri, "seed").unwrap_or(1) as u32;
        let data = Bytes::from(pattern(n, seed));
        let chunks: Vec<Result<Frame<Bytes>, hyper::Error>> = (0..n)
            .step_by(64 * 1024)
            .map(|at| Ok(Frame::data(data.slice(at..n.min(at + 64 * 1024)))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
        return Ok(Response::new(body));
    }
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(d) = frame.data_ref() {
            hasher.update(d);
            len += d.len() as u64;
        }
    }
    if path.ends_with("/upload") {
        let hash = hasher.finalize().to_hex();
        return Ok(Response::new(up_full(format!(
            "{{\"bytes\":{len},\"blake3\":\"{hash}\"}}"
        ))));
    }
    if path.ends_with("/status") {
        let code = query_num(&parts.uri, "code").unwrap_or(200) as u16;
        let mut resp = Response::new(up_full(format!("status {code}")));
        *resp.status_mut() = StatusCode::from_u16(code).unwrap();
        resp.headers_mut()
            .insert("x-upstream-status", code.to_string().parse().unwrap());
        return Ok(resp);
    }
    let mut resp = Response::new(up_full(format!(
        "{{\"target\":{target:?},\"conn\":{conn},\"bytes\":{len}}}"
    )));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp.headers_mut()
        .insert("x-upstream", "tls".parse().unwrap());
    Ok(resp)
}

/// The raw upstream's side of one connection: answers each request, and closes when told.
async fn serve_raw(
    mut tls: TlsStream<tokio::net::TcpStream>,
    conn: usize,
    answer: &Answer,
    seen: &Mutex<Vec<Seen>>,
    mut close: watch::Receiver<Close>,
    closed: &AtomicUsize,
) {
    let mut buf = Vec::new();
    loop {
        let request = tokio::select! {
            r = read_request(&mut tls, &mut buf) => Ok(r),
            told = close.wait_for(|c| *c != Close::No) => Err(told.map_or(Close::NotifyAndFin, |how| *how)),
        };
        let request = match request {
            Ok(request) => request,
            Err(Close::NotifyAndFin) => {
                // close_notify, then the TCP FIN (tokio-rustls's shutdown does both).
                let _ = tls.shutdown().await;
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Err(_) => {
                close_notify_then_wait(&mut tls, closed).await;
                return;
            }
        };
        let Some((method, target, headers)) = request else {
            return;
        };
        seen.lock().unwrap().push(Seen {
            conn,
            method,
            target: target.clone(),
            headers,
        });
        if tls.write_all(&answer(&target)).await.is_err() {
            return;
        }
        if target.ends_with("/then-close-notify") {
            // In the same flush as the answer, so keygate reads both records at once.
            close_notify_then_wait(&mut tls, closed).await;
            return;
        }
        if tls.flush().await.is_err() {
            return;
        }
    }
}

/// Sends `close_notify` (counted in `closed`) and keeps the TCP connection open, reading and
/// dropping whatever comes, until keygate closes it.
async fn close_notify_then_wait(tls: &mut TlsStream<tokio::net::TcpStream>, closed: &AtomicUsize) {
    tls.get_mut().1.send_close_notify();
    let _ = tls.flush().await;
    closed.fetch_add(1, Ordering::SeqCst);
    let mut sink = [0u8; 4096];
    while let Ok(n) = tls.get_mut().0.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// The next request on `s` (its Content-Length body read and dropped); `None` at its end.
async fn read_request<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Option<(Method, String, HeaderMap)> {
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8(buf.drain(..end + 4).collect()).unwrap();
    let mut lines = head.trim_end().split("\r\n");
    let mut start = lines.next().unwrap().split(' ');
    let method: Method = start.next().unwrap().parse().unwrap();
    let target = start.next().unwrap().to_string();
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        headers.append(
            http::HeaderName::try_from(name.trim()).unwrap(),
            value.trim().parse().unwrap(),
        );
    }
    assert!(
        !headers.contains_key("transfer-encoding"),
        "the raw upstream reads Content-Length bodies only"
    );
    let len: usize = headers
        .get("content-length")
        .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
    while buf.len() < len {
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..len);
    Some((method, target, headers))
}

/// `data` as a request body of unknown length (so sent chunked), in 64 KiB frames.
fn unsized_body(data: Bytes) -> TestBody {
    let n = data.len();
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = (0..n)
        .step_by(64 * 1024)
        .map(|at| Ok(Frame::data(data.slice(at..n.min(at + 64 * 1024)))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

// ---------------------------------------------------------------------------------------------
// keygate in front of it
// ---------------------------------------------------------------------------------------------

/// A gateway forwarding to `url`, trusting `ca` for it through `ca_file = "upstream-ca.pem"`
/// (relative to the config file), with `extra` config lines after the key.
async fn gateway(url: &str, ca: &Ca, extra: &str) -> TestGateway {
    gateway_on(ca, &config(url, "upstream-ca.pem", extra)).await
}

/// A gateway on the config `text`, with `ca` written to `upstream-ca.pem` beside it.
async fn gateway_on(ca: &Ca, text: &str) -> TestGateway {
    gateway_with_files(ca, text, &[]).await
}

/// [`gateway_on`], with `files` (name, text) written beside the config too.
async fn gateway_with_files(ca: &Ca, text: &str, files: &[(&str, &str)]) -> TestGateway {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &ca.pem).unwrap();
    for (name, text) in files {
        write_file(dir.path(), name, text);
    }
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    start_gateway_in(dir, path).await
}

fn config(url: &str, ca_file: &str, extra: &str) -> String {
    config_text(
        url,
        &format!(
            "ca_file = \"{ca_file}\"\n\n{}{extra}",
            key_entry("partner", KEY, "rate = \"1000/s\"\nburst = 1000")
        ),
    )
}

fn write_file(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// (a) Requests pass through a TLS upstream verified against `ca_file`: the partner gets the
/// upstream's status, headers and body; the upstream gets the partner's method, path, query and
/// headers without the key, plus keygate's forwarding headers; ALPN is `http/1.1`; and
/// sequential requests share one upstream TLS connection.
#[tokio::test]
async fn requests_pass_through_a_tls_upstream_on_one_connection() {
    let ca = make_ca("keygate test CA");
    let up = tls_upstream(server_tls(ca.leaf("127.0.0.1")), Serve::Hyper).await;
    let gw = gateway(&up.url(), &ca, "").await;
    let c = http1_client();

    for i in 0..4 {
        let got = get(
            &c,
            &gw.url(&format!("/v1/rooms?floor={i}")),
            &[("x-api-key", KEY), ("x-partner-trace", "abc-123")],
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        assert_eq!(got.header("x-upstream"), Some("tls"));
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert_eq!(
            got.text(),
            format!("{{\"target\":\"/v1/rooms?floor={i}\",\"conn\":1,\"bytes\":0}}")
        );
        let seen = up.last();
        assert_eq!(seen.method, Method::GET);
        assert_eq!(seen.target, format!("/v1/rooms?floor={i}"));
        assert!(
            seen.headers.get("x-api-key").is_none(),
            "the key went upstream"
        );
        assert_eq!(seen.headers["x-partner-trace"], "abc-123");
        assert_eq!(seen.headers["x-keygate-key-id"], "partner");
        assert_eq!(seen.headers["x-forwarded-proto"], "http");
        assert_eq!(seen.headers["host"], up.addr.to_string().as_str());
    }
    // A status other than 200 and a request body, Bearer-style key: the key is removed there too.
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/status?code=201"),
        &[("authorization", &format!("Bearer {KEY}"))],
        full("hello"),
    )
    .await;
    assert_eq!(got.status, StatusCode::CREATED);
    assert_eq!(got.header("x-upstream-status"), Some("201"));
    assert_eq!(got.text(), "status 201");
    let seen = up.last();
    assert_eq!(seen.method, Method::POST);
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.headers["content-length"], "5");
    let got = get(&c, &gw.url("/v1/status?code=404"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.text(), "status 404");

    assert_eq!(up.seen().len(), 6);
    assert!(up.seen().iter().all(|s| s.conn == 1), "{:?}", up.seen());
    assert_eq!(
        up.accepts(),
        1,
        "one TCP connection for sequential requests"
    );
    assert_eq!(
        up.handshakes(),
        1,
        "one TLS connection for sequential requests"
    );
    assert_eq!(
        *up.alpn.lock().unwrap(),
        vec![Some(b"http/1.1".to_vec())],
        "keygate offers ALPN http/1.1"
    );
}

/// (b) Large bodies stream through the TLS hop byte for byte: a 4 MiB request body of unknown
/// length (chunked), a 6 MiB chunked response, and a 3 MiB body echoed back as it arrives
/// (upload and download at once); all on one upstream TLS connection.
#[tokio::test]
async fn large_bodies_stream_through_the_tls_hop_byte_exact() {
    let ca = make_ca("keygate test CA");
    let up = tls_upstream(server_tls(ca.leaf("127.0.0.1")), Serve::Hyper).await;
    let gw = gateway(&up.url(), &ca, "").await;
    let c = http1_client();

    let upload = Bytes::from(pattern(4 * 1024 * 1024 + 123, 5));
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/upload"),
        &[("x-api-key", KEY)],
        unsized_body(upload.clone()),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(
        got.json(),
        serde_json::json!({
            "bytes": upload.len(),
            "blake3": blake3::hash(&upload).to_hex().to_string(),
        })
    );
    let seen = up.last();
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
    assert!(seen.headers.get("content-length").is_none());

    let n = 6 * 1024 * 1024 + 7;
    let got = get(
        &c,
        &gw.url(&format!("/v1/download?bytes={n}&seed=9")),
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body.len(), n);
    assert!(got.body == pattern(n, 9), "the downloaded bytes differ");

    let echo = Bytes::from(pattern(3 * 1024 * 1024 + 1, 13));
    let got = send(
        &c,
        Method::PUT,
        &gw.url("/v1/echo"),
        &[("x-api-key", KEY)],
        unsized_body(echo.clone()),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body.len(), echo.len());
    assert!(got.body == echo, "the echoed bytes differ");

    // And the connection is still in step after them.
    let got = get(&c, &gw.url("/v1/after"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(up.handshakes(), 1, "large bodies cost no TLS connection");
}

/// (c) A chunked response with trailers over TLS: an HTTP/2 partner gets the body and the
/// trailer fields, an HTTP/1.1 partner the body; the upstream connection is reused after it
/// (keygate read it exactly to its end).
#[tokio::test]
async fn a_chunked_response_with_trailers_arrives_over_tls() {
    let body = pattern(100_000, 21);
    let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                     transfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
        .to_vec();
    for piece in body.chunks(7_000) {
        wire.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        wire.extend_from_slice(piece);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\nx-checksum: c0ffee\r\nx-count: 15\r\n\r\n");
    let answer = move |target: &str| {
        if target.ends_with("/trailers") {
            wire.clone()
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
        }
    };
    let ca = make_ca("keygate test CA");
    let up = tls_upstream(
        server_tls(ca.leaf("127.0.0.1")),
        Serve::Raw(Arc::new(answer)),
    )
    .await;
    let gw = gateway(&up.url(), &ca, "").await;

    let h2 = h2c_client();
    for _ in 0..2 {
        let req = Request::get(gw.url("/v1/trailers"))
            .header("x-api-key", KEY)
            .body(empty())
            .unwrap();
        let resp = h2.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers arrived");
        assert!(collected.to_bytes() == body, "the body differs (HTTP/2)");
        assert_eq!(trailers["x-checksum"], "c0ffee");
        assert_eq!(trailers["x-count"], "15");
    }
    let c = http1_client();
    let got = get(&c, &gw.url("/v1/trailers"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body == body, "the body differs (HTTP/1.1)");
    let got = get(&c, &gw.url("/v1/after"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.text(), "ok");

    assert_eq!(up.seen().len(), 4);
    assert_eq!(
        up.handshakes(),
        1,
        "the connection was not reused after a response with trailers"
    );
}

/// (d) An upstream whose certificate the configured CA did not sign, or that was signed for
/// another address: the partner gets 502 `upstream_unavailable` (keygate's JSON), keygate's
/// log line names the certificate problem, and the gateway goes on serving (after a reload to
/// a good upstream, requests pass).
#[tokio::test]
async fn an_upstream_certificate_the_ca_did_not_sign_is_a_502_and_a_log_line() {
    let ca = make_ca("keygate test CA");
    let rogue = make_ca("some other CA");
    let good = tls_upstream(server_tls(ca.leaf("127.0.0.1")), Serve::Hyper).await;
    let foreign = tls_upstream(server_tls(rogue.leaf("127.0.0.1")), Serve::Hyper).await;
    let misnamed = tls_upstream(server_tls(ca.leaf("127.0.0.2")), Serve::Hyper).await;

    let gw = gateway(&foreign.url(), &ca, "").await;
    let c = http1_client();
    for (id, upstream, problem) in [
        ("tls-foreign-1", &foreign, "UnknownIssuer"),
        ("tls-foreign-2", &foreign, "UnknownIssuer"),
        ("tls-misnamed-1", &misnamed, "not valid for name"),
    ] {
        if upstream.addr != foreign.addr {
            gw.rewrite_config(&config(&upstream.url(), "upstream-ca.pem", ""));
            let switched = eventually(Duration::from_secs(5), || async {
                gw.gateway.shared().live.load().config.upstream.url == upstream.url()
            })
            .await;
            assert!(switched, "the reload did not happen");
        }
        let got = get(
            &c,
            &gw.url("/v1/x"),
            &[("x-api-key", KEY), ("x-request-id", id)],
        )
        .await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{id}: {}", got.text());
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert_eq!(got.code(), "upstream_unavailable", "{id}");
        assert_eq!(got.header("x-request-id"), Some(id));
        let lines = log_lines(id);
        assert!(
            lines.iter().any(|l| l.contains("upstream request failed")
                && l.contains("invalid peer certificate")
                && l.contains(problem)),
            "{id}: no log line naming the certificate problem ({problem}):\n{}",
            lines.join("\n")
        );
        assert!(upstream.accepts() >= 1, "{id}: keygate did not try");
        assert_eq!(upstream.handshakes(), 0, "{id}: a handshake completed");
        assert!(upstream.seen().is_empty(), "{id}: a request reached it");
    }

    gw.rewrite_config(&config(&good.url(), "upstream-ca.pem", ""));
    let served = eventually(Duration::from_secs(5), || async {
        get(&c, &gw.url("/v1/x"), &[("x-api-key", KEY)])
            .await
            .status
            == StatusCode::OK
    })
    .await;
    assert!(served, "the gateway did not go on serving");
    assert_eq!(good.last().target, "/v1/x");
}

/// (e) An upstream that closes an idle TLS connection with `close_notify` (and a FIN, or
/// without one, keeping TCP open) between requests, or right behind an answer, costs no
/// request: the next one, a `POST` with a body (which keygate may not send twice) as well as a
/// `GET`, goes on a new connection and is answered.
#[tokio::test]
async fn an_upstream_closing_an_idle_tls_connection_costs_no_request() {
    let answer = |_: &str| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec();
    let ca = make_ca("keygate test CA");
    let up = tls_upstream(
        server_tls(ca.leaf("127.0.0.1")),
        Serve::Raw(Arc::new(answer)),
    )
    .await;
    let gw = gateway(&up.url(), &ca, "").await;
    let c = http1_client();
    let got = get(&c, &gw.url("/v1/first"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.text(), "ok");

    let mut expected = 1;
    for how in [Close::NotifyAndFin, Close::NotifyOnly] {
        for method in [Method::POST, Method::GET] {
            up.close_idle(how).await;
            let target = format!("/v1/after-{how:?}-{method}");
            let id = format!("idle-close-{how:?}-{method}");
            let got = send(
                &c,
                method.clone(),
                &gw.url(&target),
                &[("x-api-key", KEY), ("x-request-id", &id)],
                full(if method == Method::POST {
                    "payload"
                } else {
                    ""
                }),
            )
            .await;
            assert_eq!(
                got.status,
                StatusCode::OK,
                "{method} after {how:?}: {}\n{}",
                got.text(),
                log_lines(&id).join("\n")
            );
            assert_eq!(got.text(), "ok");
            expected += 1;
            assert_eq!(
                up.handshakes(),
                expected,
                "{method} after {how:?}: not on a new connection"
            );
            let seen = up.last();
            assert_eq!(
                (seen.method, seen.target, seen.conn),
                (method, target, expected)
            );
        }
    }

    // A close_notify right behind an answer (read together with it): the next request, a POST,
    // goes on a new connection too.
    let got = get(&c, &gw.url("/v1/then-close-notify"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.text(), "ok");
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/after-close-notify"),
        &[("x-api-key", KEY), ("x-request-id", "after-close-notify")],
        full("payload"),
    )
    .await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "POST after an answer and close_notify: {}\n{}",
        got.text(),
        log_lines("after-close-notify").join("\n")
    );
    assert_eq!(up.handshakes(), expected + 1);
    assert_eq!(up.last().conn, expected + 1);
    // Each request reached the upstream once.
    assert_eq!(up.seen().len(), 7);
}

/// `ca_file` is what keygate trusts, also for the readiness probe: with `health_path` set, the
/// probe's `GET` to the TLS upstream succeeds and `/readyz` answers 200.
#[tokio::test]
async fn the_readiness_probe_trusts_the_ca_file_too() {
    let ca = make_ca("keygate test CA");
    let up = tls_upstream(server_tls(ca.leaf("127.0.0.1")), Serve::Hyper).await;
    let text = config(
        &up.url(),
        "upstream-ca.pem",
        "\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .replace(
        "ca_file = ",
        "health_path = \"/health\"\nhealth_interval = \"100ms\"\nca_file = ",
    );
    let gw = gateway_on(&ca, &text).await;
    let admin = gw.gateway.admin_addr().expect("admin listener");
    let c = http1_client();
    let readyz = format!("http://{admin}/readyz");
    let ready = eventually(Duration::from_secs(5), || async {
        get(&c, &readyz, &[]).await.status == StatusCode::OK
    })
    .await;
    assert!(ready, "not ready: {}", get(&c, &readyz, &[]).await.text());
    assert!(
        up.seen().iter().any(|s| s.target == "/health"),
        "the probe did not reach the upstream"
    );
}

/// A reload that changes `ca_file` (to another file with other certificates) logs that it
/// takes effect after a restart, and new upstream connections are still verified against the
/// start-up CA; a reload that keeps the certificates logs nothing about them.
#[tokio::test]
async fn a_reload_that_changes_ca_file_says_it_needs_a_restart() {
    let ca = make_ca("keygate test CA");
    let other = make_ca("another CA");
    let answer = |_: &str| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec();
    let up = tls_upstream(
        server_tls(ca.leaf("127.0.0.1")),
        Serve::Raw(Arc::new(answer)),
    )
    .await;
    let gw = gateway(&up.url(), &ca, "").await;
    let c = http1_client();
    let got = get(&c, &gw.url("/v1/x"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.text(), "ok");
    let warning = "[upstream] ca_file changes take effect after a restart";
    let warnings = || logs().matches(warning).count();
    let live_timeout = || gw.gateway.shared().live.load().config.upstream.timeout;

    // The same file and certificates (another upstream timeout, so the reload shows): silent.
    let before = warnings();
    gw.rewrite_config(&config(&up.url(), "upstream-ca.pem", "").replace("\"2s\"", "\"3s\""));
    let applied = eventually(Duration::from_secs(5), || async {
        live_timeout() == Duration::from_secs(3)
    })
    .await;
    assert!(applied, "the reload did not happen");
    assert_eq!(
        warnings(),
        before,
        "a restart warning for unchanged certificates"
    );

    // Another CA: the warning.
    write_file(gw.dir.path(), "other-ca.pem", &other.pem);
    gw.rewrite_config(&config(&up.url(), "other-ca.pem", ""));
    let applied = eventually(Duration::from_secs(5), || async {
        live_timeout() == Duration::from_secs(2)
    })
    .await;
    assert!(applied, "the reload did not happen");
    assert!(warnings() > before, "no restart warning:\n{}", logs());

    // A new connection is still verified against the start-up CA, which signed the upstream.
    up.close_idle(Close::NotifyAndFin).await;
    let got = get(&c, &gw.url("/v1/x"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(up.handshakes(), 2);
}

/// When keygate closes an upstream TLS connection (here after a `Connection: close` answer) it
/// sends `close_notify` first, so the upstream reads a clean end, not a truncation.
#[tokio::test]
async fn keygate_closes_an_upstream_tls_connection_with_close_notify() {
    let ca = make_ca("close-notify CA");
    let acceptor = server_tls(ca.leaf("127.0.0.1"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended, mut end) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let (acceptor, ended) = (acceptor.clone(), ended.clone());
            tokio::spawn(async move {
                let mut tls = acceptor.accept(s).await.unwrap();
                let mut buf = Vec::new();
                if read_request(&mut tls, &mut buf).await.is_none() {
                    return;
                }
                tls.write_all(
                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                )
                .await
                .unwrap();
                tls.flush().await.unwrap();
                // How the connection ends: Ok(0) only after a close_notify.
                let mut rest = [0u8; 64];
                let how = tls.read(&mut rest).await.map_err(|e| e.kind());
                let _ = ended.send(how);
            });
        }
    });
    let gw = gateway(&format!("https://{addr}"), &ca, "").await;
    let got = get(
        &http1_client(),
        &gw.url("/v1/guests"),
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.text(), "ok");
    let how = tokio::time::timeout(Duration::from_secs(5), end.recv())
        .await
        .expect("the upstream saw the connection end")
        .unwrap();
    assert_eq!(how, Ok(0), "a clean close_notify, not a truncation");
}

/// The config lines naming the client certificate files [`gateway_with_client_cert`] writes.
const CLIENT_CERT_LINES: &str = "client_cert = \"gw-client.crt\"\nclient_key = \"gw-client.key\"\n";

/// The config of [`config`] with `client_cert`/`client_key` naming `gw-client.crt` and
/// `gw-client.key` and `extra` lines in `[upstream]`, `tail` after the key.
fn client_cert_config(url: &str, extra: &str, tail: &str) -> String {
    config(url, "upstream-ca.pem", tail).replace(
        "ca_file = ",
        &format!("{CLIENT_CERT_LINES}{extra}ca_file = "),
    )
}

/// A gateway on [`client_cert_config`] that shows `shown` to the upstream.
async fn gateway_with_client_cert(
    url: &str,
    ca: &Ca,
    shown: &ClientLeaf,
    extra: &str,
    tail: &str,
) -> TestGateway {
    gateway_with_files(
        ca,
        &client_cert_config(url, extra, tail),
        &[
            ("gw-client.crt", &shown.cert_pem),
            ("gw-client.key", &shown.key_pem),
        ],
    )
    .await
}

/// (f) `[upstream] client_cert`/`client_key` (mutual TLS): an upstream that requires a client
/// certificate refuses a gateway without one (the partner gets 502 `upstream_unavailable`, the
/// log names the upstream's alert, nothing reaches the upstream) and serves one that shows the
/// configured certificate, on requests and on readiness probes alike.
#[tokio::test]
async fn an_upstream_that_requires_a_client_certificate_gets_the_configured_one() {
    let ca = make_ca("keygate test CA");
    let clients = make_ca("gateway clients CA");
    let shown = clients.client_leaf("keygate-gateway");
    let up = tls_upstream(
        server_tls_for(ca.leaf("127.0.0.1"), Some(&clients)),
        Serve::Hyper,
    )
    .await;
    let c = http1_client();

    let bare = gateway(&up.url(), &ca, "").await;
    let id = "mtls-without-cert";
    let got = get(
        &c,
        &bare.url("/v1/x"),
        &[("x-api-key", KEY), ("x-request-id", id)],
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.text());
    assert_eq!(got.code(), "upstream_unavailable");
    let lines = log_lines(id);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("upstream request failed") && l.contains("CertificateRequired")),
        "no log line naming the upstream's alert:\n{}",
        lines.join("\n")
    );
    assert!(up.seen().is_empty(), "a request reached the upstream");
    assert_eq!(up.handshakes(), 0, "the upstream accepted a handshake");

    let gw = gateway_with_client_cert(
        &up.url(),
        &ca,
        &shown,
        "health_path = \"/health\"\nhealth_interval = \"100ms\"\n",
        "\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    for i in 0..3 {
        let got = get(
            &c,
            &gw.url(&format!("/v1/rooms?floor={i}")),
            &[("x-api-key", KEY)],
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        assert_eq!(up.last().target, format!("/v1/rooms?floor={i}"));
        assert_eq!(up.last().headers["x-keygate-key-id"], "partner");
    }
    let readyz = format!("http://{}/readyz", gw.gateway.admin_addr().unwrap());
    let ready = eventually(Duration::from_secs(5), || async {
        get(&c, &readyz, &[]).await.status == StatusCode::OK
    })
    .await;
    assert!(ready, "not ready: {}", get(&c, &readyz, &[]).await.text());
    assert!(up.seen().iter().any(|s| s.target == "/health"));
    let certs = up.client_certs();
    assert!(
        certs.len() >= 2,
        "requests and probes: {} handshakes",
        certs.len()
    );
    assert!(
        certs.iter().all(|c| c.as_deref() == Some(&shown.der[..])),
        "a handshake without the configured certificate"
    );
}

/// The client certificate files are watched like the listener's: a renewal written over them
/// reaches the next new upstream connection (a pooled one keeps the certificate it was made
/// with), and a renewal whose key does not match its certificate is logged and the current
/// pair stays in use.
#[tokio::test]
async fn a_renewed_client_certificate_reaches_the_next_upstream_connection() {
    let ca = make_ca("keygate test CA");
    let clients = make_ca("gateway clients CA");
    let first = clients.client_leaf("keygate-gateway");
    let second = clients.client_leaf("keygate-gateway-renewed");
    let answer = |_: &str| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec();
    let up = tls_upstream(
        server_tls_for(ca.leaf("127.0.0.1"), Some(&clients)),
        Serve::Raw(Arc::new(answer)),
    )
    .await;
    let gw = gateway_with_client_cert(&up.url(), &ca, &first, "", "").await;
    let c = http1_client();
    let ok = || async {
        get(&c, &gw.url("/v1/x"), &[("x-api-key", KEY)])
            .await
            .text()
    };
    assert_eq!(ok().await, "ok");
    assert_eq!(up.client_certs(), vec![Some(first.der.clone())]);

    let cert_file = gw.dir.path().join("gw-client.crt");
    let key_file = gw.dir.path().join("gw-client.key");
    // Each step waits for a log line more than there were before it (the watch may also see
    // a renewal's key before its certificate, and say so).
    let count = |needle: &str| logs().matches(needle).count();
    let reloaded = format!(
        "upstream client certificate reloaded: new handshakes use it cert={}",
        cert_file.display()
    );
    let before = count(&reloaded);
    write_atomically(&key_file, &second.key_pem);
    write_atomically(&cert_file, &second.cert_pem);
    let seen = eventually(Duration::from_secs(5), || async {
        count(&reloaded) > before
    })
    .await;
    assert!(seen, "no reload logged:\n{}", logs());
    assert_eq!(ok().await, "ok");
    assert_eq!(up.handshakes(), 1, "the pooled connection was not reused");
    up.close_idle(Close::NotifyAndFin).await;
    assert_eq!(ok().await, "ok");
    assert_eq!(
        up.client_certs(),
        vec![Some(first.der.clone()), Some(second.der.clone())]
    );

    // A certificate written without its key yet: refused, the renewed pair stays.
    let third = clients.client_leaf("keygate-gateway-third");
    let refused = format!(
        "upstream client certificate reload failed, keeping the current certificate: the \
         private key {} does not match the certificate {}",
        key_file.display(),
        cert_file.display()
    );
    let before = count(&refused);
    write_atomically(&cert_file, &third.cert_pem);
    let seen = eventually(Duration::from_secs(5), || async {
        count(&refused) > before
    })
    .await;
    assert!(seen, "no refusal logged:\n{}", logs());
    up.close_idle(Close::NotifyAndFin).await;
    assert_eq!(ok().await, "ok");
    assert_eq!(up.client_certs().last(), Some(&Some(second.der.clone())));

    // Other files named by a reload: a restart is needed, and the watched pair stays in use.
    let warning = "[upstream] client_cert/client_key changes take effect after a restart";
    let warnings = || logs().matches(warning).count();
    let before = warnings();
    write_file(gw.dir.path(), "other-client.crt", &first.cert_pem);
    write_file(gw.dir.path(), "other-client.key", &first.key_pem);
    gw.rewrite_config(
        &client_cert_config(&up.url(), "", "").replace("gw-client.", "other-client."),
    );
    let warned = eventually(Duration::from_secs(5), || async { warnings() > before }).await;
    assert!(warned, "no restart warning:\n{}", logs());
    up.close_idle(Close::NotifyAndFin).await;
    assert_eq!(ok().await, "ok");
    assert_eq!(up.client_certs().last(), Some(&Some(second.der.clone())));
}

/// A client certificate that cannot be used stops the start with the reason: a key that does
/// not match, a file that is not there.
#[tokio::test]
async fn a_client_certificate_that_cannot_be_used_stops_the_start() {
    let ca = make_ca("keygate test CA");
    let clients = make_ca("gateway clients CA");
    let (a, b) = (clients.client_leaf("a"), clients.client_leaf("b"));
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "upstream-ca.pem", &ca.pem);
    write_file(dir.path(), "gw-client.crt", &a.cert_pem);
    write_file(dir.path(), "gw-client.key", &b.key_pem);
    let path = dir.path().join("gateway.toml");
    let text = client_cert_config("https://127.0.0.1:9", "", "");
    let start = |text: String| {
        let path = path.clone();
        async move {
            std::fs::write(&path, text).unwrap();
            let config = keygate::config::Config::load(&path).unwrap();
            match keygate::server::Gateway::start(config).await {
                Ok(_) => panic!("the gateway started"),
                Err(e) => format!("{e:#}"),
            }
        }
    };
    let err = start(text.clone()).await;
    assert_eq!(
        err,
        format!(
            "[upstream] client_cert: the private key {} does not match the certificate {}",
            dir.path().join("gw-client.key").display(),
            dir.path().join("gw-client.crt").display()
        )
    );
    // `keygate check` reads the pair as a start does and refuses it with the same words.
    let check = || {
        let out = std::process::Command::new(keygate_bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    assert_eq!(
        check(),
        (
            Some(1),
            String::new(),
            format!("{}: {err}\n", path.display())
        )
    );
    let err = start(text.replace("gw-client.crt", "missing.crt")).await;
    assert!(
        err.starts_with(&format!(
            "[upstream] client_cert: {}: no usable PEM certificate",
            dir.path().join("missing.crt").display()
        )),
        "{err}"
    );
    assert_eq!(
        check(),
        (
            Some(1),
            String::new(),
            format!("{}: {err}\n", path.display())
        )
    );

    // A usable pair passes, and the summary dates it.
    write_file(dir.path(), "gw-client.key", &a.key_pem);
    std::fs::write(&path, &text).unwrap();
    let (code, stdout, stderr) = check();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("upstream: https://127.0.0.1:9 (client certificate valid until "),
        "{stdout}"
    );
}
