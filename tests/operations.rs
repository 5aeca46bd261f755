//! Running keygate in production (issue 4), end to end: the admin listener, exact metrics after
//! known traffic, readiness following the upstream, SIGTERM with a request in flight, certificate
//! renewal without a restart, json logs, `--version`, `certs dev`, the shipped deploy files.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

const ALPHA: &str = "alpha-partner-key-0123456789abcdefghij";
const BETA: &str = "beta-partner-key-zyxwvutsrqponmlkjihgf";
const OLD: &str = "expired-partner-key-00000000000000000000";
const OFF: &str = "disabled-partner-key-1111111111111111111";

/// A config with `[server]` and `[upstream]` extras and an admin listener on a free port.
fn ops_config(upstream: &str, server_extra: &str, upstream_extra: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n\
         [upstream]\nurl = \"{upstream}\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\n{upstream_extra}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n{rest}"
    )
}

fn admin_url(gw: &TestGateway, path: &str) -> String {
    format!(
        "http://{}{path}",
        gw.gateway.admin_addr().expect("[admin] set")
    )
}

async fn scrape(client: &PlainClient, url: &str) -> String {
    let got = get(client, url, &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        got.header("content-type")
            .unwrap()
            .contains("openmetrics-text"),
        "{:?}",
        got.headers
    );
    got.text()
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

/// A key with the minted prefix whose checksum is wrong (a typo).
fn mistyped_key() -> String {
    let mut key = keygate::keys::mint("bbk_");
    let last = key.pop().unwrap();
    key.push(if last == 'A' { 'B' } else { 'A' });
    key
}

/// Metrics: after known traffic, every counter has the exact value, per key and per reason;
/// label values come from the key table, never from the request.
#[tokio::test]
async fn metrics_count_known_traffic_exactly_per_key_and_reason() {
    let up = start_upstream().await;
    let keys = format!(
        "{}{}{}{}",
        key_entry("alpha", ALPHA, "rate = \"1/min\"\nburst = 2"),
        key_entry("beta", BETA, ""),
        key_entry("old", OLD, "expires = 2020-01-01T00:00:00Z"),
        key_entry("off", OFF, "disabled = true"),
    );
    let text = ops_config(&up.url(), "", "", &keys);
    let gw = start_gateway(&text).await;
    let client = http1_client();
    let admin = http1_client();
    let mistyped = mistyped_key();

    for expected in [200, 200, 429] {
        let got = get(&client, &gw.url("/v1/guests"), &[("x-api-key", ALPHA)]).await;
        assert_eq!(got.status.as_u16(), expected);
    }
    for _ in 0..3 {
        let got = send(
            &client,
            Method::POST,
            &gw.url("/v1/messages"),
            &[("authorization", &format!("Bearer {BETA}"))],
            full("hello"),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
    }
    let refusals: [(&[(&str, &str)], &str); 5] = [
        (&[], "missing_api_key"),
        (&[("x-api-key", "no-such-key-at-all")], "invalid_api_key"),
        (&[("x-api-key", OFF)], "invalid_api_key"),
        (&[("x-api-key", &mistyped)], "invalid_api_key"),
        (&[("x-api-key", OLD)], "expired_api_key"),
    ];
    for (headers, code) in refusals {
        let got = get(&client, &gw.url("/v1/guests"), headers).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
        assert_eq!(got.code(), code);
    }
    // The upstream takes longer than `timeout` (2s): one upstream timeout for beta.
    let got = get(&client, &gw.url("/slow?ms=3000"), &[("x-api-key", BETA)]).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);

    let url = admin_url(&gw, "/metrics");
    // The request counters are written when each response body is done; wait for the last.
    let total = "keygate_request_duration_seconds_count";
    assert!(
        eventually(Duration::from_secs(5), || async {
            sample(&scrape(&admin, &url).await, total) == Some(12.0)
        })
        .await,
        "{}",
        scrape(&admin, &url).await
    );
    let m = scrape(&admin, &url).await;
    let expected = [
        (
            "keygate_requests_total{key_id=\"alpha\",class=\"2xx\"}",
            2.0,
        ),
        (
            "keygate_requests_total{key_id=\"alpha\",class=\"4xx\"}",
            1.0,
        ),
        ("keygate_requests_total{key_id=\"beta\",class=\"2xx\"}", 3.0),
        ("keygate_requests_total{key_id=\"beta\",class=\"5xx\"}", 1.0),
        ("keygate_requests_total{key_id=\"\",class=\"4xx\"}", 5.0),
        ("keygate_rejections_total{reason=\"rate_limited\"}", 1.0),
        ("keygate_rejections_total{reason=\"missing_api_key\"}", 1.0),
        ("keygate_rejections_total{reason=\"invalid_api_key\"}", 2.0),
        ("keygate_rejections_total{reason=\"bad_checksum\"}", 1.0),
        ("keygate_rejections_total{reason=\"expired_api_key\"}", 1.0),
        ("keygate_rejections_total{reason=\"forbidden_scope\"}", 0.0),
        ("keygate_rejections_total{reason=\"quota_exceeded\"}", 0.0),
        ("keygate_upstream_errors_total{kind=\"timeout\"}", 1.0),
        ("keygate_upstream_errors_total{kind=\"connect\"}", 0.0),
        ("keygate_upstream_errors_total{kind=\"reset\"}", 0.0),
        ("keygate_keys{status=\"active\"}", 2.0),
        ("keygate_keys{status=\"disabled\"}", 1.0),
        ("keygate_keys{status=\"expired\"}", 1.0),
        ("keygate_config_reloads_total{result=\"success\"}", 0.0),
        ("keygate_config_reloads_total{result=\"failure\"}", 0.0),
        ("keygate_tls_handshake_failures_total", 0.0),
        ("keygate_request_duration_seconds_count", 12.0),
        // Five upstream response heads: alpha's two and beta's three (the timeout had none).
        ("keygate_upstream_duration_seconds_count", 5.0),
    ];
    for (series, want) in expected {
        assert_eq!(value(&m, series), want, "{series} in\n{m}");
    }
    let version = format!(
        "keygate_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&m, &version), 1.0);
    // The client's keep-alive connection is open; once the client is gone, none is.
    assert!(value(&m, "keygate_open_connections") >= 1.0, "{m}");
    drop(client);
    assert!(
        eventually(Duration::from_secs(5), || async {
            sample(&scrape(&admin, &url).await, "keygate_open_connections") == Some(0.0)
        })
        .await
    );
    // Only ids from the table appear as key_id values; no key or hash is ever exposed.
    for line in m.lines().filter(|l| l.contains("key_id=")) {
        let id = line
            .split("key_id=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert!(["alpha", "beta", ""].contains(&id), "{line}");
    }
    for secret in [
        ALPHA,
        BETA,
        OLD,
        OFF,
        &mistyped,
        "no-such-key-at-all",
        "blake3:",
    ] {
        assert!(!m.contains(secret), "{secret} exposed in /metrics");
    }

    // Reloads are counted by result: one good file, then one broken file.
    gw.rewrite_config(&text.replace("burst = 2", "burst = 3"));
    let reloaded = "keygate_config_reloads_total{result=\"success\"}";
    assert!(
        eventually(Duration::from_secs(5), || async {
            sample(&scrape(&admin, &url).await, reloaded) == Some(1.0)
        })
        .await
    );
    gw.rewrite_config("[server]\nlisten = oops\n");
    let failed = "keygate_config_reloads_total{result=\"failure\"}";
    assert!(
        eventually(Duration::from_secs(5), || async {
            sample(&scrape(&admin, &url).await, failed) == Some(1.0)
        })
        .await
    );
    assert_eq!(value(&scrape(&admin, &url).await, reloaded), 1.0);
}

/// /healthz answers while the process serves; /readyz turns 503 with a JSON reason when the
/// upstream dies and 200 when it comes back; partner requests meanwhile get 502 (a connect
/// error, counted as such). Other paths on the admin port are 404, and the partner port does
/// not serve the admin endpoints.
#[tokio::test]
async fn readyz_follows_the_upstream_down_and_back() {
    let up = start_upstream().await;
    let upstream_addr = up.addr;
    let text = ops_config(
        &up.url(),
        "",
        "health_interval = \"50ms\"",
        &key_entry("alpha", ALPHA, ""),
    );
    let gw = start_gateway(&text).await;
    let admin = http1_client();
    let ready = admin_url(&gw, "/readyz");

    let status_of = |url: String| {
        let admin = admin.clone();
        async move { get(&admin, &url, &[]).await.status }
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(ready.clone()).await == StatusCode::OK
        })
        .await
    );
    let got = get(&admin, &ready, &[]).await;
    assert_eq!(got.json()["status"], "ready");
    assert_eq!(
        get(&admin, &admin_url(&gw, "/healthz"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&admin, &admin_url(&gw, "/nope"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    let partner = http1_client();
    let on_partner_port = get(&partner, &gw.url("/metrics"), &[]).await;
    assert_eq!(on_partner_port.status, StatusCode::UNAUTHORIZED);

    up.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(ready.clone()).await == StatusCode::SERVICE_UNAVAILABLE
        })
        .await
    );
    let got = get(&admin, &ready, &[]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.json()["status"], "not_ready");
    let reason = got.json()["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("connect"), "{reason}");
    assert_eq!(
        get(&admin, &admin_url(&gw, "/healthz"), &[]).await.status,
        StatusCode::OK
    );
    let got = get(&partner, &gw.url("/v1/guests"), &[("x-api-key", ALPHA)]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let metrics_url = admin_url(&gw, "/metrics");
    let m = get(&admin, &metrics_url, &[]).await.text();
    assert_eq!(value(&m, "keygate_upstream_up"), 0.0);
    assert_eq!(
        value(&m, "keygate_upstream_errors_total{kind=\"connect\"}"),
        1.0
    );

    let listener = TcpListener::bind(upstream_addr).await.unwrap();
    let _back = start_upstream_on(listener).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(ready.clone()).await == StatusCode::OK
        })
        .await
    );
    let got = get(&partner, &gw.url("/v1/guests"), &[("x-api-key", ALPHA)]).await;
    assert_eq!(got.status, StatusCode::OK);
    let m = get(&admin, &metrics_url, &[]).await.text();
    assert_eq!(value(&m, "keygate_upstream_up"), 1.0);
}

/// With `health_path`, readiness needs a 2xx/3xx answer from that path, not just a connection.
#[tokio::test]
async fn readyz_with_health_path_needs_a_good_answer() {
    // An upstream that accepts connections but answers 503 to everything.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let healthy = Arc::new(AtomicUsize::new(0));
    let flag = healthy.clone();
    let server = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let flag = flag.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let ok = flag.load(Ordering::SeqCst) == 1 && req.uri().path() == "/health";
                    async move {
                        let mut resp = Response::new(full("{}"));
                        if !ok {
                            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let text = ops_config(
        &format!("http://{addr}"),
        "",
        "health_path = \"/health\"\nhealth_interval = \"50ms\"",
        "",
    );
    let gw = start_gateway(&text).await;
    let admin = http1_client();
    let ready = admin_url(&gw, "/readyz");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&admin, &ready, &[]).await.status == StatusCode::SERVICE_UNAVAILABLE
        })
        .await
    );
    let reason = get(&admin, &ready, &[]).await.json()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("/health") && reason.contains("503"),
        "{reason}"
    );
    healthy.store(1, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&admin, &ready, &[]).await.status == StatusCode::OK
        })
        .await
    );
    server.abort();
}

