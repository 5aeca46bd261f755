//! The access log line and the request metrics, written once per request when its response
//! body is finished (or dropped: a client that goes away mid-body still gets its line; one that
//! goes away before the response head gets status 499, see `proxy::Pending`).
//!
//! Bytes are counted on the way through: the request body's by its guard
//! ([`GuardedBody`](crate::body::GuardedBody), whose [`BodyOutcome`] the record holds), the
//! response body's by [`LoggedBody`], which owns the [`AccessRecord`] and writes it on drop.
//! Nothing is buffered.
//!
//! Fields of the line (target `keygate::access`), the same in text and json:
//! `request_id`, `key_id`, `tenant`, `method`, `path` (never the query string), `status`,
//! `duration_ms` (head to last body byte), `upstream_ms` (until the upstream's response head;
//! absent when nothing was forwarded), `bytes_in` (request body bytes forwarded), `bytes_out`
//! (response body bytes sent), `client_ip` (the peer address). No key, hash or `Authorization`
//! value is ever part of it.

use std::{
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Buf;
use http::{HeaderValue, Method, Uri};
use hyper::body::{Body, Frame, SizeHint};

use crate::{
    body::{BodyError, BodyOutcome},
    keys::KeyEntry,
    metrics::{Metrics, UpstreamErrorKind},
    upstream::UpstreamError,
};

/// The `tracing` target of access lines.
pub const TARGET: &str = "keygate::access";

/// The fields every json access line carries (missing values are `null`).
pub const FIELDS: [&str; 12] = [
    "ts",
    "request_id",
    "key_id",
    "tenant",
    "method",
    "path",
    "status",
    "duration_ms",
    "upstream_ms",
    "bytes_in",
    "bytes_out",
    "client_ip",
];

/// What the access line and the request metrics need, gathered along the request path.
#[derive(Debug)]
pub struct AccessRecord {
    /// When the request head arrived.
    pub start: Instant,
    /// The request id (the client's when sane, else made).
    pub request_id: HeaderValue,
    /// The key, once it is known (admitted or rate-limited).
    pub key: Option<Arc<KeyEntry>>,
    /// The request method.
    pub method: Method,
    /// The request target as received (only its path is logged).
    pub uri: Uri,
    /// The response status sent.
    pub status: u16,
    /// Time to the upstream's response head; `None` when nothing was forwarded.
    pub upstream: Option<Duration>,
    /// The forwarded request body's record (its byte count is `bytes_in`).
    pub bytes_in: Option<Arc<BodyOutcome>>,
    /// The client's address.
    pub client_ip: IpAddr,
    /// Where the request is counted.
    pub metrics: Arc<Metrics>,
}

impl AccessRecord {
    /// Writes the access line and records the request metrics.
    pub fn finish(&self, bytes_out: u64) {
        let duration = self.start.elapsed();
        let key_id = self.key.as_ref().map(|k| &k.id);
        let counters = self.key.as_ref().map(|k| &k.counters);
        self.metrics.request_done(counters, self.status, duration);
        tracing::info!(
            target: TARGET,
            request_id = self.request_id.to_str().unwrap_or("-"),
            key_id = key_id.map(|k| &**k),
            tenant = self.key.as_ref().and_then(|k| k.tenant.as_deref()),
            method = self.method.as_str(),
            path = self.uri.path(),
            status = self.status,
            duration_ms = millis(duration),
            upstream_ms = self.upstream.map(millis),
            bytes_in = self.bytes_in.as_ref().map_or(0, |b| b.bytes()),
            bytes_out,
            client_ip = %self.client_ip,
        );
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// A response body that counts what it sends and writes the access line when it is done.
#[derive(Debug)]
pub struct LoggedBody<B> {
    inner: B,
    bytes_out: u64,
    record: AccessRecord,
}

impl<B> LoggedBody<B> {
    /// Wraps the response body `inner`; `record` is written when the body is dropped.
    pub fn new(inner: B, record: AccessRecord) -> Self {
        LoggedBody {
            inner,
            bytes_out: 0,
            record,
        }
    }
}

impl<B> Body for LoggedBody<B>
where
    B: Body + Unpin,
    B::Error: AsRef<dyn std::error::Error + Send + Sync>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes_out += data.remaining() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(kind) = upstream_fault(e.as_ref()) {
                    self.record.metrics.upstream_error(kind);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whose fault a streamed response's failure is: the upstream's (it broke off, or stalled past
/// `body_timeout`), or the client's, whose request body was still being sent beside the answer
/// (too large, stalled, cut off): not an upstream error then.
fn upstream_fault(
    e: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<UpstreamErrorKind> {
    match e.downcast_ref::<BodyError>() {
        Some(BodyError::Idle(_)) => Some(UpstreamErrorKind::Timeout),
        Some(BodyError::Inner(inner)) => match inner.downcast_ref::<UpstreamError>() {
            Some(UpstreamError::Body(_)) => None,
            _ => Some(UpstreamErrorKind::Reset),
        },
        Some(BodyError::TooLarge { .. }) => None,
        None => Some(UpstreamErrorKind::Reset),
    }
}

impl<B> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        self.record.finish(self.bytes_out);
    }
}
