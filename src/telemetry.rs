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

/// Lines the log thread may have queued before logging waits for it. The queue's slots are
/// allocated and written when it is made (32 bytes each): tracing-appender's default of
/// 128,000 cost 4 MiB of resident memory on an idle gateway; 8,192 is a seventh of a second of
/// access lines at 60,000 requests/s.
const QUEUED_LINES: usize = 8192;

/// Installs the global subscriber as `[log]` says; call once, from the binary, and keep the
/// returned guard until exit: dropping it writes out the lines still queued.
///
/// Lines are formatted where they are logged and written to stderr by a thread of its own,
/// which writes whatever has queued up in one go (a `BufWriter` flushed whenever the queue runs
/// empty): under load many access lines share one write(2) instead of costing one each on the
/// request path. Nothing is dropped: when `QUEUED_LINES` are queued, logging waits.
pub fn init_with(log: &LogConfig) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},{RUSTLS_LEVEL}", log.level.as_str())));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
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
        line.extend(std::iter::repeat_n(' ', 5usize.saturating_sub(level.len())));
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
    out.extend(std::iter::repeat_n('0', 6 - digits.len()));
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
        match json_line(event) {
            Some(line) => writer.write_str(&line),
            None => writeln!(writer, "{}", Value::Object(json_object(event))),
        }
    }
}

/// One event as a JSON line, written straight out (what [`json_object`] would hold, in its
/// order); `None` when the fields come in a way only the map can order (a name twice, an
/// access field out of order or unknown), so [`json_object`] does it. Building the map cost an
/// access line ~31,000 instructions, more than the request it logs.
fn json_line(event: &Event<'_>) -> Option<String> {
    let meta = event.metadata();
    let mut out = String::with_capacity(384);
    out.push_str("{\"ts\":\"");
    timestamp(&mut out);
    out.push_str("\",\"level\":\"");
    out.push_str(meta.level().as_str());
    out.push_str("\",\"target\":");
    json_str(&mut out, meta.target());
    let slots: &[&str] = if meta.target() == access::TARGET {
        &access::FIELDS[1..]
    } else {
        &[]
    };
    let mut stream = JsonStream {
        out: &mut out,
        slots,
        next: 0,
        names: Vec::new(),
        ok: true,
    };
    event.record(&mut stream);
    if !stream.ok {
        return None;
    }
    for slot in &slots[stream.next..] {
        stream.key(slot);
        stream.out.push_str("null");
    }
    out.push_str("}\n");
    Some(out)
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it.
fn json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&Value::from(s).to_string());
    }
}

/// Writes fields as JSON members; for an access line, `slots` (the fields every access line
/// carries, in order) are filled in that order, with `null` for those not recorded.
struct JsonStream<'a> {
    out: &'a mut String,
    slots: &'static [&'static str],
    /// The first slot not written yet.
    next: usize,
    /// Names written, when there are no slots (a name twice goes to the map).
    names: Vec<&'static str>,
    ok: bool,
}

impl JsonStream<'_> {
    /// Writes `,"name":`, and the nulls of the slots before it; false if it cannot go here.
    fn field(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.slots.is_empty() {
            if self.names.contains(&name) {
                self.ok = false;
                return false;
            }
            self.names.push(name);
        } else {
            match self.slots[self.next..].iter().position(|s| *s == name) {
                Some(skip) => {
                    for slot in &self.slots[self.next..self.next + skip] {
                        self.key(slot);
                        self.out.push_str("null");
                    }
                    self.next += skip + 1;
                }
                None => {
                    self.ok = false;
                    return false;
                }
            }
        }
        self.key(name);
        true
    }

    fn key(&mut self, name: &str) {
        self.out.push(',');
        json_str(self.out, name);
        self.out.push(':');
    }
}

