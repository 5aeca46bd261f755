//! Key lifecycle and controlled access (issue 3), end to end: the real `keygate keys ...`
//! binary edits the files of a gateway that is serving a real upstream over real sockets.

mod common;

use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::*;
use futures_util::FutureExt;
use http::{Method, StatusCode};
use keygate::{
    config::Config,
    identity::{self, Identity, IdentityKey},
    keys,
};

const SECOND: Duration = Duration::from_secs(1);

/// Runs `keygate keys <args> --config <config>`.
fn keys_cmd(config: &Path, args: &[&str]) -> Output {
    Command::new(keygate_bin())
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run keygate keys")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that prints a key (`new`, `rotate`); checks that stdout is the key and
/// nothing else, and that stderr does not repeat it.
fn minted(config: &Path, args: &[&str]) -> String {
    let out = keys_cmd(config, args);
    assert!(
        out.status.success(),
        "keys {args:?} failed: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "stdout must be the key alone: {text:?}"
    );
    let key = text.trim_end().to_string();
    assert!(key.starts_with("bbk_"), "{key}");
    assert_eq!(keys::checksum_ok(&key, "bbk_"), Some(true));
    assert!(!stderr(&out).contains(&key), "the key leaked to stderr");
    key
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "failed: {}", stderr(&out));
    out
}

async fn get_with(c: &PlainClient, gw: &TestGateway, path: &str, key: &str) -> Got {
    get(c, &gw.url(path), &[("x-api-key", key)]).await
}

/// Polls until `key` gets `status` on `path`, up to `within`.
async fn until_status(
    c: &PlainClient,
    gw: &TestGateway,
    key: &str,
    status: StatusCode,
    within: Duration,
) -> bool {
    eventually(within, || async {
        get_with(c, gw, "/v1/guests", key).await.status == status
    })
    .await
}

/// [`config_text`] with `[auth] failures_per_ip = "off"`: these tests poll with keys the
/// gateway has not loaded yet, and on a loaded machine those polls could spend the address's
/// failure budget before the reload lands (tests/hardening.rs tests that budget).
fn quiet_config(upstream: &str, rest: &str) -> String {
    let off = "[auth]\nfailures_per_ip = \"off\"\n";
    let rest = if rest.contains("[auth]\n") {
        rest.replacen("[auth]\n", off, 1)
    } else {
        format!("{off}{rest}")
    };
    config_text(upstream, &rest)
}

async fn gateway_with(rest: &str) -> (Upstream, TestGateway) {
    let up = start_upstream().await;
    let gw = start_gateway(&quiet_config(&up.url(), rest)).await;
    (up, gw)
}

/// `keys new`: the key is printed once on stdout, and the running gateway admits it within 1 s.
#[tokio::test]
async fn a_new_key_works_within_a_second() {
    let (up, gw) = gateway_with("").await;
    let c = http1_client();
    let key = minted(&gw.path, &["new", "--id", "partner", "--tenant", "hotel-1"]);

    assert!(
        until_status(&c, &gw, &key, StatusCode::OK, SECOND).await,
        "the new key was not admitted within 1 s"
    );
    let seen = up.last();
    assert_eq!(seen.headers["x-keygate-key-id"], "partner");
    assert_eq!(seen.headers["x-keygate-tenant"], "hotel-1");

    let text = std::fs::read_to_string(&gw.path).unwrap();
    assert!(!text.contains(&key), "the key itself must never be stored");
    assert!(text.contains("created_at = 20"), "{text}");
    let config = Config::load(&gw.path).unwrap();
    assert_eq!(config.keys[0].hash, keys::KeyHash::of(key.as_bytes()));

    // An existing id is refused, and nothing is printed on stdout or written.
    let before = std::fs::read_to_string(&gw.path).unwrap();
    let out = keys_cmd(&gw.path, &["new", "--id", "partner"]);
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty());
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&gw.path).unwrap(), before);
}

