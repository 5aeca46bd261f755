//! Hardening (issue 6), end to end over real sockets: limits and timeouts, hostile bytes, key
//! edge cases and brute force, client IPs, upstream faults. Raw-byte tests talk to the gateway
//! over a plain `TcpStream`, so nothing in a client library can tidy the bytes up first.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::*;
use http::{Method, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const KEY: &str = "partner-key-0123456789abcdefghijklmnop";
const BIG_KEY: &str = "bulk-upload-key-0123456789abcdefghijkl";

/// A config with `server` lines added to `[server]`, `upstream` lines to `[upstream]`, then
/// `rest`; the key `KEY` (id `partner`) is always in it.
fn config(up: &str, server: &str, upstream: &str, rest: &str) -> String {
    config_text(up, &format!("{rest}\n{}", key_entry("partner", KEY, "")))
        .replace(
            "listen = \"127.0.0.1:0\"\n",
            &format!("listen = \"127.0.0.1:0\"\n{server}\n"),
        )
        .replace(
            "connect_timeout = \"1s\"\n",
            &format!("connect_timeout = \"1s\"\n{upstream}\n"),
        )
}

async fn gateway(up: &Upstream, server: &str, upstream: &str, rest: &str) -> TestGateway {
    start_gateway(&config(&up.url(), server, upstream, rest)).await
}

/// Sends `bytes`, then reads the answer: until the gateway closes the connection, or a whole
/// response with a Content-Length body has arrived, or 5 s pass.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if response_complete(&out) {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `out` holds a response head and all of its Content-Length body.
fn response_complete(out: &[u8]) -> bool {
    let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| out.len() >= end + 4 + len)
}

async fn read_to_close(s: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response head (through the blank line) and returns it.
async fn read_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) => out.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {resp:?}"))
}

/// A well-formed request with the key, to check the gateway still serves.
async fn still_serves(gw: &TestGateway) {
    let got = get(&http1_client(), &gw.url("/v1/ok"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
}

// ---------------------------------------------------------------------------------------------
// Limits and timeouts
// ---------------------------------------------------------------------------------------------

/// `[server] header_timeout`: a client trickling its head is cut off; others are served.
#[tokio::test]
async fn slowloris_head_is_cut_off_at_header_timeout_while_others_are_served() {
    let up = start_upstream().await;
    let gw = gateway(&up, "header_timeout = \"600ms\"", "", "").await;
    let mut slow = TcpStream::connect(gw.addr()).await.unwrap();
    let start = Instant::now();
    slow.write_all(b"GET /v1/slow HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for i in 0..40 {
            if slow
                .write_all(format!("X-Drip-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rest = read_to_close(&mut slow, Duration::from_secs(3)).await;
        (rest, start.elapsed())
    });
    // Meanwhile another client is served at once.
    still_serves(&gw).await;
    let (rest, elapsed) = trickle.await.unwrap();
    assert!(!rest.contains("200 OK"), "{rest}");
    assert!(
        elapsed < Duration::from_millis(4500),
        "the slow client was not cut off: {elapsed:?}"
    );
    assert_eq!(
        up.hits(),
        1,
        "only the well-formed request reached the upstream"
    );
}

/// `[server] idle_timeout`: an idle keep-alive connection is closed; one whose request waits on
/// the upstream is not.
#[tokio::test]
async fn idle_connections_are_closed_but_not_while_a_request_is_in_flight() {
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "idle_timeout = \"400ms\"\nheader_timeout = \"30s\"",
        "",
        "",
    )
    .await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let req = format!("GET /v1/slow?ms=900 HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 200, "{head}");
    // Now idle: the gateway closes the connection after ~400 ms.
    let start = Instant::now();
    let _ = read_to_close(&mut s, Duration::from_secs(5)).await;
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "idle connection kept for {waited:?}"
    );
}

/// A connection that holds the only `max_connections` slot and does nothing useful loses it
/// after `idle_timeout`, so the next one is served: an HTTP/1.1 client that stops reading a
/// large response (one byte pipelined behind its request, which stops hyper reading), and an
/// HTTP/2 client that only sends PINGs after its request (frames are not requests).
#[tokio::test]
async fn a_client_that_stops_reading_or_only_pings_gives_its_slot_back() {
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "max_connections = 1\nidle_timeout = \"500ms\"\nheader_timeout = \"30s\"",
        "",
        "",
    )
    .await;
    let served_next = || async {
        let req = format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\r\n");
        let resp = raw(gw.addr(), req.as_bytes()).await;
        assert!(
            resp.starts_with("HTTP/1.1 200"),
            "the next connection was not served within 5 s: {resp:?}"
        );
    };

    // Stops reading 64 MiB, with a byte pipelined behind the request.
    let mut stalled = TcpStream::connect(gw.addr()).await.unwrap();
    let req =
        format!("GET /v1/download?bytes=67108864 HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\r\nG");
    stalled.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    served_next().await;
    drop(stalled);

    // Pings every 100 ms after one request, over HTTP/2 (h2c).
    let pinging = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_keep_alive_interval(Duration::from_millis(100))
        .http2_keep_alive_while_idle(true)
        .build_http::<TestBody>();
    let got = get(&pinging, &gw.url("/v1/x"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK);
    served_next().await;
}

/// An HTTP/2 connection whose preface arrived in pieces is still told as HTTP/2: its PINGs are
/// not activity, and without a request it is closed after `idle_timeout`.
#[tokio::test]
async fn pings_after_a_preface_sent_in_pieces_do_not_keep_a_connection() {
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "idle_timeout = \"500ms\"\nheader_timeout = \"30s\"",
        "",
        "",
    )
    .await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let settings = h2_frame(0x4, 0, 0, &[]);
    assert!(
        closed_while_pinging(gw.addr(), &[&preface[..1], &preface[1..], &settings]).await,
        "a connection sending only PINGs was kept 4 s past a 500 ms idle_timeout"
    );
}

/// An HTTP/2 connection gets `header_timeout`, not the longer `idle_timeout`, to send its first
/// request: a preface followed by PINGs, or by a head whose CONTINUATION frames never end, is
/// cut as a trickled HTTP/1.1 head is; one that has sent a request is then under
/// `idle_timeout` as before.
#[tokio::test]
async fn an_h2_connection_without_a_request_is_cut_at_header_timeout() {
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "idle_timeout = \"30s\"\nheader_timeout = \"500ms\"",
        "",
        "",
    )
    .await;
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    assert!(
        closed_while_pinging(gw.addr(), &[&opening]).await,
        "an HTTP/2 connection without a request was kept 4 s past a 500 ms header_timeout"
    );
    // A HEADERS frame without END_HEADERS, then nothing but PINGs: no request yet either.
    let block = hpack_get(&gw.addr().to_string(), "/v1/x");
    let mut partial = opening.clone();
    partial.extend(h2_frame(0x1, 0x1, 1, &block[..block.len() / 2])); // END_STREAM only
    assert!(
        closed_while_pinging(gw.addr(), &[&partial]).await,
        "a head left unfinished was kept 4 s past a 500 ms header_timeout"
    );
    // After a request, the connection outlives header_timeout (idle_timeout is 30 s).
    let gw = &gw;
    let open = move || sample(&gw.metrics(), "keygate_open_connections");
    let c = h2c_client();
    let got = get(&c, &gw.url("/v1/x"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        eventually(
            Duration::from_secs(5),
            || async move { open() == Some(1.0) }
        )
        .await,
        "the cut connections were still counted"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        open(),
        Some(1.0),
        "an HTTP/2 connection with a request was cut"
    );
}

/// Opens a raw connection to `addr`, sends `pieces` 50 ms apart, then a PING frame every
/// 100 ms, taking whatever the gateway sends; whether the gateway closed it within 4 s.
async fn closed_while_pinging(addr: SocketAddr, pieces: &[&[u8]]) -> bool {
    let (mut rd, mut wr) = TcpStream::connect(addr).await.unwrap().into_split();
    // Takes the server's frames in; ends when the server closes.
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(1..) = rd.read(&mut buf).await {}
    });
    for piece in pieces {
        wr.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    while !closed.is_finished() && started.elapsed() < Duration::from_secs(4) {
        let _ = wr.write_all(&h2_frame(0x6, 0, 0, &[0u8; 8])).await; // PING
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    closed.is_finished()
}

/// A raw upstream that answers every request with `pattern(total, 7)` (`total`: the sum of the
/// pieces' sizes): its head at once, then each piece of the body after its pause (ms).
async fn trickling_upstream(pieces: &'static [(u64, usize)]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let total: usize = pieces.iter().map(|&(_, len)| len).sum();
    let body = std::sync::Arc::new(pattern(total, 7));
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n"
                );
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut at = 0;
                for &(pause, len) in pieces {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    if s.write_all(&body[at..at + len]).await.is_err() {
                        return;
                    }
                    at += len;
                }
            });
        }
    });
    addr
}

