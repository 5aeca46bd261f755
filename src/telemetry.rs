//! Logging: a tracing subscriber on stderr, text or json (`[log] format`), the level from
//! `[log] level` (rustls's own lines: errors only) unless `RUST_LOG` is set (it always wins).
//!
//! The access log is the `keygate::access` target, one line per request ([`crate::access`]). In
//! json every line is one object: `ts` (RFC 3339, UTC), `level`, `target`, `message` when there is
//! one, then the event's fields under their own names; an access line always carries every name
//! in [`access::FIELDS`], `null` where a value is absent (no key, nothing forwarded). Nothing the
//! request path logs contains a key, a key hash or an `Authorization` value.

use std::{fmt, io::BufWriter};

use serde_json::{Map, Value};
use tracing::{field::Field, Event, Subscriber};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
    EnvFilter,
};

use crate::{
    access,
    config::{LogConfig, LogFormat},
};

/// Installs the global subscriber with the defaults (text, `info`); call once, from the binary,
/// and keep the guard until exit.
pub fn init() -> WorkerGuard {
    init_with(&LogConfig::default())
}

/// What rustls itself may log unless `RUST_LOG` says otherwise: errors only. Its warnings are
/// about what a client sent (an IP address as SNI, as wrk and some HTTP libraries send), one
/// line per connection that anyone on the internet can trigger: noise for operators and a way
/// to flood the log. keygate logs failed handshakes itself, at debug.
const RUSTLS_LEVEL: &str = "rustls=error";

/// Installs the global subscriber as `[log]` says; call once, from the binary, and keep the
/// returned guard until exit: dropping it writes out the lines still queued.
///
/// Lines are formatted where they are logged and written to stderr by a thread of its own,
/// which writes whatever has queued up in one go (a `BufWriter` flushed whenever the queue runs
/// empty): under load many access lines share one write(2) instead of costing one each on the
/// request path. Nothing is dropped: when 128,000 lines are queued, logging waits.
pub fn init_with(log: &LogConfig) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},{RUSTLS_LEVEL}", log.level.as_str())));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("keygate-log")
        .finish(BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match log.format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
    };
    guard
}

/// One JSON object per event, with fixed field names.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writeln!(writer, "{}", Value::Object(json_object(event)))
    }
}

/// The JSON object of one event.
fn json_object(event: &Event<'_>) -> Map<String, Value> {
    let meta = event.metadata();
    let mut map = Map::new();
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    map.insert("ts".into(), Value::String(ts));
    map.insert("level".into(), meta.level().as_str().into());
    map.insert("target".into(), meta.target().into());
    if meta.target() == access::TARGET {
        // Every access field present and in one order; recording fills in the values.
        for name in access::FIELDS {
            map.entry(name).or_insert(Value::Null);
        }
    }
    event.record(&mut JsonVisitor(&mut map));
    map
}

/// Records an event's fields into a JSON map, keeping numbers and booleans typed.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