/// `keys revoke`: the running gateway refuses the key within 1 s.
#[tokio::test]
async fn a_revoked_key_is_refused_within_a_second() {
    let (up, gw) = gateway_with("").await;
    let c = http1_client();
    let key = minted(&gw.path, &["new", "--id", "leaky"]);
    assert!(until_status(&c, &gw, &key, StatusCode::OK, SECOND).await);

    ok(keys_cmd(&gw.path, &["revoke", "leaky"]));
    let revoked_at = Instant::now();
    assert!(
        until_status(&c, &gw, &key, StatusCode::UNAUTHORIZED, SECOND).await,
        "the revoked key was still admitted after 1 s"
    );
    assert!(revoked_at.elapsed() < SECOND);
    let hits = up.hits();
    let got = get_with(&c, &gw, "/v1/guests", &key).await;
    assert_eq!(got.code(), "invalid_api_key");
    assert_eq!(up.hits(), hits, "nothing is forwarded for a revoked key");

    let config = Config::load(&gw.path).unwrap();
    assert!(config.keys[0].disabled);
    assert!(config.keys[0].revoked_at.is_some());

    let out = keys_cmd(&gw.path, &["revoke", "no-such-key"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no key with id"), "{}", stderr(&out));
}

/// `keys rotate --grace`: both keys work during the grace, only the new one after it.
#[tokio::test]
async fn rotation_keeps_the_old_key_for_the_grace_only() {
    let (_up, gw) = gateway_with("").await;
    let c = http1_client();
    // A budget large enough for the polling below (every poll is a request).
    let old = minted(
        &gw.path,
        &[
            "new", "--id", "partner", "--rate", "1000/s", "--burst", "1000",
        ],
    );
    assert!(until_status(&c, &gw, &old, StatusCode::OK, SECOND).await);

    // Taken before the command, which reads its own clock once it runs.
    let rotated = Instant::now();
    let new = minted(&gw.path, &["rotate", "partner", "--grace", "2s"]);
    assert_ne!(new, old);
    assert!(until_status(&c, &gw, &new, StatusCode::OK, SECOND).await);
    assert_eq!(
        get_with(&c, &gw, "/v1/guests", &old).await.status,
        StatusCode::OK
    );

    let text = std::fs::read_to_string(&gw.path).unwrap();
    assert!(text.contains("previous_hash = \"blake3:"), "{text}");
    assert!(text.contains("previous_expires = 20"), "{text}");

    assert!(
        until_status(
            &c,
            &gw,
            &old,
            StatusCode::UNAUTHORIZED,
            Duration::from_secs(5)
        )
        .await,
        "the old key still worked 5 s after a 2 s grace"
    );
    assert!(
        rotated.elapsed() >= Duration::from_secs(2),
        "the old key stopped before its grace was over ({:?})",
        rotated.elapsed()
    );
    assert_eq!(
        get_with(&c, &gw, "/v1/guests", &old).await.code(),
        "expired_api_key"
    );
    assert_eq!(
        get_with(&c, &gw, "/v1/guests", &new).await.status,
        StatusCode::OK
    );

    // Without --grace the old key stops at once.
    let newer = minted(&gw.path, &["rotate", "partner"]);
    assert!(until_status(&c, &gw, &newer, StatusCode::OK, SECOND).await);
    assert_eq!(
        get_with(&c, &gw, "/v1/guests", &new).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// During a rotation the old and the new key draw on one budget.
#[tokio::test]
async fn old_and_new_key_share_one_budget() {
    let (up, gw) = gateway_with("").await;
    let c = http1_client();
    let old = minted(
        &gw.path,
        &["new", "--id", "partner", "--rate", "1/h", "--burst", "4"],
    );
    // Probing with a key the gateway does not know yet costs nothing.
    let new = minted(&gw.path, &["rotate", "partner", "--grace", "1h"]);
    assert!(until_status(&c, &gw, &new, StatusCode::OK, Duration::from_secs(2)).await);
    // One of four spent; three left, whichever key asks.
    for key in [&old, &new, &old] {
        assert_eq!(
            get_with(&c, &gw, "/v1/guests", key).await.status,
            StatusCode::OK
        );
    }
    let hits = up.hits();
    for key in [&new, &old] {
        let got = get_with(&c, &gw, "/v1/guests", key).await;
        assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(got.code(), "rate_limited");
        assert!(got.header("retry-after").is_some());
    }
    assert_eq!(up.hits(), hits);
}

/// 20 `keys new` at once, each its own process: every entry lands, the file stays valid, and
/// the running gateway admits all 20 keys.
#[tokio::test]
async fn twenty_concurrent_key_creations_all_land() {
    let (_up, gw) = gateway_with("").await;
    let children: Vec<_> = (0..20)
        .map(|i| {
            Command::new(keygate_bin())
                .args(["keys", "new", "--id", &format!("partner-{i}"), "--config"])
                .arg(&gw.path)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut minted_keys = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        minted_keys.push(stdout(&out).trim().to_string());
    }
    let config = Config::load(&gw.path).unwrap();
    assert_eq!(config.keys.len(), 20, "an entry was lost");
    let mut ids: Vec<_> = config.keys.iter().map(|k| k.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);

    let c = http1_client();
    for key in &minted_keys {
        assert!(
            until_status(&c, &gw, key, StatusCode::OK, Duration::from_secs(2)).await,
            "a concurrently minted key is not admitted"
        );
    }
}

/// Edits keep the comments, order and formatting of everything they do not change.
#[tokio::test]
async fn edits_keep_comments_order_and_formatting() {
    let up = start_upstream().await;
    let legacy = "legacy-partner-key-0123456789abcdef";
    let original = format!(
        "# Bookboost production gateway\n\
         # owner: platform team\n\n\
         [server]\n\
         listen   = \"127.0.0.1:0\"   # loopback only\n\n\
         [upstream]\n\
         url     = \"{}\"\n\
         timeout = \"2s\"  # upstream head deadline\n\n\
         [limits]  # defaults\n\
         rate  = \"10/s\"\n\
         burst = 20\n\n\
         # --- partners ---\n\
         [[keys]]\n\
         id     = \"legacy\"      # pre-keygate key\n\
         hash   = \"{}\"  # rotate me\n\
         tenant = \"hotel-9\"\n\n\
         # the review platform\n\
         [[keys]]\n\
         id   = \"review\"\n\
         hash = \"{}\"\n\
         # trailing comment\n",
        up.url(),
        keys::KeyHash::of(legacy.as_bytes()).to_config_string(),
        keys::KeyHash::of(b"review-key-0123456789abcdefghijklmn").to_config_string(),
    );
    let gw = start_gateway(&original).await;
    minted(
        &gw.path,
        &["new", "--id", "messaging", "--scope", "POST /v1/messages"],
    );
    minted(&gw.path, &["rotate", "legacy", "--grace", "1h"]);
    ok(keys_cmd(&gw.path, &["revoke", "review"]));

    let edited = std::fs::read_to_string(&gw.path).unwrap();
    // Every original line is still there, in order; only the rotated hash changed value, and
    // its comment stayed.
    let mut rest = edited.as_str();
    for line in original.lines() {
        let line = if line.starts_with("hash   = ") {
            "  # rotate me"
        } else {
            line
        };
        let at = rest
            .find(line)
            .unwrap_or_else(|| panic!("line {line:?} lost or moved:\n{edited}"));
        rest = &rest[at + line.len()..];
    }
    assert!(edited.starts_with(&original[..original.find("# --- partners ---").unwrap()]));
    Config::parse(&gw.path, &edited).unwrap();
    let c = http1_client();
    assert_eq!(
        get_with(&c, &gw, "/v1/guests", legacy).await.status,
        StatusCode::OK,
        "a key of another shape still works by hash (and within its grace)"
    );
}

/// A minted key with one character mistyped is refused before any lookup, as invalid.
#[tokio::test]
async fn checksum_catches_a_one_character_typo() {
    let (up, gw) = gateway_with("").await;
    let c = http1_client();
    let key = minted(&gw.path, &["new", "--id", "partner"]);
    assert!(until_status(&c, &gw, &key, StatusCode::OK, SECOND).await);
    let hits = up.hits();
    for i in [4, 20, key.len() - 7, key.len() - 1] {
        let mut typo = key.clone().into_bytes();
        typo[i] = if typo[i] == b'Q' { b'R' } else { b'Q' };
        let typo = String::from_utf8(typo).unwrap();
        let got = get_with(&c, &gw, "/v1/guests", &typo).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "typo at {i}");
        assert_eq!(got.code(), "invalid_api_key");
        assert!(!got.text().contains(&typo));
    }
    assert_eq!(up.hits(), hits);
}

/// Scopes: a table of methods, `*`, `**`, encoded and dot-segment paths. Out of scope is 403
/// `forbidden_scope` with nothing forwarded; in scope, the upstream gets the normalised path.
#[tokio::test]
async fn scopes_admit_what_they_cover_and_nothing_else() {
    let (up, gw) = gateway_with("").await;
    let c = http1_client();
    let key = minted(
        &gw.path,
        &[
            "new",
            "--id",
            "review",
            "--scope",
            "GET /v1/guests/**",
            "--scope",
            "POST /v1/messages",
            "--scope",
            "* /v1/hotels/*",
            "--rate",
            "1/h",
            "--burst",
            "20",
        ],
    );
    let full = minted(&gw.path, &["new", "--id", "internal"]);
    assert!(until_status(&c, &gw, &key, StatusCode::OK, SECOND).await);
    assert!(until_status(&c, &gw, &full, StatusCode::OK, SECOND).await);

    // (method, path, expected status, what the upstream must see when forwarded)
    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "/v1/guests", 200, "/v1/guests"),
        (
            "GET",
            "/v1/guests/42/stays?since=2026",
            200,
            "/v1/guests/42/stays?since=2026",
        ),
        ("HEAD", "/v1/guests", 403, ""),
        ("POST", "/v1/guests", 403, ""),
        ("GET", "/v1/guestsx", 403, ""),
        ("POST", "/v1/messages", 200, "/v1/messages"),
        ("POST", "/v1/messages/7", 403, ""),
        ("GET", "/v1/messages", 403, ""),
        ("DELETE", "/v1/hotels/7", 200, "/v1/hotels/7"),
        ("PUT", "/v1/hotels/7/rooms", 403, ""),
        ("GET", "/v1/hotels/", 403, ""),
        ("GET", "/v1/guests/../messages", 403, ""),
        ("GET", "/v1/guests/%2e%2e/messages", 403, ""),
        ("GET", "/v1/guests/%2E%2E/%2E%2E/admin", 403, ""),
        ("GET", "/v1/guests/./../../admin", 403, ""),
        ("POST", "/v1/guests/../messages", 200, "/v1/messages"),
        ("GET", "/v1/./guests/x/../1", 200, "/v1/guests/1"),
        ("GET", "/v1/%67uests/1", 200, "/v1/%67uests/1"),
        ("GET", "/v1/guests/1%2f..%2f..%2fadmin", 400, ""),
        // Tomcat and Jetty read `..;` as `..`: refused rather than forwarded as checked.
        ("GET", "/v1/guests/..;/messages", 400, ""),
        ("GET", "/v1/guests/x;v=1/1", 200, "/v1/guests/x;v=1/1"),
    ];
    for &(method, path, status, upstream_path) in cases {
        let hits = up.hits();
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let got = send(&c, m, &gw.url(path), &[("x-api-key", &key)], empty()).await;
        assert_eq!(got.status.as_u16(), status, "{method} {path}");
        match status {
            200 => {
                assert_eq!(up.hits(), hits + 1, "{method} {path}");
                let seen = up.last();
                assert_eq!(seen.uri.to_string(), upstream_path, "{method} {path}");
            }
            403 => {
                assert_eq!(up.hits(), hits, "{method} {path} was forwarded");
                if method != "HEAD" {
                    assert_eq!(got.code(), "forbidden_scope", "{method} {path}");
                }
            }
            _ => assert_eq!(up.hits(), hits, "{method} {path} was forwarded"),
        }
    }
    // A key without scopes may call anything.
    let got = send(
        &c,
        Method::PUT,
        &gw.url("/v1/anything"),
        &[("x-api-key", &full)],
        empty(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);

    let text = std::fs::read_to_string(&gw.path).unwrap();
    assert!(
        text.contains(
            "scopes = [\"GET /v1/guests/**\", \"POST /v1/messages\", \"* /v1/hotels/*\"]"
        ),
        "{text}"
    );

    // Refusals cost no budget: of the burst of 20, the first poll and the eight admitted cases
    // above spent 9; the thirteen 403s and 400s spent nothing.
    for i in 0..11 {
        let got = get_with(&c, &gw, "/v1/guests", &key).await;
        assert_eq!(got.status, StatusCode::OK, "request {i} of the 11 left");
    }
    assert_eq!(
        get_with(&c, &gw, "/v1/guests", &key).await.code(),
        "rate_limited"
    );
}

/// Quota beside the rate: a request the rate refuses is not charged to the quota.
#[tokio::test]
async fn a_rate_refusal_is_not_charged_to_the_quota() {
    let (up, gw) = gateway_with("").await;
    let c = http1_client();
    let key = minted(
        &gw.path,
        &[
            "new", "--id", "p", "--rate", "1/s", "--burst", "2", "--quota", "3/day",
        ],
    );
    // Wait for the key without spending: an unknown key costs nothing.
    assert!(
        eventually(SECOND, || async {
            gw.gateway.shared().live.load().table.len() == 1
        })
        .await
    );
    let first = get_with(&c, &gw, "/v1/guests", &key).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"default\";q=2;w=2, \"quota\";q=3;w=86400")
    );
    assert_eq!(
        first.header("ratelimit").unwrap().split(", ").nth(1),
        Some("\"quota\";r=2;t=28800")
    );
    assert_eq!(
        get_with(&c, &gw, "/v1/guests", &key).await.status,
        StatusCode::OK
    );
    for _ in 0..3 {
        let got = get_with(&c, &gw, "/v1/guests", &key).await;
        assert_eq!(got.code(), "rate_limited");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The three rate refusals left the quota's third request.
    let third = get_with(&c, &gw, "/v1/guests", &key).await;
    assert_eq!(third.status, StatusCode::OK, "{}", third.text());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let hits = up.hits();
    let over = get_with(&c, &gw, "/v1/guests", &key).await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(over.code(), "quota_exceeded");
    let retry: u64 = over.header("retry-after").unwrap().parse().unwrap();
    assert!((28_000..=28_800).contains(&retry), "Retry-After {retry}");
    assert!(over
        .header("ratelimit-policy")
        .unwrap()
        .contains("\"quota\";q=3;w=86400"));
    assert_eq!(
        over.header("ratelimit"),
        Some(format!("\"quota\";r=0;t={retry}").as_str())
    );
    assert_eq!(up.hits(), hits);
}

/// Quota beside the rate: requests the quota refuses are not charged to the rate.
#[tokio::test]
async fn a_quota_refusal_is_not_charged_to_the_rate() {
    let up = start_upstream().await;
    let key = keys::mint("bbk_");
    let entry = |quota: &str| {
        quiet_config(
            &up.url(),
            &key_entry(
                "p",
                &key,
                &format!("rate = \"1/h\"\nburst = 3\nquota = \"{quota}\""),
            ),
        )
    };
    let gw = start_gateway(&entry("1/day")).await;
    let c = http1_client();
    assert_eq!(
        get_with(&c, &gw, "/v1/guests", &key).await.status,
        StatusCode::OK
    );
    for _ in 0..5 {
        assert_eq!(
            get_with(&c, &gw, "/v1/guests", &key).await.code(),
            "quota_exceeded"
        );
    }
    // A bigger quota: a fresh quota, the same rate limiter (its rate did not change).
    gw.rewrite_config(&entry("10/day"));
    let deadline = Instant::now() + SECOND;
    let mut statuses = Vec::new();
    loop {
        let got = get_with(&c, &gw, "/v1/guests", &key).await;
        if got.code() != "quota_exceeded" {
            statuses.push(got.status);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bigger quota was not loaded within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    statuses.push(get_with(&c, &gw, "/v1/guests", &key).await.status);
    let third = get_with(&c, &gw, "/v1/guests", &key).await;
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::OK],
        "the burst of 3 had 2 left: the quota refusals must not have spent it"
    );
    assert_eq!(third.code(), "rate_limited");
}

/// `X-Keygate-Signature` verifies with the configured secret, and fails with another secret or
/// for another request; a client cannot send its own.
#[tokio::test]
async fn the_identity_signature_verifies_with_the_secret_only() {
    let up = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "5f0c9a7e2b4d6f8a1c3e5a7b9d0f2a4c6e8b0d2f4a6c8e0b2d4f6a8c0e2b4d6f";
    std::fs::write(dir.path().join("identity.secret"), format!("{secret}\n")).unwrap();
    let key = "partner-key-0123456789abcdefghijklmnop";
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}/api\"\nidentity_secret_file = \"identity.secret\"\n{}",
        up.url(),
        key_entry("review", key, "tenant = \"hotel-1042\"")
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let gw = start_gateway_in(dir, path).await;
    let c = http1_client();

    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/messages?lang=en"),
        &[("x-api-key", key), ("x-keygate-signature", "t=1,v2=forged")],
        full("hello"),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = up.last();
    let header = seen.headers["x-keygate-signature"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(header, "t=1,v2=forged");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let who = Identity {
        key_id: seen.headers["x-keygate-key-id"].to_str().unwrap(),
        tenant: Some(seen.headers["x-keygate-tenant"].to_str().unwrap()),
        method: seen.method.as_str(),
        target: seen.uri.path_and_query().unwrap().as_str(),
    };
    assert_eq!(who.target, "/api/v1/messages?lang=en");
    let skew = Duration::from_secs(300);
    let right = IdentityKey::from_secret(secret.as_bytes()).unwrap();
    assert_eq!(identity::verify(&right, &header, now, skew, &who), Ok(()));
    let wrong = IdentityKey::from_secret(
        b"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    )
    .unwrap();
    assert_eq!(
        identity::verify(&wrong, &header, now, skew, &who),
        Err(identity::VerifyError::Mismatch)
    );
    // The backend check the README shows, verbatim, accepts it.
    let mut parts = http::Request::builder()
        .method(seen.method.clone())
        .uri(seen.uri.clone())
        .body(())
        .unwrap()
        .into_parts()
        .0;
    parts.headers = seen.headers.clone();
    assert!(keygate_signed(secret.as_bytes(), &parts, now));
    assert!(!keygate_signed(&[b'f'; 64], &parts, now));
    assert!(!keygate_signed(secret.as_bytes(), &parts, now + 3600));

    // Another path, or the same path with another query: not what was signed.
    for target in [
        "/api/v1/guests",
        "/api/v1/messages?lang=de",
        "/api/v1/messages",
    ] {
        let other = Identity { target, ..who };
        assert_eq!(
            identity::verify(&right, &header, now, skew, &other),
            Err(identity::VerifyError::Mismatch),
            "{target}"
        );
    }
    let mut replayed = parts.clone();
    replayed.uri = "/api/v1/messages?lang=de".parse().unwrap();
    assert!(!keygate_signed(secret.as_bytes(), &replayed, now));
}

/// The backend-side check from the README, copied verbatim.
#[rustfmt::skip]
fn keygate_signed(secret: &[u8], req: &http::request::Parts, now: u64) -> bool {
    let h = |n: &str| req.headers.get(n).and_then(|v| v.to_str().ok());
    let Some((t, v2)) = h("x-keygate-signature").and_then(|s| s.split_once(",v2=")) else { return false };
    let Some(t) = t.strip_prefix("t=").and_then(|t| t.parse::<u64>().ok()) else { return false };
    let Ok(given) = blake3::Hash::from_hex(v2) else { return false };
    let key = blake3::derive_key("keygate 2026-11 X-Keygate-Signature v2", secret);
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let msg = format!("{t}\n{}\n{}\n{}\n{target}", h("x-keygate-key-id").unwrap_or(""),
        h("x-keygate-tenant").unwrap_or(""), req.method);
    now.abs_diff(t) <= 300 && blake3::keyed_hash(&key, msg.as_bytes()) == given // constant-time ==
}

/// `keys list`: every status, limits and scopes, never a key; hashes only in `--json`.
#[tokio::test]
async fn list_shows_status_limits_and_scopes_but_never_a_key() {
    let up = start_upstream().await;
    let expired_key = "old-partner-key-0123456789abcdefghij";
    let gw = start_gateway(&quiet_config(
        &up.url(),
        &key_entry("expired", expired_key, "expires = 2020-01-01T00:00:00Z"),
    ))
    .await;
    let mut secrets = vec![expired_key.to_string()];
    secrets.push(minted(
        &gw.path,
        &[
            "new",
            "--id",
            "active",
            "--tenant",
            "hotel-1",
            "--quota",
            "10000/day",
            "--scope",
            "GET /v1/guests/**",
            "--ttl",
            "90d",
        ],
    ));
    secrets.push(minted(&gw.path, &["new", "--id", "revoked"]));
    ok(keys_cmd(&gw.path, &["revoke", "revoked"]));
    secrets.push(minted(&gw.path, &["new", "--id", "rotating"]));
    secrets.push(minted(&gw.path, &["rotate", "rotating", "--grace", "24h"]));

    let table = stdout(&ok(keys_cmd(&gw.path, &["list"])));
    let line = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("{id} missing:\n{table}"))
            .to_string()
    };
    assert!(table.starts_with("ID "), "{table}");
    let active = line("active");
    assert!(active.contains(" active "), "{active}");
    assert!(active.contains("hotel-1"));
    assert!(active.contains("quota 10000/day"), "{active}");
    assert!(active.contains("GET /v1/guests/**"), "{active}");
    assert!(line("revoked").contains(" disabled "));
    assert!(line("expired").contains(" expired "));
    assert!(line("rotating").contains(" rotating "));
    for s in &secrets {
        assert!(!table.contains(s.as_str()), "a key leaked into keys list");
    }
    assert!(!table.contains("blake3:"), "hashes only in --json");

    let json: serde_json::Value =
        serde_json::from_str(&stdout(&ok(keys_cmd(&gw.path, &["list", "--json"])))).unwrap();
    let by_id = |id: &str| {
        json.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id("active")["status"], "active");
    assert_eq!(by_id("revoked")["status"], "disabled");
    assert_eq!(by_id("expired")["status"], "expired");
    assert_eq!(by_id("rotating")["status"], "rotating");
    assert!(by_id("rotating")["previous_hash"]
        .as_str()
        .unwrap()
        .starts_with("blake3:"));
    assert!(by_id("active")["hash"]
        .as_str()
        .unwrap()
        .starts_with("blake3:"));
    let json_text = json.to_string();
    for s in &secrets {
        assert!(
            !json_text.contains(s.as_str()),
            "a key leaked into keys list --json"
        );
    }
}

/// `[auth] keys_file`: keys live in their own file, edited there and watched by the gateway.
#[tokio::test]
async fn a_separate_keys_file_is_edited_and_watched() {
    let up = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let main = quiet_config(&up.url(), "[auth]\nkeys_file = \"keys.toml\"\n");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &main).unwrap();
    std::fs::write(
        dir.path().join("keys.toml"),
        "# partner keys, owned by support\n",
    )
    .unwrap();
    let gw = start_gateway_in(dir, path).await;
    let c = http1_client();

    let key = minted(&gw.path, &["new", "--id", "partner"]);
    assert!(until_status(&c, &gw, &key, StatusCode::OK, SECOND).await);
    assert_eq!(
        std::fs::read_to_string(&gw.path).unwrap(),
        main,
        "gateway.toml untouched"
    );
    let keys_text = std::fs::read_to_string(gw.dir.path().join("keys.toml")).unwrap();
    assert!(keys_text.starts_with("# partner keys, owned by support\n"));
    assert!(keys_text.contains("id = \"partner\""));

    ok(keys_cmd(&gw.path, &["revoke", "partner"]));
    assert!(until_status(&c, &gw, &key, StatusCode::UNAUTHORIZED, SECOND).await);
}