/// GETs `url` with the key and reads the body a frame at a time, at most `rate` bytes a second
/// (sleeping after each frame as long as its bytes take at that rate): the status and the body,
/// or how far it got when the body failed.
async fn fetch_slowly(
    client: &PlainClient,
    url: &str,
    rate: Option<u64>,
) -> Result<(StatusCode, Vec<u8>), String> {
    use http_body_util::BodyExt;
    let req = http::Request::get(url)
        .header("x-api-key", KEY)
        .body(empty())
        .unwrap();
    let started = Instant::now();
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    got.extend_from_slice(d);
                    if let Some(rate) = rate {
                        let micros = d.len() as u64 * 1_000_000 / rate;
                        tokio::time::sleep(Duration::from_micros(micros)).await;
                    }
                }
            }
            Err(e) => {
                return Err(format!(
                    "body cut after {} bytes, {:?} in: {e:?}",
                    got.len(),
                    started.elapsed()
                ))
            }
        }
    }
    Ok((status, got))
}

/// A response body still on its way keeps its connection, whatever `idle_timeout` says, over
/// HTTP/2 as over HTTP/1.1: an answer the upstream sends in pieces over ~2.2 s, with a 1.2 s
/// pause in the middle (within `body_timeout`), arrives whole through a gateway whose
/// `idle_timeout` is 500 ms. (An HTTP/2 request used to count only until its response head,
/// and its bytes never: the connection was closed 0.5-1 s into the body.)
#[tokio::test]
async fn a_response_body_that_outlasts_idle_timeout_arrives_whole() {
    const PIECES: &[(u64, usize)] = &[
        (0, 10_000),
        (250, 10_000),
        (250, 10_000),
        (1200, 10_000),
        (250, 10_000),
        (250, 10_000),
    ];
    let up = trickling_upstream(PIECES).await;
    let gw = start_gateway(&config(
        &format!("http://{up}"),
        "idle_timeout = \"500ms\"\nheader_timeout = \"30s\"",
        "body_timeout = \"10s\"",
        "",
    ))
    .await;
    let url = gw.url("/v1/x");
    let (h2, h1) = (h2c_client(), http1_client());
    let (h2, h1) = tokio::join!(fetch_slowly(&h2, &url, None), fetch_slowly(&h1, &url, None));
    let want = pattern(60_000, 7);
    let whole = |got: &Result<(StatusCode, Vec<u8>), String>| matches!(got, Ok((StatusCode::OK, body)) if *body == want);
    assert!(
        whole(&h2) && whole(&h1),
        "HTTP/2: {:?}\nHTTP/1.1: {:?}",
        h2.map(|(s, b)| (s, b.len())),
        h1.map(|(s, b)| (s, b.len()))
    );
}

/// The same from the client's side: an HTTP/2 client that reads a 768 KiB download slowly
/// (small flow-control windows, about 256 KiB a second: ~3 s, six times `idle_timeout`) gets
/// all of it.
#[tokio::test]
async fn a_slowly_read_h2_download_is_not_cut_at_idle_timeout() {
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "idle_timeout = \"500ms\"\nheader_timeout = \"30s\"",
        "",
        "",
    )
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(65_535)
        .http2_initial_connection_window_size(65_535)
        .build_http::<TestBody>();
    let url = gw.url("/v1/download?bytes=786432");
    let (status, body) = fetch_slowly(&client, &url, Some(256 * 1024))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 786_432);
}

/// What a flowing body does not excuse: an HTTP/2 client that asks for a download and never
/// opens its flow-control window (a window of 0, PINGs every 100 ms) takes nothing, and its
/// connection is closed as an idle one.
#[tokio::test]
async fn an_h2_client_that_never_opens_its_window_does_not_keep_its_connection() {
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "idle_timeout = \"500ms\"\nheader_timeout = \"30s\"",
        "",
        "",
    )
    .await;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE = 0.
    out.extend(h2_frame(0x4, 0, 0, &[0, 0x4, 0, 0, 0, 0]));
    out.extend(h2_frame(0x4, 0x1, 0, &[])); // SETTINGS ack (of the server's)
    let block = hpack_get(&gw.addr().to_string(), "/v1/download?bytes=1048576");
    out.extend(h2_frame(0x1, 0x5, 1, &block)); // HEADERS, END_STREAM|END_HEADERS
    assert!(
        closed_while_pinging(gw.addr(), &[&out]).await,
        "a connection whose client never opened its window was kept 4 s past a 500 ms idle_timeout"
    );
}

/// A TLS gateway (`server` lines added to `[server]`) on a listener whose connections get a
/// send buffer of `sndbuf` bytes (the kernel doubles it and, since it is set, does not grow it).
async fn tls_gateway_small_sndbuf(
    up: &Upstream,
    cert: &TestCert,
    server: &str,
    sndbuf: usize,
) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let tls_lines = cert.write_into(dir.path());
    let text = config(&up.url(), &format!("{tls_lines}{server}"), "", "");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let listener = keygate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    // Accepted sockets inherit it from the listener.
    socket2::SockRef::from(&listener)
        .set_send_buffer_size(sndbuf)
        .unwrap();
    let config = keygate::config::Config::load(&path).unwrap();
    let gateway = keygate::server::Gateway::start_on(listener, config)
        .await
        .unwrap();
    TestGateway { gateway, dir, path }
}

/// A TLS client trusting only `cert`, for raw HTTP/1.1 over `tokio_rustls`.
fn tls_connector(cert: &TestCert) -> tokio_rustls::TlsConnector {
    keygate::tls::install_crypto_provider();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(cert.roots())
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// A TLS connection to `addr` whose socket takes at most about `rcvbuf` bytes unread.
async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    rcvbuf: u32,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// Over TLS, a client that stops reading gives its `max_connections` slot back as well.
/// rustls takes what the gateway writes into a buffer of its own and reports it written, so
/// when the end of a response fits in that buffer, what waits on the client is only the flush
/// (the byte pipelined behind the request keeps hyper from reading meanwhile). Small socket
/// buffers on both sides, and answers of 16 KiB to 256 KiB (each with a gateway of its own, one
/// slot each): some end in rustls's buffer, whatever the exact sizes the kernel allows. Every
/// one must let the next connection be served. (Only a pending write counted as a client not
/// reading: a pending flush held the connection and its slot for good.)
#[tokio::test]
async fn over_tls_a_client_that_stops_reading_gives_its_slot_back() {
    let up = start_upstream().await;
    let cert = make_cert();
    let connector = tls_connector(&cert);
    let one = |size: usize| {
        let (up, cert, connector) = (&up, &cert, &connector);
        async move {
            let gw = tls_gateway_small_sndbuf(
                up,
                cert,
                "max_connections = 1\nidle_timeout = \"500ms\"\nheader_timeout = \"30s\"\n",
                8192,
            )
            .await;
            let mut stalled = tls_connect(connector, gw.addr(), 8192).await;
            let req = format!(
                "GET /v1/download?bytes={size} HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\r\nG"
            );
            stalled.write_all(req.as_bytes()).await.unwrap();
            stalled.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;

            let next = async {
                let mut tls = tls_connect(connector, gw.addr(), 1 << 20).await;
                let req = format!(
                    "GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nConnection: close\r\n\r\n"
                );
                tls.write_all(req.as_bytes()).await.unwrap();
                let mut answer = Vec::new();
                let _ = tls.read_to_end(&mut answer).await;
                String::from_utf8_lossy(&answer).into_owned()
            };
            let answer = tokio::time::timeout(Duration::from_secs(8), next).await;
            drop(stalled);
            (size, answer)
        }
    };
    let sizes = (1..=16).map(|k| k * 16 * 1024);
    let outcomes = futures_util::future::join_all(sizes.map(one)).await;
    let held: Vec<usize> = outcomes
        .iter()
        .filter(|(_, answer)| answer.is_err())
        .map(|(size, _)| size / 1024)
        .collect();
    assert!(
        held.is_empty(),
        "with these answers (KiB) left unread the next connection was not served within 8 s: {held:?}"
    );
    for (size, answer) in outcomes {
        let answer = answer.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{size}: {answer:?}");
    }
}

/// `[server] max_connections`: beyond it a connection waits; those already in are served.
#[tokio::test]
async fn connections_beyond_max_connections_wait_and_those_in_are_served() {
    let up = start_upstream().await;
    let gw = gateway(&up, "max_connections = 2", "", "").await;
    let req = format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\r\n");
    let mut a = TcpStream::connect(gw.addr()).await.unwrap();
    let mut b = TcpStream::connect(gw.addr()).await.unwrap();
    // Both admitted connections are served.
    a.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(status_of(&read_head(&mut a).await), 200);
    b.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(status_of(&read_head(&mut b).await), 200);
    // A third connects (the kernel's backlog) but is not served while both are open.
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(700), c.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the third connection was served beyond max_connections"
    );
    // The ones in are still responsive.
    a.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(status_of(&read_head(&mut a).await), 200);
    // When one leaves, the waiting one is served.
    drop(b);
    let head = read_head(&mut c).await;
    assert_eq!(status_of(&head), 200, "{head}");
}

