//! The upstream side of the wire, end to end: a scripted raw-TCP upstream sends odd-but-legal
//! and broken HTTP/1.1 responses byte for byte, and each test asserts what a partner sees
//! through keygate (status, headers, body bytes, whether connections stay usable) and what
//! reaches the upstream. These pin the behaviour of the upstream client (`src/upstream.rs`),
//! so that any replacement of it can be proven against them.
//!
//! Every socket is on 127.0.0.1. The partner side is either the hyper client from `common` or
//! a raw `TcpStream` where the exact bytes (or one connection's lifetime) matter.
//!
//! Not repeated here: an upstream that closes kept-alive idle connections
//! (`tests/gateway.rs`, `an_upstream_closing_idle_connections_costs_no_request`) and one that
//! dies inside a Content-Length body or stalls in it (`tests/hardening.rs`).

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const KEY: &str = "partner-key-0123456789abcdefghijklmnop";
/// Longest any single read of an answer may take before the test fails.
const LIMIT: Duration = Duration::from_secs(5);
/// The answer of a well-behaved upstream.
const OK: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

// ---------------------------------------------------------------------------------------------
// Reading HTTP/1.1 off a socket (both ends use it)
// ---------------------------------------------------------------------------------------------

/// A message head: its start line and its fields (names in lower case).
#[derive(Debug, Clone)]
struct Head {
    text: String,
    start: String,
    fields: Vec<(String, String)>,
}

impl Head {
    fn parse(text: &str) -> Head {
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or_default().to_string();
        let fields = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Head {
            text: text.to_string(),
            start,
            fields,
        }
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn count(&self, name: &str) -> usize {
        self.fields.iter().filter(|(n, _)| n == name).count()
    }
    /// A request's method.
    fn method(&self) -> &str {
        self.start.split(' ').next().unwrap_or_default()
    }
    /// A request's path (with its query).
    fn path(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or_default()
    }
    /// A response's status code.
    fn status(&self) -> u16 {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {:?}", self.text))
    }
    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
    fn content_length(&self) -> Option<usize> {
        self.get("content-length").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("bad content-length in {:?}", self.text))
        })
    }
}

/// A socket and what was read from it but not yet consumed.
struct Wire<S> {
    s: S,
    buf: Vec<u8>,
    /// The trailer field lines of the last chunked body read.
    trailers: Vec<String>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl<S: AsyncRead + Unpin> Wire<S> {
    fn new(s: S) -> Self {
        Wire {
            s,
            buf: Vec::new(),
            trailers: Vec::new(),
        }
    }

    /// Reads more bytes; false at end of stream (or on an error).
    async fn more(&mut self) -> bool {
        let mut b = [0u8; 16 * 1024];
        match self.s.read(&mut b).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
        }
    }

    /// The next head, through its blank line; `None` if the stream ends first.
    async fn head(&mut self) -> Option<Head> {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..p + 4).collect();
                return Some(Head::parse(&String::from_utf8_lossy(&head[..p])));
            }
            if !self.more().await {
                return None;
            }
        }
    }

    async fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.more().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..p + 2).collect();
                return Some(String::from_utf8_lossy(&line[..p]).into_owned());
            }
            if !self.more().await {
                return None;
            }
        }
    }

    /// A chunked body, decoded (extensions dropped, trailer lines kept in `trailers`); `None`
    /// if the stream ends before the last chunk and the trailer section's blank line.
    async fn chunked(&mut self) -> Option<Vec<u8>> {
        let mut body = Vec::new();
        self.trailers.clear();
        loop {
            let line = self.line().await?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let n = usize::from_str_radix(size, 16)
                .unwrap_or_else(|_| panic!("bad chunk-size line {line:?}"));
            if n == 0 {
                loop {
                    let line = self.line().await?;
                    if line.is_empty() {
                        return Some(body);
                    }
                    self.trailers.push(line);
                }
            }
            body.extend(self.take(n).await?);
            assert_eq!(self.take(2).await?, b"\r\n", "chunk not followed by CRLF");
        }
    }

    async fn rest_until_close(&mut self) -> Vec<u8> {
        while self.more().await {}
        std::mem::take(&mut self.buf)
    }

    /// A request body as its head frames it.
    async fn request_body(&mut self, head: &Head) -> Option<Vec<u8>> {
        if head.chunked() {
            self.chunked().await
        } else {
            self.take(head.content_length().unwrap_or(0)).await
        }
    }

    /// A response body as its head frames it (`bodyless` for HEAD, 1xx, 204, 304); `None` if
    /// it is cut short.
    async fn response_body(&mut self, head: &Head, bodyless: bool) -> Option<Vec<u8>> {
        if bodyless {
            Some(Vec::new())
        } else if head.chunked() {
            self.chunked().await
        } else if let Some(n) = head.content_length() {
            self.take(n).await
        } else {
            Some(self.rest_until_close().await)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scripted upstream
// ---------------------------------------------------------------------------------------------

/// What the upstream does after reading a request head, in order.
enum Step {
    /// Reads the request body its head frames (Content-Length or chunked) and records it.
    ReadBody,
    /// Writes these bytes at once.
    Write(Vec<u8>),
    /// Writes these bytes one at a time, pausing between them.
    Trickle(Vec<u8>, Duration),
    /// Shuts its sending side, then reads (and drops) what still arrives for up to 2 s before
    /// closing, as servers do (a lingering close), so unread request bytes cause no reset.
    Close,
}

fn write(bytes: impl AsRef<[u8]>) -> Step {
    Step::Write(bytes.as_ref().to_vec())
}

/// Read the body, answer 200 "ok", keep the connection.
fn ok() -> Vec<Step> {
    vec![Step::ReadBody, write(OK)]
}

/// A request as the upstream read it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which accepted connection (1-based) carried it.
    conn: usize,
    head: Head,
    /// Its body, once a `ReadBody` step read it.
    body: Option<Vec<u8>>,
    /// The trailer lines of a chunked body, once read.
    trailers: Vec<String>,
}

struct RawUpstream {
    addr: std::net::SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// TCP connections accepted so far.
    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    /// The connections that carried each request, in order.
    fn conns(&self) -> Vec<usize> {
        self.seen().iter().map(|s| s.conn).collect()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream on 127.0.0.1 that reads request heads and does what `script` says for each;
/// after the last step it reads the connection's next request (unless a step closed it).
async fn raw_upstream<F>(script: F) -> RawUpstream
where
    F: Fn(&Head) -> Vec<Step> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(script);
    let (a, sn) = (accepts.clone(), seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let conn = a.fetch_add(1, Ordering::SeqCst) + 1;
            let (script, seen) = (script.clone(), sn.clone());
            tokio::spawn(async move { serve_raw(s, conn, &*script, &seen).await });
        }
    });
    RawUpstream {
        addr,
        accepts,
        seen,
        task,
    }
}

