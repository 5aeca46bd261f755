//! The `keygate` binary as users run it: `run` (logs, SIGHUP, broken reloads, memory while
//! streaming 1 GiB), `check`, `hash`, `demo`.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use http::{Method, StatusCode};
use keygate::keys::KeyHash;

const KEY: &str = "legacy-reload-key-0123456789abcdefghij";

fn gateway_dir(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Logs: one access line per request with the documented fields; no key, no hash and no
/// Authorization value in any line at any level (RUST_LOG=trace).
#[tokio::test]
async fn logs_carry_access_lines_and_never_a_secret() {
    let up = start_upstream().await;
    // A legacy key (no bbk_ checksum) so it reaches the table lookup.
    let key = "legacy-partner-key-4c7d1e9f0a2b3c4d5e6f";
    let (_dir, path) = gateway_dir(&config_text(
        &up.url(),
        &key_entry("review-platform", key, "tenant = \"hotel-1042\""),
    ));
    let gw = spawn_keygate(&path, &[]);
    let c = http1_client();
    let base = format!("http://{}", gw.addr);
    let wrong = "wrong-key-value-9f8e7d6c5b4a39281706";
    let requests: Vec<Vec<(&str, String)>> = vec![
        vec![("x-api-key", key.to_string())],
        vec![("authorization", format!("Bearer {key}"))],
        vec![("x-api-key", wrong.to_string())],
        vec![("authorization", format!("Bearer {wrong}"))],
        vec![
            ("x-api-key", key.to_string()),
            ("authorization", format!("Bearer {key}")),
        ],
        vec![],
    ];
    for headers in &requests {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        get(&c, &format!("{base}/v1/guests?guest_token={key}"), &h).await;
    }
    // Every access line written (they go out through the non-blocking writer).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gw.logs().matches("keygate::access").count() < requests.len()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = gw.logs();
    let access: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("keygate::access"))
        .collect();
    assert_eq!(
        access.len(),
        requests.len(),
        "one access line per request:\n{logs}"
    );
    let admitted = access[0];
    for field in [
        "request_id=",
        "key_id=\"review-platform\"",
        "tenant=\"hotel-1042\"",
        "method=\"GET\"",
        "path=\"/v1/guests\"",
        "status=200",
        "duration_ms=",
    ] {
        assert!(admitted.contains(field), "{field} missing from {admitted}");
    }
    let hash_hex = KeyHash::of(key.as_bytes()).to_config_string();
    for secret in [
        key,
        wrong,
        &hash_hex[7..],
        &hash_hex[7..23],
        "Bearer",
        "api_key=",
    ] {
        assert!(
            !logs.contains(secret),
            "{secret:?} appears in the logs:\n{logs}"
        );
    }
}

/// A client that sends an IP address as SNI (wrk and some HTTP libraries do) gets no log line
/// per connection: rustls's own warnings are off unless `RUST_LOG` asks for them, so nobody
/// can flood the log with handshakes. The connection itself is served.
#[tokio::test]
async fn an_ip_address_as_sni_puts_nothing_in_the_log() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let up = start_upstream().await;
    let cert = make_cert();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&up.url(), &key_entry("a", KEY, "")).replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\n{}", cert.write_into(dir.path())),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let gw = spawn_keygate_plain_env(&path, &[]);

    // rustls never sends an IP as SNI, so make its ClientHello for a 9-letter name and put
    // "127.0.0.1" in its place.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("abcdefghi").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    let at = hello.windows(9).position(|w| w == b"abcdefghi").unwrap();
    hello[at..at + 9].copy_from_slice(b"127.0.0.1");
    for _ in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        conn.write_all(&hello).await.unwrap();
        let mut server_hello = [0u8; 5];
        conn.read_exact(&mut server_hello).await.unwrap();
        assert_eq!(server_hello[0], 22, "a TLS handshake record answers");
    }
    let got = get(
        &tls_client(&cert, false),
        &format!("https://localhost:{}/v1/ok", gw.addr.port()),
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(gw.wait_for_log("keygate::access", Duration::from_secs(5)));
    let logs = gw.logs();
    assert!(!logs.contains("rustls"), "{logs}");
    assert!(!logs.contains("WARN"), "{logs}");
}

