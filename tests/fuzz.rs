//! Fuzz targets, on the stable toolchain: proptest drives mutations of the committed seeds in
//! `fuzz/seeds/` (byte flips, insertions, deletions, duplicated spans, tokens from a smuggler's
//! dictionary) for as long as `KEYGATE_FUZZ_SECS` says (default 2 s, so `cargo test` stays
//! quick; `.ci/run` gives each target 60 s). A failure prints the input that broke a property.
//!
//! - `fuzz_config_parsing`: `Config::parse` never panics, and every error is `file:line:col:`
//!   inside the text; a keys file streamed from disk reads as its text read whole, and streamed
//!   into a key table (duplicates found only when it is sealed) too, error for error.
//! - `fuzz_request_heads`: raw bytes against a live gateway: it never panics or hangs, always
//!   answers with a well-formed status line (no 5xx: the upstream is up), forwards only what
//!   was admitted with the key (`X-Keygate-Key-Id` set), never forwards the key, keeps serving.
//! - `fuzz_client_ip`: forwarding headers never panic the client-IP walk, and an untrusted
//!   peer's headers are never believed.
//! - `fuzz_proxy_v2`: the PROXY v2 reader never panics and reads no byte past its header.
//! - `fuzz_scope_matching`: path normalisation never panics, leaves no dot segment, is
//!   idempotent, and a `GET /v1/guests/**` scope admits only paths that really are under it.
//! - `fuzz_upstream_answers`: upstream answers (heads, interim answers, every body framing)
//!   never panic the reader, and read the same whether they arrive whole or cut anywhere.

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use common::*;
use http::{HeaderMap, HeaderValue, StatusCode};
use keygate::{
    client_ip::{self, Cidr, ClientIpHeader, TrustedProxies},
    config::Config,
    keys::KeyTableBuilder,
    wire::{self, BodyReader, Step},
};
use proptest::{
    prelude::*,
    test_runner::{Config as RunnerConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "partner-key-0123456789abcdefghijklmnop";

/// Tokens a smuggler would try, spliced into seeds by the mutator.
const DICTIONARY: &[&str] = &[
    "\r\n",
    "\n",
    "\r",
    ": ",
    ",",
    ";",
    "=",
    "\"",
    "[",
    "]",
    "\0",
    "\u{ff}",
    "%00",
    "%",
    " ",
    "\t",
    "Transfer-Encoding: chunked\r\n",
    "Content-Length: 0\r\n",
    "Content-Length: 18446744073709551616\r\n",
    "Content-Length: 5, 6\r\n",
    "Authorization: Bearer ",
    "X-Api-Key: ",
    "X-Forwarded-For: ",
    "Connection: upgrade\r\n",
    "Upgrade: h2c\r\n",
    "Host: ",
    "?api_key=",
    "&api_key=",
    "http://evil/",
    "CONNECT ",
    "HTTP/1.0",
    "HTTP/2.0",
    "0\r\n\r\n",
    "ffffffffffffffff\r\n",
    "\r\n ",
    "[[keys]]\n",
    "[server]\n",
    "= \"",
    "1e999",
    "-1",
    "2027-02-30T25:61:00Z",
    "blake3:",
    "999999999999999999999KiB",
    "/0",
    "/129",
    "::ffff:",
];

/// One mutation: (kind, position, byte, length).
type Mutation = (u8, usize, u8, usize);

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec((0u8..6, any::<usize>(), any::<u8>(), 0usize..64), 0..8)
}

/// Applies `muts` to `seed`, the mutators libFuzzer uses most.
fn mutate(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for &(kind, pos, byte, len) in muts {
        let at = if b.is_empty() { 0 } else { pos % (b.len() + 1) };
        match kind {
            0 if at < b.len() => b[at] ^= byte | 1,
            1 => b.insert(at, byte),
            2 => {
                let end = (at + len).min(b.len());
                b.drain(at..end);
            }
            3 => {
                let end = (at + len).min(b.len());
                let span = b[at..end].to_vec();
                b.splice(at..at, span);
            }
            4 => {
                let token = DICTIONARY[usize::from(byte) % DICTIONARY.len()];
                b.splice(at..at, token.bytes());
            }
            _ => {
                // Overwrite a span with one repeated byte (long runs find length bugs).
                let end = (at + len).min(b.len());
                b[at..end].fill(byte);
            }
        }
    }
    b
}

/// A seed from the clock and the process id: different on every round and run.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

fn seeds(dir: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<_> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `test` on inputs from `strategy` until the time budget is spent; panics with the
/// failing input on the first broken property.
fn fuzz_for<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let secs: u64 = std::env::var("KEYGATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let config = RunnerConfig {
        cases: 64,
        failure_persistence: None,
        ..RunnerConfig::default()
    };
    let mut rounds = 0u64;
    while Instant::now() < deadline || rounds == 0 {
        // A fresh runner per round (a runner counts its cases once); each with a new seed,
        // printed on failure so the run can be repeated with KEYGATE_FUZZ_SEED.
        let seed: u64 = match std::env::var("KEYGATE_FUZZ_SEED") {
            Ok(s) => s.parse().expect("KEYGATE_FUZZ_SEED is a number"),
            Err(_) => rand_seed(),
        };
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let mut runner = TestRunner::new_with_rng(config.clone(), rng);
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("fuzz target {name} failed (KEYGATE_FUZZ_SEED={seed}): {e}");
        }
        rounds += 1;
    }
    eprintln!("{name}: {} inputs in {secs} s, no failure", rounds * 64);
}