/// An upstream that streams `CHUNKS` chunks of `CHUNK` bytes, `GAP` apart; on `/cut` it breaks
/// the connection after the first chunk. `started` counts answers begun.
const CHUNKS: usize = 8;
const CHUNK: usize = 16 * 1024;
const GAP: Duration = Duration::from_millis(250);

async fn start_drip_upstream() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let cut = req.uri().path() == "/cut";
                    let stream = futures_util::stream::unfold(0usize, move |i| async move {
                        if i == CHUNKS {
                            return None;
                        }
                        if i > 0 {
                            tokio::time::sleep(GAP).await;
                            if cut {
                                return Some((Err(std::io::Error::other("cut")), CHUNKS));
                            }
                        }
                        let chunk = Bytes::from(vec![b'a' + i as u8; CHUNK]);
                        Some((Ok(Frame::data(chunk)), i + 1))
                    });
                    let mut resp = Response::new(StreamBody::new(stream).boxed());
                    resp.headers_mut()
                        .insert(http::header::CONTENT_LENGTH, (CHUNKS * CHUNK).into());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, started, task)
}

fn write_config(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// SIGTERM with a slow request in flight: the request completes with its whole body, the
/// gateway stops accepting and reports not ready while it drains, the idle keep-alive
/// connection is closed rather than waited for, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_in_flight_finish_with_its_full_body() {
    let (up, started, _task) = start_drip_upstream().await;
    let text = ops_config(
        &format!("http://{up}"),
        "shutdown_timeout = \"20s\"",
        "",
        &key_entry("alpha", ALPHA, ""),
    );
    let (_dir, path) = write_config(&text);
    let mut proc = spawn_keygate(&path, &[]);
    let admin_addr = proc.admin_addr();
    let base = format!("http://{}", proc.addr);

    // An idle keep-alive connection, which must not hold up the exit.
    let idle = http1_client();
    assert_eq!(
        get(&idle, &format!("{base}/drip"), &[("x-api-key", ALPHA)])
            .await
            .status,
        StatusCode::OK
    );

    let slow = http1_client();
    let url = format!("{base}/drip");
    let in_flight = tokio::spawn(async move {
        let resp = slow
            .request(
                http::Request::get(url)
                    .header("x-api-key", ALPHA)
                    .body(empty())
                    .unwrap(),
            )
            .await
            .expect("response head");
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        (status, body)
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            started.load(Ordering::SeqCst) == 2
        })
        .await
    );
    tokio::time::sleep(GAP).await;
    proc.signal("TERM");
    assert!(
        proc.wait_for_log("shutting down", Duration::from_secs(5)),
        "{}",
        proc.logs()
    );

    // While draining: not ready, and no new partner connections.
    let admin = http1_client();
    let got = get(&admin, &format!("http://{admin_addr}/readyz"), &[]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.json()["reason"], "shutting down");
    assert!(
        eventually(Duration::from_secs(2), || async {
            tokio::net::TcpStream::connect(proc.addr).await.is_err()
        })
        .await,
        "the partner port still accepts connections after SIGTERM"
    );

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let body = body.expect("the whole body, not a cut-off stream");
    assert_eq!(body.len(), CHUNKS * CHUNK);
    for (i, chunk) in body.chunks(CHUNK).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == b'a' + i as u8),
            "chunk {i} damaged"
        );
    }
    let exit = proc
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after the drain:\n{}", proc.logs()));
    assert!(exit.success(), "exit status {exit:?}");
    assert!(proc.logs().contains("shutdown complete"), "{}", proc.logs());
}