/// A SIGHUP (`systemctl reload`) that lands while keygate is still loading its keys does not
/// end it: it goes on starting and listens.
#[cfg(unix)]
#[tokio::test]
async fn a_sighup_while_starting_does_not_end_keygate() {
    let up = start_upstream().await;
    // Enough keys that loading them takes a while.
    let mut keys = key_entry("a", KEY, "");
    for i in 0..200_000 {
        keys.push_str(&key_entry(&format!("k{i}"), &format!("key-{i}"), ""));
    }
    let (dir, path) = gateway_dir(&config_text(
        &up.url(),
        "[auth]\nkeys_file = \"keys.toml\"\n",
    ));
    std::fs::write(dir.path().join("keys.toml"), keys).unwrap();
    let mut child = Command::new(keygate_bin())
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // Once keygate listens for SIGHUP (a process cannot before it runs), and before it has
    // started: the HUP lands while the keys load.
    let caught = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                let mask = s
                    .lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))?
                    .trim()
                    .to_string();
                u64::from_str_radix(&mask, 16).ok()
            })
            .is_some_and(|mask| mask & 1 != 0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !caught(child.id()) {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "keygate never listened for SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut seen = String::new();
    while let Ok(line) = lines.try_recv() {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(
        !seen.contains("listening on"),
        "keygate started before it listened for SIGHUP: the start-up window is not covered"
    );
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let listening = loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("listening on") {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let status = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        listening && status.is_none(),
        "keygate did not survive the SIGHUP (exit {status:?}): {seen}"
    );
}

/// Reload through the binary: SIGHUP reloads, a broken file logs one error with
/// file:line:col and keeps serving the old table.
#[tokio::test]
async fn sighup_reloads_and_a_broken_file_logs_file_line_col_and_keeps_serving() {
    let up = start_upstream().await;
    let v1 = config_text(&up.url(), &key_entry("a", KEY, ""));
    let (_dir, path) = gateway_dir(&v1);
    let gw = spawn_keygate(&path, &[]);
    let c = http1_client();
    let url = format!("http://{}/v1/guests", gw.addr);
    assert_eq!(
        get(&c, &url, &[("x-api-key", KEY)]).await.status,
        StatusCode::OK
    );

    gw.signal("HUP");
    assert!(
        gw.wait_for_log("config reloaded", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    assert!(gw.logs().contains("SIGHUP"));

    let broken = format!("{v1}\n[limits]\nrate = \"5/fortnight\"\n");
    let bad_line = broken
        .lines()
        .position(|l| l.contains("fortnight"))
        .unwrap()
        + 1;
    write_atomically(&path, &broken);
    assert!(
        gw.wait_for_log("config reload failed", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("config reload failed"))
        .unwrap();
    let location = format!("{}:{bad_line}:8:", path.display());
    assert!(line.contains(&location), "no {location} in {line}");
    assert_eq!(
        logs.matches("config reload failed").count(),
        1,
        "one error per bad write"
    );
    assert_eq!(
        get(&c, &url, &[("x-api-key", KEY)]).await.status,
        StatusCode::OK
    );
}

/// Line 4: a 1 GiB upload and a 1 GiB download pass through with bounded gateway memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_with_bounded_memory() {
    let up = start_upstream().await;
    let key = "legacy-streaming-key-0123456789abcdef";
    let (_dir, path) = gateway_dir(
        &config_text(&up.url(), &key_entry("a", key, "max_body = \"2GiB\""))
            .replace("timeout = \"2s\"", "timeout = \"60s\""),
    );
    let gw = spawn_keygate(&path, &[("RUST_LOG", "warn,keygate::server=info")]);
    let c = http1_client();
    let base = format!("http://{}", gw.addr);
    const GIB: u64 = 1 << 30;
    let got = send(
        &c,
        Method::POST,
        &format!("{base}/upload"),
        &[("x-api-key", key)],
        stream_body(GIB),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["bytes"], GIB);

    // Count the download without keeping it.
    let req = http::Request::get(format!("{base}/download?bytes={GIB}"))
        .header("x-api-key", key)
        .body(empty())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut n = 0u64;
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            n += d.len() as u64;
        }
    }
    assert_eq!(n, GIB);

    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 64 * 1024,
        "gateway peak RSS {hwm_kib} KiB while streaming 2 GiB"
    );
}

/// `keygate check`: the shipped gateway.toml passes with a summary; a broken file prints
/// file:line:col and exits 1.
#[test]
fn check_passes_on_the_shipped_config_and_locates_errors() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml");
    let out = Command::new(keygate_bin())
        .args(["check", "--config", shipped])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "listen:   127.0.0.1:8443",
        "tls:      off",
        "upstream: http://127.0.0.1:9000",
        "keys:     1 active, 0 disabled, 0 expired",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }

    let text = std::fs::read_to_string(shipped)
        .unwrap()
        .replace("burst = 100", "burst = 100\nbogus = 1");
    let (_dir, path) = gateway_dir(&text);
    let out = Command::new(keygate_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l == "bogus = 1").unwrap() + 1;
    assert!(
        stderr.starts_with(&format!("{}:{line}:1: ", path.display()))
            && stderr.contains("unknown field"),
        "{stderr}"
    );

    // Counting statuses.
    let now_plus = "2999-01-01T00:00:00Z";
    let keys = format!(
        "{}{}{}",
        key_entry(
            "a",
            "k-a-0123456789abcdef0123456789",
            &format!("expires = {now_plus}")
        ),
        key_entry("b", "k-b-0123456789abcdef0123456789", "disabled = true"),
        key_entry(
            "c",
            "k-c-0123456789abcdef0123456789",
            "expires = 2001-01-01T00:00:00Z"
        ),
    );
    let (_dir, path) = gateway_dir(&config_text("http://127.0.0.1:9", &keys));
    let out = Command::new(keygate_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 active, 1 disabled, 1 expired"));
}

