//! The core contract (issue 2), end to end: real sockets, real TLS, real HTTP/1.1 and HTTP/2
//! clients, a real upstream. Each test names the contract line it guards.

mod common;

use common::*;
use std::time::Duration;

use http::{Method, StatusCode};

const KEY: &str = "partner-key-0123456789abcdefghijklmnop";
const OTHER: &str = "other-partner-key-zyxwvutsrqponmlkjihg";

async fn basic() -> (Upstream, TestGateway) {
    let up = start_upstream().await;
    let text = config_text(
        &up.url(),
        &format!(
            "{}{}",
            key_entry("review-platform", KEY, "tenant = \"hotel-1042\""),
            key_entry("messaging", OTHER, "max_body = \"1GiB\"")
        ),
    );
    let gw = start_gateway(&text).await;
    (up, gw)
}

/// Line 1: the key comes from the configured header, else Authorization: Bearer; it is never
/// forwarded.
#[tokio::test]
async fn key_in_header_or_bearer_is_admitted_and_not_forwarded() {
    let (up, gw) = basic().await;
    let c = http1_client();

    let got = get(&c, &gw.url("/v1/guests"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let seen = up.last();
    assert!(seen.headers.get("x-api-key").is_none());
    assert_eq!(seen.headers["x-keygate-key-id"], "review-platform");

    let got = get(
        &c,
        &gw.url("/v1/guests"),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = up.last();
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.headers["x-keygate-key-id"], "review-platform");

    // An Authorization that did not carry the key belongs to the partner and is kept.
    let got = get(
        &c,
        &gw.url("/v1/guests"),
        &[("x-api-key", KEY), ("authorization", "Basic dXNlcjpwdw==")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(up.last().headers["authorization"], "Basic dXNlcjpwdw==");
    assert_eq!(up.hits(), 3);
}

/// Line 2: missing, unknown, disabled and expired keys get 401 with WWW-Authenticate and the
/// JSON shape; nothing reaches the upstream; the key is never echoed.
#[tokio::test]
async fn refused_keys_get_401_json_and_nothing_is_forwarded() {
    let up = start_upstream().await;
    let text = config_text(
        &up.url(),
        &format!(
            "{}{}{}",
            key_entry("live", KEY, ""),
            key_entry(
                "off",
                "disabled-key-abcdefghijklmnopqrstuv",
                "disabled = true"
            ),
            key_entry(
                "old",
                "expired-key-abcdefghijklmnopqrstuvw",
                "expires = 2020-01-01T00:00:00Z"
            ),
        ),
    );
    let gw = start_gateway(&text).await;
    let c = http1_client();
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[], "missing_api_key"),
        (
            &[("x-api-key", "unknown-key-abcdefghijklmnopqrstuvwxyz")],
            "invalid_api_key",
        ),
        (
            &[("authorization", "Bearer unknown-key-abcdefghijklmnopqrst")],
            "invalid_api_key",
        ),
        (
            &[("x-api-key", "disabled-key-abcdefghijklmnopqrstuv")],
            "invalid_api_key",
        ),
        (
            &[("x-api-key", "expired-key-abcdefghijklmnopqrstuvw")],
            "expired_api_key",
        ),
    ];
    for (headers, code) in cases {
        let got = get(&c, &gw.url("/v1/guests"), headers).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(got.code(), code, "{headers:?}");
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert!(got
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer"));
        let json = got.json();
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(json.as_object().unwrap().len(), 2, "only error and message");
        for (_, value) in headers {
            let secret = value.trim_start_matches("Bearer ");
            assert!(!got.text().contains(secret), "key echoed in body");
            assert!(
                got.headers
                    .values()
                    .all(|v| !v.to_str().unwrap_or("").contains(secret)),
                "key echoed in a header"
            );
        }
    }
    assert_eq!(up.hits(), 0, "a refused request reached the upstream");
}

/// Line 3: each key id has its own limiter; 429 rate_limited with Retry-After after which the
/// request is admitted; RateLimit-Policy and RateLimit on every answer to a valid key.
#[tokio::test]
async fn each_key_is_rate_limited_on_its_own_with_retry_after_and_ratelimit_fields() {
    let up = start_upstream().await;
    let text = config_text(
        &up.url(),
        &format!(
            "[limits]\nrate = \"1/s\"\nburst = 2\n\n{}{}",
            key_entry("a", KEY, ""),
            key_entry("b", OTHER, "rate = \"100/s\"\nburst = 50")
        ),
    );
    let gw = start_gateway(&text).await;
    let c = http1_client();
    let url = gw.url("/v1/guests");

    let first = get(&c, &url, &[("x-api-key", KEY)]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"default\";q=2;w=2")
    );
    assert_eq!(first.header("ratelimit"), Some("\"default\";r=1;t=1"));
    let second = get(&c, &url, &[("x-api-key", KEY)]).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.header("ratelimit"), Some("\"default\";r=0;t=2"));

    let limited = get(&c, &url, &[("x-api-key", KEY)]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.code(), "rate_limited");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"default\";q=2;w=2")
    );
    assert_eq!(
        limited.header("ratelimit"),
        Some(format!("\"default\";r=0;t={retry}").as_str())
    );
    assert_eq!(up.hits(), 2, "the limited request was forwarded");

    // Another key's budget is its own.
    for _ in 0..10 {
        let got = get(&c, &url, &[("x-api-key", OTHER)]).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.header("ratelimit-policy"), Some("\"default\";q=50;w=1"));
    }

    // After Retry-After seconds the request is admitted.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let again = get(&c, &url, &[("x-api-key", KEY)]).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "not admitted after Retry-After"
    );
}

