//! gateway.toml → a validated [`Config`].
//!
//! The pipeline: the file's text is parsed by serde into raw structs (`Raw*`, every table with
//! `deny_unknown_fields`, every value that can be wrong kept with its [`Spanned`] position), then
//! [`Config::parse`] checks each value and builds the typed [`Config`]. Any error becomes a
//! [`ConfigError`] printed as `file:line:col: message`, the form editors and CI understand.
//!
//! A key table of a million `[[keys]]` is over 100 MB of TOML, which a general TOML parser
//! reads in seconds. `[[keys]]` written the plain way (one `name = value` a line, as
//! `keygate keys` writes them) go through a line scanner (`config/fast.rs`) that builds the same raw
//! structs with the same spans; anything it is not sure of, it hands back to the toml crate, so
//! the accepted language and the error messages are the toml crate's.
//!
//! Choices where the contract is silent (written down here and in the README):
//! - relative paths (`tls_cert`, `tls_key`) are resolved against the config file's directory;
//! - a key's `rate` and `burst` each fall back to `[limits]` on their own;
//! - `[limits]` defaults to `rate = "10/s"`, `burst = 20`;
//! - `expires` must be a full date-time with an offset (`2027-06-30T00:00:00Z`);
//! - `[auth] keys_file` (relative to the config file) moves `[[keys]]` into a file of their own,
//!   whose errors are reported against that file; `[[keys]]` in both places is an error;
//! - a key's `quota` falls back to `[limits] quota` (none by default);
//! - `scopes = []` is refused (it would admit nothing): leave `scopes` out for full access;
//! - `previous_hash` and `previous_expires` (a rotation's grace) go together.
//! - `[admin]` absent means no admin listener; its address may not be the partner-facing one;
//! - `[log] level` is one of `error`, `warn`, `info`, `debug`, `trace` (`RUST_LOG` overrides it).
//! - `[limits] on_store_error` without `store` is refused (it would do nothing).
//! - sizes (`max_body`, `max_header_bytes`) are whole bytes or a string like `"16MiB"`;
//! - a key's `max_body` falls back to `[server] max_body`.
//! - `[upstream] ca_file` (relative to the config file, https:// only) replaces the webpki roots
//!   for the upstream's certificate; it is read and checked here, at load.
//! - `[upstream] client_cert` and `client_key` (https:// only, both or neither, relative to the
//!   config file) are the certificate keygate shows an upstream that asks for one; like the
//!   listener's pair they are read at start-up ([`crate::certs`]) and then watched.

use std::{
    hash::BuildHasher,
    net::SocketAddr,
    num::NonZeroU32,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{uri::Authority, uri::PathAndQuery, uri::Scheme, HeaderName, Uri};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use serde::Deserialize;
use toml::Spanned;

use crate::{
    identity::IdentityKey,
    keys::KeyHash,
    limit::RateLimit,
    quota::QuotaLimit,
    scope::Scope,
    store::{redis::StoreUrl, OnStoreError, StoreConfig},
    watch::FilesRead,
};

mod fast;

/// A config problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct ConfigError {
    /// The file as named by the operator.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What is wrong, in one sentence.
    pub message: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from.
    pub path: PathBuf,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[upstream]`.
    pub upstream: UpstreamConfig,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[limits]`: the defaults each key falls back to.
    pub limits: RateLimit,
    /// `[limits] quota`: the default long-window quota, if any.
    pub quota: Option<QuotaLimit>,
    /// `[limits] store` and `on_store_error`: the shared limit store, if any.
    pub limit_store: Option<StoreConfig>,
    /// `[[keys]]`, in file order.
    pub keys: Vec<KeyConfig>,
    /// `[admin]`: the operator's listener; `None` when the section is absent.
    pub admin: Option<AdminConfig>,
    /// `[log]`.
    pub log: LogConfig,
    /// The files this was read from (this config's, its keys file), each stamped just before
    /// it was read: what the reload watch compares against. Empty for text not read from disk.
    pub files_read: FilesRead,
}

/// `[admin]`: where `/healthz`, `/readyz` and `/metrics` are served (no API key needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address to bind; never the partner-facing one.
    pub listen: SocketAddr,
}

/// `[log]`: how log lines are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Text lines for people or one JSON object per line for log shippers.
    pub format: LogFormat,
    /// The level used when `RUST_LOG` is not set (`info` by default).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// `[log] format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line with fixed field names.
    Json,
}

/// `[server]`: the partner-facing listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Certificate and key; `None` serves plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Runtime worker threads; `None` means one per core.
    pub workers: Option<usize>,
    /// How long requests in flight may take to finish after SIGTERM/SIGINT (default 30 s).
    pub shutdown_timeout: Duration,
    /// How long a client may take to send a request head (slowloris guard).
    pub header_timeout: Duration,
    /// How long a connection may sit without traffic and without a request in flight.
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request head (HTTP/1.1 read buffer, HTTP/2 header list), in bytes: 431 beyond.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1.1 request head: 431 beyond.
    pub max_headers: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_streams: u32,
    /// Default largest request body, in bytes: 413 beyond (a key may override it).
    pub max_body: u64,
    /// Peers whose `X-Forwarded-For` or `Forwarded` (`client_ip_header`) and PROXY header are
    /// believed.
    pub trusted_proxies: crate::client_ip::TrustedProxies,
    /// Whether trusted peers must open their connections with a PROXY protocol v2 header.
    pub proxy_protocol: bool,
}

/// PEM files of the listener's certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, RSA or SEC1).
    pub key: PathBuf,
}

/// `[upstream]`: where admitted requests go.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The URL as written.
    pub url: String,
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port.
    pub authority: Authority,
    /// Path prefix prepended to every forwarded path, without a trailing slash (may be empty).
    pub path_prefix: String,
    /// The `Host` value sent upstream (the authority), made once.
    pub host_header: http::HeaderValue,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed for the upstream's response head.
    pub timeout: Duration,
    /// Signs `X-Keygate-Signature` when set (`identity_secret` or `identity_secret_file`).
    pub identity: Option<IdentityKey>,
    /// Path probed with `GET` for readiness; `None` probes with a TCP connect.
    pub health_path: Option<String>,
    /// Time between readiness probes (default 5 s).
    pub health_interval: Duration,
    /// Longest pause allowed inside a request or response body while it streams.
    pub body_timeout: Duration,
    /// `ca_file`: what an `https://` upstream's certificate is verified against instead of the
    /// webpki roots; `None` uses the webpki roots.
    pub ca: Option<UpstreamCa>,
    /// `client_cert` and `client_key`: the certificate shown to an `https://` upstream that
    /// asks for one (mutual TLS); `None` shows none.
    pub client_cert: Option<TlsFiles>,
}

/// `[upstream] ca_file`, read and checked: the certificates trusted for the upstream.
#[derive(Debug, Clone)]
pub struct UpstreamCa {
    /// The file, resolved against the config file's directory.
    pub file: PathBuf,
    /// Its certificates (DER), in file order.
    pub certs: Vec<CertificateDer<'static>>,
    /// The same certificates as trust anchors, shared by every upstream connection.
    pub roots: Arc<rustls::RootCertStore>,
}

impl PartialEq for UpstreamCa {
    /// The same file with the same certificates (the root store is made from them).
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file && self.certs == other.certs
    }
}

impl Eq for UpstreamCa {}

/// `[auth]`: where keys are read from.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The header carrying the key (lower case); `Authorization: Bearer` is the fallback.
    pub header: HeaderName,
    /// The prefix of keys keygate mints; keys with it have their checksum checked.
    pub key_prefix: String,
    /// `keys_file`, resolved against the config's directory: where `[[keys]]` live instead.
    pub keys_file: Option<PathBuf>,
    /// Whether a key in the query string (`?<query_key>=...`) is accepted; refused when false.
    pub allow_query_key: bool,
    /// The query parameter that carries a key.
    pub query_key: String,
    /// Failed key attempts allowed per client IP; `None` turns the guard off.
    pub failures_per_ip: Option<RateLimit>,
}

/// One `[[keys]]` entry.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// Unique id, safe to log.
    pub id: String,
    /// blake3 of the key.
    pub hash: KeyHash,
    /// The hotel the key acts for.
    pub tenant: Option<String>,
    /// Effective rate and burst (the key's own, else `[limits]`).
    pub limit: RateLimit,
    /// Refused while set.
    pub disabled: bool,
    /// Refused from this time on.
    pub expires: Option<SystemTime>,
    /// What the key may call; empty means everything.
    pub scopes: Vec<Scope>,
    /// Effective long-window quota (the key's own, else `[limits] quota`).
    pub quota: Option<QuotaLimit>,
    /// When `keygate keys new` made it (informational).
    pub created_at: Option<SystemTime>,
    /// When `keygate keys revoke` disabled it (informational).
    pub revoked_at: Option<SystemTime>,
    /// The hash this key replaced in a rotation, valid until its own expiry.
    pub previous: Option<PreviousKey>,
    /// Largest request body for this key, in bytes.
    pub max_body: u64,
}