/// An upstream that breaks off mid-body counts as an upstream reset; the client sees the head
/// and a cut-off body (never a complete-looking short one), and the request is still counted.
#[tokio::test]
async fn upstream_cut_off_mid_body_counts_as_a_reset() {
    let (up, _started, _task) = start_drip_upstream().await;
    let text = ops_config(
        &format!("http://{up}"),
        "",
        "",
        &key_entry("alpha", ALPHA, ""),
    );
    let gw = start_gateway(&text).await;
    let client = http1_client();
    let resp = client
        .request(
            http::Request::get(gw.url("/cut"))
                .header("x-api-key", ALPHA)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.into_body().collect().await.is_err());

    let admin = http1_client();
    let url = admin_url(&gw, "/metrics");
    let series = "keygate_requests_total{key_id=\"alpha\",class=\"2xx\"}";
    assert!(
        eventually(Duration::from_secs(5), || async {
            sample(&scrape(&admin, &url).await, series) == Some(1.0)
        })
        .await
    );
    let m = scrape(&admin, &url).await;
    assert_eq!(
        value(&m, "keygate_upstream_errors_total{kind=\"reset\"}"),
        1.0
    );
    assert_eq!(
        value(&m, "keygate_upstream_errors_total{kind=\"connect\"}"),
        0.0
    );
    assert_eq!(
        value(&m, "keygate_upstream_errors_total{kind=\"timeout\"}"),
        0.0
    );
}