/// A keys file that is a symlink into another directory (config management, a Kubernetes
/// mount): `keys` edits the file it names, there, and the running gateway still sees the edit.
/// So does a gateway whose link is moved to a file in a third directory.
#[cfg(unix)]
#[tokio::test]
async fn a_symlinked_keys_file_is_watched_where_it_lives() {
    let up = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (conf, real) = (dir.path().join("etc"), dir.path().join("srv"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&real).unwrap();
    std::fs::write(real.join("keys.toml"), "").unwrap();
    std::os::unix::fs::symlink(real.join("keys.toml"), conf.join("keys.toml")).unwrap();
    let path = conf.join("gateway.toml");
    std::fs::write(
        &path,
        quiet_config(&up.url(), "[auth]\nkeys_file = \"keys.toml\"\n"),
    )
    .unwrap();
    let gw = start_gateway_in(dir, path).await;
    let c = http1_client();

    let key = minted(&gw.path, &["new", "--id", "partner"]);
    assert!(until_status(&c, &gw, &key, StatusCode::OK, SECOND).await);
    ok(keys_cmd(&gw.path, &["revoke", "partner"]));
    assert!(
        until_status(&c, &gw, &key, StatusCode::UNAUTHORIZED, SECOND).await,
        "a revoke through the symlink was not applied"
    );

    // The link now names a file elsewhere: its edits count too.
    let moved = gw.dir.path().join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    std::fs::write(moved.join("keys.toml"), "").unwrap();
    let link_tmp = conf.join("keys.toml.link");
    std::os::unix::fs::symlink(moved.join("keys.toml"), &link_tmp).unwrap();
    std::fs::rename(&link_tmp, conf.join("keys.toml")).unwrap();
    let key = minted(&gw.path, &["new", "--id", "moved"]);
    assert!(
        std::fs::read_to_string(moved.join("keys.toml"))
            .unwrap()
            .contains("id = \"moved\""),
        "the key went elsewhere"
    );
    assert!(
        until_status(&c, &gw, &key, StatusCode::OK, SECOND).await,
        "a key added where the moved link points was not loaded"
    );
}

/// A config that is a symlink into another directory resolves its relative files (here
/// `identity_secret_file`) beside the link, for `keygate keys` as for the gateway: the edit is
/// not refused for a file the gateway finds.
#[cfg(unix)]
#[test]
fn keys_edits_resolve_a_symlinked_configs_files_as_the_gateway_does() {
    let dir = tempfile::tempdir().unwrap();
    let (etc, releases) = (dir.path().join("etc"), dir.path().join("releases/v3"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&releases).unwrap();
    let text = quiet_config("http://127.0.0.1:9", "").replace(
        "[upstream]\n",
        "[upstream]\nidentity_secret_file = \"identity.secret\"\n",
    );
    std::fs::write(releases.join("gateway.toml"), text).unwrap();
    std::fs::write(etc.join("identity.secret"), "0123456789abcdef".repeat(4)).unwrap();
    let config = etc.join("gateway.toml");
    std::os::unix::fs::symlink(releases.join("gateway.toml"), &config).unwrap();
    assert!(Config::load(&config).is_ok(), "the gateway's reading");
    minted(&config, &["new", "--id", "partner"]);
    ok(keys_cmd(&config, &["revoke", "partner"]));
    assert!(std::fs::read_to_string(releases.join("gateway.toml"))
        .unwrap()
        .contains("id = \"partner\""));
}

/// A key revoked between the gateway's start-up read and the start of its file watch (a
/// `keys revoke` right after a restart, while a large key file loads) is refused all the same.
#[tokio::test]
async fn a_revoke_while_the_gateway_starts_is_not_lost() {
    let up = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, quiet_config(&up.url(), "")).unwrap();
    let key = minted(&path, &["new", "--id", "leaky"]);
    // Read as the gateway reads it at start...
    let config = Config::load(&path).unwrap();
    // ...revoked before its watch exists...
    ok(keys_cmd(&path, &["revoke", "leaky"]));
    // ...and then the gateway starts serving what it read.
    let gateway = keygate::server::Gateway::start(config).await.unwrap();
    let gw = TestGateway { gateway, dir, path };
    let c = http1_client();
    assert!(
        until_status(&c, &gw, &key, StatusCode::UNAUTHORIZED, SECOND).await,
        "the key revoked during start-up was still admitted"
    );
}

/// Bad input changes nothing: a flag that does not parse, a config that is already broken.
#[tokio::test]
async fn refused_edits_leave_the_file_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, quiet_config("http://127.0.0.1:9", "")).unwrap();
    let before = std::fs::read_to_string(&path).unwrap();
    for (args, needle) in [
        (vec!["new", "--id", "a", "--scope", "GET v1"], "--scope"),
        (vec!["new", "--id", "a", "--quota", "5/s"], "--quota"),
        (vec!["new", "--id", "a", "--rate", "5/fortnight"], "--rate"),
        (vec!["new", "--id", "has space"], "--id"),
        (
            vec!["new", "--id", "a", "--expires", "2001-01-01T00:00:00Z"],
            "past",
        ),
        (vec!["rotate", "nobody"], "no key with id"),
    ] {
        let out = keys_cmd(&path, &args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stdout(&out).is_empty(), "{args:?} printed on stdout");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    }
    let broken = format!("{before}[limits]\nburst = 0\n");
    std::fs::write(&path, &broken).unwrap();
    let out = keys_cmd(&path, &["new", "--id", "a"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("gateway.toml:"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), broken);
}