#[test]
fn fuzz_config_parsing() {
    let seeds = seeds("config");
    let n = seeds.len();
    // The keys part of each input also goes to a keys file: streamed from disk (how a keys
    // file is read) it must give what the same text read whole gives, error for error.
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("main.toml");
    let main_text =
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n\
                     [auth]\nkeys_file = \"keys.toml\"\n";
    std::fs::write(&main, main_text).unwrap();
    let keys_path = dir.path().join("keys.toml");
    let keys_of = |c: &Config| -> Vec<String> {
        c.keys
            .iter()
            .map(|k| format!("{k:?} {}", k.hash.to_config_string()))
            .collect()
    };
    fuzz_for("config", (0..n, mutations()), |(i, muts)| {
        let bytes = mutate(&seeds[i], &muts);
        let text = String::from_utf8_lossy(&bytes);
        match Config::parse(Path::new("gw.toml"), &text) {
            Ok(_) => {}
            Err(e) => {
                let s = e.to_string();
                prop_assert!(s.starts_with("gw.toml:"), "{s}");
                prop_assert!(e.line >= 1 && e.line <= text.lines().count() + 1, "{s}");
                prop_assert!(e.col >= 1, "{s}");
            }
        }
        let keys_text = &text[text.find("[[keys]]").unwrap_or(0)..];
        std::fs::write(&keys_path, keys_text).unwrap();
        let whole = Config::parse_with_keys(&main, main_text, Some(keys_text));
        match (Config::parse(&main, main_text), &whole) {
            (Ok(streamed), Ok(whole)) => prop_assert_eq!(keys_of(&streamed), keys_of(whole)),
            (Err(streamed), Err(whole)) => {
                prop_assert_eq!(streamed.to_string(), whole.to_string())
            }
            (streamed, whole) => prop_assert!(
                false,
                "streamed: {:?}, whole: {:?}",
                streamed.map(|c| keys_of(&c)),
                whole.as_ref().map(keys_of)
            ),
        }
        // Into a key table: every key's hashes find it, and nothing else is in it.
        let mut builder = KeyTableBuilder::new(None);
        match (Config::load_into(&main, &mut builder), &whole) {
            (Ok(_), Ok(whole)) => {
                let table = builder.finish();
                let previous = whole.keys.iter().filter(|k| k.previous.is_some()).count();
                prop_assert_eq!(table.len(), whole.keys.len() + previous);
                for k in &whole.keys {
                    let found = table.lookup(&k.hash).map(|f| f.entry.id.to_string());
                    prop_assert_eq!(found.as_deref(), Some(k.id.as_str()));
                    if let Some(p) = &k.previous {
                        let found = table.lookup(&p.hash).map(|f| f.entry.id.to_string());
                        prop_assert_eq!(found.as_deref(), Some(k.id.as_str()));
                    }
                }
            }
            (Err(table), Err(whole)) => prop_assert_eq!(table.to_string(), whole.to_string()),
            (table, whole) => prop_assert!(
                false,
                "into a table: {:?}, whole: {:?}",
                table.map(|_| "ok"),
                whole.as_ref().map(keys_of)
            ),
        }
        Ok(())
    });
}