/// SIGINT (Ctrl-C) shuts down the same way: exit 0.
#[test]
fn sigint_exits_zero() {
    let text = ops_config("http://127.0.0.1:9", "", "", "");
    let (_dir, path) = write_config(&text);
    let mut proc = spawn_keygate(&path, &[]);
    proc.signal("INT");
    let exit = proc
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running after SIGINT:\n{}", proc.logs()));
    assert!(exit.success(), "exit status {exit:?}");
}

/// A config directory serving `cert` (gateway.crt, gateway.key) in front of `upstream`, with
/// the admin listener and the key alpha; returns it and the config's path.
fn tls_config_dir(cert: &TestCert, upstream: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tls = cert.write_into(dir.path());
    let text = ops_config(upstream, &tls, "", &key_entry("alpha", ALPHA, ""));
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

async fn tls_get(client: &TlsClient, url: &str) -> Result<StatusCode, String> {
    let req = http::Request::get(url)
        .header("x-api-key", ALPHA)
        .body(empty())
        .unwrap();
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            resp.into_body()
                .collect()
                .await
                .map_err(|e| format!("{e:?}"))?;
            Ok(status)
        }
        Err(e) => Err(format!("{e:?}")),
    }
}

/// The admin listener closes a connection that sends no request head within `[server]
/// header_timeout`, as the partner listener does (it had no timeout at all), and still
/// answers the next one.
#[tokio::test]
async fn the_admin_listener_closes_connections_that_send_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = start_upstream().await;
    let text = ops_config(&up.url(), "header_timeout = \"300ms\"", "", "");
    let gw = start_gateway(&text).await;
    let admin = gw.gateway.admin_addr().expect("[admin] set");
    let mut silent = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent admin connection was kept: {closed:?}"
    );
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
}