async fn serve_raw<F>(s: TcpStream, conn: usize, script: &F, seen: &Mutex<Vec<Seen>>)
where
    F: Fn(&Head) -> Vec<Step>,
{
    let mut w = Wire::new(s);
    while let Some(head) = w.head().await {
        let steps = script(&head);
        let idx = {
            let mut seen = seen.lock().unwrap();
            seen.push(Seen {
                conn,
                head,
                body: None,
                trailers: Vec::new(),
            });
            seen.len() - 1
        };
        for step in steps {
            match step {
                Step::ReadBody => {
                    let head = seen.lock().unwrap()[idx].head.clone();
                    let body = w.request_body(&head).await;
                    let mut seen = seen.lock().unwrap();
                    seen[idx].body = body;
                    seen[idx].trailers = std::mem::take(&mut w.trailers);
                }
                Step::Write(bytes) => {
                    if w.s.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Step::Trickle(bytes, pause) => {
                    for b in bytes {
                        if w.s.write_all(&[b]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(pause).await;
                    }
                }
                Step::Close => {
                    let _ = w.s.shutdown().await;
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), w.rest_until_close()).await;
                    return;
                }
            }
        }
    }
}

async fn gateway(up: &RawUpstream) -> TestGateway {
    start_gateway(&config_text(
        &up.url(),
        &key_entry("partner", KEY, "rate = \"1000/s\"\nburst = 1000"),
    ))
    .await
}

// ---------------------------------------------------------------------------------------------
// A raw partner connection to the gateway
// ---------------------------------------------------------------------------------------------

/// One partner connection to the gateway, raw, kept across requests.
struct Partner {
    w: Wire<TcpStream>,
}

/// What a partner got back on the wire.
#[derive(Debug)]
struct Answer {
    head: Head,
    /// The body, de-chunked; `None` if the connection ended before the body was complete.
    body: Option<Vec<u8>>,
}

impl Answer {
    fn body(&self) -> &[u8] {
        self.body
            .as_deref()
            .unwrap_or_else(|| panic!("body cut short after {:?}", self.head.text))
    }
}

impl Partner {
    async fn connect(gw: &TestGateway) -> Partner {
        Partner {
            w: Wire::new(TcpStream::connect(gw.addr()).await.unwrap()),
        }
    }

    /// Sends one request with the key (`extra`: more header lines, each ending in CRLF) and
    /// reads its whole answer.
    async fn call(&mut self, method: &str, path: &str, extra: &str, body: &[u8]) -> Answer {
        self.try_call(method, path, extra, body)
            .await
            .expect("an answer head before the connection closed")
    }

    /// [`call`](Self::call), but `None` if the connection closes before a whole answer head.
    async fn try_call(
        &mut self,
        method: &str,
        path: &str,
        extra: &str,
        body: &[u8],
    ) -> Option<Answer> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {KEY}\r\n{extra}"
        );
        if !body.is_empty() {
            req.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.w.s.write_all(&bytes).await.unwrap();
        self.try_answer(method == "HEAD").await
    }

    async fn answer(&mut self, head_request: bool) -> Answer {
        self.try_answer(head_request)
            .await
            .expect("an answer head before the connection closed")
    }

    /// The next answer; `None` if the connection closes before a whole head arrives.
    async fn try_answer(&mut self, head_request: bool) -> Option<Answer> {
        let head = tokio::time::timeout(LIMIT, self.w.head())
            .await
            .expect("an answer head in time")?;
        let bodyless = head_request || matches!(head.status(), 100..=199 | 204 | 304);
        let body = tokio::time::timeout(LIMIT, self.w.response_body(&head, bodyless))
            .await
            .expect("an answer body in time");
        Some(Answer { head, body })
    }
}

// ---------------------------------------------------------------------------------------------
// Response framing the upstream may legally use
// ---------------------------------------------------------------------------------------------

/// The chunked encoding of `data` (after a first `5;ext=1` chunk of "hello"): hundreds of tiny
/// chunks with extensions (quoted ones too), data that spells a last chunk and a status line,
/// a size in upper-case hex and one with leading zeros, then the last chunk with an extension
/// and `trailers` (CRLF-ended field lines). Returns the wire bytes and the decoded body.
fn odd_chunks(data: &[u8], trailers: &str) -> (Vec<u8>, Vec<u8>) {
    let mut wire = b"5;ext=1\r\nhello\r\n".to_vec();
    let mut body = b"hello".to_vec();
    let mut at = 0;
    for i in 0..400 {
        let n = 1 + i % 7;
        let ext = match i % 3 {
            0 => ";a=b",
            1 => ";name=\"quoted;value\";flag",
            _ => "",
        };
        wire.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
        wire.extend_from_slice(&data[at..at + n]);
        wire.extend_from_slice(b"\r\n");
        body.extend_from_slice(&data[at..at + n]);
        at += n;
    }
    let tricky = b"\r\n0\r\n\r\nHTTP/1.1 500 Oops\r\n\r\n";
    wire.extend_from_slice(format!("{:X}\r\n", tricky.len()).as_bytes());
    wire.extend_from_slice(tricky);
    wire.extend_from_slice(b"\r\n");
    body.extend_from_slice(tricky);
    let big = &data[at..];
    wire.extend_from_slice(format!("000{:x}\r\n", big.len()).as_bytes());
    wire.extend_from_slice(big);
    wire.extend_from_slice(b"\r\n");
    body.extend_from_slice(big);
    wire.extend_from_slice(format!("0;last=yes\r\n{trailers}\r\n").as_bytes());
    (wire, body)
}