/// `keygate check` reads the listener's certificate as a start would: a broken file fails the
/// check naming it, and the summary shows how long the certificate is valid (an expired one
/// is reported, not refused: keygate serves it, as nginx does).
#[test]
fn check_reads_the_listener_certificate_and_dates_it() {
    const DAY: u64 = 24 * 3600;
    let now = std::time::SystemTime::now();
    let check = |path: &std::path::Path| {
        let out = Command::new(keygate_bin())
            .args(["check", "--config"])
            .arg(path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    let date = |secs: i64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64),
        )
    };
    let (cert, not_after) = make_cert_until(now + std::time::Duration::from_secs(30 * DAY + 60));
    let dir = tempfile::tempdir().unwrap();
    let tls = cert.write_into(dir.path());
    let text = config_text("http://127.0.0.1:9", "").replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\n{tls}"),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &text).unwrap();
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let line = format!(
        "  tls:      on, certificate valid until {} (30 days left)\n",
        date(not_after)
    );
    assert!(stdout.contains(&line), "{line:?} not in\n{stdout}");

    let (expired, expired_at) = make_cert_until(now - std::time::Duration::from_secs(3 * DAY));
    expired.write_into(dir.path());
    let (code, stdout, _) = check(&path);
    assert_eq!(code, Some(0));
    let line = format!(
        "  tls:      on, certificate EXPIRED on {} (3 days ago)\n",
        date(expired_at)
    );
    assert!(stdout.contains(&line), "{line:?} not in\n{stdout}");

    // A half-written certificate: what `keygate run` would refuse to start with.
    std::fs::write(
        dir.path().join("gateway.crt"),
        "-----BEGIN CERTIFICATE-----\nMIIB",
    )
    .unwrap();
    let (code, stdout, stderr) = check(&path);
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    let cert_path = dir.path().join("gateway.crt");
    assert!(
        stderr.starts_with(&format!(
            "{}: {}: no usable PEM certificate",
            path.display(),
            cert_path.display()
        )),
        "{stderr}"
    );
}

/// `keygate hash` prints the blake3 form of the key read on stdin.
#[test]
fn hash_prints_the_config_form() {
    let mut child = Command::new(keygate_bin())
        .arg("hash")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"bbk_someKey123\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.trim(),
        format!("blake3:{}", blake3::hash(b"bbk_someKey123").to_hex())
    );
}

/// `keygate demo`: a key and commands are printed; accepted, rejected and rate-limited all
/// behave as printed.
#[tokio::test]
async fn demo_prints_a_working_key_and_commands() {
    let mut child = Command::new(keygate_bin())
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
            if line.contains("Ctrl-C") {
                let _ = tx.send(text.clone());
            }
        }
    });
    let text = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("demo printed its tour");
    let key = text
        .split_whitespace()
        .find(|w| w.starts_with("bbk_"))
        .expect("a key")
        .to_string();
    let base = text
        .split_whitespace()
        .find_map(|w| {
            w.strip_suffix("/v1/guests")
                .filter(|b| b.starts_with("http://127.0.0.1:"))
        })
        .expect("a URL")
        .to_string();
    assert!(text.contains("curl"));
    // Its config lives in a directory of its own, made for it, private.
    let config = text
        .lines()
        .find_map(|l| l.strip_prefix("config: "))
        .expect("the config's path");
    let dir = std::path::Path::new(config.trim()).parent().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
    }
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let random = name.rsplit('-').next().unwrap();
    assert!(
        random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit()),
        "{name}"
    );
    let c = http1_client();
    let got = get(&c, &format!("{base}/v1/guests"), &[("x-api-key", &key)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["called_by"]["key_id"], "demo-review-platform");
    assert_eq!(got.json()["called_by"]["tenant"], "hotel-1042");
    let got = send(
        &c,
        Method::POST,
        &format!("{base}/v1/messages"),
        &[("authorization", &format!("Bearer {key}"))],
        full("{\"text\":\"hi\"}"),
    )
    .await;
    assert_eq!(got.status, StatusCode::CREATED);
    assert_eq!(
        get(&c, &format!("{base}/v1/guests"), &[]).await.code(),
        "missing_api_key"
    );
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(
            get(&c, &format!("{base}/v1/guests"), &[("x-api-key", &key)])
                .await
                .status
                .as_u16(),
        );
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let _ = child.kill();
    let _ = child.wait();
}