/// A head trickled a byte at a time is cut at `header_timeout` on the admin listener too (its
/// 64 slots would otherwise go to such connections, and `/readyz` probes wait behind them).
#[tokio::test]
async fn the_admin_listener_cuts_a_trickled_head_at_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = start_upstream().await;
    let text = ops_config(&up.url(), "header_timeout = \"500ms\"", "", "");
    let gw = start_gateway(&text).await;
    let admin = gw.gateway.admin_addr().expect("[admin] set");
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let started = std::time::Instant::now();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut cut = None;
    for &b in head.iter() {
        if s.write_all(&[b]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = Some(started.elapsed());
                break;
            }
            // An answer (408) before the close is a cut too.
            Ok(Ok(_)) => {
                cut = Some(started.elapsed());
                break;
            }
            Err(_) => {}
        }
    }
    let cut = cut.expect("a head trickled over 7 s was never cut");
    assert!(cut < Duration::from_secs(4), "cut only after {cut:?}");
}

/// A renewed certificate is served to new TLS clients without a restart, while a connection
/// made with the old certificate goes on working.
#[tokio::test]
async fn certificate_swap_is_seen_by_new_clients_while_old_connections_go_on() {
    let up = start_upstream().await;
    let old = make_cert();
    let new = make_cert();
    let (dir, path) = tls_config_dir(&old, &up.url());
    let gw = start_gateway_in(dir, path).await;
    let url = format!("https://localhost:{}/v1/guests", gw.addr().port());

    // One keep-alive connection made with the old certificate (this client trusts only it).
    let old_client = tls_client(&old, false);
    assert_eq!(tls_get(&old_client, &url).await, Ok(StatusCode::OK));
    assert!(tls_get(&tls_client(&new, false), &url).await.is_err());

    // Renewal: key and certificate replaced by rename, as certbot and config management do.
    write_atomically(&gw.dir.path().join("gateway.key"), &new.key_pem);
    write_atomically(&gw.dir.path().join("gateway.crt"), &new.cert_pem);

    assert!(
        eventually(Duration::from_secs(5), || async {
            tls_get(&tls_client(&new, false), &url).await == Ok(StatusCode::OK)
        })
        .await,
        "new clients never saw the renewed certificate"
    );
    // New handshakes get the new certificate: a fresh client trusting only the old one fails.
    assert!(tls_get(&tls_client(&old, false), &url).await.is_err());
    // The connection made before the swap goes on (its client could not handshake anew).
    assert_eq!(tls_get(&old_client, &url).await, Ok(StatusCode::OK));
    // h2 clients handshake with the new certificate too.
    assert_eq!(
        tls_get(&tls_client(&new, true), &url).await,
        Ok(StatusCode::OK)
    );

    let admin = http1_client();
    let m = get(&admin, &admin_url(&gw, "/metrics"), &[]).await.text();
    assert_eq!(
        value(&m, "keygate_certificate_reloads_total{result=\"success\"}"),
        1.0
    );
    assert_eq!(
        value(&m, "keygate_certificate_reloads_total{result=\"failure\"}"),
        0.0
    );
    // The client that trusted only the old certificate failed its handshake (at least once).
    assert!(
        value(&m, "keygate_tls_handshake_failures_total") >= 1.0,
        "{m}"
    );
}

/// A broken certificate file, then a certificate that does not match its key: each time the
/// old certificate stays in service and the log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_or_mismatched_certificate_keeps_the_old_one_and_logs_why() {
    let up = start_upstream().await;
    let good = make_cert();
    let other = make_cert();
    let (dir, path) = tls_config_dir(&good, &up.url());
    let proc = spawn_keygate(&path, &[]);
    let url = format!("https://localhost:{}/v1/guests", proc.addr.port());
    assert_eq!(
        tls_get(&tls_client(&good, false), &url).await,
        Ok(StatusCode::OK)
    );

    // A half-written renewal: the certificate file is garbage.
    write_atomically(
        &dir.path().join("gateway.crt"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
    );
    assert!(
        proc.wait_for_log("keeping the current certificate", Duration::from_secs(5)),
        "{}",
        proc.logs()
    );
    assert!(
        proc.logs()
            .contains("gateway.crt: no usable PEM certificate"),
        "{}",
        proc.logs()
    );
    assert_eq!(
        tls_get(&tls_client(&good, false), &url).await,
        Ok(StatusCode::OK)
    );

    // A valid certificate with somebody else's key.
    write_atomically(&dir.path().join("gateway.crt"), &other.cert_pem);
    assert!(
        proc.wait_for_log("does not match the certificate", Duration::from_secs(5)),
        "{}",
        proc.logs()
    );
    assert_eq!(
        tls_get(&tls_client(&good, false), &url).await,
        Ok(StatusCode::OK)
    );
    assert!(tls_get(&tls_client(&other, false), &url).await.is_err());
    let admin = http1_client();
    let m = get(
        &admin,
        &format!("http://{}/metrics", proc.admin_addr()),
        &[],
    )
    .await
    .text();
    assert_eq!(
        value(&m, "keygate_certificate_reloads_total{result=\"failure\"}"),
        2.0
    );
    // No private key material in any log line.
    assert!(!proc.logs().contains("PRIVATE KEY"));
}