/// The old hash of a rotating key: accepted for the same entry until `expires`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousKey {
    /// blake3 of the old key.
    pub hash: KeyHash,
    /// The end of the grace period.
    pub expires: SystemTime,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    keys: Vec<RawKey>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<Spanned<String>>,
    level: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Spanned<String>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    workers: Option<Spanned<i64>>,
    shutdown_timeout: Option<Spanned<String>>,
    header_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    max_header_bytes: Option<Spanned<RawSize>>,
    max_headers: Option<Spanned<i64>>,
    h2_max_streams: Option<Spanned<i64>>,
    max_body: Option<Spanned<RawSize>>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    client_ip_header: Option<Spanned<String>>,
    #[serde(default)]
    proxy_protocol: bool,
}

/// A size as written: whole bytes, or a string such as `"16MiB"`.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Spanned<String>,
    connect_timeout: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    identity_secret: Option<Spanned<String>>,
    identity_secret_file: Option<Spanned<String>>,
    health_path: Option<Spanned<String>>,
    health_interval: Option<Spanned<String>>,
    body_timeout: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    header: Option<Spanned<String>>,
    key_prefix: Option<Spanned<String>>,
    keys_file: Option<Spanned<String>>,
    #[serde(default)]
    allow_query_key: bool,
    query_key: Option<Spanned<String>>,
    failures_per_ip: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<i64>>,
    quota: Option<Spanned<String>>,
    store: Option<Spanned<String>>,
    on_store_error: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: Spanned<String>,
    hash: Spanned<String>,
    tenant: Option<Spanned<String>>,
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<i64>>,
    #[serde(default)]
    disabled: bool,
    expires: Option<Spanned<toml::value::Datetime>>,
    scopes: Option<Spanned<Vec<Spanned<String>>>>,
    quota: Option<Spanned<String>>,
    created_at: Option<Spanned<toml::value::Datetime>>,
    revoked_at: Option<Spanned<toml::value::Datetime>>,
    previous_hash: Option<Spanned<String>>,
    previous_expires: Option<Spanned<toml::value::Datetime>>,
    max_body: Option<Spanned<RawSize>>,
}

/// A separate keys file (`[auth] keys_file`): only `[[keys]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeysFile {
    #[serde(default)]
    keys: Vec<RawKey>,
}

/// Locates errors in one source text.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        let offset = span.map_or(0, |s| s.start).min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        ConfigError {
            file: self.file.display().to_string(),
            line,
            col,
            message: message.into(),
        }
    }

    fn at<T>(&self, v: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(Some(v.span()), message)
    }
}

/// `[server] idle_timeout` when the config names none.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Parses a duration such as `250ms`, `2s` or `1m`; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like \"250ms\", \"2s\" or \"1m\": {e}"))?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be more than zero"));
    }
    Ok(d)
}

/// The longest timeout or interval the config takes: far beyond any sensible one, and short
/// enough that a deadline `now + d` never overflows the clock (an `idle_timeout` of
/// `300000000000y` parsed, then panicked on every connection).
pub const MAX_CONFIG_DURATION: Duration = Duration::from_secs(3653 * 24 * 3600);

/// [`parse_duration`] for a config field: also refuses more than [`MAX_CONFIG_DURATION`].
fn parse_config_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > MAX_CONFIG_DURATION {
        return Err(format!("duration {s:?} is longer than 10 years"));
    }
    Ok(d)
}

/// Parses a size: whole bytes, or a number with `B`, `KiB`, `MiB`, `GiB` (or `KB`, `MB`, `GB`,
/// 1000-based); zero is refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"16MiB\", \"512KiB\" or 1048576"))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "size {s:?}: unit {u:?} is not one of B, KiB, MiB, GiB"
            ))
        }
    };
    let bytes = n
        .checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("size {s:?} must be more than zero"));
    }
    Ok(bytes)
}