/// The whole life of a partner's key against `keygate run` in its own process: mint, use,
/// rotate, revoke; and at trace level no log line ever holds a key or a hash.
#[tokio::test]
async fn a_keys_whole_life_against_a_running_gateway_process_logs_no_secret() {
    let up = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, quiet_config(&up.url(), "")).unwrap();
    let gw = spawn_keygate(&path, &[]);
    let c = http1_client();
    let url = format!("http://{}/v1/guests", gw.addr);
    let status = |key: String| {
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url, &[("x-api-key", &key)]).await.status }
    };

    let first = minted(
        &path,
        &["new", "--id", "partner", "--scope", "GET /v1/guests/**"],
    );
    assert!(
        eventually(SECOND, || status(first.clone())
            .map(|s| s == StatusCode::OK))
        .await
    );
    let second = minted(&path, &["rotate", "partner", "--grace", "1h"]);
    assert!(
        eventually(SECOND, || status(second.clone())
            .map(|s| s == StatusCode::OK))
        .await
    );
    assert_eq!(status(first.clone()).await, StatusCode::OK);
    let got = send(&c, Method::POST, &url, &[("x-api-key", &second)], empty()).await;
    assert_eq!(got.code(), "forbidden_scope");

    // A one-character typo is refused like an unknown key, but logged apart.
    let mut typo = second.clone().into_bytes();
    typo[10] = if typo[10] == b'Z' { b'Y' } else { b'Z' };
    let typo = String::from_utf8(typo).unwrap();
    let got = get(&c, &url, &[("x-api-key", &typo)]).await;
    assert_eq!(got.code(), "invalid_api_key");
    assert!(gw.wait_for_log("bad_checksum", SECOND));
    let unknown = keys::mint("bbk_");
    assert_eq!(status(unknown.clone()).await, StatusCode::UNAUTHORIZED);
    assert!(gw.wait_for_log("reason=\"invalid_api_key\"", SECOND));

    ok(keys_cmd(&path, &["revoke", "partner"]));
    assert!(
        eventually(SECOND, || status(second.clone())
            .map(|s| s == StatusCode::UNAUTHORIZED))
        .await
    );
    assert_eq!(status(first.clone()).await, StatusCode::UNAUTHORIZED);

    assert!(gw.wait_for_log("config reloaded", SECOND));
    let logs = gw.logs();
    let config = Config::load(&path).unwrap();
    let k = &config.keys[0];
    for secret in [
        first.clone(),
        second.clone(),
        typo,
        unknown,
        k.hash.to_config_string(),
        k.previous.unwrap().hash.to_config_string(),
    ] {
        assert!(!logs.contains(&secret), "a key or hash reached the log");
        assert!(
            !logs.contains(&secret[7..]),
            "a key or hash reached the log"
        );
    }
}

