//! The Prometheus registry and the typed handles the gateway records into.
//!
//! One [`Metrics`] per gateway (tests run several in one process, each with its own counts).
//! Every name carries the `keygate_` prefix and every label value is bounded: key ids come from
//! the key table (an admitted or rate-limited key), reasons and kinds from fixed lists, never
//! from the request. A request without an admitted key is counted with `key_id=""`, a value no
//! configured key can have.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `keygate_requests_total` | counter | `key_id`, `class` (`2xx` … `5xx`) |
//! | `keygate_request_duration_seconds` | histogram | whole request, until the last body byte |
//! | `keygate_upstream_duration_seconds` | histogram | until the upstream's response head |
//! | `keygate_rejections_total` | counter | `reason` ([`GatewayError::reason`]) |
//! | `keygate_upstream_errors_total` | counter | `kind` (`connect`, `timeout`, `reset`) |
//! | `keygate_config_reloads_total` | counter | `result` (`success`, `failure`) |
//! | `keygate_certificate_reloads_total` | counter | `result` (`success`, `failure`); the listener's and the upstream client certificate |
//! | `keygate_certificate_expiry_timestamp_seconds` | gauge | `certificate` (`listener`, `upstream_client`): the current one's `notAfter`, Unix time |
//! | `keygate_keys` | gauge | `status` (`active`, `disabled`, `expired`), computed at scrape |
//! | `keygate_open_connections` | gauge | partner-facing client connections |
//! | `keygate_tls_handshake_failures_total` | counter | |
//! | `keygate_upstream_up` | gauge | 1 when the last readiness probe succeeded |
//! | `keygate_limit_store_mode` | gauge | `mode` (`in_process`, `shared`, `fallback`): 1 for the current |
//! | `keygate_build_info` | info | `version` |

use std::{
    fmt::Write as _,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::Registry,
};

use crate::{
    error::GatewayError,
    keys::{KeyTable, StatusCounts},
    store::LimitMode,
};

/// The content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The rejection reasons that always appear in the exposition, at 0 until one happens.
pub const REJECTION_REASONS: [&str; 7] = [
    "missing_api_key",
    "invalid_api_key",
    "bad_checksum",
    "expired_api_key",
    "forbidden_scope",
    "rate_limited",
    "quota_exceeded",
];

/// Bucket bounds (seconds) of both duration histograms: 1 ms to 30 s.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type OneLabel = [(&'static str, &'static str); 1];

/// Labels of `keygate_requests_total`: the key id is shared with the key table, not copied.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestLabels {
    key_id: Arc<str>,
    class: &'static str,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("key_id", &*self.key_id).encode(encoder.encode_label())?;
        ("class", self.class).encode(encoder.encode_label())
    }
}

/// A key's `keygate_requests_total` counters, one per status class, kept in its key entry
/// (or, for requests without a key, in [`Metrics`]).
///
/// Each is taken from the labelled family the first time it is used (so a series appears, as
/// before, only once it counts something) and kept: counting a request is then one atomic add
/// instead of a family lookup (a lock and a SipHash of the labels, ~450 instructions a request).
/// A key entry belongs to one gateway's key table, so its counters are that gateway's.
#[derive(Debug)]
pub struct KeyCounters {
    key_id: Arc<str>,
    by_class: [OnceLock<Counter>; 5],
}

impl KeyCounters {
    /// The counters of the key `key_id` (`""`: requests without an admitted key).
    pub fn new(key_id: Arc<str>) -> KeyCounters {
        KeyCounters {
            key_id,
            by_class: Default::default(),
        }
    }
}

/// How a request to the upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The connection could not be made (refused, unreachable, DNS, connect timeout).
    Connect,
    /// No response head within `upstream.timeout`.
    Timeout,
    /// The connection broke after it was made (reset, closed mid-response).
    Reset,
}

impl UpstreamErrorKind {
    /// The `kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
        }
    }
}