/// Whether `s` may be a key id: 1–64 characters of `A-Z a-z 0-9 . _ -`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses a TOML offset date-time into a point in time.
pub fn datetime_to_system_time(dt: &toml::value::Datetime) -> Result<SystemTime, String> {
    if dt.date.is_none() || dt.time.is_none() || dt.offset.is_none() {
        return Err(format!(
            "{dt} needs a date, a time and an offset, e.g. 2027-06-30T00:00:00Z"
        ));
    }
    let parsed = time::OffsetDateTime::parse(
        &dt.to_string(),
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(|e| format!("{dt} is not a valid date-time: {e}"))?;
    Ok(parsed.into())
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut keys = KeyVec::default();
        let mut config = Config::load_into(path, &mut keys)?;
        config.keys = keys.keys;
        Ok(config)
    }

    /// Like [`load`](Self::load), but each validated key goes to `keys` as it is read instead
    /// of into [`Config::keys`], which stays empty: a reload streams a large key file straight
    /// into the new table ([`crate::keys::KeyTableBuilder`]).
    pub fn load_into(path: &Path, keys: &mut dyn KeySink) -> Result<Config, ConfigError> {
        let mut files_read = FilesRead::default();
        files_read.stamp(path);
        let text = read(path, "config")?;
        Config::parse_into(path, &text, None, keys, Some(files_read))
    }

    /// Validates `text` as the contents of the file at `path` (reading `keys_file` when set).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_keys(path, text, None)
    }

    /// The file that holds the `[[keys]]` of the config at `path`: its `keys_file`, else itself.
    /// Only `[auth]` is looked at, so this works while the keys file does not exist yet.
    pub fn key_store_path(path: &Path) -> Result<PathBuf, ConfigError> {
        let text = read(path, "config")?;
        let src = Source {
            file: path,
            text: &text,
        };
        let raw: RawConfig =
            toml::from_str(&text).map_err(|e| src.error(e.span(), e.message().to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(match &raw.auth.keys_file {
            Some(f) => base.join(f.get_ref()),
            None => path.to_path_buf(),
        })
    }

    /// Like [`parse`](Self::parse), but when `keys_text` is given it is used as the keys file's
    /// contents instead of reading it (to validate an edit before it lands). Without a
    /// `keys_file`, the keys are in `text` itself and `keys_text` is not used.
    pub fn parse_with_keys(
        path: &Path,
        text: &str,
        keys_text: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let mut keys = KeyVec::default();
        let mut config = Config::parse_into(path, text, keys_text, &mut keys, None)?;
        config.keys = keys.keys;
        Ok(config)
    }

    fn parse_into(
        path: &Path,
        text: &str,
        keys_text: Option<&str>,
        sink: &mut dyn KeySink,
        // The files read so far (the config's) when it came from disk: the keys file joins them.
        mut files_read: Option<FilesRead>,
    ) -> Result<Config, ConfigError> {
        let src = Source { file: path, text };
        let raw = match fast::split(text) {
            Some(raw) => raw,
            None => toml::from_str::<RawConfig>(text)
                .map_err(|e| src.error(e.span(), e.message().to_string()))?,
        };
        let base = path.parent().unwrap_or(Path::new("."));

        let listen = raw
            .server
            .listen
            .get_ref()
            .parse::<SocketAddr>()
            .map_err(|_| {
                src.at(
                    &raw.server.listen,
                    "listen must be an address with a port, like \"127.0.0.1:8443\"",
                )
            })?;
        let tls = match (&raw.server.tls_cert, &raw.server.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: base.join(cert.get_ref()),
                key: base.join(key.get_ref()),
            }),
            (None, None) => None,
            (Some(v), None) | (None, Some(v)) => {
                return Err(src.at(v, "tls_cert and tls_key go together: set both or neither"))
            }
        };
        let workers = match &raw.server.workers {
            Some(w) if !(1..=1024).contains(w.get_ref()) => {
                return Err(src.at(w, "workers must be between 1 and 1024"))
            }
            Some(w) => Some(*w.get_ref() as usize),
            None => None,
        };

        let shutdown_timeout = match &raw.server.shutdown_timeout {
            Some(d) => parse_config_duration(d.get_ref()).map_err(|m| src.at(d, m))?,
            None => Duration::from_secs(30),
        };
        let server = &raw.server;
        let duration = |v: &Option<Spanned<String>>, default: Duration| match v {
            Some(d) => parse_config_duration(d.get_ref()).map_err(|m| src.at(d, m)),
            None => Ok(default),
        };
        let int = |v: &Option<Spanned<i64>>,
                   name: &str,
                   range: std::ops::RangeInclusive<i64>,
                   default: i64| match v {
            Some(n) if !range.contains(n.get_ref()) => Err(src.at(
                n,
                format!(
                    "{name} must be between {} and {}",
                    range.start(),
                    range.end()
                ),
            )),
            Some(n) => Ok(*n.get_ref()),
            None => Ok(default),
        };
        let header_timeout = duration(&server.header_timeout, Duration::from_secs(10))?;
        let idle_timeout = duration(&server.idle_timeout, DEFAULT_IDLE_TIMEOUT)?;
        let max_connections = int(
            &server.max_connections,
            "max_connections",
            1..=1_000_000,
            4096,
        )? as usize;
        let max_header_bytes = match &server.max_header_bytes {
            Some(v) => match size(&src, v)? {
                n @ 8192..=1_048_576 => n as usize,
                _ => return Err(src.at(v, "max_header_bytes must be between 8KiB and 1MiB")),
            },
            None => 64 * 1024,
        };
        let max_headers = int(&server.max_headers, "max_headers", 1..=10_000, 100)? as usize;
        let h2_max_streams = int(&server.h2_max_streams, "h2_max_streams", 1..=10_000, 256)? as u32;
        let max_body = match &server.max_body {
            Some(v) => size(&src, v)?,
            None => 16 << 20,
        };
        let mut trusted_proxies = Vec::with_capacity(server.trusted_proxies.len());
        for t in &server.trusted_proxies {
            trusted_proxies
                .push(crate::client_ip::Cidr::parse(t.get_ref()).map_err(|m| src.at(t, m))?);
        }
        let client_ip_header = match &server.client_ip_header {
            Some(h) => {
                crate::client_ip::ClientIpHeader::parse(h.get_ref()).map_err(|m| src.at(h, m))?
            }
            None => crate::client_ip::ClientIpHeader::default(),
        };
        let trusted_proxies =
            crate::client_ip::TrustedProxies::new(trusted_proxies).reading(client_ip_header);

        let upstream = parse_upstream(&src, &raw.upstream)?;
        let admin = match &raw.admin {
            Some(a) => Some(parse_admin(&src, a, listen)?),
            None => None,
        };
        let log = parse_log(&src, &raw.log)?;

        let header = match &raw.auth.header {
            Some(h) => HeaderName::try_from(h.get_ref().to_ascii_lowercase())
                .map_err(|_| src.at(h, "header must be a valid HTTP header name"))?,
            None => HeaderName::from_static("x-api-key"),
        };
        if header == http::header::AUTHORIZATION {
            let h = raw
                .auth
                .header
                .as_ref()
                .expect("default is not authorization");
            return Err(src.at(
                h,
                "header cannot be \"authorization\": Bearer tokens are always accepted there",
            ));
        }
        let key_prefix = match &raw.auth.key_prefix {
            Some(p) if !p.get_ref().bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(src.at(p, "key_prefix must be printable ASCII without spaces"))
            }
            Some(p) => p.get_ref().clone(),
            None => crate::keys::DEFAULT_PREFIX.to_string(),
        };

        let query_key = match &raw.auth.query_key {
            Some(q)
                if q.get_ref().is_empty()
                    || !q
                        .get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) =>
            {
                return Err(src.at(q, "query_key must be letters, digits, '_', '-' or '.'"))
            }
            Some(q) => q.get_ref().clone(),
            None => "api_key".to_string(),
        };
        let failures_per_ip = match &raw.auth.failures_per_ip {
            Some(f) if f.get_ref().trim() == "off" => None,
            Some(f) => {
                let (count, per) =
                    RateLimit::parse_rate(f.get_ref(), false).map_err(|m| src.at(f, m))?;
                Some(RateLimit {
                    count,
                    per,
                    burst: count,
                })
            }
            None => {
                let count = NonZeroU32::new(30).expect("30");
                Some(RateLimit {
                    count,
                    per: Duration::from_secs(60),
                    burst: count,
                })
            }
        };

        let default_rate = match &raw.limits.rate {
            Some(r) => RateLimit::parse_rate(r.get_ref(), false).map_err(|m| src.at(r, m))?,
            None => (NonZeroU32::new(10).expect("10"), Duration::from_secs(1)),
        };
        let default_burst = match &raw.limits.burst {
            Some(b) => parse_burst(&src, b)?,
            None => NonZeroU32::new(20).expect("20"),
        };
        let limits = RateLimit {
            count: default_rate.0,
            per: default_rate.1,
            burst: default_burst,
        };
        if !limits.fits() {
            return Err(span_too_long(&src, &raw.limits.burst, &raw.limits.rate));
        }

        let limit_store = parse_limit_store(&src, &raw.limits)?;
        let quota = match &raw.limits.quota {
            Some(q) => Some(QuotaLimit::parse(q.get_ref()).map_err(|m| src.at(q, m))?),
            None => None,
        };
        let keys_file = raw.auth.keys_file.as_ref().map(|f| base.join(f.get_ref()));
        match &keys_file {
            None => validated_into(sink, |sink| {
                parse_keys(&src, raw.keys, &limits, quota, max_body, sink)
            })?,
            Some(file) => {
                if let Some(k) = raw.keys.first() {
                    return Err(src.at(
                        &k.id,
                        format!(
                            "[auth] keys_file is set: [[keys]] belong in {}",
                            file.display()
                        ),
                    ));
                }
                if let (None, Some(read)) = (keys_text, &mut files_read) {
                    read.stamp(file);
                }
                // A keys file on disk is streamed (`fast::KeysFile`); read whole and parsed
                // again only when that fails, for the error and its line.
                let streamed =
                    keys_text.is_none() && stream_keys(file, &limits, quota, max_body, sink);
                if !streamed {
                    let owned;
                    let keys_text = match keys_text {
                        Some(t) => t,
                        None => {
                            owned = read(file, "keys")?;
                            &owned
                        }
                    };
                    validated_into(sink, |sink| {
                        keys_from_text(file, keys_text, &limits, quota, max_body, sink)
                    })?;
                }
            }
        };
        Ok(Config {
            path: path.to_path_buf(),
            server: ServerConfig {
                listen,
                tls,
                workers,
                shutdown_timeout,
                header_timeout,
                idle_timeout,
                max_connections,
                max_header_bytes,
                max_headers,
                h2_max_streams,
                max_body,
                trusted_proxies,
                proxy_protocol: server.proxy_protocol,
            },
            upstream,
            auth: AuthConfig {
                header,
                key_prefix,
                keys_file,
                allow_query_key: raw.auth.allow_query_key,
                query_key,
                failures_per_ip,
            },
            limits,
            quota,
            limit_store,
            keys: Vec::new(),
            admin,
            log,
            files_read: files_read.unwrap_or_default(),
        })
    }
}

/// The keys file at `file` streamed into `sink`, validated key by key: `false` (and `sink`
/// emptied) when it could not be, for whatever reason; the caller then parses the whole text.
fn stream_keys(
    file: &Path,
    limits: &RateLimit,
    quota: Option<QuotaLimit>,
    max_body: u64,
    sink: &mut dyn KeySink,
) -> bool {
    let Some(keys) = fast::KeysFile::open(file) else {
        return false;
    };
    sink.reserve(keys.count());
    // Errors are not reported from here (the whole text is parsed again for them).
    let quiet = Source { file, text: "" };
    let mut v = KeysValidator::new(&quiet, limits, quota, max_body, &mut *sink);
    if keys.each_key(|k| v.push(k).is_ok()).is_some() && sink.seal() {
        return true;
    }
    sink.clear();
    false
}

/// Runs `validate` on `sink`, or, when the sink finds duplicates only when sealed, on a
/// vector whose keys then go to the sink: keys from text are checked one by one, so that an
/// error points at its key.
fn validated_into(
    sink: &mut dyn KeySink,
    validate: impl FnOnce(&mut dyn KeySink) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    if !sink.checks_when_sealed() {
        return validate(sink);
    }
    let mut exact = KeyVec::default();
    validate(&mut exact)?;
    sink.reserve(exact.keys.len());
    for key in exact.keys {
        sink.push(key);
    }
    let unique = sink.seal();
    debug_assert!(unique, "validated keys are unique");
    Ok(())
}