/// The key store keeps its owner and group across an edit made by root (the shipped unit runs
/// keygate as `keygate` and has root edit `/etc/keygate`); a keys file made anew takes the
/// config's; and a symlinked store stays a link, the file it names edited. (Ownership is only
/// checked when the test runs as root, as CI does.)
#[test]
fn edits_keep_the_owner_and_edit_through_a_symlink() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        quiet_config("http://127.0.0.1:9", "[auth]\nkeys_file = \"keys.toml\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();
    let as_root = std::os::unix::fs::chown(&config, Some(12345), Some(12346)).is_ok();
    minted(&config, &["new", "--id", "a"]);
    let keys = dir.path().join("keys.toml");
    let meta = std::fs::metadata(&keys).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640, "like the config");
    if as_root {
        assert_eq!((meta.uid(), meta.gid()), (12345, 12346), "like the config");
        minted(&config, &["new", "--id", "b"]);
        let meta = std::fs::metadata(&keys).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (12345, 12346),
            "kept across an edit"
        );
    } else {
        eprintln!("not root: ownership not checked");
    }

    // The store behind a symlink: the link stays, the file it names gets the key.
    let real = dir.path().join("real-keys.toml");
    std::fs::rename(&keys, &real).unwrap();
    std::os::unix::fs::symlink(&real, &keys).unwrap();
    minted(&config, &["new", "--id", "c"]);
    assert!(std::fs::symlink_metadata(&keys)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read_to_string(&real)
        .unwrap()
        .contains("id = \"c\""));
}