/// A connection that has sent nothing yet does not hold a `max_connections` slot: the kernel
/// keeps it until its first bytes arrive or about a second has passed (`TCP_DEFER_ACCEPT`), so
/// a client that sends its request is served at once beside a silent one, not after the silent
/// one's `header_timeout`.
/// Once the silent one speaks, it is served too.
#[tokio::test]
async fn a_connection_that_sends_nothing_holds_no_slot() {
    let up = start_upstream().await;
    let gw = gateway(&up, "max_connections = 1\nheader_timeout = \"10s\"", "", "").await;
    let mut silent = TcpStream::connect(gw.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let req =
        format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nConnection: close\r\n\r\n");
    let served = tokio::time::timeout(Duration::from_secs(3), raw(gw.addr(), req.as_bytes()))
        .await
        .expect("a request waited behind a connection that sent nothing");
    assert_eq!(status_of(&served), 200, "{served}");
    assert!(started.elapsed() < Duration::from_secs(3));
    silent.write_all(req.as_bytes()).await.unwrap();
    let resp = read_to_close(&mut silent, Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
}

/// A burst of new connections while the gateway is at `max_connections` waits in the listen
/// backlog, all of it: 300 connections complete their TCP handshake at once (with the standard
/// library's backlog of 128 the rest would have their SYNs dropped and retried a second later),
/// and each is served once a slot is free.
#[tokio::test]
async fn a_burst_of_connections_waits_in_the_backlog_and_is_served() {
    let up = start_upstream().await;
    let gw = gateway(&up, "max_connections = 1", "", "").await;
    let mut hold = TcpStream::connect(gw.addr()).await.unwrap();
    // A head begun and not finished: the accept loop has taken `hold` (a connection that sent
    // nothing would still be the kernel's) and now waits for its slot; 300 more queue.
    hold.write_all(b"GET /v1/x HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let connects = (0..300).map(|_| {
        let addr = gw.addr();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(800), TcpStream::connect(addr)).await
        })
    });
    let mut waiting = Vec::new();
    for c in connects {
        let conn = c
            .await
            .unwrap()
            .expect("connect waited for a SYN retry")
            .unwrap();
        waiting.push(conn);
    }
    assert!(started.elapsed() < Duration::from_millis(800));
    let req =
        format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nConnection: close\r\n\r\n");
    for conn in &mut waiting {
        conn.write_all(req.as_bytes()).await.unwrap();
    }
    drop(hold);
    // Each gets its answer: forwarded, or past the key's rate the gateway's own 429.
    let mut answered = 0;
    for mut conn in waiting {
        let resp = read_to_close(&mut conn, Duration::from_secs(10)).await;
        assert!(matches!(status_of(&resp), 200 | 429), "{resp}");
        answered += 1;
    }
    assert_eq!(answered, 300);
    assert!(up.hits() > 0);
}

/// Request head size and header count limits: 431, nothing forwarded.
#[tokio::test]
async fn oversized_heads_and_too_many_headers_get_431_and_are_not_forwarded() {
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "max_header_bytes = \"16KiB\"\nmax_headers = 50",
        "",
        "",
    )
    .await;
    let big = format!(
        "GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    assert_eq!(status_of(&raw(gw.addr(), big.as_bytes()).await), 431);
    let mut many = format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n");
    for i in 0..60 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(status_of(&raw(gw.addr(), many.as_bytes()).await), 431);
    // HTTP/2: the header list limit is announced and enforced the same way.
    let h2 = h2c_client();
    let big_value = "a".repeat(20 * 1024);
    let res = h2
        .request(
            http::Request::get(gw.url("/v1/x"))
                .header("x-api-key", KEY)
                .header("x-big", big_value.as_str())
                .body(empty())
                .unwrap(),
        )
        .await;
    match res {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => panic!("h2 oversized head: expected 431, got {e:?}"),
    }
    assert_eq!(up.hits(), 0);
    still_serves(&gw).await;
}

/// The default header count limit (100, which keygate leaves to hyper's built-in default):
/// 101 fields get 431 and are not forwarded; 90 pass (the upstream, itself limited to 100,
/// sees the forwarding headers keygate adds too).
#[tokio::test]
async fn the_default_header_count_limit_is_100() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "").await;
    let head = |fields: usize| {
        let mut h = format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n");
        for i in 2..fields {
            h.push_str(&format!("X-H{i}: v\r\n"));
        }
        h + "\r\n"
    };
    assert_eq!(status_of(&raw(gw.addr(), head(101).as_bytes()).await), 431);
    assert_eq!(up.hits(), 0);
    assert_eq!(status_of(&raw(gw.addr(), head(90).as_bytes()).await), 200);
    assert_eq!(up.hits(), 1);
}

/// `max_body`: 413 as soon as Content-Length says so, without reading or forwarding the body.
#[tokio::test]
async fn content_length_over_max_body_gets_413_at_once() {
    let up = start_upstream().await;
    let gw = gateway(&up, "max_body = \"1MiB\"", "", "").await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let head = format!(
        "POST /v1/upload HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nContent-Length: {}\r\n\r\n",
        2 << 20
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // No body sent at all: the answer comes from the head alone.
    let resp = read_head(&mut s).await;
    assert_eq!(status_of(&resp), 413, "{resp}");
    assert_eq!(up.hits(), 0);
}

/// `max_body`: a chunked body is cut when it passes the limit: 413, and the upstream never
/// receives a byte beyond the limit. A key's own `max_body` overrides the default.
#[tokio::test]
async fn chunked_body_past_max_body_gets_413_and_nothing_beyond_reaches_upstream() {
    let up = start_upstream().await;
    let rest = key_entry("bulk", BIG_KEY, "max_body = \"4MiB\"");
    let gw = gateway(&up, "max_body = \"1MiB\"", "", &rest).await;
    let c = http1_client();
    // stream_body has no Content-Length: hyper sends it chunked.
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/upload"),
        &[("x-api-key", KEY)],
        stream_body(3 << 20),
    )
    .await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", got.text());
    assert_eq!(got.code(), "payload_too_large");
    let seen_by_upstream = up.seen.lock().unwrap().iter().map(|s| s.body_len).max();
    if let Some(n) = seen_by_upstream {
        assert!(
            n <= 1 << 20,
            "upstream received {n} bytes past the 1 MiB limit"
        );
    }
    // Within the limit: forwarded whole.
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/upload"),
        &[("x-api-key", KEY)],
        stream_body(1 << 20),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["bytes"], 1 << 20);
    // The bulk key's own limit is 4 MiB.
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/upload"),
        &[("x-api-key", BIG_KEY)],
        stream_body(3 << 20),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.json()["bytes"], 3 << 20);
}

/// `[upstream] body_timeout`, client side: a request body that stalls is cut (408) and the
/// upstream sees an aborted body, not a short "complete" one.
#[tokio::test]
async fn a_stalled_request_body_is_cut_at_the_body_timeout() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "body_timeout = \"500ms\"", "").await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let head = format!(
        "POST /v1/upload HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nContent-Length: 100\r\n\r\n0123456789"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let resp = read_head(&mut s).await;
    assert_eq!(status_of(&resp), 408, "{resp}");
    assert!(start.elapsed() < Duration::from_secs(3));
    still_serves(&gw).await;
}

/// A raw upstream: answers every request with a head promising `promised` bytes, sends `sent`
/// bytes, then stalls (`hold`) or closes.
async fn raw_upstream(promised: usize, sent: usize, hold: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {promised}\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&vec![b'z'; sent]).await;
                if hold {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    addr
}