/// The `[[keys]]` of a keys file's `text` into `sink`: scanned and validated key by key (no
/// vector of raw keys); the toml crate takes over when the scanner is unsure (see `fast`).
fn keys_from_text(
    file: &Path,
    text: &str,
    limits: &RateLimit,
    quota: Option<QuotaLimit>,
    max_body: u64,
    sink: &mut dyn KeySink,
) -> Result<(), ConfigError> {
    let ksrc = Source { file, text };
    // Sized up front: growing a vector of 256-byte KeyConfigs by doubling copies hundreds of
    // MB for a large table.
    sink.reserve(fast::count_headers(text));
    let mut v = KeysValidator::new(&ksrc, limits, quota, max_body, &mut *sink);
    match fast::each_key(text, |k| v.push(k)) {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(e),
        None => {
            sink.clear();
            let raw = toml::from_str::<RawKeysFile>(text)
                .map_err(|e| ksrc.error(e.span(), e.message().to_string()))?;
            parse_keys(&ksrc, raw.keys, limits, quota, max_body, sink)
        }
    }
}

fn read(path: &Path, what: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: 1,
        col: 1,
        message: format!("cannot read the {what} file: {e}"),
    })
}

fn parse_datetime(
    src: &Source<'_>,
    v: &Option<Spanned<toml::value::Datetime>>,
) -> Result<Option<SystemTime>, ConfigError> {
    match v {
        Some(e) => Ok(Some(
            datetime_to_system_time(e.get_ref()).map_err(|m| src.at(e, m))?,
        )),
        None => Ok(None),
    }
}

/// Where validated `[[keys]]` go, in file order, with what the duplicate checks need: a
/// vector for [`Config::keys`], or a key table being built ([`Config::load_into`]).
pub trait KeySink {
    /// Room for `additional` more keys.
    fn reserve(&mut self, additional: usize);
    /// Whether this sink finds duplicate ids and hashes itself, all at once in
    /// [`KeySink::seal`], rather than being asked about each key as it comes (`has_id`,
    /// `has_hash`). Such a sink gets only keys streamed from a keys file, whose errors are
    /// reported by reading the file again; keys from text are validated into a vector first.
    fn checks_when_sealed(&self) -> bool {
        false
    }
    /// Whether a key with this id was pushed.
    fn has_id(&self, id: &str) -> bool;
    /// Whether this is the hash or the previous hash of a pushed key.
    fn has_hash(&self, hash: &KeyHash) -> bool;
    /// Keeps a validated key.
    fn push(&mut self, key: KeyConfig);
    /// After the last key: `false` when two keys share an id or a hash (only a sink that
    /// [`checks_when_sealed`](KeySink::checks_when_sealed) finds any here).
    fn seal(&mut self) -> bool {
        true
    }
    /// Forgets every key (a fast scan gave up; the toml crate starts again).
    fn clear(&mut self);
}

/// The keys of a [`Config`], with indexes of positions for the duplicate checks (5 bytes a
/// slot rather than sets of ids and 32-byte hashes).
#[derive(Default)]
struct KeyVec {
    keys: Vec<KeyConfig>,
    ids: hashbrown::HashTable<u32>,
    id_hasher: hashbrown::DefaultHashBuilder,
    /// By hash; with [`PREVIOUS`] set: the key's `previous_hash`.
    hashes: hashbrown::HashTable<u32>,
}

/// Marks a position in [`KeyVec::hashes`] that stands for a key's previous hash.
const PREVIOUS: u32 = 1 << 31;

/// blake3 output is uniform: its first eight bytes are already a good hash.
fn hash64(hash: &KeyHash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.0[..8]);
    u64::from_le_bytes(first)
}

/// The hash a position in [`KeyVec::hashes`] stands for.
fn hash_at(keys: &[KeyConfig], v: u32) -> &KeyHash {
    let key = &keys[(v & !PREVIOUS) as usize];
    match (v & PREVIOUS != 0, &key.previous) {
        (true, Some(p)) => &p.hash,
        _ => &key.hash,
    }
}

impl KeySink for KeyVec {
    fn reserve(&mut self, additional: usize) {
        let KeyVec {
            keys,
            ids,
            id_hasher,
            hashes,
        } = self;
        keys.reserve(additional);
        ids.reserve(additional, |&i| {
            id_hasher.hash_one(keys[i as usize].id.as_str())
        });
        hashes.reserve(additional, |&v| hash64(hash_at(keys, v)));
    }

    fn has_id(&self, id: &str) -> bool {
        self.ids
            .find(self.id_hasher.hash_one(id), |&i| {
                self.keys[i as usize].id == id
            })
            .is_some()
    }

    fn has_hash(&self, hash: &KeyHash) -> bool {
        self.hashes
            .find(hash64(hash), |&v| hash_at(&self.keys, v) == hash)
            .is_some()
    }

    fn push(&mut self, key: KeyConfig) {
        assert!(self.keys.len() < PREVIOUS as usize, "more than 2^31 keys");
        let pos = self.keys.len() as u32;
        self.keys.push(key);
        let KeyVec {
            keys,
            ids,
            id_hasher,
            hashes,
        } = self;
        let key = &keys[pos as usize];
        ids.insert_unique(id_hasher.hash_one(key.id.as_str()), pos, |&i| {
            id_hasher.hash_one(keys[i as usize].id.as_str())
        });
        let rehash = |&v: &u32| hash64(hash_at(keys, v));
        hashes.insert_unique(hash64(&key.hash), pos, rehash);
        if let Some(p) = &key.previous {
            hashes.insert_unique(hash64(&p.hash), pos | PREVIOUS, rehash);
        }
    }

    fn clear(&mut self) {
        *self = KeyVec::default();
    }
}

/// Validates `[[keys]]` one at a time against `src`, the file they were read from, taking
/// each raw key's strings rather than copying them, and hands them to a [`KeySink`].
struct KeysValidator<'a> {
    src: &'a Source<'a>,
    limits: RateLimit,
    default_quota: Option<QuotaLimit>,
    default_max_body: u64,
    sink: &'a mut dyn KeySink,
    /// Ask the sink about duplicates key by key (unless it finds them when sealed).
    exact: bool,
}

impl<'a> KeysValidator<'a> {
    fn new(
        src: &'a Source<'a>,
        limits: &RateLimit,
        default_quota: Option<QuotaLimit>,
        default_max_body: u64,
        sink: &'a mut dyn KeySink,
    ) -> Self {
        KeysValidator {
            src,
            limits: *limits,
            default_quota,
            default_max_body,
            exact: !sink.checks_when_sealed(),
            sink,
        }
    }