/// The lock file beside the store serves whoever may edit the store: one that root made (an
/// edit with sudo) takes the store's owner, and one that is root's anyway (0644, an older
/// keygate) still locks for the owner, who only needs to read it. Root only (as CI runs).
#[cfg(unix)]
#[test]
fn the_stores_owner_can_still_edit_after_root_did() {
    use std::os::unix::{fs::MetadataExt, process::CommandExt};
    let dir = tempfile::tempdir().unwrap();
    let (uid, gid) = (12347, 12348);
    if std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).is_err() {
        eprintln!("not root: skipped");
        return;
    }
    let as_owner = |args: &[&str], config: &Path| {
        Command::new(keygate_bin())
            .arg("keys")
            .args(args)
            .arg("--config")
            .arg(config)
            .uid(uid)
            .gid(gid)
            .output()
    };
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, quiet_config("http://127.0.0.1:9", "")).unwrap();
    std::os::unix::fs::chown(&config, Some(uid), Some(gid)).unwrap();
    match as_owner(&["list"], &config) {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!("the binary cannot run as {uid} here ({other:?}): skipped");
            return;
        }
    }
    let lock = dir.path().join("gateway.toml.lock");
    minted(&config, &["new", "--id", "by-root"]);
    let meta = std::fs::metadata(&lock).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (uid, gid),
        "the lock took root's owner"
    );
    let out = as_owner(&["new", "--id", "by-owner"], &config).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // A lock root left as its own, readable by all.
    std::fs::remove_file(&lock).unwrap();
    std::fs::write(&lock, "").unwrap();
    let out = as_owner(&["new", "--id", "after-old-lock"], &config).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .contains("id = \"after-old-lock\""));
}