/// `[upstream] body_timeout`, upstream side: a response body that stalls is aborted towards the
/// client (it never looks complete).
#[tokio::test]
async fn a_stalled_response_body_is_aborted_at_the_body_timeout() {
    let up_addr = raw_upstream(1000, 10, true).await;
    let text = config(
        &format!("http://{up_addr}"),
        "",
        "body_timeout = \"500ms\"",
        "",
    );
    let gw = start_gateway(&text).await;
    let c = http1_client();
    let resp = c
        .request(
            http::Request::get(gw.url("/v1/x"))
                .header("x-api-key", KEY)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let start = Instant::now();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(body.is_err(), "a stalled body must not end as complete");
    assert!(start.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// Request smuggling and malformed heads: 400, never forwarded
// ---------------------------------------------------------------------------------------------

/// Each case is a complete request with a valid key, malformed in one way. Every one must be
/// answered 400 and none may reach the upstream; the gateway keeps serving afterwards.
#[tokio::test]
async fn smuggling_and_malformed_heads_get_400_and_are_never_forwarded() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "").await;
    let k = format!("X-Api-Key: {KEY}\r\n");
    let cases: Vec<(&str, String)> = vec![
        (
            "conflicting Content-Length",
            format!("POST /v1/a HTTP/1.1\r\nHost: x\r\n{k}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ),
        (
            "identical repeated Content-Length",
            format!("POST /v1/a HTTP/1.1\r\nHost: x\r\n{k}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "Content-Length with Transfer-Encoding",
            format!("POST /v1/a HTTP/1.1\r\nHost: x\r\n{k}Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "Content-Length list",
            format!("POST /v1/a HTTP/1.1\r\nHost: x\r\n{k}Content-Length: 5, 5\r\n\r\nhello"),
        ),
        (
            "Transfer-Encoding not ending in chunked",
            format!("POST /v1/a HTTP/1.1\r\nHost: x\r\n{k}Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "unknown Transfer-Encoding",
            format!("POST /v1/a HTTP/1.1\r\nHost: x\r\n{k}Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "negative Content-Length",
            format!("POST /v1/a HTTP/1.1\r\nHost: x\r\n{k}Content-Length: -1\r\n\r\n"),
        ),
        (
            "obsolete line folding",
            format!("GET /v1/a HTTP/1.1\r\nHost: x\r\n{k}X-Folded: a\r\n b\r\n\r\n"),
        ),
        (
            "space in a header name",
            format!("GET /v1/a HTTP/1.1\r\nHost: x\r\n{k}X Bad: 1\r\n\r\n"),
        ),
        (
            "space before the colon",
            format!("GET /v1/a HTTP/1.1\r\nHost: x\r\n{k}Content-Length : 0\r\n\r\n"),
        ),
        (
            "control character in a header name",
            format!("GET /v1/a HTTP/1.1\r\nHost: x\r\n{k}X-\x01Bad: 1\r\n\r\n"),
        ),
        (
            "NUL in a header value",
            format!("GET /v1/a HTTP/1.1\r\nHost: x\r\n{k}X-Bad: a\x00b\r\n\r\n"),
        ),
        (
            "bare CR in a header value",
            format!("GET /v1/a HTTP/1.1\r\nHost: x\r\n{k}X-Bad: a\rb\r\n\r\n"),
        ),
        (
            "absolute-form target",
            format!("GET http://evil.example/v1/a HTTP/1.1\r\nHost: evil.example\r\n{k}\r\n"),
        ),
        (
            "CONNECT",
            format!("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n{k}\r\n"),
        ),
        (
            "space in the target",
            format!("GET /v1/a b HTTP/1.1\r\nHost: x\r\n{k}\r\n"),
        ),
        (
            "unknown HTTP version",
            format!("GET /v1/a HTTP/1.7\r\nHost: x\r\n{k}\r\n"),
        ),
        (
            "missing Host on HTTP/1.1",
            format!("GET /v1/a HTTP/1.1\r\n{k}\r\n"),
        ),
        (
            "two Host headers",
            format!("GET /v1/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n{k}\r\n"),
        ),
    ];
    let mut failures = Vec::new();
    for (name, bytes) in &cases {
        let resp = raw(gw.addr(), bytes.as_bytes()).await;
        let status = resp.split(' ').nth(1).unwrap_or("(none)").to_string();
        if status != "400" {
            failures.push(format!("{name}: got {status} ({:?})", resp.lines().next()));
        }
        if up.hits() != 0 {
            failures.push(format!("{name}: forwarded to the upstream"));
            break;
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    still_serves(&gw).await;

    // What is never forwarded is refused before the key is looked at: 400 without a key too
    // (not 401), and a scoped key's `OPTIONS *` like an unscoped one's (it was forwarded as
    // `OPTIONS /*`).
    let scoped = "scoped-key-0123456789abcdefghijklmnop";
    let gw = gateway(
        &up,
        "",
        "",
        &key_entry("scoped", scoped, "scopes = [\"* /**\"]"),
    )
    .await;
    let s = format!("X-Api-Key: {scoped}\r\n");
    let before = up.hits();
    for (name, bytes) in [
        (
            "absolute-form, no key",
            "GET http://evil.example/v1/a HTTP/1.1\r\nHost: evil.example\r\n\r\n".to_string(),
        ),
        (
            "CONNECT, no key",
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".to_string(),
        ),
        (
            "OPTIONS *, no key",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "OPTIONS *, scoped key",
            format!("OPTIONS * HTTP/1.1\r\nHost: x\r\n{s}\r\n"),
        ),
        (
            "OPTIONS *, full key",
            format!("OPTIONS * HTTP/1.1\r\nHost: x\r\n{k}\r\n"),
        ),
    ] {
        let resp = raw(gw.addr(), bytes.as_bytes()).await;
        assert_eq!(status_of(&resp), 400, "{name}: {resp}");
        assert!(resp.contains("bad_request"), "{name}: {resp}");
    }
    assert_eq!(up.hits(), before);
}

/// A length stated twice — two identical `Content-Length` lines, or `Content-Length` with
/// `Transfer-Encoding` in either order (the CL.TE / TE.CL smuggle) — is refused with 400 and
/// `Connection: close`: neither the request nor the one hidden after its body is forwarded or
/// answered, whichever way a proxy in front would have read the body.
#[tokio::test]
async fn a_length_stated_twice_gets_400_closes_and_forwards_nothing() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "").await;
    let smuggled = format!("GET /v1/smuggled HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\r\n");
    for framing in [
        "Content-Length: 4\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 40",
        "Content-Length: 22\r\ncontent-length: 22",
        "Content-Length: 22\r\nX-Between: 1\r\nCONTENT-LENGTH:22",
    ] {
        let bytes = format!(
            "POST /v1/a HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n{framing}\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}"
        );
        let mut conn = TcpStream::connect(gw.addr()).await.unwrap();
        conn.write_all(bytes.as_bytes()).await.unwrap();
        // Read everything until the gateway closes: exactly one answer.
        let resp = read_to_close(&mut conn, Duration::from_secs(5)).await;
        assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{framing}: {resp}");
        assert_eq!(status_of(&resp), 400, "{framing}: {resp}");
        assert!(resp.contains("connection: close"), "{framing}: {resp}");
        assert!(
            resp.contains(r#""error":"bad_request""#),
            "{framing}: {resp}"
        );
        assert_eq!(up.hits(), 0, "{framing}: forwarded");
    }
    still_serves(&gw).await;
}

/// The screen that finds a repeated length follows each body to the next head, so on one
/// keep-alive connection a pipelined chunked request and a length request are served, and only
/// the ambiguous third is refused — also when its head arrives a few bytes at a time, and when
/// the first body carries bytes that look like a bad head.
#[tokio::test]
async fn a_repeated_length_is_found_after_pipelined_bodies_and_in_a_trickled_head() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "").await;
    let decoy = "GET /v1/decoy HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n";
    let good = format!(
        "POST /v1/one HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x};ext=1\r\n{decoy}\r\n0\r\nX-Trailer: 1\r\n\r\n\
         POST /v1/two HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nContent-Length: {}\r\n\r\n{decoy}",
        decoy.len(),
        decoy.len(),
    );
    let bad = format!(
        "POST /v1/three HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    );
    for trickle in [false, true] {
        let before = up.hits();
        let mut conn = TcpStream::connect(gw.addr()).await.unwrap();
        conn.write_all(good.as_bytes()).await.unwrap();
        if trickle {
            for b in bad.as_bytes().chunks(3) {
                // The answer (and the close) may come before the body's last bytes are sent.
                if conn.write_all(b).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        } else {
            conn.write_all(bad.as_bytes()).await.unwrap();
        }
        let resp = read_to_close(&mut conn, Duration::from_secs(5)).await;
        let statuses: Vec<u16> = resp
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| status_of(&resp[i..]))
            .collect();
        assert_eq!(statuses, [200, 200, 400], "trickle {trickle}: {resp}");
        assert_eq!(up.hits() - before, 2, "trickle {trickle}");
        let seen = up.seen.lock().unwrap().clone();
        let paths: Vec<_> = seen[before..]
            .iter()
            .map(|s| s.uri.path().to_string())
            .collect();
        assert_eq!(paths, ["/v1/one", "/v1/two"]);
        assert!(seen[before..]
            .iter()
            .all(|s| s.body_len == decoy.len() as u64));
    }
    still_serves(&gw).await;
}

/// A Content-Length hyper accepts however many leading zeros it has does not end the screen:
/// an ambiguous head pipelined behind one is still refused and never forwarded.
#[tokio::test]
async fn a_length_with_many_leading_zeros_does_not_switch_the_screen_off() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "").await;
    let zeros = "0".repeat(24);
    let pipelined = format!(
        "GET /v1/one HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nContent-Length: {zeros}\r\n\r\n\
         POST /v1/two HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    );
    let before = up.hits();
    let mut conn = TcpStream::connect(gw.addr()).await.unwrap();
    conn.write_all(pipelined.as_bytes()).await.unwrap();
    let resp = read_to_close(&mut conn, Duration::from_secs(5)).await;
    let statuses: Vec<u16> = resp
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| status_of(&resp[i..]))
        .collect();
    assert_eq!(statuses, [200, 400], "{resp}");
    assert_eq!(up.hits() - before, 1);
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// Keys: edge cases, query-string keys, brute force
// ---------------------------------------------------------------------------------------------

/// Over-long, non-ASCII, repeated and doubled keys: each a defined 401 or 400, none forwarded,
/// no panic (the gateway keeps serving).
#[tokio::test]
async fn odd_keys_get_a_defined_answer_and_are_never_forwarded() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "[auth]\nfailures_per_ip = \"off\"").await;
    let long = "k".repeat(513);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "over-long",
            format!("X-Api-Key: {long}\r\n"),
            401,
            "invalid_api_key",
        ),
        (
            "over-long Bearer",
            format!("Authorization: Bearer {long}\r\n"),
            401,
            "invalid_api_key",
        ),
        (
            "non-ASCII",
            "X-Api-Key: cl\u{e9}-\u{1F511}\r\n".to_string(),
            401,
            "invalid_api_key",
        ),
        (
            "obs-text bytes",
            "X-Api-Key: \u{ff}\u{fe}key\r\n".to_string(),
            401,
            "invalid_api_key",
        ),
        (
            "inner space",
            "X-Api-Key: part ner\r\n".to_string(),
            401,
            "invalid_api_key",
        ),
        (
            "tab inside",
            "X-Api-Key: part\tner\r\n".to_string(),
            401,
            "invalid_api_key",
        ),
        (
            "empty",
            "X-Api-Key: \r\n".to_string(),
            401,
            "missing_api_key",
        ),
        (
            "empty Bearer",
            "Authorization: Bearer \r\n".to_string(),
            401,
            "missing_api_key",
        ),
        (
            "two key headers",
            format!("X-Api-Key: {KEY}\r\nX-Api-Key: {KEY}\r\n"),
            400,
            "ambiguous_api_key",
        ),
        (
            "header and Bearer",
            format!("X-Api-Key: {KEY}\r\nAuthorization: Bearer {KEY}\r\n"),
            400,
            "ambiguous_api_key",
        ),
        (
            "two Bearer tokens",
            format!("Authorization: Bearer {KEY}\r\nAuthorization: Bearer {KEY}\r\n"),
            400,
            "ambiguous_api_key",
        ),
    ];
    for (name, header, status, code) in cases {
        let req = format!("GET /v1/x HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n");
        // Send the bytes as they are: latin-1 chars become single bytes, others UTF-8.
        let bytes: Vec<u8> = if name == "obs-text bytes" {
            req.chars().map(|c| c as u32 as u8).collect()
        } else {
            req.into_bytes()
        };
        let resp = raw(gw.addr(), &bytes).await;
        assert_eq!(status_of(&resp), status, "{name}: {resp}");
        assert!(
            resp.contains(&format!("\"error\":\"{code}\"")),
            "{name}: {resp}"
        );
    }
    assert_eq!(up.hits(), 0);
    still_serves(&gw).await;
}

/// `[auth] allow_query_key = false` (the default): a key in the query string is refused and
/// not forwarded, even a valid one.
#[tokio::test]
async fn query_string_keys_are_refused_by_default() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "").await;
    let got = get(
        &http1_client(),
        &gw.url(&format!("/v1/x?api_key={KEY}")),
        &[],
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert!(got.text().contains("query string"), "{}", got.text());
    assert_eq!(up.hits(), 0);
}

/// With `allow_query_key = true` the query key is accepted and removed from what is forwarded;
/// the other parameters stay in order. A query key next to a header key is ambiguous.
#[tokio::test]
async fn an_allowed_query_key_is_stripped_from_the_forwarded_query() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "[auth]\nallow_query_key = true").await;
    let c = http1_client();
    let got = get(&c, &gw.url(&format!("/v1/x?a=1&api_key={KEY}&b=two")), &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let seen = up.last();
    assert_eq!(seen.uri.query(), Some("a=1&b=two"));
    assert_eq!(seen.headers["x-keygate-key-id"], "partner");
    assert!(!seen.uri.to_string().contains(KEY));

    let got = get(&c, &gw.url(&format!("/v1/x?api_key={KEY}")), &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(up.last().uri.query(), None);

    // Percent-encoded, it is the same key.
    let encoded: String = KEY.bytes().map(|b| format!("%{b:02X}")).collect();
    let got = get(&c, &gw.url(&format!("/v1/x?api_key={encoded}")), &[]).await;
    assert_eq!(got.status, StatusCode::OK);

    let got = get(
        &c,
        &gw.url(&format!("/v1/x?api_key={KEY}")),
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.code(), "ambiguous_api_key");
    let got = get(
        &c,
        &gw.url(&format!("/v1/x?api_key={KEY}&api_key={KEY}")),
        &[],
    )
    .await;
    assert_eq!(got.code(), "ambiguous_api_key");
    assert_eq!(up.hits(), 3);
}

/// `[auth] failures_per_ip`: past the budget, the address gets 429 for everything but the keys
/// it used successfully since it first failed (a partner behind the same NAT, calling while
/// the guessing went on), which keep working; any other key, even a valid one, is not looked
/// up, so a blocked address learns nothing from its guesses. A reload does not forgive.
#[tokio::test]
async fn failed_attempts_per_ip_are_limited_and_valid_keys_keep_working() {
    const OTHER: &str = "other-partner-key-0123456789abcdefghij";
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "",
        "",
        &format!(
            "[auth]\nfailures_per_ip = \"5/min\"\n{}",
            key_entry("other", OTHER, "")
        ),
    )
    .await;
    let c = http1_client();
    let url = gw.url("/v1/x");
    let got = get(&c, &url, &[("x-api-key", "guess-0")]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    // The partner behind the same address calls while the guessing goes on.
    assert_eq!(
        get(&c, &url, &[("x-api-key", KEY)]).await.status,
        StatusCode::OK
    );
    for i in 1..5 {
        let got = get(&c, &url, &[("x-api-key", &format!("guess-{i}"))]).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let got = get(&c, &url, &[("x-api-key", "guess-5")]).await;
    assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(got.code(), "too_many_failures");
    let retry: u64 = got.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "retry-after {retry}");
    // Without a key, with junk, with a wrong key: all 429 now.
    assert_eq!(get(&c, &url, &[]).await.code(), "too_many_failures");
    assert_eq!(
        get(&c, &url, &[("x-api-key", &"j".repeat(600))])
            .await
            .code(),
        "too_many_failures"
    );
    // A valid key this address never used is a guess like any other: no answer tells it apart.
    let got = get(&c, &url, &[("x-api-key", OTHER)]).await;
    assert_eq!(
        got.code(),
        "too_many_failures",
        "a guess was judged while blocked"
    );
    // The partner is not locked out.
    let got = get(&c, &url, &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK);
    // A reload (same rate) keeps the block.
    let text = std::fs::read_to_string(&gw.path).unwrap();
    gw.rewrite_config(&format!("{text}\n# touched\n"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        get(&c, &url, &[("x-api-key", "guess-6")]).await.code(),
        "too_many_failures"
    );
    assert_eq!(up.hits(), 2);
}

// ---------------------------------------------------------------------------------------------
// Client IP: socket peer, trusted proxies, PROXY protocol v2
// ---------------------------------------------------------------------------------------------

/// Connects from `local` (any 127/8 address works on loopback) to `addr`.
async fn connect_from(local: &str, addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// One request over a fresh connection from `local`, with `headers` (raw lines); the status.
async fn status_from(
    local: &str,
    gw: &TestGateway,
    prefix: &[u8],
    headers: impl AsRef<[u8]>,
) -> u16 {
    let mut s = connect_from(local, gw.addr()).await;
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n");
    bytes.extend_from_slice(headers.as_ref());
    bytes.extend_from_slice(b"Connection: close\r\n\r\n");
    s.write_all(&bytes).await.unwrap();
    let resp = read_to_close(&mut s, Duration::from_secs(5)).await;
    status_of(&resp)
}

/// A gateway behind proxies on 127.0.0.0/8 (`server`: more `[server]` lines), with a budget of
/// two failed keys per client.
async fn behind_a_proxy(up: &Upstream, server: &str) -> TestGateway {
    gateway(
        up,
        &format!("trusted_proxies = [\"127.0.0.0/8\"]\n{server}"),
        "",
        "[auth]\nfailures_per_ip = \"2/min\"",
    )
    .await
}

/// The statuses of `n` such requests in a row (a failure budget being spent).
async fn statuses_from(
    local: &str,
    gw: &TestGateway,
    prefix: &[u8],
    headers: impl AsRef<[u8]>,
    n: usize,
) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(status_from(local, gw, prefix, headers.as_ref()).await);
    }
    out
}

/// A peer that is not a trusted proxy cannot pick its address with `X-Forwarded-For`: its
/// failures count against the socket address whatever the header says.
#[tokio::test]
async fn forwarding_headers_of_untrusted_peers_do_not_escape_the_failure_budget() {
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "trusted_proxies = [\"127.0.0.1\"]",
        "",
        "[auth]\nfailures_per_ip = \"3/min\"",
    )
    .await;
    for i in 0..3 {
        let h = format!("X-Api-Key: wrong\r\nX-Forwarded-For: 198.51.100.{i}\r\nForwarded: for=198.51.100.{i}\r\n");
        assert_eq!(status_from("127.0.0.2", &gw, b"", &h).await, 401);
    }
    let h = "X-Api-Key: wrong\r\nX-Forwarded-For: 198.51.100.99\r\n";
    assert_eq!(status_from("127.0.0.2", &gw, b"", h).await, 429);
    // Another address is not affected.
    assert_eq!(
        status_from("127.0.0.3", &gw, b"", "X-Api-Key: wrong\r\n").await,
        401
    );
}