/// A certificate's end of validity is exported for alerting and logged when near or past, at
/// start and after each renewal; an expired one is still served (replacing it is the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_is_exported_and_logged_when_near_or_past() {
    const DAY: u64 = 24 * 3600;
    let now = std::time::SystemTime::now();
    let up = start_upstream().await;
    // Five days and an hour left: "5 days left", under the 14-day warning.
    let (soon, soon_at) = make_cert_until(now + Duration::from_secs(5 * DAY + 3600));
    let (dir, path) = tls_config_dir(&soon, &up.url());
    let proc = spawn_keygate(&path, &[]);
    let metrics_url = format!("http://{}/metrics", proc.admin_addr());
    let series = "keygate_certificate_expiry_timestamp_seconds{certificate=\"listener\"}";
    let admin = http1_client();
    let m = get(&admin, &metrics_url, &[]).await.text();
    assert_eq!(value(&m, series), soon_at as f64, "{m}");
    let until = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(soon_at as u64),
    );
    let warning = format!("valid until {until} (5 days left): renew it");
    assert!(
        proc.logs().contains(&warning),
        "{warning:?} not in\n{}",
        proc.logs()
    );
    assert!(proc.logs().contains("WARN"), "{}", proc.logs());

    // Renewed for 90 days: the metric follows, and no warning is added.
    let (renewed, renewed_at) = make_cert_until(now + Duration::from_secs(90 * DAY));
    write_atomically(&dir.path().join("gateway.key"), &renewed.key_pem);
    write_atomically(&dir.path().join("gateway.crt"), &renewed.cert_pem);
    assert!(
        eventually(Duration::from_secs(5), || async {
            sample(&get(&admin, &metrics_url, &[]).await.text(), series) == Some(renewed_at as f64)
        })
        .await,
        "expiry metric never followed the renewal:\n{}",
        proc.logs()
    );
    assert!(
        !proc.logs().contains("89 days left") && proc.logs().matches("renew it").count() == 1,
        "{}",
        proc.logs()
    );

    // Replaced by one that expired two days ago: an error line, and it is served all the same.
    let (expired, expired_at) = make_cert_until(now - Duration::from_secs(2 * DAY));
    write_atomically(&dir.path().join("gateway.key"), &expired.key_pem);
    write_atomically(&dir.path().join("gateway.crt"), &expired.cert_pem);
    assert!(
        proc.wait_for_log("partners' clients refuse it", Duration::from_secs(5)),
        "{}",
        proc.logs()
    );
    let since = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(expired_at as u64),
    );
    assert!(
        proc.logs()
            .contains(&format!("EXPIRED on {since} (2 days ago)")),
        "{}",
        proc.logs()
    );
    let m = get(&admin, &metrics_url, &[]).await.text();
    assert_eq!(value(&m, series), expired_at as f64, "{m}");
    // Served all the same: a client whose clock reads a day before the expiry verifies it and
    // is answered; a client with the right time refuses it, as partners' clients would.
    let url = format!("https://localhost:{}/v1/guests", proc.addr.port());
    let day_before = std::time::UNIX_EPOCH + Duration::from_secs(expired_at as u64 - DAY);
    assert_eq!(
        tls_get(&tls_client_at(&expired, day_before), &url).await,
        Ok(StatusCode::OK)
    );
    let refused = tls_get(&tls_client(&expired, false), &url)
        .await
        .unwrap_err();
    assert!(refused.contains("Expired"), "{refused}");
}

/// A TLS client trusting only `cert`, verifying it as of `at` (webpki's checks, another clock).
fn tls_client_at(cert: &TestCert, at: std::time::SystemTime) -> TlsClient {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    #[derive(Debug)]
    struct AtTime(Arc<rustls::client::WebPkiServerVerifier>, UnixTime);
    impl ServerCertVerifier for AtTime {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            self.0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, self.1)
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
    keygate::tls::install_crypto_provider();
    let webpki = rustls::client::WebPkiServerVerifier::builder(Arc::new(cert.roots()))
        .build()
        .unwrap();
    let tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AtTime(
            webpki,
            UnixTime::since_unix_epoch(at.duration_since(std::time::UNIX_EPOCH).unwrap()),
        )))
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector)
}

/// A keygate process in front of `up` logging json at info, with the key alpha (tenant
/// hotel-1042) and the admin listener.
fn json_logging_keygate(up: &Upstream) -> (tempfile::TempDir, Process) {
    let keys = key_entry("alpha", ALPHA, "tenant = \"hotel-1042\"");
    let text = ops_config(
        &up.url(),
        "",
        "",
        &format!("[log]\nformat = \"json\"\nlevel = \"info\"\n\n{keys}"),
    );
    let (dir, path) = write_config(&text);
    let proc = spawn_keygate_plain_env(&path, &[]);
    (dir, proc)
}

