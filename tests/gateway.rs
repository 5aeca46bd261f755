//! The core contract (issue 2), end to end: real sockets, real TLS, real HTTP/1.1 and HTTP/2
//! clients, a real upstream. Each test names the contract line it guards.

mod common;

use common::*;
use http::StatusCode;

const KEY: &str = "partner-key-0123456789abcdefghijklmnop";
const OTHER: &str = "other-partner-key-zyxwvutsrqponmlkjihg";

async fn basic() -> (Upstream, TestGateway) {
    let up = start_upstream().await;
    let text = config_text(
        &up.url(),
        &format!(
            "{}{}",
            key_entry("review-platform", KEY, "tenant = \"hotel-1042\""),
            key_entry("messaging", OTHER, "")
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