/// 1. Chunked answers with chunk extensions, hundreds of tiny chunks, odd hex sizes and data
///    that looks like a last chunk, with and without a trailer section: the partner gets
///    exactly the decoded bytes, on a connection that stays in step. Without trailers the
///    upstream connection is reused, so the answer ended exactly at its last chunk.
///
///    Under the hyper client an answer *with* trailers costs its upstream connection (the next
///    request opens a new one); that is not pinned here, only that nothing goes wrong after it.
#[tokio::test]
async fn a_chunked_answer_with_extensions_tiny_chunks_and_trailers_arrives_exact() {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                transfer-encoding: chunked\r\n";
    let (plain_wire, plain) = odd_chunks(&pattern(72_000, 7), "");
    let (trailed_wire, trailed) = odd_chunks(
        &pattern(72_000, 11),
        "x-checksum: 1234abcd\r\nx-more: two\r\n",
    );
    let plain_answer = [format!("{head}\r\n").into_bytes(), plain_wire].concat();
    let trailed_answer = [
        format!("{head}trailer: x-checksum, x-more\r\n\r\n").into_bytes(),
        trailed_wire,
    ]
    .concat();
    let up = raw_upstream(move |h| match h.path() {
        "/chunked" => vec![Step::ReadBody, write(&plain_answer)],
        "/trailers" => vec![Step::ReadBody, write(&trailed_answer)],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    for (path, body) in [
        ("/chunked", &plain),
        ("/trailers", &trailed),
        ("/chunked", &plain),
        ("/trailers", &trailed),
    ] {
        let a = p.call("GET", path, "", b"").await;
        assert_eq!(a.head.status(), 200, "{path}: {}", a.head.text);
        assert_eq!(a.head.get("content-type"), Some("application/octet-stream"));
        assert!(
            a.body() == body.as_slice(),
            "{path}: the decoded body differs"
        );
        let a = p.call("GET", "/after", "", b"").await;
        assert_eq!(a.head.status(), 200, "after {path}: {}", a.head.text);
        assert_eq!(a.body(), b"ok");
    }
    let conns = up.conns();
    assert_eq!(conns.len(), 8);
    assert_eq!(
        conns[0], conns[1],
        "not reused after a chunked answer: {conns:?}"
    );
    assert_eq!(
        conns[4], conns[5],
        "not reused after a chunked answer: {conns:?}"
    );

    // The same through a client library.
    let c = http1_client();
    let got = get(&c, &gw.url("/chunked"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body == plain, "the decoded body differs (hyper client)");
    let got = get(&c, &gw.url("/trailers"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        got.body == trailed,
        "the decoded body differs (hyper client)"
    );
}

/// A transfer coding other than chunked beside a Content-Length: the body is read to the
/// upstream's close and reaches the partner whole, without the length (which would have framed
/// the partner's side and cut the coded body short).
#[tokio::test]
async fn a_coded_close_delimited_answer_with_a_stray_length_arrives_whole() {
    let coded = pattern(5_000, 7);
    let mut wire =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 10\r\n\r\n".to_vec();
    wire.extend_from_slice(&coded);
    let up = raw_upstream(move |_| vec![Step::ReadBody, write(&wire), Step::Close]).await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    let a = p.call("GET", "/coded", "", b"").await;
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    assert_eq!(a.head.content_length(), None, "{}", a.head.text);
    assert!(a.body() == coded.as_slice(), "the body differs");
}

/// The head deadline (`timeout`, 2 s here) counts from the request body's last write: an
/// upload that takes 3 s to an upstream reading all of it before answering is answered, while
/// an upstream that takes the whole body and then says nothing is a 504 about 2 s later.
#[tokio::test]
async fn the_head_deadline_counts_from_the_end_of_the_upload() {
    let up = raw_upstream(|h| match h.path() {
        "/silent" => vec![Step::ReadBody],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {KEY}\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    p.w.s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.w.s.write_all(b"5\r\nhello\r\n").await.unwrap();
    }
    p.w.s.write_all(b"0\r\n\r\n").await.unwrap();
    let a = p.answer(false).await;
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    assert_eq!(
        up.seen()[0].body.as_deref(),
        Some("hello".repeat(6).as_bytes())
    );

    let mut p = Partner::connect(&gw).await;
    let sent = Instant::now();
    let a = p.call("POST", "/silent", "", b"a small body").await;
    let waited = sent.elapsed();
    assert_eq!(a.head.status(), 504, "{}", a.head.text);
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

/// A client that stalls its body past the upstream's head deadline gets 408 request_timeout
/// when its own body timeout passes (4 s here), not a 504 blaming the upstream at 2 s: time
/// spent waiting for the client's bytes is not the upstream's.
#[tokio::test]
async fn a_stalled_request_body_is_the_clients_timeout_not_the_upstreams() {
    let up = raw_upstream(|_| ok()).await;
    let gw = start_gateway(
        &config_text(
            &up.url(),
            &key_entry("partner", KEY, "rate = \"1000/s\"\nburst = 1000"),
        )
        .replace(
            "timeout = \"2s\"\n",
            "timeout = \"2s\"\nbody_timeout = \"4s\"\n",
        ),
    )
    .await;
    let mut p = Partner::connect(&gw).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {KEY}\r\ncontent-length: 10\r\n\r\nabc"
    );
    p.w.s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let head = tokio::time::timeout(Duration::from_secs(8), p.w.head())
        .await
        .expect("an answer in time")
        .expect("an answer head");
    let waited = started.elapsed();
    assert_eq!(head.status(), 408, "{}", head.text);
    assert!(waited >= Duration::from_millis(3900), "{waited:?}");
}

/// The upstream answers while the request body still streams, then the client's body passes
/// its key's max_body: the answer is cut off, and that is counted as what it is, the client's
/// body (the access line's status stays the upstream's), not an upstream reset.
#[tokio::test]
async fn a_client_body_failing_beside_a_streamed_answer_is_not_an_upstream_error() {
    let up = raw_upstream(|_| {
        vec![
            write("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n"),
            Step::ReadBody,
        ]
    })
    .await;
    let gw = start_gateway(&config_text(
        &up.url(),
        &key_entry("partner", KEY, "max_body = 1024"),
    ))
    .await;
    let mut p = Partner::connect(&gw).await;
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {KEY}\r\n\
         transfer-encoding: chunked\r\n\r\n200\r\n{}\r\n",
        "a".repeat(512)
    );
    p.w.s.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(LIMIT, p.w.head())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text);
    // Past the 1,024-byte limit: the body fails, the streamed answer with it.
    let big = format!("1000\r\n{}\r\n", "b".repeat(4096));
    let _ = p.w.s.write_all(big.as_bytes()).await;
    let rest = tokio::time::timeout(LIMIT, p.w.rest_until_close())
        .await
        .expect("the streamed answer was not cut off");
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "the answer ended whole: {}",
        String::from_utf8_lossy(&rest)
    );
    let metrics = gw.metrics();
    for kind in ["reset", "timeout"] {
        let series = format!("keygate_upstream_errors_total{{kind=\"{kind}\"}}");
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}\n{metrics}");
    }
}

/// 2. A close-delimited answer (HTTP/1.1, neither Content-Length nor Transfer-Encoding, then
///    the upstream closes): the partner gets all of it, on a connection that stays usable, and
///    the next request goes on a new upstream connection.
#[tokio::test]
async fn a_close_delimited_answer_arrives_whole_and_the_next_request_uses_a_new_connection() {
    let body = pattern(200_000, 3);
    let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\r\n".to_vec();
    wire.extend_from_slice(&body);
    let up = raw_upstream(move |h| match h.path() {
        "/until-close" => vec![Step::ReadBody, write(&wire), Step::Close],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    let a = p.call("GET", "/until-close", "", b"").await;
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    assert!(a.body() == body.as_slice(), "the body differs");
    // The partner's connection outlives the upstream's.
    let a = p.call("GET", "/next", "", b"").await;
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    assert_eq!(a.body(), b"ok");
    assert_eq!(up.accepts(), 2);
    assert_eq!(up.conns(), vec![1, 2]);

    let got = get(
        &http1_client(),
        &gw.url("/until-close"),
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body == body, "the body differs (hyper client)");
}

/// 3. A head and body trickled one byte at a time (fixed length, then chunked): status,
///    headers and body arrive intact.
#[tokio::test]
async fn an_answer_trickled_byte_by_byte_arrives_intact() {
    let pause = Duration::from_millis(2);
    let up = raw_upstream(move |h| match h.path() {
        "/sized" => vec![
            Step::ReadBody,
            Step::Trickle(
                b"HTTP/1.1 201 Created\r\nx-trickle: yes\r\ncontent-type: text/plain\r\n\
                  content-length: 11\r\n\r\nhello world"
                    .to_vec(),
                pause,
            ),
        ],
        "/chunked" => vec![
            Step::ReadBody,
            Step::Trickle(
                b"HTTP/1.1 202 Accepted\r\nx-trickle: chunks\r\ntransfer-encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-t: 1\r\n\r\n"
                    .to_vec(),
                pause,
            ),
        ],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let c = http1_client();
    let started = Instant::now();
    let got = get(&c, &gw.url("/sized"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::CREATED, "{}", got.text());
    assert_eq!(got.header("x-trickle"), Some("yes"));
    assert_eq!(got.header("content-type"), Some("text/plain"));
    assert_eq!(got.text(), "hello world");
    let got = get(&c, &gw.url("/chunked"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::ACCEPTED, "{}", got.text());
    assert_eq!(got.header("x-trickle"), Some("chunks"));
    assert_eq!(got.text(), "hello world");
    let got = get(&c, &gw.url("/ok"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.text(), "ok");
    // Each answer was framed right: every request got its own answer (the chunked one, with a
    // trailer, costs its upstream connection under the hyper client; not pinned).
    assert_eq!(up.seen().len(), 3);
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// 4. Interim answers (`100 Continue`, `103 Early Hints` with a field) before the final one:
///    the partner gets the final status, its fields and its body; the connection stays in step.
#[tokio::test]
async fn interim_answers_are_skipped_and_the_final_answer_arrives() {
    let up = raw_upstream(|h| match h.path() {
        "/interim" => vec![
            write("HTTP/1.1 100 Continue\r\n\r\n"),
            Step::ReadBody,
            write(
                "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
                 HTTP/1.1 200 OK\r\nx-final: yes\r\ncontent-length: 4\r\n\r\ndone",
            ),
        ],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let c = http1_client();
    for _ in 0..2 {
        let got = send(
            &c,
            Method::POST,
            &gw.url("/interim"),
            &[("x-api-key", KEY)],
            full("payload"),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        assert_eq!(got.header("x-final"), Some("yes"));
        assert_eq!(got.text(), "done");
        let got = get(&c, &gw.url("/ok"), &[("x-api-key", KEY)]).await;
        assert_eq!(got.text(), "ok");
    }
    let seen = up.seen();
    assert_eq!(seen[0].body.as_deref(), Some(&b"payload"[..]));
    assert_eq!(up.accepts(), 1, "requests: {:?}", up.conns());
}

/// 5. The answer to HEAD states `Content-Length: 1234` and has no body: the partner gets 200,
///    that length and no body bytes, and a GET on the same partner connection (and the same
///    upstream connection) follows cleanly.
#[tokio::test]
async fn a_head_answer_keeps_its_length_and_carries_no_body() {
    let up = raw_upstream(|h| match h.method() {
        "HEAD" => vec![write(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1234\r\n\r\n",
        )],
        _ => vec![
            Step::ReadBody,
            write("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
        ],
    })
    .await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    for _ in 0..2 {
        let a = p.call("HEAD", "/doc", "", b"").await;
        assert_eq!(a.head.status(), 200, "{}", a.head.text);
        assert_eq!(
            a.head.get("content-length"),
            Some("1234"),
            "{}",
            a.head.text
        );
        assert!(!a.head.chunked());
        // A GET right behind it: a stray body byte would garble this answer's status line.
        let a = p.call("GET", "/doc", "", b"").await;
        assert_eq!(a.head.status(), 200, "{}", a.head.text);
        assert_eq!(a.body(), b"hello");
    }
    assert!(p.w.buf.is_empty(), "stray bytes: {:?}", p.w.buf);
    let methods: Vec<String> = up.seen().iter().map(|s| s.head.method().into()).collect();
    assert_eq!(methods, ["HEAD", "GET", "HEAD", "GET"]);
    assert_eq!(up.accepts(), 1);

    let c = http1_client();
    let got = send(
        &c,
        Method::HEAD,
        &gw.url("/doc"),
        &[("x-api-key", KEY)],
        empty(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("content-length"), Some("1234"));
    assert!(got.body.is_empty());
    let got = get(&c, &gw.url("/doc"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.text(), "hello");
}

/// 6. `204` and `304` carry no body (even a 304 stating the length of what it stands for):
///    the partner gets them bodiless, and the same upstream connection serves what follows.
#[tokio::test]
async fn no_content_and_not_modified_answers_carry_no_body_and_keep_the_connection() {
    let up = raw_upstream(|h| match h.path() {
        "/no-content" => vec![
            Step::ReadBody,
            write("HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n"),
        ],
        "/not-modified" => vec![
            Step::ReadBody,
            write(
                "HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncache-control: max-age=60\r\n\
                 content-length: 777\r\n\r\n",
            ),
        ],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    for _ in 0..2 {
        let a = p.call("DELETE", "/no-content", "", b"").await;
        assert_eq!(a.head.status(), 204, "{}", a.head.text);
        assert_eq!(a.head.get("x-a"), Some("1"));
        assert!(!a.head.chunked(), "{}", a.head.text);
        let a = p
            .call("GET", "/not-modified", "if-none-match: \"v1\"\r\n", b"")
            .await;
        assert_eq!(a.head.status(), 304, "{}", a.head.text);
        assert_eq!(a.head.get("etag"), Some("\"v1\""));
        assert!(!a.head.chunked(), "{}", a.head.text);
        let a = p.call("GET", "/ok", "", b"").await;
        assert_eq!(a.head.status(), 200, "{}", a.head.text);
        assert_eq!(a.body(), b"ok");
    }
    assert!(p.w.buf.is_empty(), "stray bytes: {:?}", p.w.buf);
    assert_eq!(up.accepts(), 1, "requests: {:?}", up.conns());
    assert_eq!(up.conns(), vec![1; 6]);

    let c = http1_client();
    let got = send(
        &c,
        Method::DELETE,
        &gw.url("/no-content"),
        &[("x-api-key", KEY)],
        empty(),
    )
    .await;
    assert_eq!(got.status, StatusCode::NO_CONTENT);
    assert!(got.body.is_empty());
    let got = get(&c, &gw.url("/not-modified"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::NOT_MODIFIED);
    assert!(got.body.is_empty());
}

/// 7. `Connection: close` with a Content-Length: the body arrives whole, the `Connection`
///    field is the upstream's hop and does not close the partner's connection, and the next
///    request opens a new upstream connection and succeeds.
#[tokio::test]
async fn a_connection_close_answer_is_delivered_and_the_next_request_reconnects() {
    let up = raw_upstream(|h| match h.path() {
        "/bye" => vec![
            Step::ReadBody,
            write("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nfirst"),
            Step::Close,
        ],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    let a = p.call("GET", "/bye", "", b"").await;
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    assert_eq!(a.body(), b"first");
    assert!(
        !a.head.get("connection").unwrap_or("").contains("close"),
        "the upstream's Connection field reached the partner: {}",
        a.head.text
    );
    let a = p.call("GET", "/again", "", b"").await;
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    assert_eq!(a.body(), b"ok");
    let a = p.call("GET", "/bye", "", b"").await;
    assert_eq!(a.body(), b"first");
    let a = p.call("GET", "/again", "", b"").await;
    assert_eq!(a.body(), b"ok");
    // bye | again, bye | again: each close costs one new connection and no request.
    assert_eq!(up.conns(), vec![1, 2, 2, 3]);
    assert_eq!(up.accepts(), 3);
}

/// 8. An HTTP/1.0 upstream (no keep-alive; with a Content-Length, then without one, ended by
///    the close): both answers arrive whole and the next request works.
#[tokio::test]
async fn an_http10_upstream_is_served_and_the_next_request_works() {
    let up = raw_upstream(|h| match h.path() {
        "/old" => vec![
            Step::ReadBody,
            write("HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 6\r\n\r\nold-ok"),
            Step::Close,
        ],
        "/old-unframed" => vec![
            Step::ReadBody,
            write("HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nends at the close"),
            Step::Close,
        ],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let c = http1_client();
    for _ in 0..2 {
        let got = get(&c, &gw.url("/old"), &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        assert_eq!(got.text(), "old-ok");
        let got = get(&c, &gw.url("/old-unframed"), &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        assert_eq!(got.text(), "ends at the close");
        let got = get(&c, &gw.url("/ok"), &[("x-api-key", KEY)]).await;
        assert_eq!(got.text(), "ok");
    }
    // old | old-unframed | ok, old | ...: an HTTP/1.0 answer is never kept alive.
    assert_eq!(up.conns(), vec![1, 2, 3, 3, 4, 5]);

    // On the wire to the partner, keygate answers in its own version, as nginx and Envoy do:
    // the upstream's `HTTP/1.0` stays on the upstream hop.
    let mut p = Partner::connect(&gw).await;
    let a = p.call("GET", "/old", "", b"").await;
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    assert!(a.head.text.starts_with("HTTP/1.1 200"), "{}", a.head.text);
    assert_eq!(a.body(), b"old-ok");
}

// ---------------------------------------------------------------------------------------------
// Broken answers
// ---------------------------------------------------------------------------------------------

/// 9. Malformed answer heads give the partner keygate's 502 (`upstream_unavailable`, JSON),
///    and the gateway keeps serving.
#[tokio::test]
async fn malformed_answer_heads_give_502_and_the_gateway_keeps_serving() {
    let bad: &[(&str, &str)] = &[
        (
            "/garbage-status",
            "HTTP/1.1 abc\r\ncontent-length: 2\r\n\r\nok",
        ),
        (
            "/no-colon",
            "HTTP/1.1 200 OK\r\nx-broken header line\r\ncontent-length: 2\r\n\r\nok",
        ),
        ("/half-head", "HTTP/1.1 200 OK\r\ncontent-type: te"),
        (
            "/bad-length",
            "HTTP/1.1 200 OK\r\ncontent-length: 12abc\r\n\r\nok",
        ),
        (
            "/two-lengths",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!",
        ),
        ("/not-http", "SSH-2.0-OpenSSH_9.6\r\n\r\n"),
    ];
    let table: Vec<(String, String)> = bad
        .iter()
        .map(|(p, w)| (p.to_string(), w.to_string()))
        .collect();
    let up = raw_upstream(move |h| match table.iter().find(|(p, _)| p == h.path()) {
        Some((_, wire)) => vec![Step::ReadBody, write(wire), Step::Close],
        None => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let c = http1_client();
    for (path, _) in bad {
        let started = Instant::now();
        let got = get(&c, &gw.url(path), &[("x-api-key", KEY)]).await;
        assert_eq!(
            got.status,
            StatusCode::BAD_GATEWAY,
            "{path}: {}",
            got.text()
        );
        assert_eq!(got.code(), "upstream_unavailable", "{path}");
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert!(started.elapsed() < Duration::from_secs(1), "{path}: slow");
        let got = get(&c, &gw.url("/ok"), &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK, "after {path}: {}", got.text());
        assert_eq!(got.text(), "ok");
    }
    // The same on a raw partner connection, which stays usable after each 502.
    let mut p = Partner::connect(&gw).await;
    for (path, _) in bad {
        let a = p.call("GET", path, "", b"").await;
        assert_eq!(a.head.status(), 502, "{path}: {}", a.head.text);
        let a = p.call("GET", "/ok", "", b"").await;
        assert_eq!(a.body(), b"ok", "after {path}");
    }
}

/// 9b. A good head followed by a broken body (a bad chunk size; a close inside a chunk): the
///     head has been sent on, so the partner's body must end in an error, never look complete;
///     the gateway keeps serving.
#[tokio::test]
async fn a_broken_chunked_body_is_never_delivered_as_complete() {
    let up = raw_upstream(|h| match h.path() {
        "/bad-size" => vec![
            Step::ReadBody,
            write(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nxx\r\n0\r\n\r\n",
            ),
            Step::Close,
        ],
        "/cut" => vec![
            Step::ReadBody,
            write("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nonly-part"),
            Step::Close,
        ],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    for path in ["/bad-size", "/cut"] {
        // On the wire: either no answer at all (the connection just closes) or a head whose
        // body is cut short; never a whole answer.
        let mut p = Partner::connect(&gw).await;
        if let Some(a) = p.try_call("GET", path, "", b"").await {
            assert_eq!(a.head.status(), 200, "{path}: {}", a.head.text);
            assert!(
                a.body.is_none(),
                "{path}: a broken body looked complete: {:?}",
                a.body
            );
        }
        // Through a client library: the request or its body fails.
        let c = http1_client();
        let req = http::Request::get(gw.url(path))
            .header("x-api-key", KEY)
            .body(empty())
            .unwrap();
        if let Ok(resp) = c.request(req).await {
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(
                resp.into_body().collect().await.is_err(),
                "{path}: a broken body looked complete (hyper client)"
            );
        }
        let got = get(&c, &gw.url("/ok"), &[("x-api-key", KEY)]).await;
        assert_eq!(got.text(), "ok");
    }
}

// ---------------------------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------------------------

/// 10. The upstream answers right after the head, before reading a large body the partner is
///     still sending (fixed length: 413 and close; chunked: 200, then it reads the rest): the
///     partner gets that answer while its body is unfinished.
#[tokio::test]
async fn an_early_answer_reaches_the_partner_while_its_body_still_streams() {
    let up = raw_upstream(|h| match h.path() {
        "/too-big" => vec![
            write(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-type: text/plain\r\n\
                 content-length: 8\r\nconnection: close\r\n\r\ntoo big!",
            ),
            Step::Close,
        ],
        "/early-ok" => vec![
            write("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly"),
            Step::ReadBody,
        ],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;

    // Fixed length: 8 MiB promised, 64 KiB sent, then the partner waits for an answer.
    let mut p = Partner::connect(&gw).await;
    let head = format!(
        "POST /too-big HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {KEY}\r\n\
         content-length: {}\r\n\r\n",
        8 << 20
    );
    p.w.s.write_all(head.as_bytes()).await.unwrap();
    p.w.s.write_all(&pattern(64 << 10, 5)).await.unwrap();
    let a = p.answer(false).await;
    assert_eq!(a.head.status(), 413, "{}", a.head.text);
    assert_eq!(a.body(), b"too big!");

    // Chunked, of no stated length: a few chunks, then the answer, then the rest.
    let mut p = Partner::connect(&gw).await;
    let head = format!(
        "POST /early-ok HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {KEY}\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    p.w.s.write_all(head.as_bytes()).await.unwrap();
    let sent = pattern(48 << 10, 9);
    for piece in sent.chunks(16 << 10) {
        p.w.s
            .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await
            .unwrap();
        p.w.s.write_all(piece).await.unwrap();
        p.w.s.write_all(b"\r\n").await.unwrap();
    }
    let a = p.answer(false).await;
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    assert_eq!(a.body(), b"early");
    // What happens to the rest of the body is not pinned. The hyper client keeps forwarding it
    // (the upstream reads it whole) and the partner's connection then serves another request;
    // dropping the rest and closing the partner's connection, as nginx and Envoy may, is as
    // good. The partner finishing its body must only do no harm.
    let rest = pattern(10_000, 13);
    let mut tail = format!("{:x}\r\n", rest.len()).into_bytes();
    tail.extend_from_slice(&rest);
    tail.extend_from_slice(b"\r\n0\r\n\r\n");
    let _ = p.w.s.write_all(&tail).await;
    // The gateway serves on.
    let got = get(&http1_client(), &gw.url("/ok"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.text(), "ok");
}

/// A body of `data` streamed in pieces of varied sizes, of no stated length (sent chunked).
fn unsized_body(data: &[u8]) -> TestBody {
    let sizes = [1usize, 7, 100, 4096, 65_536, 33_333, 2];
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < data.len() {
        let n = sizes[i % sizes.len()].min(data.len() - at);
        pieces.push(Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(
            &data[at..at + n],
        ))));
        at += n;
        i += 1;
    }
    StreamBody::new(futures_util::stream::iter(pieces)).boxed()
}

/// 11. Large request bodies reach the upstream byte for byte: with a Content-Length, as that
///     length; of unknown length, chunked (and without a Content-Length).
#[tokio::test]
async fn large_request_bodies_reach_the_upstream_byte_exact_in_their_framing() {
    let up = raw_upstream(|_| ok()).await;
    let gw = gateway(&up).await;
    let c = http1_client();
    let data = pattern(3 << 20, 17);

    let got = send(
        &c,
        Method::POST,
        &gw.url("/sized"),
        &[("x-api-key", KEY)],
        full(data.clone()),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.head.path(), "/sized");
    assert_eq!(
        seen.head.content_length(),
        Some(data.len()),
        "{}",
        seen.head.text
    );
    assert!(!seen.head.chunked(), "{}", seen.head.text);
    assert!(
        seen.body.as_deref() == Some(&data[..]),
        "the sized body differs"
    );

    let got = send(
        &c,
        Method::PUT,
        &gw.url("/unsized"),
        &[("x-api-key", KEY)],
        unsized_body(&data),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.head.path(), "/unsized");
    assert_eq!(seen.head.get("transfer-encoding"), Some("chunked"));
    assert_eq!(seen.head.count("transfer-encoding"), 1);
    assert_eq!(seen.head.get("content-length"), None, "{}", seen.head.text);
    assert!(
        seen.body.as_deref() == Some(&data[..]),
        "the chunked body differs"
    );

    // A raw partner's chunked body, with extensions and a trailer: decoded and re-framed.
    let mut p = Partner::connect(&gw).await;
    let head = format!(
        "POST /raw-chunked HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {KEY}\r\n\
         transfer-encoding: chunked\r\n\r\n4;a=b\r\nwiki\r\n5\r\npedia\r\n0\r\nx-t: 1\r\n\r\n"
    );
    p.w.s.write_all(head.as_bytes()).await.unwrap();
    let a = p.answer(false).await;
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.head.path(), "/raw-chunked");
    assert!(seen.head.chunked(), "{}", seen.head.text);
    assert_eq!(seen.body.as_deref(), Some(&b"wikipedia"[..]));
    assert_eq!(up.accepts(), 1);
}

// ---------------------------------------------------------------------------------------------
// Conflicting framing
// ---------------------------------------------------------------------------------------------

/// 12. An answer with both `Transfer-Encoding: chunked` and `Content-Length` (smaller, then
///     larger than the body): the chunked framing wins (RFC 9112 §6.3, which also says an
///     intermediary must drop the `Content-Length` before passing such a message on), so the
///     partner gets exactly the decoded body under a framing that matches it, and its
///     connection stays in step.
#[tokio::test]
async fn an_answer_with_chunked_and_a_length_is_read_as_chunked() {
    let up = raw_upstream(|h| match h.path() {
        "/both-short" => vec![
            Step::ReadBody,
            write(
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            ),
        ],
        "/both-long" => vec![
            Step::ReadBody,
            write(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 1000\r\n\r\n\
                 5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            ),
        ],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    for path in ["/both-short", "/both-long"] {
        let a = p.call("GET", path, "", b"").await;
        assert_eq!(a.head.status(), 200, "{path}: {}", a.head.text);
        assert!(
            matches!(a.head.get("content-length"), None | Some("11")),
            "{path}: the upstream's length was passed on: {}",
            a.head.text
        );
        assert_eq!(a.body(), b"hello world", "{path}");
        assert!(p.w.buf.is_empty(), "{path}: stray bytes {:?}", p.w.buf);
        let a = p.call("GET", "/ok", "", b"").await;
        assert_eq!(a.body(), b"ok", "after {path}");
    }
    let c = http1_client();
    for path in ["/both-short", "/both-long"] {
        let got = get(&c, &gw.url(path), &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.text(), "hello world", "{path} (hyper client)");
    }
}

/// A connect the upstream never answers (its accept queue is full, so its SYNs are dropped)
/// ends at `[upstream] connect_timeout` with a 502, and a reload changes that timeout for the
/// next connection without a restart.
#[tokio::test]
async fn connect_timeout_bounds_a_hung_connect_and_a_reload_changes_it() {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue with connections nobody accepts, until a connect hangs.
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("filler connect failed: {e}"),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    let config = |timeout: &str| {
        config_text(&format!("http://{addr}"), &key_entry("a", KEY, "")).replace(
            "connect_timeout = \"1s\"",
            &format!("connect_timeout = \"{timeout}\""),
        )
    };
    let gw = start_gateway(&config("300ms")).await;
    let c = http1_client();
    let timed = |c: PlainClient| {
        let url = gw.url("/v1/guests");
        async move {
            let start = Instant::now();
            let got = get(&c, &url, &[("x-api-key", KEY)]).await;
            (got, start.elapsed())
        }
    };
    let (got, took) = timed(c.clone()).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.text());
    assert_eq!(got.code(), "upstream_unavailable");
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(1200),
        "{took:?}"
    );
    gw.rewrite_config(&config("1500ms"));
    let shared = gw.gateway.shared().clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let shared = shared.clone();
            async move {
                shared.live.load().config.upstream.connect_timeout == Duration::from_millis(1500)
            }
        })
        .await,
        "the reload never landed"
    );
    let (got, took) = timed(c).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.text());
    assert!(took >= Duration::from_millis(1450), "{took:?}");
    drop(fillers);
}

/// A partner that sends `Expect: 100-continue` (curl does for bodies over 1 KiB) gets the
/// `100 Continue` from keygate, sends its body, and the upstream gets it whole; the upstream's
/// own `100 Continue` is not passed on as a second interim answer.
#[tokio::test]
async fn a_partner_expecting_100_continue_is_told_to_go_on_and_its_body_arrives() {
    let up = raw_upstream(|_| {
        vec![
            write("HTTP/1.1 100 Continue\r\n\r\n"),
            Step::ReadBody,
            write(OK),
        ]
    })
    .await;
    let gw = gateway(&up).await;
    let body = pattern(5000, 23);
    let mut p = Partner::connect(&gw).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {KEY}\r\n\
         expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    p.w.s.write_all(head.as_bytes()).await.unwrap();
    // Nothing of the body is sent until keygate says so.
    let interim = tokio::time::timeout(LIMIT, p.w.head())
        .await
        .expect("an interim answer in time")
        .expect("an interim answer");
    assert_eq!(interim.status(), 100, "{}", interim.text);
    p.w.s.write_all(&body).await.unwrap();
    let a = p.answer(false).await;
    assert_eq!(a.head.status(), 200, "{}", a.head.text);
    assert_eq!(a.body(), b"ok");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.as_deref(), Some(&body[..]));
}

/// Request trailers are not forwarded (as nginx): a trailer section carrying the fields keygate
/// strips from heads (identity, forwarding, the key) never reaches the upstream, over
/// HTTP/1.1 chunked or HTTP/2; the body arrives whole and the request is answered.
#[tokio::test]
async fn request_trailers_are_dropped_on_the_way_up() {
    let up = raw_upstream(|_| ok()).await;
    let gw = gateway(&up).await;
    let spoof = "x-keygate-key-id: admin\r\nx-keygate-tenant: other\r\n\
                 x-forwarded-for: 1.2.3.4\r\nx-api-key: leaked\r\nx-checksum: c0ffee\r\n";
    let mut p = Partner::connect(&gw).await;
    let req = format!(
        "POST /v1/upload HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {KEY}\r\n\
         transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n{spoof}\r\n"
    );
    p.w.s.write_all(req.as_bytes()).await.unwrap();
    let answer = p.answer(false).await;
    assert_eq!(answer.head.status(), 200, "{}", answer.head.text);
    let seen = up.seen();
    assert_eq!(seen[0].body.as_deref(), Some(&b"hello world"[..]));
    assert!(seen[0].head.chunked(), "{}", seen[0].head.text);
    assert_eq!(seen[0].trailers, Vec::<String>::new());

    // HTTP/2 trailers, on a body of unknown length (sent upstream chunked).
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"h2 body"))),
        Ok(Frame::trailers({
            let mut t = http::HeaderMap::new();
            t.insert("x-keygate-key-id", "admin".parse().unwrap());
            t.insert("x-checksum", "c0ffee".parse().unwrap());
            t
        })),
    ];
    let body: TestBody = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let req = http::Request::post(gw.url("/v1/upload"))
        .header("x-api-key", KEY)
        .body(body)
        .unwrap();
    let resp = h2c_client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = up.seen();
    assert_eq!(seen[1].body.as_deref(), Some(&b"h2 body"[..]));
    assert!(seen[1].head.chunked(), "{}", seen[1].head.text);
    assert_eq!(seen[1].trailers, Vec::<String>::new());
}

/// Bytes an upstream sends after a complete answer are never read as the answer to the next
/// request: that connection is not reused.
#[tokio::test]
async fn bytes_after_a_complete_answer_are_not_the_next_answer() {
    let up = raw_upstream(|h| match h.path() {
        "/junk-after" => vec![
            Step::ReadBody,
            write("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nforge"),
        ],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    for path in ["/junk-after", "/next", "/next"] {
        let a = p.call("GET", path, "", b"").await;
        assert_eq!(a.head.status(), 200, "{path}: {}", a.head.text);
        assert_eq!(a.body(), b"ok", "{path}");
    }
    // The connection that carried the junk was closed; the next ones were fresh or reused clean.
    let conns = up.conns();
    assert_ne!(conns[0], conns[1], "{conns:?}");
}

/// An answer's trailer fields reach an HTTP/1.1 partner that asked for them (`TE: trailers`):
/// the `Trailer` field that announces them goes on (it is not hop-by-hop, RFC 9110 §6.6.2, and
/// the partner side writes only the trailer fields it names), and so do the fields.
#[tokio::test]
async fn an_http11_partner_asking_for_trailers_gets_them() {
    let (wire, body) = odd_chunks(&pattern(20_000, 5), "x-checksum: c0ffee\r\n");
    let answer = [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
          transfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
            .to_vec(),
        wire,
    ]
    .concat();
    let up = raw_upstream(move |h| match h.path() {
        "/trailers" => vec![Step::ReadBody, write(&answer)],
        _ => ok(),
    })
    .await;
    let gw = gateway(&up).await;
    let mut p = Partner::connect(&gw).await;
    for _ in 0..2 {
        let a = p.call("GET", "/trailers", "te: trailers\r\n", b"").await;
        assert_eq!(a.head.status(), 200, "{}", a.head.text);
        assert_eq!(a.head.get("trailer"), Some("x-checksum"), "{}", a.head.text);
        assert!(a.body() == body.as_slice(), "the decoded body differs");
        assert_eq!(p.w.trailers, ["x-checksum: c0ffee"]);
        let a = p.call("GET", "/after", "", b"").await;
        assert_eq!(a.body(), b"ok");
    }
    // The `TE` of the partner's hop is not the upstream's.
    assert!(up.seen()[0].head.get("te").is_none());
}
