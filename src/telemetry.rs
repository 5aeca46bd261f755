//! Logging: a tracing subscriber on stderr, text or json (`[log] format`), the level from
//! `[log] level` (rustls's own lines: errors only) unless `RUST_LOG` is set (it always wins).
//!
//! The access log is the `keygate::access` target, one line per request ([`crate::access`]). In
//! json every line is one object: `ts` (RFC 3339, UTC), `level`, `target`, `message` when there is
//! one, then the event's fields under their own names; an access line always carries every name
//! in [`access::FIELDS`], `null` where a value is absent (no key, nothing forwarded). Nothing the
//! request path logs contains a key, a key hash or an `Authorization` value.

use std::{
    fmt::{self, Write as _},
    io::BufWriter,
};

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
        // A terminal gets tracing's own format, in colour.
        LogFormat::Text if std::io::IsTerminal::is_terminal(&std::io::stderr()) => {
            builder.with_ansi(true).try_init()
        }
        LogFormat::Text => builder.event_format(TextLines).try_init(),
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
    };
    guard
}

/// Text lines as tracing's own format prints them without colour,
/// `2026-11-26T11:22:27.758184Z  INFO keygate::access: request_id="…" status=200 …`, written
/// without its per-field styling and `Debug` machinery: a string that needs no escaping is
/// copied as it is, integers go through `itoa`, and the timestamp's date and time of day are
/// formatted once a second. The access line cost ~19,000 instructions through tracing's
/// formatter, more than the rest of the request (`benches/load/instructions.sh` with
/// `RUST_LOG=info`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TextLines;

impl<S, N> FormatEvent<S, N> for TextLines
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
        let meta = event.metadata();
        let mut line = String::with_capacity(320);
        timestamp(&mut line);
        line.push(' ');
        let level = meta.level().as_str();
        line.extend(std::iter::repeat(' ').take(5usize.saturating_sub(level.len())));
        line.push_str(level);
        line.push(' ');
        line.push_str(meta.target());
        line.push(':');
        event.record(&mut TextVisitor(&mut line));
        line.push('\n');
        writer.write_str(&line)
    }
}

/// Appends `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` (UTC) for now.
fn timestamp(out: &mut String) {
    thread_local! {
        /// The second last formatted on this thread, and its text up to the seconds.
        static SECOND: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            let t = i64::try_from(secs)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            text.clear();
            let _ = write!(
                text,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            *second = secs;
        }
        out.push_str(text);
    });
    let micros = now.subsec_micros();
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(micros);
    out.push('.');
    out.extend(std::iter::repeat('0').take(6 - digits.len()));
    out.push_str(digits);
    out.push('Z');
}

/// Writes an event's fields as tracing's default format does: ` message name=value …`, strings
/// quoted (`Debug`), `%`-values as they display.
struct TextVisitor<'a>(&'a mut String);

impl TextVisitor<'_> {
    fn name(&mut self, field: &Field) {
        self.0.push(' ');
        self.0
            .push_str(field.name().strip_prefix("r#").unwrap_or(field.name()));
        self.0.push('=');
    }
}

impl tracing::field::Visit for TextVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        self.0.push_str(itoa::Buffer::new().format(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        self.0.push_str(itoa::Buffer::new().format(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        self.0.push_str(if value { "true" } else { "false" });
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push(' ');
            self.0.push_str(value);
            return;
        }
        self.name(field);
        // What `Debug` would print, without its per-character escape check when nothing needs
        // escaping.
        if value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            self.0.push('"');
            self.0.push_str(value);
            self.0.push('"');
        } else {
            let _ = write!(self.0, "{value:?}");
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0.push(' ');
        } else {
            self.name(field);
        }
        let _ = write!(self.0, "{value:?}");
    }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Lines logged while `log` runs, through a subscriber with event format `format`.
    fn capture<F>(format: F, log: impl FnOnce()) -> Vec<String>
    where
        F: FormatEvent<
                tracing_subscriber::Registry,
                tracing_subscriber::fmt::format::DefaultFields,
            > + Send
            + Sync
            + 'static,
    {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&out);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(Arc::clone(&sink)))
            .event_format(format)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn events() {
        let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        tracing::info!(
            target: "keygate::access",
            request_id = "req-1",
            key_id = Some("partner"),
            tenant = None::<&str>,
            path = "/v1/\"quoted\"\\path\tand\u{e9}",
            status = 200u16,
            duration_ms = 0.449,
            upstream_ms = Some(12.0),
            bytes_in = 0u64,
            signed = -3i64,
            ok = true,
            client_ip = %ip,
        );
        tracing::warn!(peer = %ip, "refused after {} tries: {:?}", 3, "a \"b\"");
        tracing::error!(message = "plain message", r#type = "x");
    }

    #[test]
    fn text_lines_read_as_tracing_s_own_format_does() {
        let ours = capture(TextLines, events);
        let theirs = capture(tracing_subscriber::fmt::format::Format::default(), events);
        assert_eq!(ours.len(), 3);
        assert_eq!(ours.len(), theirs.len());
        for (ours, theirs) in ours.iter().zip(&theirs) {
            // `2026-11-26T11:27:51.759376Z`: the same shape, then the same text.
            let (ts, rest) = ours.split_at(27);
            assert!(
                ts.len() == 27 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
                "{ours}"
            );
            assert_eq!(rest, &theirs[27..]);
        }
    }
}