/// Behind a trusted proxy, the client is the rightmost untrusted `X-Forwarded-For` hop (or
/// `Forwarded: for=` with `client_ip_header = "forwarded"`): two clients behind one proxy have
/// separate budgets, a client cannot move itself by writing a hop of its own to the left, nor
/// by writing the header its proxy does not use (passed on untouched).
#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    let up = start_upstream().await;
    let gw = behind_a_proxy(&up, "").await;
    let attacker = "X-Api-Key: wrong\r\nX-Forwarded-For: 203.0.113.7\r\n";
    assert_eq!(
        statuses_from("127.0.0.1", &gw, b"", attacker, 3).await,
        [401, 401, 429]
    );
    // A forged hop to the left of the one the proxy appended changes nothing.
    let forged = "X-Api-Key: wrong\r\nX-Forwarded-For: 192.0.2.1, 203.0.113.7\r\n";
    assert_eq!(status_from("127.0.0.1", &gw, b"", forged).await, 429);
    // Another client behind the same proxy is judged on its own.
    let other = "X-Api-Key: wrong\r\nX-Forwarded-For: 203.0.113.8\r\n";
    assert_eq!(status_from("127.0.0.1", &gw, b"", other).await, 401);
    // `Forwarded` is not read here: a client's own is the proxy's (127.0.0.1) request.
    let forwarded_blocked = "X-Api-Key: wrong\r\nForwarded: for=203.0.113.8\r\n";
    assert_eq!(
        statuses_from("127.0.0.1", &gw, b"", forwarded_blocked, 3).await,
        [401, 401, 429]
    );

    // Behind a proxy that writes `Forwarded` (HAProxy `option forwarded`).
    let gw = behind_a_proxy(&up, "client_ip_header = \"forwarded\"").await;
    let attacker = "X-Api-Key: wrong\r\nForwarded: for=203.0.113.7\r\n";
    assert_eq!(
        statuses_from("127.0.0.1", &gw, b"", attacker, 3).await,
        [401, 401, 429]
    );
    // The client's X-Forwarded-For, which this proxy passes on as it came, picks nothing.
    let spoof = format!("{attacker}X-Forwarded-For: 198.51.100.1\r\n");
    assert_eq!(status_from("127.0.0.1", &gw, b"", &spoof).await, 429);
    let other = "X-Api-Key: wrong\r\nForwarded: for=\"203.0.113.9:5000\"\r\n";
    assert_eq!(status_from("127.0.0.1", &gw, b"", other).await, 401);
}