/// A client that goes away while its request waits on the upstream still gets an access line
/// and a count, with nginx's 499: its key, its request id, the time it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_is_logged_499() {
    use tokio::io::AsyncWriteExt;
    let up = start_upstream().await;
    let (_dir, proc) = json_logging_keygate(&up);
    let mut s = tokio::net::TcpStream::connect(proc.addr).await.unwrap();
    let req = format!(
        "GET /v1/slow?ms=2000 HTTP/1.1\r\nHost: x\r\nX-Api-Key: {ALPHA}\r\nX-Request-Id: gone-1\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    assert!(
        proc.wait_for_log("gone-1", Duration::from_secs(5)),
        "{}",
        proc.logs()
    );
    let logs = proc.logs();
    let line = logs.lines().find(|l| l.contains("gone-1")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["status"], 499, "{line}");
    assert_eq!(v["key_id"], "alpha", "{line}");
    assert_eq!(v["path"], "/v1/slow", "{line}");
    // At least most of the 300 ms the client waited (the clock starts once keygate has the
    // request, which a loaded machine may take a while to get to).
    assert!(v["duration_ms"].as_f64().unwrap() >= 100.0, "{line}");
    let m = get(
        &http1_client(),
        &format!("http://{}/metrics", proc.admin_addr()),
        &[],
    )
    .await
    .text();
    assert_eq!(
        value(&m, "keygate_requests_total{key_id=\"alpha\",class=\"4xx\"}"),
        1.0,
        "{m}"
    );
}

/// `[log] format = "json"`: every line is one JSON object; access lines carry the fixed field
/// names with the request's real values, and never the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse_and_carry_the_access_fields() {
    let up = start_upstream().await;
    let (_dir, proc) = json_logging_keygate(&up);
    let client = http1_client();
    let base = format!("http://{}", proc.addr);

    let admitted = send(
        &client,
        Method::POST,
        &format!("{base}/v1/messages?secret-query=1"),
        &[("x-api-key", ALPHA), ("x-request-id", "req-json-1")],
        full(vec![b'x'; 1000]),
    )
    .await;
    assert_eq!(admitted.status, StatusCode::OK);
    let refused = get(&client, &format!("{base}/v1/guests"), &[]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let refused_id = refused.header("x-request-id").unwrap().to_string();

    assert!(
        proc.wait_for_log(&refused_id, Duration::from_secs(5)),
        "{}",
        proc.logs()
    );
    let logs = proc.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for line in &lines {
        assert!(
            line["ts"].as_str().is_some_and(|t| t.contains('T')),
            "{line}"
        );
        let level = line["level"].as_str().unwrap();
        assert!(
            ["INFO", "WARN", "ERROR"].contains(&level),
            "level info: {line}"
        );
    }
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "keygate::access")
        .collect();
    assert_eq!(access.len(), 2, "{logs}");
    for line in &access {
        for field in [
            "ts",
            "request_id",
            "key_id",
            "tenant",
            "method",
            "path",
            "status",
            "duration_ms",
            "upstream_ms",
            "bytes_in",
            "bytes_out",
            "client_ip",
        ] {
            assert!(line.get(field).is_some(), "{field} missing from {line}");
        }
    }
    let a = access
        .iter()
        .find(|l| l["request_id"] == "req-json-1")
        .unwrap();
    assert_eq!(a["key_id"], "alpha");
    assert_eq!(a["tenant"], "hotel-1042");
    assert_eq!(a["method"], "POST");
    assert_eq!(a["path"], "/v1/messages");
    assert_eq!(a["status"], 200);
    assert_eq!(a["bytes_in"], 1000);
    assert_eq!(a["bytes_out"], admitted.body.len() as u64);
    assert_eq!(a["client_ip"], "127.0.0.1");
    let duration = a["duration_ms"].as_f64().unwrap();
    let upstream = a["upstream_ms"].as_f64().unwrap();
    assert!(upstream > 0.0 && upstream <= duration, "{a}");

    let r = access
        .iter()
        .find(|l| l["request_id"] == refused_id)
        .unwrap();
    assert_eq!(r["status"], 401);
    assert!(r["key_id"].is_null() && r["tenant"].is_null() && r["upstream_ms"].is_null());
    assert_eq!(r["bytes_in"], 0);
    assert_eq!(r["bytes_out"], refused.body.len() as u64);

    assert!(!logs.contains(ALPHA), "the key reached a log line");
    assert!(
        !logs.contains("secret-query"),
        "the query string reached a log line"
    );
}