/// Dates the config cannot hold are refused with a message (RFC 3339 and TOML stop at the
/// year 9999), not a panic; rotating an expired key is refused (its new key would be refused
/// as expired); a key that cannot be shown is reported, with what to do.
#[test]
fn far_dates_expired_rotations_and_a_closed_stdout_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, quiet_config("http://127.0.0.1:9", "")).unwrap();
    for args in [
        &["new", "--id", "x", "--ttl", "9000y"][..],
        &["new", "--id", "x", "--expires", "9999-12-31T23:00:00-05:00"],
    ] {
        let out = keys_cmd(&config, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("9999"), "{args:?}: {}", stderr(&out));
    }
    minted(&config, &["new", "--id", "r"]);
    let out = keys_cmd(&config, &["rotate", "r", "--grace", "9000y"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // A hand-written "never" past 9999 UTC: listed, not a panic.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "id = \"r\"",
        "id = \"r\"\nexpires = 9999-12-31T23:59:59-05:00",
    );
    std::fs::write(&config, text).unwrap();
    let out = keys_cmd(&config, &["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("after 9999-12-31T23:59:59Z"),
        "{}",
        stdout(&out)
    );

    // Expired: no rotation.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("9999-12-31T23:59:59-05:00", "2001-01-01T00:00:00Z");
    std::fs::write(&config, text).unwrap();
    let before = std::fs::read_to_string(&config).unwrap();
    let out = keys_cmd(&config, &["rotate", "r"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("expired on 2001-01-01T00:00:00Z"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        before,
        "nothing written"
    );

    // stdout that cannot be written: the key is stored, and the error says how to get another.
    let out = Command::new(keygate_bin())
        .args(["keys", "new", "--id", "lost", "--config"])
        .arg(&config)
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("keygate keys rotate lost"),
        "{}",
        stderr(&out)
    );
}