/// A byte that is not ASCII in the client's part of `X-Forwarded-For` (which a proxy appends to,
/// as nginx's `$proxy_add_x_forwarded_for` does) spoils that hop only: the client is still the
/// hop the proxy appended, its failures are its own (not the proxy's), and the upstream gets
/// the whole chain with the proxy's hop and keygate's peer after it.
#[tokio::test]
async fn a_non_ascii_byte_in_a_forwarded_chain_spoils_only_its_own_hop() {
    let up = start_upstream().await;
    let gw = behind_a_proxy(&up, "").await;
    let spoiled = |key: &str| {
        let mut h = format!("X-Api-Key: {key}\r\nX-Forwarded-For: ").into_bytes();
        h.extend_from_slice(b"\xff\xfe, 203.0.113.7\r\n");
        h
    };
    assert_eq!(
        status_from("127.0.0.1", &gw, b"", spoiled("wrong")).await,
        401
    );
    // A valid key from that client (before its budget is spent: once blocked, only keys it had
    // used still get through) goes on with the whole chain.
    assert_eq!(status_from("127.0.0.1", &gw, b"", spoiled(KEY)).await, 200);
    let seen = up.last();
    assert_eq!(
        seen.headers["x-forwarded-for"].as_bytes(),
        b"\xff\xfe, 203.0.113.7, 127.0.0.1"
    );
    assert_eq!(
        statuses_from("127.0.0.1", &gw, b"", spoiled("wrong"), 2).await,
        [401, 429]
    );
    // The budget spent was 203.0.113.7's: the proxy itself and other clients still get 401.
    assert_eq!(
        status_from("127.0.0.1", &gw, b"", "X-Api-Key: wrong\r\n").await,
        401
    );
    let other = "X-Api-Key: wrong\r\nX-Forwarded-For: 203.0.113.8\r\n";
    assert_eq!(status_from("127.0.0.1", &gw, b"", other).await, 401);
}