/// Line 4: method, path, query and body unchanged; key, hop-by-hop and spoofed X-Keygate-*
/// removed (in `_` spellings too, which CGI-style servers read as `-`); forwarding and
/// identity headers set; the request id kept or made and returned; method overrides dropped
/// for a scoped key only.
#[tokio::test]
async fn forwarding_rewrites_exactly_the_documented_headers() {
    let up = start_upstream().await;
    let scoped = "scoped-key-0123456789abcdefghijklmnop";
    let text = config_text(
        &format!("{}/api/", up.url()),
        &format!(
            "{}{}",
            key_entry("review-platform", KEY, "tenant = \"hotel-1042\""),
            key_entry("scoped", scoped, "scopes = [\"* /v1/**\"]")
        ),
    );
    let gw = start_gateway(&text).await;
    let c = http1_client();
    let got = send(
        &c,
        Method::PATCH,
        &gw.url("/v1/guests/g-1?since=2026-11-01&limit=5"),
        &[
            ("x-api-key", KEY),
            ("connection", "x-hop-secret"),
            ("x-hop-secret", "1"),
            ("x-keygate-key-id", "admin"),
            ("x-keygate-tenant", "hotel-1"),
            ("x-keygate-anything", "spoof"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "spoofed.example"),
            ("x-request-id", "partner-req-42"),
            ("x-custom", "kept"),
            ("content-type", "application/json"),
            ("x_keygate_tenant", "victim"),
            ("x_keygate_key_id", "admin"),
            ("x_forwarded_for", "1.2.3.4"),
            ("x-forwarded_proto", "https"),
            ("x_request_id", "spoof"),
            ("x_api_key", "leaked"),
            ("x_custom", "kept too"),
            ("x-http-method-override", "DELETE"),
        ],
        full("{\"name\":\"Ada\"}"),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.header("x-request-id"), Some("partner-req-42"));

    let seen = up.last();
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(seen.uri.path(), "/api/v1/guests/g-1");
    assert_eq!(seen.uri.query(), Some("since=2026-11-01&limit=5"));
    assert_eq!(seen.body_len, 14);
    let h = &seen.headers;
    assert!(h.get("x-api-key").is_none());
    assert!(h.get("x-hop-secret").is_none());
    assert!(h.get("connection").is_none());
    assert!(h.get("x-keygate-anything").is_none());
    assert_eq!(h.get_all("x-keygate-key-id").iter().count(), 1);
    assert_eq!(h["x-keygate-key-id"], "review-platform");
    assert_eq!(h["x-keygate-tenant"], "hotel-1042");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], gw.addr().to_string());
    assert_eq!(h["x-request-id"], "partner-req-42");
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["content-type"], "application/json");
    for spoof in [
        "x_keygate_tenant",
        "x_keygate_key_id",
        "x_forwarded_for",
        "x-forwarded_proto",
        "x_request_id",
        "x_api_key",
    ] {
        assert!(h.get(spoof).is_none(), "{spoof} was forwarded");
    }
    assert_eq!(h["x_custom"], "kept too");
    // An unscoped key may call any method: its override goes on.
    assert_eq!(h["x-http-method-override"], "DELETE");
    assert_eq!(h["host"], up.addr.to_string());
    // Each field keygate sets goes once, whatever the client sent.
    for name in [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "x-keygate-tenant",
    ] {
        assert_eq!(h.get_all(name).iter().count(), 1, "{name}");
    }

    // A request id that is not sane is replaced, and the new one is returned and forwarded.
    let got = get(
        &c,
        &gw.url("/v1/guests"),
        &[("x-api-key", KEY), ("x-request-id", "bad id with spaces")],
    )
    .await;
    let id = got.header("x-request-id").unwrap().to_string();
    assert_ne!(id, "bad id with spaces");
    assert_eq!(id.len(), 32);
    assert_eq!(up.last().headers["x-request-id"], id.as_str());

    // A scoped key was checked against the request line's method: no override goes upstream.
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/guests"),
        &[
            ("x-api-key", scoped),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x_http_method_override", "DELETE"),
        ],
        empty(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let h = up.last().headers;
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x_http_method_override",
    ] {
        assert!(h.get(name).is_none(), "{name} was forwarded");
    }
}