/// The gateway's metrics: the registry and a typed handle for each thing counted.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Histogram,
    upstream_duration: Histogram,
    rejections: Family<OneLabel, Counter>,
    upstream_errors: Family<OneLabel, Counter>,
    config_reloads: Family<OneLabel, Counter>,
    certificate_reloads: Family<OneLabel, Counter>,
    certificate_expiry: Family<OneLabel, Gauge>,
    keys: Family<OneLabel, Gauge>,
    open_connections: Gauge,
    tls_handshake_failures: Counter,
    upstream_up: Gauge,
    limit_store_mode: Family<OneLabel, Gauge>,
    no_key: KeyCounters,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered and the fixed label values at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keygate");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Histogram::new(DURATION_BUCKETS),
            upstream_duration: Histogram::new(DURATION_BUCKETS),
            rejections: Family::default(),
            upstream_errors: Family::default(),
            config_reloads: Family::default(),
            certificate_reloads: Family::default(),
            certificate_expiry: Family::default(),
            keys: Family::default(),
            open_connections: Gauge::default(),
            tls_handshake_failures: Counter::default(),
            upstream_up: Gauge::default(),
            limit_store_mode: Family::default(),
            no_key: KeyCounters::new(Arc::from("")),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by key id (empty when no key was admitted) and status class",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Whole request duration, from the request head to the last response byte",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time from forwarding a request to the upstream's response head",
            m.upstream_duration.clone(),
        );
        registry.register(
            "rejections",
            "Requests the gateway refused, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed upstream requests, by kind (connect, timeout, reset)",
            m.upstream_errors.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads, by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "certificate_reloads",
            "TLS certificate reloads (the listener's and the upstream client certificate), by \
             result (a failure keeps the previous certificate)",
            m.certificate_reloads.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the current TLS certificate stops being valid (notAfter, Unix time), by \
             certificate (listener, upstream_client)",
            m.certificate_expiry.clone(),
        );
        registry.register("keys", "Keys loaded, by status", m.keys.clone());
        registry.register(
            "open_connections",
            "Open partner-facing client connections",
            m.open_connections.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Client TLS handshakes that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "upstream_up",
            "1 when the upstream answered the last readiness probe, else 0",
            m.upstream_up.clone(),
        );
        registry.register(
            "limit_store_mode",
            "Where limits are decided: 1 for the current mode (in_process, shared, fallback)",
            m.limit_store_mode.clone(),
        );
        registry.register(
            "build",
            "The running keygate build",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        for reason in REJECTION_REASONS {
            let _ = m.rejections.get_or_create(&[("reason", reason)]);
        }
        for kind in [
            UpstreamErrorKind::Connect,
            UpstreamErrorKind::Timeout,
            UpstreamErrorKind::Reset,
        ] {
            let _ = m.upstream_errors.get_or_create(&[("kind", kind.label())]);
        }
        for result in ["success", "failure"] {
            let _ = m.config_reloads.get_or_create(&[("result", result)]);
            let _ = m.certificate_reloads.get_or_create(&[("result", result)]);
        }
        Metrics { registry, ..m }
    }

    /// Records one finished request: its key's counters (from its entry), status and whole
    /// duration.
    pub fn request_done(&self, key: Option<&KeyCounters>, status: u16, duration: Duration) {
        let key = key.unwrap_or(&self.no_key);
        let class = status_class(status);
        key.by_class[class]
            .get_or_init(|| {
                let labels = RequestLabels {
                    key_id: Arc::clone(&key.key_id),
                    class: STATUS_CLASSES[class],
                };
                self.requests.get_or_create(&labels).clone()
            })
            .inc();
        self.request_duration.observe(duration.as_secs_f64());
    }

    /// Records a refusal; upstream failures are counted by [`upstream_error`](Self::upstream_error).
    pub fn refused(&self, err: &GatewayError) {
        if !matches!(
            err,
            GatewayError::UpstreamUnavailable | GatewayError::UpstreamTimeout
        ) {
            self.rejections
                .get_or_create(&[("reason", err.reason())])
                .inc();
        }
    }

    /// Records the time the upstream took to send its response head.
    pub fn upstream_head(&self, elapsed: Duration) {
        self.upstream_duration.observe(elapsed.as_secs_f64());
    }

    /// Records a failed upstream request.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors
            .get_or_create(&[("kind", kind.label())])
            .inc();
    }

    /// Records a config reload attempt.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .get_or_create(&[("result", if ok { "success" } else { "failure" })])
            .inc();
    }

    /// Records a certificate reload attempt.
    pub fn certificate_reload(&self, ok: bool) {
        self.certificate_reloads
            .get_or_create(&[("result", if ok { "success" } else { "failure" })])
            .inc();
    }

    /// Records when the `certificate` in use now stops being valid (`None`: unreadable, so
    /// the series is removed rather than left at an old certificate's date).
    pub fn certificate_expiry(&self, certificate: &'static str, not_after: Option<SystemTime>) {
        let labels = [("certificate", certificate)];
        match not_after.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()) {
            Some(secs) => {
                let secs = i64::try_from(secs.as_secs()).unwrap_or(i64::MAX);
                self.certificate_expiry.get_or_create(&labels).set(secs);
            }
            None => {
                self.certificate_expiry.remove(&labels);
            }
        }
    }

    /// Records a failed or timed-out client TLS handshake.
    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Records the result of a readiness probe.
    pub fn set_upstream_up(&self, up: bool) {
        self.upstream_up.set(i64::from(up));
    }

    /// Counts a client connection as open until the returned guard is dropped.
    pub fn connection_opened(&self) -> ConnectionGuard {
        self.open_connections.inc();
        ConnectionGuard(self.open_connections.clone())
    }

    /// The exposition text, with `keygate_keys` computed from the live key table as of now and
    /// `keygate_limit_store_mode` from `mode`.
    pub fn encode(&self, keys: &KeyTable, mode: LimitMode) -> String {
        for m in [LimitMode::InProcess, LimitMode::Shared, LimitMode::Fallback] {
            self.limit_store_mode
                .get_or_create(&[("mode", m.as_str())])
                .set(i64::from(m == mode));
        }
        let StatusCounts {
            active,
            disabled,
            expired,
        } = keys.status_counts(SystemTime::now());
        self.keys.get_or_create(&[("status", "active")]).set(active);
        self.keys
            .get_or_create(&[("status", "disabled")])
            .set(disabled);
        self.keys
            .get_or_create(&[("status", "expired")])
            .set(expired);
        let mut out = String::with_capacity(4096);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing to a String cannot fail; keep the scrape well-formed regardless.
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }
}