/// `[server] proxy_protocol = true`: a trusted peer's connection starts with a PROXY v2 header
/// whose source is the client (its failures, its X-Forwarded-For hop); a trusted peer without
/// the header is refused; an untrusted peer is served without one.
#[tokio::test]
async fn proxy_protocol_v2_from_a_trusted_peer_names_the_client() {
    use keygate::client_ip::encode_proxy_v2;
    let up = start_upstream().await;
    let gw = gateway(
        &up,
        "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = true",
        "",
        "[auth]\nfailures_per_ip = \"1/min\"",
    )
    .await;
    let dst = gw.addr();
    let client_a = encode_proxy_v2("203.0.113.7:40000".parse().unwrap(), dst);
    let client_b = encode_proxy_v2("[2001:db8::9]:40000".parse().unwrap(), dst);
    let key = format!("X-Api-Key: {KEY}\r\n");
    assert_eq!(status_from("127.0.0.1", &gw, &client_a, &key).await, 200);
    assert_eq!(
        up.last().headers["x-forwarded-for"],
        "203.0.113.7",
        "the upstream sees the PROXY source as the client"
    );
    let wrong = "X-Api-Key: wrong\r\n";
    assert_eq!(status_from("127.0.0.1", &gw, &client_a, wrong).await, 401);
    assert_eq!(status_from("127.0.0.1", &gw, &client_a, wrong).await, 429);
    assert_eq!(status_from("127.0.0.1", &gw, &client_b, wrong).await, 401);
    // A trusted peer that skips the header gets no answer at all.
    let mut s = connect_from("127.0.0.1", gw.addr()).await;
    s.write_all(format!("GET /v1/x HTTP/1.1\r\nHost: x\r\n{key}\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut s, Duration::from_secs(3)).await, "");
    // An untrusted peer speaks plain HTTP.
    assert_eq!(status_from("127.0.0.2", &gw, b"", &key).await, 200);
    // A LOCAL header (the balancer's own connection, or a source it cannot name): the peer is
    // the balancer, and an X-Forwarded-For there is the client's own, so it picks nothing.
    let mut local = keygate::client_ip::PROXY_V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    for i in 1..=2 {
        let spoof = format!("X-Api-Key: wrong\r\nX-Forwarded-For: 198.51.100.{i}\r\n");
        let want = if i == 1 { 401 } else { 429 };
        assert_eq!(status_from("127.0.0.1", &gw, &local, &spoof).await, want);
    }
}

/// A reload that changes `trusted_proxies` applies to the PROXY header and to the request path
/// at once: a peer taken off the list is served plain HTTP without a PROXY header from then on
/// (before, the accept loop kept the list it started with and waited for a header).
#[tokio::test]
async fn a_reload_of_trusted_proxies_applies_to_the_proxy_header_too() {
    use keygate::client_ip::encode_proxy_v2;
    let up = start_upstream().await;
    let text = |proxies: &str| {
        config(
            &up.url(),
            &format!("trusted_proxies = [{proxies}]\nproxy_protocol = true"),
            "",
            "",
        )
    };
    let gw = start_gateway(&text("\"127.0.0.0/8\"")).await;
    let key = format!("X-Api-Key: {KEY}\r\n");
    let proxied = encode_proxy_v2("203.0.113.7:40000".parse().unwrap(), gw.addr());
    assert_eq!(status_from("127.0.0.2", &gw, &proxied, &key).await, 200);
    assert_eq!(up.last().headers["x-forwarded-for"], "203.0.113.7");

    gw.rewrite_config(&text("\"127.0.0.1\""));
    assert!(
        eventually(Duration::from_secs(5), || async {
            // Until the reload lands the gateway waits for a header: no answer at all.
            let mut s = connect_from("127.0.0.2", gw.addr()).await;
            let req = format!("GET /v1/x HTTP/1.1\r\nHost: x\r\n{key}Connection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            read_to_close(&mut s, Duration::from_millis(300))
                .await
                .starts_with("HTTP/1.1 200")
        })
        .await,
        "127.0.0.2 was still expected to send a PROXY header after the reload"
    );
    assert_eq!(up.last().headers["x-forwarded-for"], "127.0.0.2");
    // Its PROXY header is now the start of a malformed request; 127.0.0.1 still sends one.
    assert_eq!(status_from("127.0.0.2", &gw, &proxied, &key).await, 400);
    assert_eq!(status_from("127.0.0.1", &gw, &proxied, &key).await, 200);
    assert_eq!(up.last().headers["x-forwarded-for"], "203.0.113.7");
}

// ---------------------------------------------------------------------------------------------
// Logs never carry a key
// ---------------------------------------------------------------------------------------------

/// Run as its own process at `RUST_LOG=trace`: whatever arrives (valid key in each place, bad
/// keys, refused query keys, upstream down), no log line carries a key, its hash, or the
/// Authorization value.
#[tokio::test]
async fn no_log_line_carries_a_key_its_hash_or_an_authorization_value() {
    let up = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        config(
            &up.url(),
            "",
            "",
            "[auth]\nallow_query_key = true\nfailures_per_ip = \"2/min\"",
        ),
    )
    .unwrap();
    let gw = spawn_keygate(&path, &[]);
    let c = http1_client();
    let base = format!("http://{}", gw.addr);
    let wrong = "wrong-key-that-must-not-be-logged-42";
    let basic = "Basic c2VjcmV0LXVzZXI6c2VjcmV0LXB3";
    let _ = get(&c, &format!("{base}/v1/a"), &[("x-api-key", KEY)]).await;
    let _ = get(
        &c,
        &format!("{base}/v1/a"),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await;
    let _ = get(&c, &format!("{base}/v1/a?api_key={KEY}&x=1"), &[]).await;
    let _ = get(
        &c,
        &format!("{base}/v1/a"),
        &[("x-api-key", KEY), ("authorization", basic)],
    )
    .await;
    for _ in 0..4 {
        let _ = get(
            &c,
            &format!("{base}/v1/a?api_key={wrong}"),
            &[("x-api-key", wrong)],
        )
        .await;
        let _ = get(&c, &format!("{base}/v1/a"), &[("x-api-key", wrong)]).await;
    }
    let _ = get(
        &c,
        &format!("{base}/v1/a"),
        &[("x-api-key", &"z".repeat(600))],
    )
    .await;
    up.stop();
    let _ = get(&c, &format!("{base}/v1/down"), &[("x-api-key", KEY)]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = gw.logs();
    assert!(logs.contains("keygate::access"), "no access log: {logs}");
    let hash_hex = blake3::hash(KEY.as_bytes()).to_hex().to_string();
    for secret in [
        KEY,
        wrong,
        &hash_hex[..16],
        "c2VjcmV0LXVzZXI6c2VjcmV0LXB3",
        "zzzzzzzzzzzzzzzz",
    ] {
        assert!(
            !logs.contains(secret),
            "the log carries {secret:?}:\n{logs}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream faults
// ---------------------------------------------------------------------------------------------

/// The upstream dies mid-response: the client's body ends in an error (never a short body that
/// looks complete), and the gateway keeps serving others, over the same pool.
#[tokio::test]
async fn an_upstream_dying_mid_body_aborts_the_clients_body_and_others_are_served() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "").await;
    // A raw upstream that promises 128 KiB, sends 64 KiB and closes its socket.
    let dying = raw_upstream(128 << 10, 64 << 10, false).await;
    let gw_dying = start_gateway(&config(&format!("http://{dying}"), "", "", "")).await;
    let c = http1_client();
    for _ in 0..3 {
        let resp = c
            .request(
                http::Request::get(gw_dying.url("/v1/x"))
                    .header("x-api-key", KEY)
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-length"], "131072");
        let body = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert!(body.is_err(), "a truncated body was delivered as complete");
        // The gateway in front of the dying upstream still answers, and so does the other.
        still_serves(&gw).await;
        let got = get(&c, &gw_dying.url("/v1/x"), &[]).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    }
}

/// A hung upstream: each waiting request gets 504 at `[upstream] timeout`; while they wait,
/// the same key's other requests are served at once (waiting holds no limiter budget and no
/// lock).
#[tokio::test]
async fn a_hung_upstream_gives_504_at_the_timeout_without_blocking_others() {
    let up = start_upstream().await;
    let text = config(&up.url(), "", "", "").replace("timeout = \"2s\"", "timeout = \"800ms\"");
    let gw = start_gateway(&text).await;
    let url = gw.url("/v1/slow?ms=10000");
    let started = Instant::now();
    let hung: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&http1_client(), &url, &[("x-api-key", KEY)]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        let t = Instant::now();
        still_serves(&gw).await;
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "blocked by the hung requests"
        );
    }
    for h in hung {
        let got = h.await.unwrap();
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(got.code(), "upstream_timeout");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

/// A panic in one connection's task ends that connection only: every connection is its own
/// tokio task, which catches the unwind. That holds only while panics unwind, so this guards
/// the profiles against `panic = "abort"`.
#[test]
fn panics_unwind_so_a_connection_task_cannot_take_the_process_down() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let manifest: toml::Table = manifest.parse().unwrap();
    if let Some(profiles) = manifest.get("profile").and_then(|p| p.as_table()) {
        for (name, profile) in profiles {
            assert_ne!(
                profile.get("panic").and_then(|p| p.as_str()),
                Some("abort"),
                "profile.{name} sets panic = \"abort\": one panicking connection would end the process"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reloads under load
// ---------------------------------------------------------------------------------------------

const STAY: &str = "stays-key-0123456789abcdefghijklmnopqr";
const GONE: &str = "goes-away-key-0123456789abcdefghijklmn";

/// 100 reloads, alternating valid and broken files, under sustained load from several
/// clients: zero 5xx, zero refusals of the key that stays, and once the removal of a key has
/// settled, zero admissions of it (broken files in between never bring it back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_lose_nothing_and_admit_no_removed_key() {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    };
    let up = start_upstream().await;
    let high = "rate = \"100000/s\"\nburst = 100000";
    let valid = |with_gone: bool, n: usize| {
        let mut keys = key_entry("stays", STAY, high);
        if with_gone {
            keys.push_str(&key_entry("goes", GONE, high));
        }
        // Each valid file differs, so every write is a real change.
        config(&up.url(), "", "", &format!("# version {n}\n{keys}"))
    };
    let broken = |n: usize| {
        if n % 4 == 1 {
            "[server\nlisten = ".to_string()
        } else {
            // Valid TOML, invalid config: a duplicate id.
            format!(
                "{}{}",
                valid(true, n),
                key_entry("stays", "another-key-0123456789abcdefghijklmno", "")
            )
        }
    };
    let gw = start_gateway(&valid(true, 0)).await;
    let url = gw.url("/v1/load");

    let stop = Arc::new(AtomicBool::new(false));
    let settled = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let bad: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let mut load = Vec::new();
    for worker in 0..4 {
        let (stop, settled, ok, bad, url) = (
            stop.clone(),
            settled.clone(),
            ok.clone(),
            bad.clone(),
            url.clone(),
        );
        load.push(tokio::spawn(async move {
            let c = http1_client();
            while !stop.load(Ordering::Relaxed) {
                let got = get(&c, &url, &[("x-api-key", STAY)]).await;
                if got.status == StatusCode::OK {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad.lock().unwrap().push(format!("stays: {}", got.status));
                }
                if worker == 0 {
                    let was_settled = settled.load(Ordering::SeqCst);
                    let got = get(&c, &url, &[("x-api-key", GONE)]).await;
                    if got.status.is_server_error() {
                        bad.lock().unwrap().push(format!("goes: {}", got.status));
                    }
                    // Refused: 401, or 429 once the brute-force guard has seen enough.
                    if was_settled && got.status.is_success() {
                        bad.lock()
                            .unwrap()
                            .push(format!("removed key: {}", got.status));
                    }
                }
            }
        }));
    }

    let c = http1_client();
    for n in 1..=100 {
        let text = if n % 2 == 1 {
            broken(n)
        } else {
            valid(n < 50, n)
        };
        gw.rewrite_config(&text);
        if n == 50 {
            // The removal settles when the gateway refuses the key; from then on, never again.
            let removed = eventually(Duration::from_secs(5), || async {
                !get(&c, &url, &[("x-api-key", GONE)])
                    .await
                    .status
                    .is_success()
            })
            .await;
            assert!(removed, "the removed key is still admitted");
            settled.store(true, Ordering::SeqCst);
        } else {
            tokio::time::sleep(Duration::from_millis(70)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let bad = bad.lock().unwrap();
    assert!(
        bad.is_empty(),
        "{} bad answers: {:?}",
        bad.len(),
        &bad[..bad.len().min(20)]
    );
    assert!(ok.load(Ordering::Relaxed) > 200, "too little load: {ok:?}");
}

// ---------------------------------------------------------------------------------------------
// Protocols: WebSocket pass-through, HTTP/2 rapid reset
// ---------------------------------------------------------------------------------------------

/// A real WebSocket echo server as the upstream; it records the handshake headers it saw and
/// greets each client with a message of its own before echoing.
async fn ws_upstream() -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<http::HeaderMap>>>,
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{handshake::server, Message};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<http::HeaderMap>>> = Default::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let record = record.clone();
            tokio::spawn(async move {
                // tungstenite's callback signature fixes the error type; it is not ours to shrink.
                #[allow(clippy::result_large_err)]
                let cb = |req: &server::Request, resp: server::Response| {
                    record.lock().unwrap().push(req.headers().clone());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
                    return;
                };
                let _ = ws.send(Message::text("hello from upstream")).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        let _ = ws.send(msg).await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// WebSocket through keygate: admitted after the key check, bytes flow both ways, the key never
/// reaches the upstream; without a key the handshake is refused and nothing is opened upstream.
#[tokio::test]
async fn websocket_passes_through_after_the_key_check_with_the_key_stripped() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let (up_addr, seen) = ws_upstream().await;
    let gw = start_gateway(&config(&format!("http://{up_addr}"), "", "", "")).await;
    let url = format!("ws://{}/v1/stream", gw.addr());

    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("x-api-key", KEY.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    // Upstream → client without a prompt.
    let first = ws.next().await.unwrap().unwrap();
    assert_eq!(first, Message::text("hello from upstream"));
    // Client → upstream → client, text and a large binary frame.
    for i in 0..3 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("ping {i}"))
        );
    }
    let blob = vec![7u8; 256 * 1024];
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();

    let headers = seen.lock().unwrap()[0].clone();
    assert!(
        headers.get("x-api-key").is_none(),
        "the key reached the upstream"
    );
    assert_eq!(headers["x-keygate-key-id"], "partner");
    assert!(headers["upgrade"]
        .to_str()
        .unwrap()
        .eq_ignore_ascii_case("websocket"));

    // No key: refused before the upstream sees anything.
    let err = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("expected a 401 handshake refusal, got {other:?}"),
    }
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// An upgraded connection keeps its `max_connections` slot, its place in the connection gauge
/// until its splice ends: with a limit of one, a second connection waits while a WebSocket is
/// open and is served once it closes. (Before, hyper's part ended at the 101 and the slot was
/// given back while the splice went on, uncounted.)
#[tokio::test]
async fn a_websocket_holds_its_connection_slot_until_it_closes() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let (up_addr, _seen) = ws_upstream().await;
    let gw = start_gateway(&config(
        &format!("http://{up_addr}"),
        "max_connections = 1",
        "",
        "",
    ))
    .await;
    let mut req = format!("ws://{}/v1/stream", gw.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("x-api-key", KEY.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello from upstream")
    );

    let mut next = TcpStream::connect(gw.addr()).await.unwrap();
    let get = format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\r\n");
    next.write_all(get.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(700), next.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "served beside an open WebSocket beyond max_connections"
    );

    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    drop(ws);
    let served = tokio::time::timeout(Duration::from_secs(5), next.read_exact(&mut buf)).await;
    assert!(served.is_ok(), "not served after the WebSocket closed");
    assert!(
        buf.starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
}

/// An upgraded connection on which nothing moves either way for `idle_timeout` (the one the
/// listener started with, like every connection's) is closed on both sides, its slot given
/// back, even when the upstream never closes (hung, or ignoring the client's half-close): a
/// silent WebSocket client cannot hold a slot for as long as the upstream lives.
#[tokio::test]
async fn an_idle_upgraded_connection_gives_its_slot_back_whatever_the_upstream_does() {
    // Switches protocols, then neither reads, writes nor closes until the test ends.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = l.local_addr().unwrap();
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                .await;
            let _ = held_tx.send(s);
        }
    });
    let text = config(
        &format!("http://{up_addr}"),
        "max_connections = 1\nidle_timeout = \"500ms\"",
        "",
        "",
    );
    let gw = start_gateway(&text).await;
    // A reload cannot change idle_timeout (it needs a restart): not for splices either.
    gw.rewrite_config(&text.replace("idle_timeout = \"500ms\"", "idle_timeout = \"60s\""));
    let shared = gw.gateway.shared().clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let shared = shared.clone();
            async move { shared.live.load().config.server.idle_timeout == Duration::from_secs(60) }
        })
        .await,
        "the reload never landed"
    );
    // Before the handshake: the splice (and its idle clock) cannot start earlier.
    let started = std::time::Instant::now();
    let mut ws = TcpStream::connect(gw.addr()).await.unwrap();
    let handshake = format!(
        "GET /v1/stream HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-Api-Key: {KEY}\r\n\r\n"
    );
    ws.write_all(handshake.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    ws.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
    let _upstream_side = held.recv().await.unwrap();
    // The client goes quiet (and says it has no more to send); the upstream says nothing.
    ws.shutdown().await.unwrap();

    let mut next = TcpStream::connect(gw.addr()).await.unwrap();
    let get = format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\r\n");
    next.write_all(get.as_bytes()).await.unwrap();
    let served = tokio::time::timeout(Duration::from_secs(10), next.read(&mut buf)).await;
    assert!(
        matches!(served, Ok(Ok(n)) if n > 0),
        "the idle upgraded connection still held the only slot after 10 s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "served before the upgraded connection was idle"
    );
}

/// One HTTP/2 frame: 9-byte header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK block for `GET path` with the key: static-table pseudo headers, literals without
/// Huffman coding.
fn hpack_get(authority: &str, path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
    let lit = |b: &mut Vec<u8>, s: &str| {
        b.push(s.len() as u8);
        b.extend_from_slice(s.as_bytes());
    };
    b.push(0x04); // :path, literal value
    lit(&mut b, path);
    b.push(0x01); // :authority, literal value
    lit(&mut b, authority);
    b.push(0x00); // x-api-key, literal name and value
    lit(&mut b, "x-api-key");
    lit(&mut b, KEY);
    b
}

/// HTTP/2 rapid reset (CVE-2023-44487), spoken frame by frame: a client that opens streams and
/// resets each at once, as fast as it can write, is sent away with GOAWAY, the flood does not
/// turn into upstream requests, and another client is answered promptly throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_rapid_reset_flood_is_cut_off_and_others_are_served() {
    let up = start_upstream().await;
    let gw = gateway(&up, "", "", "").await;
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    // Read the server's frames; report the GOAWAY error code, if one comes.
    let reader = tokio::spawn(async move {
        let mut head = [0u8; 9];
        loop {
            if rd.read_exact(&mut head).await.is_err() {
                return None;
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                return None;
            }
            if head[3] == 0x7 && len >= 8 {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
    });
    let authority = gw.addr().to_string();
    let block = hpack_get(&authority, "/v1/slow?ms=50");
    let flood = tokio::spawn(async move {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
        out.extend(h2_frame(0x4, 0x1, 0, &[])); // SETTINGS ack (of the server's)
        let mut stream = 1u32;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) && stream < 2_000_000 {
            for _ in 0..500 {
                out.extend(h2_frame(0x1, 0x5, stream, &block)); // HEADERS, END_STREAM|END_HEADERS
                out.extend(h2_frame(0x3, 0, stream, &8u32.to_be_bytes())); // RST_STREAM CANCEL
                stream += 2;
            }
            if wr.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        (stream / 2, started.elapsed())
    });
    let c = h2c_client();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let got = get(&c, &gw.url("/v1/ok"), &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK);
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (sent, took) = flood.await.unwrap();
    let goaway = tokio::time::timeout(Duration::from_secs(5), reader).await;
    assert!(
        took < Duration::from_secs(10) && sent < 100_000,
        "the flooding connection was not cut off ({sent} resets in {took:?})"
    );
    assert_eq!(
        goaway.ok().and_then(Result::ok).flatten(),
        Some(0xb),
        "expected GOAWAY ENHANCE_YOUR_CALM"
    );
    let flood_upstream = up.hits() - 20;
    assert!(
        flood_upstream < 256,
        "{flood_upstream} flood streams reached the upstream"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "another client waited {slowest:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Soak (by hand: scripts/soak.sh)
// ---------------------------------------------------------------------------------------------

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Ten minutes (`KEYGATE_SOAK_SECS`) of load on the keygate binary with key churn (every reload
/// removes one key and adds one) and broken files in between: zero 5xx, zero refusals of a
/// valid key, zero admissions of a removed key once its removal settled, and flat memory (the
/// last third's peak RSS within 25% of the middle third's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak: run by hand with scripts/soak.sh"]
async fn soak_with_key_churn_and_reloads_keeps_memory_flat_and_errors_at_zero() {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    };
    let secs: u64 = std::env::var("KEYGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let up = start_upstream().await;
    let key = |g: usize| format!("soak-key-{g:08}-0123456789abcdefghijklmnop");
    let valid = |g: usize| {
        let keys: String = (g..g + 5)
            .map(|i| key_entry(&format!("k{i}"), &key(i), ""))
            .collect();
        config_text(
            &up.url(),
            &format!("[auth]\nfailures_per_ip = \"600/min\"\n[limits]\nrate = \"100000/s\"\nburst = 100000\n{keys}"),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, valid(0)).unwrap();
    let gw = spawn_keygate(&path, &[("RUST_LOG", "warn,keygate::server=info")]);
    let base = format!("http://{}/v1/soak", gw.addr);

    let generation = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..4usize {
        let (generation, stop, served, errors, base) = (
            generation.clone(),
            stop.clone(),
            served.clone(),
            errors.clone(),
            base.clone(),
        );
        workers.push(tokio::spawn(async move {
            let c = http1_client();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let g = generation.load(Ordering::SeqCst);
                // g+1..g+4 are valid in generation g and in g+1, whichever is live.
                let k = key(g + 1 + n % 4);
                let got = get(&c, &base, &[("x-api-key", &k)]).await;
                served.fetch_add(1, Ordering::Relaxed);
                if got.status != StatusCode::OK {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("valid key: {}", got.status));
                }
                if w == 0 && n.is_multiple_of(10) && g > 0 {
                    // The key removed when g became current: refused, never admitted.
                    let got = get(&c, &base, &[("x-api-key", &key(g - 1))]).await;
                    if got.status.is_success() || got.status.is_server_error() {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("removed key: {}", got.status));
                    }
                }
                if w == 1 && n.is_multiple_of(10) {
                    let got = get(&c, &base, &[("x-api-key", "never-a-key")]).await;
                    if got.status.is_success() || got.status.is_server_error() {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("bad key: {}", got.status));
                    }
                }
            }
        }));
    }

    let started = Instant::now();
    let mut rss = Vec::new();
    let mut last_sample = Instant::now() - Duration::from_secs(60);
    let c = http1_client();
    let mut g = 0usize;
    while started.elapsed() < Duration::from_secs(secs) {
        if last_sample.elapsed() >= Duration::from_secs(5) {
            rss.push(rss_kib(gw.pid()));
            last_sample = Instant::now();
        }
        // A broken file, then the next generation; wait for the removal to settle.
        write_atomically(&path, "[server\nlisten = ");
        tokio::time::sleep(Duration::from_millis(300)).await;
        write_atomically(&path, &valid(g + 1));
        let removed = key(g);
        let settled = eventually(Duration::from_secs(5), || async {
            !get(&c, &base, &[("x-api-key", &removed)])
                .await
                .status
                .is_success()
        })
        .await;
        assert!(settled, "generation {} never took effect", g + 1);
        g += 1;
        generation.store(g, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let errors = errors.lock().unwrap();
    let third = rss.len() / 3;
    let middle = rss[third..2 * third].iter().max().copied().unwrap_or(0);
    let last = rss[2 * third..].iter().max().copied().unwrap_or(0);
    eprintln!(
        "soak: {secs} s, {} requests, {g} reloads (+{g} broken), RSS KiB every 5 s: {rss:?}",
        served.load(Ordering::Relaxed)
    );
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(20)]
    );
    assert!(rss.len() >= 3, "too short to judge memory");
    assert!(
        last <= middle + middle / 4,
        "memory grew: middle third peak {middle} KiB, last third peak {last} KiB"
    );
}