#[test]
fn fuzz_request_heads() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (up, gw) = rt.block_on(async {
        let up = start_upstream().await;
        let text = config_text(
            &up.url(),
            &format!(
                "[auth]\nallow_query_key = true\nfailures_per_ip = \"off\"\n[limits]\nrate = \"100000/s\"\nburst = 100000\n{}",
                key_entry("partner", KEY, "")
            ),
        )
        .replace(
            "listen = \"127.0.0.1:0\"\n",
            "listen = \"127.0.0.1:0\"\nheader_timeout = \"1s\"\nmax_body = 4096\n",
        )
        .replace("connect_timeout = \"1s\"\n", "connect_timeout = \"1s\"\nbody_timeout = \"1s\"\n");
        let gw = start_gateway(&text).await;
        (up, gw)
    });
    let addr = gw.addr();
    let seeds = seeds("heads");
    let n = seeds.len();
    // How many of the upstream's recorded requests have been checked already.
    let checked = std::cell::Cell::new(0usize);
    fuzz_for("heads", (0..n, mutations()), |(i, muts)| {
        let bytes = mutate(&seeds[i], &muts);
        let answer = rt.block_on(exchange(addr, &bytes));
        let answer = match answer {
            Some(a) => a,
            None => return Err(TestCaseError::fail("no answer and no close within 5 s")),
        };
        if !answer.is_empty() {
            let status = parse_status(&answer);
            prop_assert!(
                status.is_some(),
                "malformed answer {:?}",
                String::from_utf8_lossy(&answer)
            );
            let status = status.unwrap();
            prop_assert!(
                status < 500,
                "5xx for {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
        // What the upstream received (recorded once its body ended, so possibly on a later
        // round): every request was admitted with the key, and none carries it.
        let seen = up.seen.lock().unwrap().clone();
        if seen.len() < checked.get() {
            checked.set(0); // the upstream's record was cleared
        }
        for s in &seen[checked.get()..] {
            // Where a key is read from, none reaches the upstream. (A client that also copies
            // its key into some other header of its own has that header forwarded as sent.)
            let flat = format!("{:?} {:?}", s.uri, s.headers);
            prop_assert!(s.headers.get("x-api-key").is_none(), "{flat}");
            prop_assert!(
                s.headers
                    .get_all("authorization")
                    .iter()
                    .all(|v| v.len() <= 7 || !v.as_bytes()[..7].eq_ignore_ascii_case(b"bearer ")),
                "{flat}"
            );
            prop_assert!(
                s.uri
                    .query()
                    .is_none_or(|q| q.split('&').all(|kv| !kv.starts_with("api_key="))),
                "{flat}"
            );
            prop_assert!(s
                .headers
                .get("x-keygate-key-id")
                .is_some_and(|v| v == "partner"));
        }
        checked.set(seen.len());
        Ok(())
    });
    rt.block_on(async {
        let got = get(&http1_client(), &gw.url("/v1/after"), &[("x-api-key", KEY)]).await;
        assert_eq!(got.status, StatusCode::OK, "the gateway stopped serving");
    });
}

/// Sends `bytes`, half-closes, and reads until the gateway closes (`None` after 5 s).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| out)
}

fn parse_status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))?;
    let code = rest.get(..3)?.parse().ok()?;
    Some(code)
}