    /// Checks one key against the ones before it and keeps it.
    fn push(&mut self, k: RawKey) -> Result<(), ConfigError> {
        let src = self.src;
        let id = k.id.get_ref();
        if !valid_id(id) {
            return Err(src.at(
                &k.id,
                "id must be 1 to 64 characters of letters, digits, '.', '_' or '-'",
            ));
        }
        if self.exact && self.sink.has_id(id) {
            return Err(src.at(&k.id, format!("duplicate key id {id:?}")));
        }
        let hash = KeyHash::parse(k.hash.get_ref()).map_err(|m| src.at(&k.hash, m))?;
        if self.exact && self.sink.has_hash(&hash) {
            return Err(src.at(
                &k.hash,
                format!("key {id:?} has the same hash as an earlier key"),
            ));
        }
        let tenant = match &k.tenant {
            Some(t) if !valid_id(t.get_ref()) => {
                return Err(src.at(
                    t,
                    "tenant must be 1 to 64 characters of letters, digits, '.', '_' or '-'",
                ))
            }
            Some(_) => k.tenant.map(Spanned::into_inner),
            None => None,
        };
        let (count, per) = match &k.rate {
            Some(r) => RateLimit::parse_rate(r.get_ref(), false).map_err(|m| src.at(r, m))?,
            None => (self.limits.count, self.limits.per),
        };
        let burst = match &k.burst {
            Some(b) => parse_burst(src, b)?,
            None => self.limits.burst,
        };
        if !(RateLimit { count, per, burst }).fits() {
            return Err(span_too_long(src, &k.burst, &k.rate));
        }
        let expires = parse_datetime(src, &k.expires)?;
        let scopes = match &k.scopes {
            Some(list) if list.get_ref().is_empty() => {
                return Err(src.at(
                    list,
                    "scopes = [] would admit nothing: leave scopes out for full access, or list at least one",
                ))
            }
            Some(list) => list
                .get_ref()
                .iter()
                .map(|s| Scope::parse(s.get_ref()).map_err(|m| src.at(s, m)))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let quota = match &k.quota {
            Some(q) => Some(QuotaLimit::parse(q.get_ref()).map_err(|m| src.at(q, m))?),
            None => self.default_quota,
        };
        let previous = match (&k.previous_hash, &k.previous_expires) {
            (Some(h), Some(e)) => {
                let previous = KeyHash::parse(h.get_ref()).map_err(|m| src.at(h, m))?;
                if previous == hash || (self.exact && self.sink.has_hash(&previous)) {
                    return Err(src.at(
                        h,
                        format!("key {id:?}: previous_hash is already the hash of a key"),
                    ));
                }
                let expires = datetime_to_system_time(e.get_ref()).map_err(|m| src.at(e, m))?;
                Some(PreviousKey {
                    hash: previous,
                    expires,
                })
            }
            (None, None) => None,
            (Some(h), None) => {
                return Err(src.at(
                    h,
                    "previous_hash needs previous_expires (the end of the grace)",
                ))
            }
            (None, Some(e)) => return Err(src.at(e, "previous_expires needs previous_hash")),
        };
        let created_at = parse_datetime(src, &k.created_at)?;
        let revoked_at = parse_datetime(src, &k.revoked_at)?;
        let max_body = match &k.max_body {
            Some(v) => size(src, v)?,
            None => self.default_max_body,
        };
        self.sink.push(KeyConfig {
            id: k.id.into_inner(),
            hash,
            tenant,
            limit: RateLimit { count, per, burst },
            disabled: k.disabled,
            expires,
            scopes,
            quota,
            created_at,
            revoked_at,
            previous,
            max_body,
        });
        Ok(())
    }
}

/// Validates `[[keys]]` against `src`, the file they were read from, into `sink`.
fn parse_keys(
    src: &Source<'_>,
    raw: Vec<RawKey>,
    limits: &RateLimit,
    default_quota: Option<QuotaLimit>,
    default_max_body: u64,
    sink: &mut dyn KeySink,
) -> Result<(), ConfigError> {
    sink.reserve(raw.len());
    let mut v = KeysValidator::new(src, limits, default_quota, default_max_body, sink);
    for k in raw {
        v.push(k)?;
    }
    Ok(())
}

fn parse_limit_store(
    src: &Source<'_>,
    raw: &RawLimits,
) -> Result<Option<StoreConfig>, ConfigError> {
    let on_error = match &raw.on_store_error {
        Some(v) => OnStoreError::parse(v.get_ref()).map_err(|m| src.at(v, m))?,
        None => OnStoreError::default(),
    };
    match (&raw.store, &raw.on_store_error) {
        (Some(url), _) => Ok(Some(StoreConfig {
            url: StoreUrl::parse(url.get_ref()).map_err(|m| src.at(url, m))?,
            on_error,
        })),
        (None, Some(v)) => Err(src.at(v, "on_store_error needs a store = \"redis://...\"")),
        (None, None) => Ok(None),
    }
}

/// A rate and burst that cannot be used together (see [`RateLimit::fits`]), reported at the
/// burst if it was written, else at the rate: the defaults fit, and a key's fields fall back to
/// `[limits]`, which was checked first, so one of the two was written.
fn span_too_long(
    src: &Source<'_>,
    burst: &Option<Spanned<i64>>,
    rate: &Option<Spanned<String>>,
) -> ConfigError {
    const WHY: &str = "rate and burst together span more than 500 years (the time per request times the burst); lower the burst or raise the rate";
    match (burst, rate) {
        (Some(b), _) => src.at(b, WHY),
        (None, Some(r)) => src.at(r, WHY),
        (None, None) => unreachable!("the defaults fit and [limits] is checked before the keys"),
    }
}

fn parse_burst(src: &Source<'_>, b: &Spanned<i64>) -> Result<NonZeroU32, ConfigError> {
    u32::try_from(*b.get_ref())
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| src.at(b, "burst must be a whole number from 1 to 4294967295"))
}

fn parse_admin(
    src: &Source<'_>,
    raw: &RawAdmin,
    partner: SocketAddr,
) -> Result<AdminConfig, ConfigError> {
    let listen = raw.listen.get_ref().parse::<SocketAddr>().map_err(|_| {
        src.at(
            &raw.listen,
            "listen must be an address with a port, like \"127.0.0.1:9901\"",
        )
    })?;
    // Port 0 picks a free port, so two zeros never collide.
    let overlaps = listen.port() != 0
        && listen.port() == partner.port()
        && (listen.ip() == partner.ip()
            || listen.ip().is_unspecified()
            || partner.ip().is_unspecified());
    if overlaps {
        return Err(src.at(
            &raw.listen,
            "the admin listener cannot share the partner-facing [server] listen address",
        ));
    }
    Ok(AdminConfig { listen })
}

fn parse_log(src: &Source<'_>, raw: &RawLog) -> Result<LogConfig, ConfigError> {
    let format = match &raw.format {
        Some(f) => match f.get_ref().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(src.at(f, "format must be \"text\" or \"json\"")),
        },
        None => LogFormat::Text,
    };
    let level = match &raw.level {
        Some(l) => {
            let level = l.get_ref().to_ascii_lowercase();
            if !matches!(
                level.as_str(),
                "error" | "warn" | "info" | "debug" | "trace"
            ) {
                return Err(src.at(
                    l,
                    "level must be one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"",
                ));
            }
            level
        }
        None => "info".to_string(),
    };
    Ok(LogConfig { format, level })
}

fn size(src: &Source<'_>, v: &Spanned<RawSize>) -> Result<u64, ConfigError> {
    match v.get_ref() {
        RawSize::Bytes(n) if *n > 0 => Ok(*n as u64),
        RawSize::Bytes(_) => Err(src.at(v, "a size must be more than zero")),
        RawSize::Text(t) => parse_size(t).map_err(|m| src.at(v, m)),
    }
}

fn parse_upstream(src: &Source<'_>, raw: &RawUpstream) -> Result<UpstreamConfig, ConfigError> {
    let url = raw.url.get_ref();
    let uri: Uri = url
        .parse()
        .map_err(|_| src.at(&raw.url, format!("{url:?} is not a URL")))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(src.at(&raw.url, "url must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| src.at(&raw.url, "url needs a host"))?;
    // `user:password@host` would go out in every `Host` field and print in `keygate check`,
    // and no credentials would be sent: refused, without echoing it.
    if authority.as_str().contains('@') {
        return Err(src.at(
            &raw.url,
            "url cannot hold a user or password (`user:password@`): keygate would not send them",
        ));
    }
    if uri.query().is_some() {
        return Err(src.at(&raw.url, "url cannot have a query string"));
    }
    let path_prefix = uri.path().trim_end_matches('/').to_string();
    // Files named in [upstream] are relative to the config file.
    let base = src.file.parent().unwrap_or(Path::new("."));
    let duration = |v: &Option<Spanned<String>>, default: Duration| match v {
        Some(d) => parse_config_duration(d.get_ref()).map_err(|m| src.at(d, m)),
        None => Ok(default),
    };
    let identity = match (&raw.identity_secret, &raw.identity_secret_file) {
        (Some(_), Some(f)) => {
            return Err(src.at(f, "set identity_secret or identity_secret_file, not both"))
        }
        (Some(s), None) => {
            Some(IdentityKey::from_secret(s.get_ref().as_bytes()).map_err(|m| src.at(s, m))?)
        }
        (None, Some(f)) => {
            let secret = std::fs::read(base.join(f.get_ref()))
                .map_err(|e| src.at(f, format!("cannot read identity_secret_file: {e}")))?;
            let secret = secret.trim_ascii_end();
            Some(IdentityKey::from_secret(secret).map_err(|m| src.at(f, m))?)
        }
        (None, None) => None,
    };
    let health_path = match &raw.health_path {
        Some(p) => {
            let path = p.get_ref();
            if !path.starts_with('/') || PathAndQuery::try_from(path.as_str()).is_err() {
                return Err(src.at(p, "health_path must be a path starting with '/'"));
            }
            Some(path.clone())
        }
        None => None,
    };
    let host_header = http::HeaderValue::try_from(authority.as_str())
        .map_err(|_| src.at(&raw.url, "url's host is not a valid Host header"))?;
    let ca = match &raw.ca_file {
        Some(f) if scheme != Scheme::HTTPS => {
            return Err(src.at(
                f,
                "ca_file is only used with an https:// url (this upstream is plain http://)",
            ))
        }
        Some(f) => Some(load_upstream_ca(&base.join(f.get_ref())).map_err(|m| src.at(f, m))?),
        None => None,
    };
    const ONLY_HTTPS: &str =
        "client_cert is only used with an https:// url (this upstream is plain http://)";
    const A_PAIR: &str = "client_cert and client_key go together: set both or neither";
    let client_cert = match (&raw.client_cert, &raw.client_key) {
        (Some(cert), Some(_)) if scheme != Scheme::HTTPS => return Err(src.at(cert, ONLY_HTTPS)),
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: base.join(cert.get_ref()),
            key: base.join(key.get_ref()),
        }),
        (Some(v), None) | (None, Some(v)) => return Err(src.at(v, A_PAIR)),
        (None, None) => None,
    };
    Ok(UpstreamConfig {
        identity,
        url: url.clone(),
        scheme,
        authority,
        path_prefix,
        host_header,
        connect_timeout: duration(&raw.connect_timeout, Duration::from_secs(2))?,
        timeout: duration(&raw.timeout, Duration::from_secs(30))?,
        health_path,
        health_interval: duration(&raw.health_interval, Duration::from_secs(5))?,
        body_timeout: duration(&raw.body_timeout, Duration::from_secs(30))?,
        ca,
        client_cert,
    })
}