/// Line 4: upstream connections are pooled and kept alive.
#[tokio::test]
async fn upstream_connections_are_reused() {
    let (up, gw) = basic().await;
    let c = http1_client();
    for _ in 0..20 {
        let got = get(&c, &gw.url("/v1/guests"), &[("x-api-key", OTHER)]).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    assert_eq!(up.hits(), 20);
    assert_eq!(up.conns.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Line 4: large bodies stream both ways.
#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let (up, gw) = basic().await;
    let c = http1_client();
    let size: u64 = 64 * 1024 * 1024;
    let got = send(
        &c,
        Method::POST,
        &gw.url("/upload"),
        &[("x-api-key", OTHER)],
        stream_body(size),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["bytes"], size);
    let got = get(
        &c,
        &gw.url(&format!("/download?bytes={size}")),
        &[("x-api-key", OTHER)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body.len() as u64, size);
    assert_eq!(up.hits(), 2);
}

/// Line 5: an upstream that refuses connections gives 502, one that sends no head in time 504.
#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gw = start_gateway(&config_text(&dead, &key_entry("a", KEY, ""))).await;
    let c = http1_client();
    let got = get(&c, &gw.url("/v1/guests"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.code(), "upstream_unavailable");
    assert_eq!(got.header("content-type"), Some("application/json"));

    let up = start_upstream().await;
    let text = config_text(&up.url(), &key_entry("a", KEY, ""))
        .replace("timeout = \"2s\"", "timeout = \"300ms\"");
    let gw = start_gateway(&text).await;
    let started = std::time::Instant::now();
    let got = get(&c, &gw.url("/slow?ms=3000"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(got.code(), "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "504 came late: {:?}",
        started.elapsed()
    );
    let got = get(&c, &gw.url("/slow?ms=10"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK, "a fast request after a timeout");
}

/// A gateway with `cert` on its listener and the key `KEY` (id `a`).
async fn tls_gateway(up: &Upstream, cert: &TestCert) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let tls_lines = cert.write_into(dir.path());
    let text = config_text(&up.url(), &key_entry("a", KEY, "")).replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\n{tls_lines}"),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    start_gateway_in(dir, path).await
}

/// One `GET /v1/ok` over a new TLS connection made by `connector`, `Connection: close`: the
/// answer as it came, and whether the handshake was full or resumed.
async fn tls_get_ok(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> (String, Option<rustls::HandshakeKind>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "GET /v1/ok HTTP/1.1\r\nHost: localhost\r\nX-Api-Key: {KEY}\r\nConnection: close\r\n\r\n"
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let kind = tls.get_ref().1.handshake_kind();
    (String::from_utf8_lossy(&answer).into_owned(), kind)
}

/// TLS 1.3 session resumption: each handshake leaves the client one session ticket (rustls
/// would send two; each costs the client a session object, and a resuming client only needs
/// one), and the next connection resumes with it.
#[tokio::test]
async fn tls13_handshakes_leave_one_ticket_and_the_next_connection_resumes() {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    /// The client's session memory, counting the TLS 1.3 tickets the server sends.
    #[derive(Debug)]
    struct Counting(rustls::client::ClientSessionMemoryCache, AtomicUsize);
    impl rustls::client::ClientSessionStore for Counting {
        fn set_kx_hint(&self, n: rustls_pki_types::ServerName<'static>, g: rustls::NamedGroup) {
            self.0.set_kx_hint(n, g)
        }
        fn kx_hint(&self, n: &rustls_pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.0.kx_hint(n)
        }
        fn set_tls12_session(
            &self,
            n: rustls_pki_types::ServerName<'static>,
            v: rustls::client::Tls12ClientSessionValue,
        ) {
            self.0.set_tls12_session(n, v)
        }
        fn tls12_session(
            &self,
            n: &rustls_pki_types::ServerName<'_>,
        ) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.0.tls12_session(n)
        }
        fn remove_tls12_session(&self, n: &rustls_pki_types::ServerName<'static>) {
            self.0.remove_tls12_session(n)
        }
        fn insert_tls13_ticket(
            &self,
            n: rustls_pki_types::ServerName<'static>,
            v: rustls::client::Tls13ClientSessionValue,
        ) {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.insert_tls13_ticket(n, v)
        }
        fn take_tls13_ticket(
            &self,
            n: &rustls_pki_types::ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.0.take_tls13_ticket(n)
        }
    }

    let up = start_upstream().await;
    let cert = make_cert();
    let gw = tls_gateway(&up, &cert).await;

    let mut config = cert.client_config(
        rustls::crypto::ring::default_provider(),
        &rustls::version::TLS13,
    );
    let store = Arc::new(Counting(
        rustls::client::ClientSessionMemoryCache::new(8),
        AtomicUsize::new(0),
    ));
    config.resumption = rustls::client::Resumption::store(store.clone());
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut kinds = Vec::new();
    for round in 1..=2 {
        let (answer, kind) = tls_get_ok(&connector, gw.addr()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        kinds.push(kind);
        assert_eq!(
            store.1.load(Ordering::SeqCst),
            round,
            "tickets after {round} handshakes"
        );
    }
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
}

/// Any number of clients can resume: a client's session ticket still resumes after 300 other
/// clients have each made a full handshake and got their own (the tickets are stateless;
/// rustls's default cache of 256 sessions had lost the first by then).
#[tokio::test]
async fn a_client_resumes_after_300_others_got_tickets() {
    use std::sync::Arc;

    let up = start_upstream().await;
    let cert = make_cert();
    let gw = tls_gateway(&up, &cert).await;
    let base = cert.client_config(
        rustls::crypto::ring::default_provider(),
        &rustls::version::TLS13,
    );
    // A client with its own session memory: one connection, its handshake kind (the answer
    // may be the key's 429 by then; any answer will do).
    let call = |store: Arc<rustls::client::ClientSessionMemoryCache>| {
        let mut config = base.clone();
        config.resumption = rustls::client::Resumption::store(store);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = gw.addr();
        async move {
            let (answer, kind) = tls_get_ok(&connector, addr).await;
            assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
            kind
        }
    };
    let first = Arc::new(rustls::client::ClientSessionMemoryCache::new(4));
    assert_eq!(call(first.clone()).await, Some(rustls::HandshakeKind::Full));
    for batch in 0..30 {
        let others = (0..10).map(|_| {
            tokio::spawn(call(Arc::new(
                rustls::client::ClientSessionMemoryCache::new(4),
            )))
        });
        for other in others {
            assert_eq!(
                other.await.unwrap(),
                Some(rustls::HandshakeKind::Full),
                "batch {batch}"
            );
        }
    }
    assert_eq!(
        call(first).await,
        Some(rustls::HandshakeKind::Resumed),
        "the first client's ticket no longer resumed after 300 other clients"
    );
}

/// The listener picks the cipher suite in its own order, AES-128-GCM first (Mozilla's
/// guidelines), whatever order the client lists them in: a client offering AES-256-GCM first
/// (as rustls and OpenSSL clients do) gets TLS13_AES_128_GCM_SHA256 over TLS 1.3 and
/// ECDHE-ECDSA-AES128-GCM-SHA256 over TLS 1.2; one offering only AES-256 or only ChaCha20 gets
/// that.
#[tokio::test]
async fn the_listener_picks_aes_128_gcm_first_in_its_own_order() {
    use rustls::{crypto::ring::cipher_suite::*, CipherSuite};
    use std::sync::Arc;
    let up = start_upstream().await;
    let cert = make_cert();
    let gw = tls_gateway(&up, &cert).await;
    let negotiated = |suites: Vec<rustls::SupportedCipherSuite>,
                      version: &'static rustls::SupportedProtocolVersion| {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: suites,
            ..rustls::crypto::ring::default_provider()
        };
        let config = cert.client_config(provider, version);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = gw.addr();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
        }
    };
    let v13 = &rustls::version::TLS13;
    let v12 = &rustls::version::TLS12;
    let all13 = vec![
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_128_GCM_SHA256,
    ];
    let all12 = vec![
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ];
    assert_eq!(
        negotiated(all13, v13).await,
        CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    assert_eq!(
        negotiated(all12, v12).await,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    );
    assert_eq!(
        negotiated(vec![TLS13_AES_256_GCM_SHA384], v13).await,
        CipherSuite::TLS13_AES_256_GCM_SHA384
    );
    assert_eq!(
        negotiated(vec![TLS13_CHACHA20_POLY1305_SHA256], v13).await,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
    );
}

/// Line 6: TLS with HTTP/1.1 and HTTP/2 (ALPN), TLS 1.2 and 1.3; plain HTTP serves h2c too.
#[tokio::test]
async fn tls_serves_http1_and_http2_and_plain_serves_h2c() {
    let up = start_upstream().await;
    let cert = make_cert();
    let gw = tls_gateway(&up, &cert).await;
    let url = format!("https://localhost:{}/v1/guests", gw.addr().port());

    for h2 in [false, true] {
        let c = tls_client(&cert, h2);
        let got = get(&c, &url, &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK);
        let want = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(got.version, want);
        assert_eq!(up.last().headers["x-forwarded-proto"], "https");
        // The per-request fields arrive intact (over h2 as never-indexed literals), twice in a
        // row on one connection, each with its own value.
        let again = get(&c, &url, &[("x-api-key", KEY)]).await;
        for g in [&got, &again] {
            assert_eq!(
                g.header("x-request-id").map(str::len),
                Some(32),
                "{:?}",
                g.headers
            );
            assert!(g.header("ratelimit").unwrap().starts_with("\"default\";r="));
        }
        assert_ne!(got.header("x-request-id"), again.header("x-request-id"));
        assert_ne!(got.header("ratelimit"), again.header("ratelimit"));
        let refused = get(&c, &url, &[]).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    }

    // TLS 1.2 only and TLS 1.3 only clients both get through.
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let c = tls_client_with_version(&cert, version);
        let got = get(&c, &url, &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK);
    }

    // Plain listener: HTTP/2 with prior knowledge.
    let (_up2, plain) = basic().await;
    let got = get(
        &h2c_client(),
        &plain.url("/v1/guests"),
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.version, http::Version::HTTP_2);
}

fn tls_client_with_version(
    cert: &TestCert,
    version: &'static rustls::SupportedProtocolVersion,
) -> TlsClient {
    let tls = cert.client_config(rustls::crypto::ring::default_provider(), version);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// Reload: a new key works, a removed or disabled key is refused within 1 s, a broken file
/// keeps the running table, and a key's limiter survives.
#[tokio::test]
async fn reload_adds_removes_keeps_on_error_and_keeps_limiter_state() {
    let up = start_upstream().await;
    // No failure budget: the polls below, made with a key not loaded yet, must not spend it
    // on a slow machine (tests/hardening.rs tests that budget).
    let limits = "[auth]\nfailures_per_ip = \"off\"\n\n[limits]\nrate = \"1/min\"\nburst = 2\n\n";
    let v1 = config_text(&up.url(), &format!("{limits}{}", key_entry("a", KEY, "")));
    let gw = start_gateway(&v1).await;
    let c = http1_client();
    let url = gw.url("/v1/guests");

    // Spend key a's burst.
    for _ in 0..2 {
        assert_eq!(
            get(&c, &url, &[("x-api-key", KEY)]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        get(&c, &url, &[("x-api-key", KEY)]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        get(&c, &url, &[("x-api-key", OTHER)]).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Good file: adds b. Within 1 s b is admitted; a's spent budget is not refilled.
    let v2 = config_text(
        &up.url(),
        &format!(
            "{limits}{}{}",
            key_entry("a", KEY, ""),
            key_entry("b", OTHER, "")
        ),
    );
    let written = std::time::Instant::now();
    gw.rewrite_config(&v2);
    let c2 = c.clone();
    let url2 = url.clone();
    assert!(
        eventually(Duration::from_secs(1), || {
            let (c, url) = (c2.clone(), url2.clone());
            async move { get(&c, &url, &[("x-api-key", OTHER)]).await.status == StatusCode::OK }
        })
        .await,
        "new key not admitted within 1 s"
    );
    assert!(written.elapsed() < Duration::from_secs(1));
    assert_eq!(
        get(&c, &url, &[("x-api-key", KEY)]).await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "reload handed out a fresh budget"
    );

    // Broken file: both keys keep working as before (once it has been read and refused).
    gw.rewrite_config(&v2.replace("[limits]", "[limits\n"));
    let refused = "keygate_config_reloads_total{result=\"failure\"}";
    let gw_ref = &gw;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            sample(&gw_ref.metrics(), refused).is_some_and(|n| n >= 1.0)
        })
        .await,
        "the broken file was never read"
    );
    assert_eq!(
        get(&c, &url, &[("x-api-key", OTHER)]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, &url, &[("x-api-key", KEY)]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Key b disabled, then removed: refused within 1 s of the write.
    gw.rewrite_config(&config_text(
        &up.url(),
        &format!(
            "{limits}{}{}",
            key_entry("a", KEY, ""),
            key_entry("b", OTHER, "disabled = true")
        ),
    ));
    let written = std::time::Instant::now();
    let (c2, url2) = (c.clone(), url.clone());
    assert!(
        eventually(Duration::from_secs(1), || {
            let (c, url) = (c2.clone(), url2.clone());
            async move {
                get(&c, &url, &[("x-api-key", OTHER)]).await.status == StatusCode::UNAUTHORIZED
            }
        })
        .await,
        "disabled key still admitted after 1 s"
    );
    assert!(written.elapsed() < Duration::from_millis(1100));
    gw.rewrite_config(&v1);
    let shared = gw.gateway.shared().clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let shared = shared.clone();
            async move { shared.live.load().table.len() == 1 }
        })
        .await,
        "key b was never removed"
    );
    assert_eq!(
        get(&c, &url, &[("x-api-key", OTHER)]).await.code(),
        "invalid_api_key"
    );
}

/// Line 4: an upstream that closes its keep-alive connections after each response never
/// surfaces as a 502: a request the gateway could not write on a closed idle connection goes
/// out on a fresh one.
#[tokio::test]
async fn an_upstream_closing_idle_connections_costs_no_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                // Keep-alive by the headers, but the socket closes right after.
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    let gw = start_gateway(&config_text(
        &format!("http://{addr}"),
        &key_entry("a", KEY, "rate = \"1000/s\"\nburst = 1000"),
    ))
    .await;
    let c = http1_client();
    for i in 0..30 {
        let got = get(&c, &gw.url("/v1/guests"), &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK, "request {i}: {}", got.text());
        assert_eq!(got.text(), "ok");
        if i % 3 == 0 {
            // Give the close time to land, so the next request meets a closed idle connection.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Dot segments cannot climb out of the `[upstream] url` path: they are resolved (`%2e` read as
/// `.`) before the prefix is put in front, and a path that climbs above the root is refused
/// with 400 `bad_request` before it costs the key anything, for keys with and without scopes;
/// the upstream never sees it. A path that stays inside goes with its dot segments resolved.
#[tokio::test]
async fn dot_segments_cannot_climb_out_of_the_upstream_path() {
    let up = start_upstream().await;
    let scoped = "scoped-key-0123456789abcdefghijklmnop";
    let text = config_text(
        &format!("{}/partner-api", up.url()),
        &format!(
            "{}{}",
            key_entry("partner", KEY, ""),
            key_entry("scoped", scoped, "scopes = [\"GET /**\"]")
        ),
    );
    let gw = start_gateway(&text).await;
    let c = http1_client();
    for key in [KEY, scoped] {
        for path in [
            "/../admin",
            "/a/../../admin",
            "/%2e%2e/admin",
            "/%2E./admin?x=1",
            "/v1/guests/../../../admin/users",
            "/..",
            // Read as `..` by Tomcat and Jetty (`;` parameters) or by servers that decode `%2f`.
            "/..;/admin",
            "/v1/..%2f..%2fadmin",
        ] {
            let got = get(&c, &gw.url(path), &[("x-api-key", key)]).await;
            assert_eq!(
                got.status,
                StatusCode::BAD_REQUEST,
                "{path}: {}",
                got.text()
            );
            assert_eq!(got.code(), "bad_request", "{path}");
        }
    }
    assert_eq!(
        up.hits(),
        0,
        "a path climbing out of the prefix reached the upstream"
    );

    for key in [KEY, scoped] {
        for (path, forwarded) in [
            ("/v1/./guests/../guests", "/partner-api/v1/guests"),
            ("/v1/x/%2E%2e/guests/./7/", "/partner-api/v1/guests/7/"),
            ("/v1/guests/..", "/partner-api/v1/"),
            ("/v1/file.v2.json", "/partner-api/v1/file.v2.json"),
            ("/v1/...", "/partner-api/v1/..."),
        ] {
            let got = get(&c, &gw.url(path), &[("x-api-key", key)]).await;
            assert_eq!(got.status, StatusCode::OK, "{path}: {}", got.text());
            assert_eq!(up.last().uri.path(), forwarded, "{path}");
        }
    }
    // The query goes on untouched, and an unscoped key's encoded slash is still its own.
    let got = get(
        &c,
        &gw.url("/v1/a/../guests?since=../x"),
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        up.last().uri.to_string(),
        "/partner-api/v1/guests?since=../x"
    );
    let got = get(&c, &gw.url("/v1/files/a%2Fb"), &[("x-api-key", KEY)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(up.last().uri.path(), "/partner-api/v1/files/a%2Fb");
}

/// The forwarding fields keygate does not write itself (`Forwarded`, `X-Real-IP`,
/// `X-Forwarded-Port`, `X-Forwarded-Prefix`), in either spelling, stay behind: an upstream
/// that prefers them (Rack, Spring) would take the client's word for its address, host and
/// scheme. A scoped key's path overrides (`X-Original-URL`, `X-Rewrite-URL`) stay behind too:
/// the key was checked against the request line's path.
#[tokio::test]
async fn client_forwarding_and_path_override_fields_do_not_reach_the_upstream() {
    let up = start_upstream().await;
    let scoped = "scoped-key-0123456789abcdefghijklmnop";
    let text = config_text(
        &up.url(),
        &format!(
            "{}{}",
            key_entry("partner", KEY, ""),
            key_entry("scoped", scoped, "scopes = [\"GET /v1/guests/**\"]")
        ),
    );
    let gw = start_gateway(&text).await;
    let spoofed = [
        (
            "forwarded",
            "for=203.0.113.9;host=admin.example;proto=https",
        ),
        ("x-real-ip", "203.0.113.9"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/admin"),
        ("x_real_ip", "203.0.113.9"),
        ("x_forwarded_port", "443"),
        ("x_forwarded_prefix", "/admin"),
    ];
    let overrides = [
        ("x-original-url", "/admin/users"),
        ("x-rewrite-url", "/admin/users"),
        ("x_original_url", "/admin/users"),
        ("x_rewrite_url", "/admin/users"),
    ];
    for (key, c) in [(KEY, http1_client()), (scoped, h2c_client())] {
        let mut headers = vec![("x-api-key", key), ("x-custom", "kept")];
        headers.extend(spoofed);
        headers.extend(overrides);
        let got = get(&c, &gw.url("/v1/guests/7"), &headers).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        let h = up.last().headers;
        for (name, _) in spoofed {
            assert!(h.get(name).is_none(), "{name} was forwarded ({key})");
        }
        assert_eq!(h["x-custom"], "kept");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        for (name, _) in overrides {
            // Not even for an unscoped key: they would leave the `[upstream] url` path.
            assert!(h.get(name).is_none(), "{name} was forwarded ({key})");
        }
    }
}

/// A trusted proxy's forwarding fields go upstream as it wrote them (`Forwarded` with the chain
/// keygate believed, Envoy's `X-Forwarded-Client-Cert`, an auth proxy's `X-Forwarded-User`);
/// the three keygate writes are keygate's all the same. From a peer that is not trusted, they
/// stay behind.
#[tokio::test]
async fn a_trusted_proxys_forwarding_fields_go_on_and_a_clients_do_not() {
    let sent = [
        ("forwarded", "for=203.0.113.9"),
        ("x-forwarded-client-cert", "By=spiffe://x;Hash=ab"),
        ("x-forwarded-user", "alice"),
        ("x-real-ip", "203.0.113.9"),
    ];
    for (server, trusted) in [
        (
            "trusted_proxies = [\"127.0.0.1\"]\nclient_ip_header = \"forwarded\"\n",
            true,
        ),
        ("trusted_proxies = [\"127.0.0.1\"]\n", true),
        ("", false),
    ] {
        let up = start_upstream().await;
        let text = config_text(&up.url(), &key_entry("partner", KEY, "")).replace(
            "listen = \"127.0.0.1:0\"\n",
            &format!("listen = \"127.0.0.1:0\"\n{server}"),
        );
        let gw = start_gateway(&text).await;
        let mut headers = vec![
            ("x-api-key", KEY),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "admin.example"),
        ];
        headers.extend(sent);
        let got = get(&http1_client(), &gw.url("/v1/guests"), &headers).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        let h = up.last().headers;
        for (name, value) in sent {
            assert_eq!(
                h.get(name).map(|v| v.to_str().unwrap()),
                trusted.then_some(value),
                "{name} with {server:?}"
            );
        }
        assert_eq!(h["x-forwarded-proto"], "http", "{server:?}");
        assert!(h
            .get("x-forwarded-host")
            .is_none_or(|v| v != "admin.example"));
    }
}

/// An HTTP/2 client may split `Cookie` into one field per cookie (RFC 9113 §8.2.3); they go
/// upstream as one `cookie` field joined with "; ", as HTTP/1.1 servers expect.
#[tokio::test]
async fn split_h2_cookies_go_upstream_as_one_field() {
    let (up, gw) = basic().await;
    let got = get(
        &h2c_client(),
        &gw.url("/v1/guests"),
        &[("x-api-key", KEY), ("cookie", "a=1"), ("cookie", "b=2")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.version, http::Version::HTTP_2);
    let cookies: Vec<_> = up
        .last()
        .headers
        .get_all("cookie")
        .iter()
        .cloned()
        .collect();
    assert_eq!(cookies, ["a=1; b=2"]);

    // One field from an HTTP/1.1 client goes as it was.
    let got = get(
        &http1_client(),
        &gw.url("/v1/guests"),
        &[("x-api-key", KEY), ("cookie", "a=1; b=2")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let cookies: Vec<_> = up
        .last()
        .headers
        .get_all("cookie")
        .iter()
        .cloned()
        .collect();
    assert_eq!(cookies, ["a=1; b=2"]);
}