impl tracing::field::Visit for JsonStream<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.field(field) {
            if value.is_finite() {
                self.out.push_str(ryu::Buffer::new().format_finite(value));
            } else {
                self.out.push_str("null");
            }
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.field(field) {
            self.out.push_str(itoa::Buffer::new().format(value));
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.field(field) {
            self.out.push_str(itoa::Buffer::new().format(value));
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.field(field) {
            self.out.push_str(if value { "true" } else { "false" });
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.field(field) {
            json_str(self.out, value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.field(field) {
            json_str(self.out, &format!("{value:?}"));
        }
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

/// Log lines captured in memory, for the tests of this module and others (`certs`).
#[cfg(test)]
pub(crate) mod capture {
    use std::sync::{Arc, Mutex};

    /// Everything written through it (a `MakeWriter`: each writer appends to the same buffer).
    #[derive(Clone, Default)]
    pub struct LogSink(Arc<Mutex<Vec<u8>>>);

    impl LogSink {
        /// What was written so far.
        pub fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for LogSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
        type Writer = LogSink;
        fn make_writer(&'a self) -> LogSink {
            self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use std::sync::{Arc, Mutex};

    use super::{capture::LogSink, *};

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
        let sink = LogSink::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(sink.clone())
            .event_format(format)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        sink.text().lines().map(str::to_string).collect()
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

    /// Access lines as `access::AccessRecord::finish` logs them: one whole, one with no key
    /// and nothing forwarded.
    fn access_events() {
        let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        for (key_id, tenant, upstream) in [
            (Some("partner"), Some("hotel-\"1\""), Some(0.372)),
            (None, None, None),
        ] {
            tracing::info!(
                target: "keygate::access",
                request_id = "req-1",
                key_id,
                tenant,
                method = "GET",
                path = "/v1/guests",
                status = 200u16,
                duration_ms = 0.449,
                upstream_ms = upstream,
                bytes_in = 0u64,
                bytes_out = 11u64,
                client_ip = %ip,
            );
        }
    }

    #[test]
    fn json_lines_written_straight_out_match_the_map() {
        let both = || {
            access_events();
            events();
        };
        let streamed = capture(JsonLines, both);
        assert_eq!(streamed.len(), 5);
        let mapped = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&mapped);
        let subscriber = tracing_subscriber::registry().with(MapLayer(sink));
        tracing::subscriber::with_default(subscriber, both);
        let mapped = mapped.lock().unwrap();
        // Written straight out but for the access line with fields of its own (the map's).
        let straight: Vec<bool> = mapped.iter().map(|(s, _)| *s).collect();
        assert_eq!(straight, [true, true, false, true, true]);
        for (line, (_, map)) in streamed.iter().zip(mapped.iter()) {
            let mut ours: Value = serde_json::from_str(line).unwrap();
            let mut theirs = Value::Object(map.clone());
            assert!(ours["ts"].as_str().unwrap().ends_with('Z'), "{line}");
            ours["ts"] = Value::Null;
            theirs["ts"] = Value::Null;
            // Same members, same order, same values.
            assert_eq!(ours.to_string(), theirs.to_string());
        }
        // An access line names every access field, in order, null where absent.
        let access: Value = serde_json::from_str(&streamed[1]).unwrap();
        let names: Vec<&str> = access
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(names[..3], ["ts", "level", "target"]);
        assert_eq!(names[3..], access::FIELDS[1..]);
        assert!(access["key_id"].is_null() && access["upstream_ms"].is_null());
        let whole: Value = serde_json::from_str(&streamed[0]).unwrap();
        assert_eq!(whole["tenant"], "hotel-\"1\"");
        assert_eq!(whole["upstream_ms"], 0.372);
    }

    /// Records, for each event, whether it is written straight out and its [`json_object`],
    /// the map the streamed lines must match.
    type Mapped = Arc<Mutex<Vec<(bool, Map<String, Value>)>>>;
    struct MapLayer(Mapped);

    impl<S: Subscriber> tracing_subscriber::Layer<S> for MapLayer {
        fn on_event(&self, event: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            let straight = json_line(event).is_some();
            self.0.lock().unwrap().push((straight, json_object(event)));
        }
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