/// Reads `[upstream] ca_file`: at least one PEM certificate, each usable as a trust anchor.
/// The message names the file.
fn load_upstream_ca(file: &Path) -> Result<UpstreamCa, String> {
    let name = file.display();
    let pem = std::fs::read(file).map_err(|e| format!("cannot read ca_file {name}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("ca_file {name} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "ca_file {name} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|e| {
            // Without rustls's "invalid peer certificate" in front: this is no peer's.
            let why = match e {
                rustls::Error::InvalidCertificate(why) => why.to_string(),
                other => other.to_string(),
            };
            format!(
                "ca_file {name}: certificate {} of {} cannot be used as a trust anchor: {why}",
                i + 1,
                certs.len()
            )
        })?;
    }
    Ok(UpstreamCa {
        file: file.to_path_buf(),
        certs,
        roots: Arc::new(roots),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH_A: &str = "blake3:0000000000000000000000000000000000000000000000000000000000000001";
    const HASH_B: &str = "blake3:0000000000000000000000000000000000000000000000000000000000000002";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("gw.toml"), text)
    }

    fn minimal(extra: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:9000/api/\"\n{extra}"
        )
    }

    /// Ten years, as humantime counts them (365.25 days each), is the longest timeout.
    #[test]
    fn ten_years_is_the_longest_duration() {
        let at = |d: &str| {
            parse(&format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"{d}\"\n[upstream]\nurl = \"http://x\"\n"
            ))
        };
        assert!(at("10y").is_ok());
        assert!(at("11y")
            .unwrap_err()
            .message
            .contains("longer than 10 years"));
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = parse(&minimal("")).unwrap();
        assert!(c.server.tls.is_none());
        assert_eq!(c.upstream.path_prefix, "/api");
        assert_eq!(c.upstream.timeout, Duration::from_secs(30));
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.auth.header, "x-api-key");
        assert_eq!(c.limits.burst.get(), 20);
        assert_eq!(c.limits.count.get(), 10);
    }

    #[test]
    fn keys_inherit_limits_field_by_field() {
        let c = parse(&minimal(&format!(
            "[limits]\nrate = \"5/min\"\nburst = 7\n[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\nburst = 9\n"
        )))
        .unwrap();
        let k = &c.keys[0];
        assert_eq!(k.limit.count.get(), 5);
        assert_eq!(k.limit.per, Duration::from_secs(60));
        assert_eq!(k.limit.burst.get(), 9);
    }

    #[test]
    fn errors_carry_file_line_and_column() {
        let text = minimal(&format!("[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\n[[keys]]\nid = \"a\"\nhash = \"{HASH_B}\"\n"));
        let err = parse(&text).unwrap_err();
        assert_eq!(err.to_string(), "gw.toml:9:6: duplicate key id \"a\"");
    }

    /// A slow rate with a large burst is fine up to 500 years of requests (governor's
    /// nanosecond arithmetic wraps at 584): the error names the line.
    #[test]
    fn rate_times_burst_is_bounded() {
        let ok = minimal("[limits]\nrate = \"1/h\"\nburst = 4000000\n");
        assert_eq!(parse(&ok).unwrap().limits.burst.get(), 4_000_000);
        let err = parse(&minimal("[limits]\nrate = \"1/h\"\nburst = 5000000\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("gw.toml:7:"), "{err}");
    }

    #[test]
    fn unknown_fields_duplicate_hashes_and_bad_values_are_refused() {
        let cases = [
            (minimal("[auth]\nheadr = \"x\"\n"), "unknown field"),
            (
                minimal(&format!("[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\n[[keys]]\nid = \"b\"\nhash = \"{HASH_A}\"\n")),
                "same hash",
            ),
            (minimal("[limits]\nrate = \"10/fortnight\"\n"), "unit"),
            (minimal("[limits]\nburst = 0\n"), "burst"),
            (
                "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"https://svc:s3cret@api.internal\"\n".to_string(),
                "user or password",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"300000000000y\"\n[upstream]\nurl = \"http://x\"\n".to_string(),
                "longer than 10 years",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://x\"\ntimeout = \"3654days\"\n".to_string(),
                "longer than 10 years",
            ),
            (
                minimal("[limits]\nrate = \"1/h\"\nburst = 6000000\n"),
                "500 years",
            ),
            (
                minimal(&format!("[limits]\nburst = 6000000\n[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\nrate = \"1/h\"\n")),
                "500 years",
            ),
            (
                minimal(&format!("[[keys]]\nid = \"has space\"\nhash = \"{HASH_A}\"\n")),
                "id must be",
            ),
            (
                minimal(&format!("[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\nexpires = 2027-06-30\n")),
                "offset",
            ),
            (
                "[server]\nlisten = \"nowhere\"\n[upstream]\nurl = \"http://x\"\n".to_string(),
                "listen must be",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"ftp://x\"\n".to_string(),
                "http://",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\ntls_cert = \"a\"\n[upstream]\nurl = \"http://x\"\n"
                    .to_string(),
                "set both",
            ),
            (
                minimal("[upstream.extra]\n"),
                "",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(&text).expect_err(&text).to_string();
            assert!(err.starts_with("gw.toml:"), "{err}");
            assert!(err.contains(needle), "{err} should mention {needle}");
            assert!(!err.contains("s3cret"), "a password echoed: {err}");
        }
    }

    #[test]
    fn lifecycle_fields_are_validated_where_they_stand() {
        let key = |extra: &str| {
            minimal(&format!(
                "[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\n{extra}"
            ))
        };
        let cases = [
            (
                key("scopes = []\n"),
                "gw.toml:8:10: scopes = [] would admit nothing",
            ),
            (
                key("scopes = [\"GET /ok\", \"get /v1\"]\n"),
                "gw.toml:8:22: scope \"get /v1\"",
            ),
            (key("quota = \"5/s\"\n"), "gw.toml:8:9: quota \"5/s\""),
            (
                key(&format!("previous_hash = \"{HASH_B}\"\n")),
                "gw.toml:8:17: previous_hash needs previous_expires",
            ),
            (
                key(&format!(
                    "previous_hash = \"{HASH_A}\"\nprevious_expires = 2030-01-01T00:00:00Z\n"
                )),
                "gw.toml:8:17: key \"a\": previous_hash is already the hash of a key",
            ),
            (
                key("created_at = 2026-01-01\n"),
                "gw.toml:8:14: 2026-01-01 needs a date, a time and an offset",
            ),
        ];
        for (text, want) in cases {
            let err = parse(&text).expect_err(&text).to_string();
            assert!(err.starts_with(want), "{err}\n  should start with\n{want}");
        }
        let upstream = |extra: &str| {
            format!("[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://x\"\n{extra}")
        };
        let err = parse(&upstream("identity_secret = \"short\"\n")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("gw.toml:5:19: the identity secret must be at least 32 bytes"),
            "{err}"
        );
        assert!(
            !err.to_string().contains("short"),
            "the secret is not echoed"
        );
        let err = parse(&upstream(&format!(
            "identity_secret = \"{}\"\nidentity_secret_file = \"s\"\n",
            "x".repeat(32)
        )))
        .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn quota_scopes_and_rotation_are_understood() {
        let c = parse(&minimal(&format!(
            "[limits]\nquota = \"100/day\"\n[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\nscopes = [\"GET /v1/**\"]\n\
             previous_hash = \"{HASH_B}\"\nprevious_expires = 2030-01-01T00:00:00Z\n\
             [[keys]]\nid = \"b\"\nhash = \"blake3:{}\"\nquota = \"5/h\"\n",
            "3".repeat(64)
        )))
        .unwrap();
        assert_eq!(c.keys[0].quota.unwrap().to_string(), "100/day");
        assert_eq!(c.keys[1].quota.unwrap().to_string(), "5/h");
        assert_eq!(c.keys[0].scopes[0].to_string(), "GET /v1/**");
        assert!(c.keys[1].scopes.is_empty());
        assert_eq!(
            c.keys[0].previous.unwrap().hash,
            KeyHash::parse(HASH_B).unwrap()
        );
    }

    #[test]
    fn a_keys_file_holds_the_keys_and_its_errors_point_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("gw.toml");
        let main_text = minimal("[auth]\nkeys_file = \"keys.toml\"\n");
        std::fs::write(&main, &main_text).unwrap();
        let keys = dir.path().join("keys.toml");
        std::fs::write(
            &keys,
            format!("# keys\n[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\n"),
        )
        .unwrap();
        let c = Config::parse(&main, &main_text).unwrap();
        assert_eq!(c.keys.len(), 1);
        assert_eq!(c.auth.keys_file.as_deref(), Some(keys.as_path()));
        assert_eq!(Config::key_store_path(&main).unwrap(), keys);

        let bad = format!("[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\nrate = \"1/fortnight\"\n");
        let err = Config::parse_with_keys(&main, &main_text, Some(&bad)).unwrap_err();
        assert_eq!(err.file, keys.display().to_string());
        assert_eq!((err.line, err.col), (4, 8));

        let both = format!("{main_text}[[keys]]\nid = \"b\"\nhash = \"{HASH_B}\"\n");
        let err = Config::parse(&main, &both).unwrap_err();
        assert!(err.message.contains("belong in"), "{err}");

        std::fs::remove_file(&keys).unwrap();
        let err = Config::parse(&main, &main_text).unwrap_err();
        assert!(
            err.to_string().contains("cannot read the keys file"),
            "{err}"
        );
    }

    #[test]
    fn a_hash_may_not_repeat_a_previous_hash_either_way() {
        let rotating = format!(
            "[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\nprevious_hash = \"{HASH_B}\"\n\
             previous_expires = 2030-01-01T00:00:00Z\n"
        );
        let err = parse(&minimal(&format!(
            "{rotating}[[keys]]\nid = \"b\"\nhash = \"{HASH_B}\"\n"
        )))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "gw.toml:12:8: key \"b\" has the same hash as an earlier key"
        );
        let err = parse(&minimal(&format!(
            "[[keys]]\nid = \"b\"\nhash = \"{HASH_B}\"\n{rotating}"
        )))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "gw.toml:11:17: key \"a\": previous_hash is already the hash of a key"
        );
    }

    #[test]
    fn a_keys_file_reports_the_error_the_toml_crate_would_report_first() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("gw.toml");
        let main_text = minimal("[auth]\nkeys_file = \"keys.toml\"\n");
        let key = |id: &str, hash: &str, extra: &str| {
            format!("[[keys]]\nid = \"{id}\"\nhash = \"{hash}\"\n{extra}")
        };
        // A bad value in the first key, a syntax error in the last: the syntax error wins, as
        // it does when the toml crate reads the whole file before anything is validated.
        let both = format!(
            "{}{}",
            key("a", HASH_A, "rate = \"1/fortnight\"\n"),
            key("b", HASH_B, "burst = \n")
        );
        let err = Config::parse_with_keys(&main, &main_text, Some(&both)).unwrap_err();
        assert_eq!((err.line, err.col), (8, 9), "{err}");
        // Without the syntax error, the bad value is reported where it stands.
        let bad_value = format!(
            "{}{}",
            key("a", HASH_A, ""),
            key("b", HASH_B, "rate = \"1/fortnight\"\n")
        );
        let err = Config::parse_with_keys(&main, &main_text, Some(&bad_value)).unwrap_err();
        assert_eq!((err.line, err.col), (7, 8), "{err}");
        assert!(err.message.contains("fortnight"), "{err}");
        let dup = format!("{}{}", key("a", HASH_A, ""), key("a", HASH_B, ""));
        let err = Config::parse_with_keys(&main, &main_text, Some(&dup)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:5:6: duplicate key id \"a\"",
                dir.path().join("keys.toml").display()
            )
        );
    }

    #[test]
    fn a_streamed_keys_file_loads_as_its_text_and_errors_still_point_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("gw.toml");
        let main_text = minimal("[auth]\nkeys_file = \"keys.toml\"\n");
        let keys_path = dir.path().join("keys.toml");
        // ~2.6 MB: streamed in several chunks.
        let mut text = String::new();
        for i in 1..=20_000u32 {
            text += &format!(
                "[[keys]]\nid = \"partner-{i}\"\nhash = \"blake3:{:032x}{i:032x}\"\n\
                 tenant = \"hotel-{}\"\nrate = \"{i}/s\"\n\n",
                // Leading bytes that differ: the tables index by the first eight.
                u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                i % 9
            );
        }
        std::fs::write(&keys_path, &text).unwrap();
        let streamed = Config::parse(&main, &main_text).unwrap();
        let whole = Config::parse_with_keys(&main, &main_text, Some(&text)).unwrap();
        assert_eq!(streamed.keys.len(), 20_000);
        for (s, w) in streamed.keys.iter().zip(&whole.keys) {
            assert_eq!(
                (&s.id, s.hash, &s.tenant, s.limit),
                (&w.id, w.hash, &w.tenant, w.limit)
            );
        }
        assert_eq!(streamed.keys[16_999].id, "partner-17000");

        // A bad value far into the file: reported at its line, as from the whole text.
        let bad = text.replacen("rate = \"17000/s\"", "rate = \"1/fortnight\"", 1);
        std::fs::write(&keys_path, &bad).unwrap();
        let err = Config::parse(&main, &main_text).unwrap_err();
        assert_eq!(err.file, keys_path.display().to_string());
        assert_eq!((err.line, err.col), (16_999 * 6 + 5, 8), "{err}");
        // A duplicate id likewise.
        let dup = text.replacen("id = \"partner-19000\"", "id = \"partner-3\"", 1);
        std::fs::write(&keys_path, &dup).unwrap();
        let err = Config::parse(&main, &main_text).unwrap_err();
        assert_eq!(
            (err.line, err.col, err.message.as_str()),
            (18_999 * 6 + 2, 6, "duplicate key id \"partner-3\"")
        );
        // What only the toml crate reads (an escape) still loads, through it.
        let escaped = text.replacen("tenant = \"hotel-1\"", "tenant = \"hotel\\u002D1\"", 1);
        std::fs::write(&keys_path, &escaped).unwrap();
        let c = Config::parse(&main, &main_text).unwrap();
        assert_eq!(c.keys.len(), 20_000);
        assert_eq!(c.keys[0].tenant.as_deref(), Some("hotel-1"));
    }

    #[test]
    fn operations_sections_are_parsed_with_defaults() {
        let c = parse(&minimal("")).unwrap();
        assert!(c.admin.is_none());
        assert_eq!(c.log, LogConfig::default());
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.upstream.health_interval, Duration::from_secs(5));
        assert!(c.upstream.health_path.is_none());

        let text = "[server]\nlisten = \"127.0.0.1:8443\"\nshutdown_timeout = \"5s\"\n\
                    [upstream]\nurl = \"http://127.0.0.1:9000\"\nhealth_path = \"/health\"\nhealth_interval = \"250ms\"\n\
                    [admin]\nlisten = \"127.0.0.1:9901\"\n[log]\nformat = \"json\"\nlevel = \"DEBUG\"\n";
        let c = parse(text).unwrap();
        assert_eq!(c.admin.unwrap().listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream.health_path.as_deref(), Some("/health"));
        assert_eq!(c.upstream.health_interval, Duration::from_millis(250));
    }

    #[test]
    fn operations_sections_refuse_bad_values_with_positions() {
        let cases = [
            (
                "[server]\nlisten = \"0.0.0.0:8443\"\n[upstream]\nurl = \"http://x\"\n[admin]\nlisten = \"127.0.0.1:8443\"\n",
                "gw.toml:6:10: the admin listener cannot share",
            ),
            (
                &minimal("[admin]\nlisten = \"nowhere\"\n") as &str,
                "gw.toml:6:10: listen must be",
            ),
            (&minimal("[log]\nformat = \"xml\"\n"), "gw.toml:6:10: format must be"),
            (&minimal("[log]\nlevel = \"loud\"\n"), "gw.toml:6:9: level must be"),
            (&minimal("[log]\nfile = \"x\"\n"), "unknown field"),
            (&minimal("[admin]\nport = 1\n"), "unknown field"),
        ];
        for (text, needle) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{err} should contain {needle}");
        }
        let bad_health = "[server]\nlisten = \"127.0.0.1:1\"\nshutdown_timeout = \"0s\"\n[upstream]\nurl = \"http://x\"\n";
        assert!(parse(bad_health)
            .unwrap_err()
            .to_string()
            .starts_with("gw.toml:3:20:"));
        let bad_path = "[server]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"http://x\"\nhealth_path = \"health\"\n";
        assert!(parse(bad_path)
            .unwrap_err()
            .to_string()
            .contains("health_path must be"));
    }

    #[test]
    fn limit_store_is_optional_checked_and_located() {
        assert!(parse(&minimal("")).unwrap().limit_store.is_none());
        let c = parse(&minimal(
            "[limits]\nstore = \"rediss://gw:pw@cache:6380/1\"\non_store_error = \"deny\"\n",
        ))
        .unwrap();
        let store = c.limit_store.unwrap();
        assert_eq!(store.on_error, OnStoreError::Deny);
        assert_eq!(store.url.to_string(), "rediss://gw:***@cache:6380/1");
        let c = parse(&minimal("[limits]\nstore = \"redis://127.0.0.1:6379\"\n")).unwrap();
        assert_eq!(c.limit_store.unwrap().on_error, OnStoreError::Local);

        let err = parse(&minimal("[limits]\nstore = \"memcached://x\"\n")).unwrap_err();
        assert_eq!(err.line, 6);
        assert_eq!(err.col, 9);
        let err = parse(&minimal(
            "[limits]\nstore = \"redis://x\"\non_store_error = \"maybe\"\n",
        ))
        .unwrap_err();
        assert!(err.to_string().starts_with("gw.toml:7:18:"), "{err}");
        let err = parse(&minimal("[limits]\non_store_error = \"deny\"\n")).unwrap_err();
        assert!(err.message.contains("needs a store"), "{err}");
    }

    #[test]
    fn hardening_settings_have_safe_defaults_and_are_validated() {
        let c = parse(&minimal("")).unwrap();
        assert_eq!(c.server.header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.max_body, 16 << 20);
        assert_eq!(c.server.max_header_bytes, 64 * 1024);
        assert!(c.server.trusted_proxies.is_empty() && !c.server.proxy_protocol);
        assert!(!c.auth.allow_query_key);
        assert_eq!(c.auth.query_key, "api_key");
        assert_eq!(c.auth.failures_per_ip.unwrap().count.get(), 30);

        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmax_body = 1024\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
             [upstream]\nurl = \"http://x\"\n[auth]\nfailures_per_ip = \"off\"\n\
             [[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\nmax_body = \"2MiB\"\n[[keys]]\nid = \"b\"\nhash = \"{HASH_B}\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.keys[0].max_body, 2 << 20);
        assert_eq!(c.keys[1].max_body, 1024);
        assert!(c.auth.failures_per_ip.is_none());
        assert!(c
            .server
            .trusted_proxies
            .contains("10.1.2.3".parse().unwrap()));

        for (server, needle) in [
            ("max_body = \"16 furlongs\"", "unit"),
            ("max_body = 0", "more than zero"),
            ("max_header_bytes = 100", "between 8KiB"),
            ("max_connections = 0", "max_connections"),
            ("trusted_proxies = [\"10.0.0.0/40\"]", "prefix"),
            (
                "client_ip_header = \"x-real-ip\"",
                "client_ip_header must be",
            ),
            ("header_timeout = \"0s\"", "more than zero"),
        ] {
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[upstream]\nurl = \"http://x\"\n"
            );
            let err = parse(&text).expect_err(server).to_string();
            assert!(err.starts_with("gw.toml:3:"), "{err}");
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn an_upstream_ca_file_is_read_at_load_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        let main = dir.path().join("gw.toml");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["other.test".into()]).unwrap();
        let bundle = format!("# upstream CAs\n{}{}", ca.cert.pem(), other.cert.pem());
        std::fs::write(dir.path().join("certs/ca.pem"), bundle).unwrap();
        let text =
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"https://10.0.0.1:8443\"\n\
                    ca_file = \"certs/ca.pem\"\n";
        let c = Config::parse(&main, text).unwrap();
        let loaded = c.upstream.ca.expect("ca_file loaded");
        assert_eq!(loaded.file, dir.path().join("certs/ca.pem"));
        assert_eq!(loaded.certs.len(), 2);
        assert_eq!(loaded.certs[0].as_ref(), ca.cert.der().as_ref());
        assert_eq!(loaded.roots.len(), 2);
        assert!(parse(&minimal("")).unwrap().upstream.ca.is_none());
    }

    #[test]
    fn a_bad_upstream_ca_file_refuses_the_config_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("gw.toml");
        let cert = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let config = |url: &str, file: &str| {
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"{url}\"\nca_file = \"{file}\"\n"
            )
        };
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(
            dir.path().join("key-only.pem"),
            cert.signing_key.serialize_pem(),
        )
        .unwrap();
        std::fs::write(dir.path().join("text.pem"), "not a certificate\n").unwrap();
        // A CERTIFICATE block whose base64 is broken, and one that is base64 but not DER.
        std::fs::write(
            dir.path().join("broken.pem"),
            "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("not-der.pem"),
            format!(
                "{}-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
                cert.cert.pem()
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("good.pem"), cert.cert.pem()).unwrap();
        let cases = [
            (
                config("https://up:443", "missing.pem"),
                format!("cannot read ca_file {}", path("missing.pem")),
            ),
            (
                config("https://up:443", "key-only.pem"),
                format!("ca_file {} holds no PEM certificate", path("key-only.pem")),
            ),
            (
                config("https://up:443", "text.pem"),
                format!("ca_file {} holds no PEM certificate", path("text.pem")),
            ),
            (
                config("https://up:443", "broken.pem"),
                format!("ca_file {} is not valid PEM", path("broken.pem")),
            ),
            (
                config("https://up:443", "not-der.pem"),
                format!(
                    "ca_file {}: certificate 2 of 2 cannot be used as a trust anchor",
                    path("not-der.pem")
                ),
            ),
            (
                config("http://up:80", "good.pem"),
                "ca_file is only used with an https:// url".to_string(),
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(&main, &text).expect_err(&text);
            // Located at the ca_file value.
            assert_eq!((err.line, err.col), (5, 11), "{err}");
            assert!(
                err.message.starts_with(&want),
                "{err}\n  should start with\n{want}"
            );
        }
    }

    #[test]
    fn an_upstream_client_certificate_is_a_pair_for_https_relative_to_the_config() {
        let main = Path::new("/etc/keygate/gw.toml");
        let config = |url: &str, lines: &str| {
            format!("[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"{url}\"\n{lines}")
        };
        let both = "client_cert = \"certs/gw.crt\"\nclient_key = \"/secret/gw.key\"\n";
        let c = Config::parse(main, &config("https://up:443", both)).unwrap();
        assert_eq!(
            c.upstream.client_cert,
            Some(TlsFiles {
                cert: PathBuf::from("/etc/keygate/certs/gw.crt"),
                key: PathBuf::from("/secret/gw.key"),
            })
        );
        assert!(parse(&minimal("")).unwrap().upstream.client_cert.is_none());
        // The files themselves are read at start-up (`certs::CertStore`), not here.
        let cases = [
            (
                config("https://up:443", "client_cert = \"gw.crt\"\n"),
                "client_cert and client_key go together: set both or neither",
                (5, 15),
            ),
            (
                config("https://up:443", "client_key = \"gw.key\"\n"),
                "client_cert and client_key go together: set both or neither",
                (5, 14),
            ),
            (
                config("http://up:80", both),
                "client_cert is only used with an https:// url (this upstream is plain http://)",
                (5, 15),
            ),
        ];
        for (text, want, at) in cases {
            let err = Config::parse(main, &text).expect_err(&text);
            assert_eq!(err.message, want, "{text}");
            assert_eq!((err.line, err.col), at, "{err}");
        }
    }

    #[test]
    fn expiry_with_offset_is_understood() {
        let c = parse(&minimal(&format!(
            "[[keys]]\nid = \"a\"\nhash = \"{HASH_A}\"\nexpires = 2000-01-01T02:00:00+02:00\n"
        )))
        .unwrap();
        assert_eq!(
            c.keys[0].expires.unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_800)
        );
    }
}