/// Keeps `keygate_open_connections` counted while a connection lives.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `2xx`-style class of a status code.
/// The `class` label values, indexed by [`status_class`].
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config() -> Config {
        Config::parse(
            std::path::Path::new("gw.toml"),
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n",
        )
        .unwrap()
    }

    #[test]
    fn exposition_has_the_fixed_series_at_zero_and_counts_by_label() {
        let m = Metrics::new();
        let a = KeyCounters::new(Arc::from("partner-a"));
        m.request_done(Some(&a), 200, Duration::from_millis(3));
        m.request_done(Some(&a), 204, Duration::from_millis(3));
        m.request_done(None, 401, Duration::from_millis(1));
        m.refused(&GatewayError::BadChecksum);
        m.refused(&GatewayError::UpstreamTimeout);
        m.upstream_error(UpstreamErrorKind::Timeout);
        let text = m.encode(&KeyTable::build(&config(), None), LimitMode::InProcess);
        for line in [
            "keygate_requests_total{key_id=\"partner-a\",class=\"2xx\"} 2",
            "keygate_requests_total{key_id=\"\",class=\"4xx\"} 1",
            "keygate_rejections_total{reason=\"bad_checksum\"} 1",
            "keygate_rejections_total{reason=\"rate_limited\"} 0",
            "keygate_upstream_errors_total{kind=\"timeout\"} 1",
            "keygate_upstream_errors_total{kind=\"connect\"} 0",
            "keygate_config_reloads_total{result=\"failure\"} 0",
            "keygate_keys{status=\"active\"} 0",
            "keygate_build_info{version=\"",
            "keygate_request_duration_seconds_count 3",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("upstream_timeout"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        let text = m.encode(&KeyTable::build(&config(), None), LimitMode::Fallback);
        assert!(
            text.contains("keygate_limit_store_mode{mode=\"fallback\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keygate_limit_store_mode{mode=\"shared\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn connection_guard_counts_while_alive() {
        let m = Metrics::new();
        let a = m.connection_opened();
        let b = m.connection_opened();
        drop(a);
        assert!(m
            .encode(&KeyTable::build(&config(), None), LimitMode::InProcess)
            .contains("keygate_open_connections 1\n"));
        drop(b);
    }

    #[test]
    fn status_classes() {
        let class = |status| STATUS_CLASSES[status_class(status)];
        assert_eq!(class(101), "1xx");
        assert_eq!(class(299), "2xx");
        assert_eq!(class(304), "3xx");
        assert_eq!(class(429), "4xx");
        assert_eq!(class(504), "5xx");
    }
}