#[test]
fn fuzz_client_ip() {
    let hop = prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::from(o).to_string()),
        any::<[u8; 16]>().prop_map(|o| format!("[{}]:443", IpAddr::from(o))),
        "[ -~]{0,40}",
    ];
    let strategy = (
        prop::collection::vec(hop.clone(), 0..6),
        prop::collection::vec(hop, 0..3),
        any::<[u8; 4]>(),
        any::<bool>(),
        any::<bool>(),
    );
    fuzz_for(
        "client_ip",
        strategy,
        |(xff, fwd, peer, trusted, forwarded_mode)| {
            let peer = IpAddr::from(peer);
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::try_from(xff.join(", ")) {
                headers.insert("x-forwarded-for", v);
            }
            let forwarded: Vec<String> = fwd.iter().map(|h| format!("for=\"{h}\"")).collect();
            if let Ok(v) = HeaderValue::try_from(forwarded.join(", ")) {
                headers.insert("forwarded", v);
            }
            let list = if trusted {
                vec![Cidr::parse(&format!("{peer}/24")).unwrap()]
            } else {
                vec![]
            };
            let header = if forwarded_mode {
                ClientIpHeader::Forwarded
            } else {
                ClientIpHeader::XForwardedFor
            };
            let got = TrustedProxies::new(list)
                .reading(header)
                .client_ip(peer, &headers);
            if !trusted {
                prop_assert_eq!(got, peer);
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_proxy_v2() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let strategy = (
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..64),
        any::<[u8; 16]>(),
        any::<u16>(),
    );
    fuzz_for("proxy_v2", strategy, |(signed, tail, src, port)| {
        // Random bytes, half of them behind a valid signature.
        let mut bytes = if signed {
            client_ip::PROXY_V2_SIGNATURE.to_vec()
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(&tail);
        let _ = rt.block_on(client_ip::read_proxy_v2(&mut &bytes[..]));
        // A valid header round-trips and leaves what follows unread.
        let src = SocketAddr::new(IpAddr::from(src), port);
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let mut framed = client_ip::encode_proxy_v2(src, dst);
        framed.extend_from_slice(&tail);
        let mut reader = &framed[..];
        let got = rt.block_on(client_ip::read_proxy_v2(&mut reader));
        let want = match src.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(src, |v4| SocketAddr::new(IpAddr::V4(v4), port)),
            IpAddr::V4(_) => src,
        };
        prop_assert_eq!(
            got.unwrap()
                .map(|a| SocketAddr::new(canonical(a.ip()), a.port())),
            Some(want)
        );
        prop_assert_eq!(reader, &tail[..]);
        Ok(())
    });
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[test]
fn fuzz_scope_matching() {
    use keygate::scope::{self, Scope};
    let seeds = seeds("paths");
    let n = seeds.len();
    let guests = [Scope::parse("GET /v1/guests/**").unwrap()];
    fuzz_for("scope", (0..n, mutations()), |(i, muts)| {
        let bytes = mutate(&seeds[i], &muts);
        let text = String::from_utf8_lossy(&bytes);
        let path = text.split('?').next().unwrap_or("");
        let Ok(normal) = scope::normalise(path) else {
            return Ok(());
        };
        prop_assert!(normal.encoded.starts_with('/'), "{normal:?}");
        prop_assert!(
            normal.segments.iter().all(|s| s != b"." && s != b".."),
            "dot segment left in {normal:?}"
        );
        let again = scope::normalise(&normal.encoded);
        prop_assert_eq!(again.as_ref().ok(), Some(&normal), "not idempotent");
        if scope::allowed(&guests, &http::Method::GET, &normal) {
            prop_assert!(
                normal.segments.len() >= 2
                    && normal.segments[0] == b"v1"
                    && normal.segments[1] == b"guests",
                "{path:?} slipped past GET /v1/guests/** as {normal:?}"
            );
        }
        prop_assert!(!scope::allowed(&guests, &http::Method::POST, &normal));
        Ok(())
    });
}

/// What the upstream client makes of `wire` arriving in pieces cut at `cuts`: the final
/// answer's status, its body and whether it had trailers, and how many bytes it left unread; or
/// why it is malformed.
fn read_answer(wire: &[u8], cuts: &[usize]) -> Result<(u16, Vec<u8>, bool, usize), String> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.sort_unstable();
    points.push(wire.len());
    let mut pieces = points.into_iter();
    let mut at = 0;
    let mut buf = BytesMut::new();
    let mut feed = |buf: &mut BytesMut| match pieces.next() {
        Some(to) => {
            buf.extend_from_slice(&wire[at..to]);
            at = to;
            true
        }
        None => false,
    };
    let head = loop {
        match wire::parse_response(&mut buf, &http::Method::GET) {
            Err(e) => return Err(e.to_string()),
            Ok(Some(head)) if head.status.is_informational() && head.status != 101 => continue,
            Ok(Some(head)) => break head,
            Ok(None) if feed(&mut buf) => {}
            Ok(None) => return Err("closed mid-head".into()),
        }
    };
    let mut reader = BodyReader::new(head.body);
    let (mut body, mut trailers) = (Vec::new(), false);
    loop {
        match reader.next(&mut buf).map_err(|e| e.to_string())? {
            Step::Data(d) => body.extend_from_slice(&d),
            Step::Trailers(_) => trailers = true,
            Step::End => break,
            Step::More if feed(&mut buf) => {}
            Step::More => {
                reader.at_eof().map_err(|e| e.to_string())?;
                break;
            }
        }
    }
    Ok((
        head.status.as_u16(),
        body,
        trailers,
        buf.len() + (wire.len() - at),
    ))
}

#[test]
fn fuzz_upstream_answers() {
    let seeds = seeds("answers");
    let n = seeds.len();
    let cuts = prop::collection::vec(any::<usize>(), 0..8);
    fuzz_for("answers", (0..n, mutations(), cuts), |(i, muts, cuts)| {
        let bytes = mutate(&seeds[i], &muts);
        let whole = read_answer(&bytes, &[]);
        let cut = read_answer(&bytes, &cuts);
        prop_assert_eq!(&whole, &cut, "{:?}", String::from_utf8_lossy(&bytes));
        if let Ok((_, body, _, _)) = &whole {
            prop_assert!(body.len() <= bytes.len());
        }
        Ok(())
    });
}