/// Log lines are written by a thread of their own, many to a write: under a burst from 16
/// clients no access line is lost, and the lines still queued when SIGTERM comes are written
/// before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_access_line_is_written_even_those_queued_at_exit() {
    let up = start_upstream().await;
    let keys = key_entry("alpha", ALPHA, "rate = \"100000/s\"\nburst = 100000");
    let text = ops_config(
        &up.url(),
        "",
        "",
        &format!("[log]\nlevel = \"info\"\n\n{keys}"),
    );
    let (_dir, path) = write_config(&text);
    let mut proc = spawn_keygate_plain_env(&path, &[]);
    let url = format!("http://{}/v1/guests", proc.addr);
    let (clients, each) = (16, 125);
    let mut burst = tokio::task::JoinSet::new();
    for c in 0..clients {
        let url = url.clone();
        burst.spawn(async move {
            let client = http1_client();
            for i in 0..each {
                let id = format!("burst-{c}-{i}");
                let got = get(
                    &client,
                    &url,
                    &[("x-api-key", ALPHA), ("x-request-id", &id)],
                )
                .await;
                assert_eq!(got.status, StatusCode::OK);
            }
        });
    }
    while let Some(done) = burst.join_next().await {
        done.unwrap();
    }
    proc.signal("TERM");
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .expect("keygate exited");
    assert!(status.success(), "{status:?}");
    let access_lines = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains("keygate::access") && l.contains("request_id=\"burst-"))
            .count()
    };
    let all = eventually(Duration::from_secs(5), || async {
        access_lines(&proc.logs()) == clients * each
    })
    .await;
    assert!(
        all,
        "{} of {} access lines",
        access_lines(&proc.logs()),
        clients * each
    );
}

/// `RUST_LOG` overrides `[log] level`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_overrides_the_configured_level() {
    let up = start_upstream().await;
    let text = ops_config(
        &up.url(),
        "",
        "",
        "[log]\nformat = \"json\"\nlevel = \"error\"\n",
    );
    let (_dir, path) = write_config(&text);
    let quiet = spawn_keygate_plain_env(&path, &[("RUST_LOG", "keygate=info")]);
    let client = http1_client();
    let got = get(&client, &format!("http://{}/x", quiet.addr), &[]).await;
    let id = got.header("x-request-id").unwrap().to_string();
    assert!(
        quiet.wait_for_log(&id, Duration::from_secs(5)),
        "{}",
        quiet.logs()
    );
}

/// `keygate --version` prints the name and version.
#[test]
fn version_flag_prints_the_version() {
    let out = Command::new(keygate_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("keygate {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// `keygate certs dev` writes a pair the gateway can serve, the key readable by its owner only.
#[test]
fn certs_dev_writes_a_servable_pair_with_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(keygate_bin())
        .args(["certs", "dev", "--out"])
        .arg(dir.path().join("certs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let files = keygate::config::TlsFiles {
        cert: dir.path().join("certs/gateway.crt"),
        key: dir.path().join("certs/gateway.key"),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    keygate::certs::CertStore::load(&files, keygate::certs::CertRole::Listener)
        .expect("a usable pair");
}

/// The shipped deploy files: the example config passes `keygate check` once its certificate
/// files exist (and names the missing one before), the unit runs as a non-root user with
/// SIGHUP for reload, the image runs as a non-root user.
#[test]
fn deploy_files_are_consistent() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let check = |config: &std::path::Path| {
        Command::new(keygate_bin())
            .args(["check", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    // As installed: /etc/keygate moved into a temporary directory.
    let etc = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("deploy/gateway.toml"))
        .unwrap()
        .replace("/etc/keygate/", &format!("{}/", etc.path().display()));
    let config = etc.path().join("gateway.toml");
    std::fs::write(&config, text).unwrap();
    let out = check(&config);
    let missing = etc.path().join("tls/fullchain.pem");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("{}: no usable PEM certificate", missing.display())),
        "{out:?}"
    );
    let cert = make_cert();
    std::fs::create_dir(etc.path().join("tls")).unwrap();
    std::fs::write(&missing, &cert.cert_pem).unwrap();
    std::fs::write(etc.path().join("tls/privkey.pem"), &cert.key_pem).unwrap();
    let out = check(&config);
    assert!(out.status.success(), "{out:?}");
    let unit = std::fs::read_to_string(root.join("deploy/keygate.service")).unwrap();
    for line in [
        "User=keygate",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/local/bin/keygate run --config /etc/keygate/gateway.toml",
        "NoNewPrivileges=yes",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.lines().any(|l| l.trim() == line), "{line} missing");
    }
    let docker = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    assert!(
        docker.lines().any(|l| l.starts_with("USER 10001")),
        "USER missing"
    );
    assert!(!docker.contains("USER root"));
    assert!(docker.contains("deploy/gateway.toml"));
}
