//! Body guards: a size limit and an idle timeout on a streamed body.
//!
//! [`GuardedBody`] wraps a body on its way through keygate. It ends the stream with an error
//!
//! - before yielding a frame that would take the body past `limit` bytes, so nothing beyond
//!   the limit is ever passed on (the request body, for `max_body`: the client gets a 413);
//! - when the inner body has kept keygate waiting for `idle` with nothing to pass on (both
//!   directions, `[upstream] body_timeout`). Time the *reader* spends not asking for data, such
//!   as a slow client applying back-pressure, is not counted.
//!
//! Why the stream ended is recorded in a shared [`BodyOutcome`], so the request path can tell a
//! 413 from an upstream failure after the upstream call returns an error.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Why a guarded body was cut short.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body passed its size limit.
    #[error("body exceeds the {limit}-byte limit")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// Nothing arrived for the idle timeout.
    #[error("body stalled for {0:?}")]
    Idle(Duration),
    /// The inner body failed (the peer reset or closed mid-body).
    #[error("body failed: {0}")]
    Inner(Box<dyn std::error::Error + Send + Sync>),
}

/// How a guarded body ended, shared with the code that started it.
/// Zero while the body is whole or still streaming.
#[derive(Debug, Default)]
pub struct BodyOutcome {
    state: AtomicU8,
    /// Bytes passed on so far (what the access log calls `bytes_in` for a request body).
    bytes: AtomicU64,
}

const TOO_LARGE: u8 = 1;
const IDLE: u8 = 2;
const BROKEN: u8 = 3;

impl BodyOutcome {
    /// Whether the body was cut at its size limit.
    pub fn too_large(&self) -> bool {
        self.state.load(Ordering::Acquire) == TOO_LARGE
    }

    /// Bytes of the body passed on so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the body was cut for stalling.
    pub fn idle(&self) -> bool {
        self.state.load(Ordering::Acquire) == IDLE
    }

    /// Whether the inner body failed (its sender reset or closed mid-body).
    pub fn broken(&self) -> bool {
        self.state.load(Ordering::Acquire) == BROKEN
    }

    fn set(&self, v: u8) {
        self.state.store(v, Ordering::Release);
    }
}

/// A body with a size limit and an idle timeout; see the module doc.
pub struct GuardedBody<B> {
    inner: B,
    limit: Option<u64>,
    seen: u64,
    idle: Duration,
    /// Made on the first wait, so a body that never waits costs no timer.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    outcome: Arc<BodyOutcome>,
    done: bool,
}

impl<B> GuardedBody<B> {
    /// Wraps `inner`: at most `limit` bytes (`None`: no limit), at most `idle` of waiting.
    pub fn new(inner: B, limit: Option<u64>, idle: Duration) -> GuardedBody<B> {
        GuardedBody {
            inner,
            limit,
            seen: 0,
            idle,
            timer: None,
            waiting: false,
            outcome: Arc::new(BodyOutcome::default()),
            done: false,
        }
    }

    /// The wrapped body.
    pub fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// The shared record of how this body ended.
    pub fn outcome(&self) -> Arc<BodyOutcome> {
        Arc::clone(&self.outcome)
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                let frame = match frame {
                    None => return Poll::Ready(None),
                    Some(Err(e)) => {
                        this.done = true;
                        this.outcome.set(BROKEN);
                        return Poll::Ready(Some(Err(BodyError::Inner(e.into()))));
                    }
                    Some(Ok(frame)) => frame,
                };
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if let Some(limit) = this.limit.filter(|&limit| this.seen > limit) {
                        this.done = true;
                        this.outcome.set(TOO_LARGE);
                        return Poll::Ready(Some(Err(BodyError::TooLarge { limit })));
                    }
                    this.outcome.bytes.store(this.seen, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if !this.waiting {
                    this.waiting = true;
                    timer.as_mut().reset(Instant::now() + idle);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.done = true;
                    this.outcome.set(IDLE);
                    return Poll::Ready(Some(Err(BodyError::Idle(this.idle))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn a_body_within_the_limit_passes_whole() {
        let body = GuardedBody::new(
            Full::new(Bytes::from_static(b"hello")),
            Some(5),
            Duration::from_secs(1),
        );
        let outcome = body.outcome();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert!(!outcome.too_large() && !outcome.idle());
    }

    #[tokio::test]
    async fn the_frame_that_crosses_the_limit_is_never_passed_on() {
        let chunks = ["aaaa", "bbbb", "cccc"].map(|c| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes())))
        });
        let body = GuardedBody::new(
            StreamBody::new(futures_util::stream::iter(chunks)),
            Some(10),
            Duration::from_secs(1),
        );
        let outcome = body.outcome();
        let mut body = std::pin::pin!(body);
        let mut passed = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => passed.extend_from_slice(f.data_ref().unwrap()),
                Err(e) => {
                    assert!(matches!(e, BodyError::TooLarge { limit: 10 }));
                    break;
                }
            }
        }
        assert_eq!(passed, b"aaaabbbb");
        assert!(outcome.too_large());
    }

    #[tokio::test]
    async fn a_stalled_body_ends_with_an_error_after_the_idle_timeout() {
        let stalled = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        let body = GuardedBody::new(stalled, None, Duration::from_millis(50));
        let outcome = body.outcome();
        let err = body.collect().await.unwrap_err();
        assert!(matches!(err, BodyError::Idle(_)));
        assert!(outcome.idle());
    }
}
