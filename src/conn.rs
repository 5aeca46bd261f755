//! Per-connection guards on the client's byte stream: the keep-alive idle timeout, and the
//! HTTP/1 framing screen ([`crate::framing`]), which sees every byte read.
//!
//! [`ClientIo`] wraps a client connection's byte stream. When neither a byte has been read or
//! written for `[server] idle_timeout` nor a request is in flight ([`InFlight`]), the next
//! read reports end of stream: hyper then closes an idle HTTP/1.1 connection cleanly and ends
//! an HTTP/2 one. A request waiting on a slow upstream keeps its connection (the upstream's own
//! timeouts bound that wait). For HTTP/1.1 the shorter of `header_timeout` and `idle_timeout`
//! applies between requests, since hyper's header timer also runs while a connection waits for
//! its next request.
//!
//! On HTTP/2 (told by its preface, however its bytes were split: the [`FramingScreen`] joins
//! them) bytes are not activity, requests are: PINGs or SETTINGS would otherwise hold a
//! connection (and its `max_connections` slot) for ever without a request, as Envoy's idle
//! timeout counts streams, not frames.
//!
//! A write that waits for the client to take bytes fails after `idle_timeout` without
//! progress (nginx's `send_timeout`): a client that stops reading a response, or an upgraded
//! connection's, no longer holds it whatever else it sends.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use crate::framing::FramingScreen;

/// Requests of one connection that are being handled (from the head read to the response
/// head), and how many have started in all.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    now: AtomicUsize,
    started: AtomicUsize,
}

impl InFlight {
    /// Marks a request as started; it counts until the returned guard is dropped.
    pub fn start(&self) -> InFlightGuard {
        self.0.now.fetch_add(1, Ordering::AcqRel);
        self.0.started.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(Arc::clone(&self.0))
    }

    fn any(&self) -> bool {
        self.0.now.load(Ordering::Acquire) > 0
    }

    fn started(&self) -> usize {
        self.0.started.load(Ordering::Relaxed)
    }
}

/// One request in flight; see [`InFlight::start`].
#[derive(Debug)]
pub struct InFlightGuard(Arc<Counts>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client byte stream that ends itself after `idle` without traffic or requests in flight,
/// and hands what it reads to a [`FramingScreen`].
///
/// Traffic only records the time (`touch`); the timer is moved when it fires,
/// to `idle` after the last traffic, rather than on every read and write (resetting a tokio
/// timer converts the deadline to a wheel tick and updates the entry: too much for each of the
/// several reads and writes of every request). The connection still ends exactly `idle` after
/// its last byte, at timer granularity.
///
/// Likewise a read that must wait polls the timer only when it may have fired or the waker has
/// changed: a timer keeps the waker it was last polled with until it fires, so re-polling it
/// with the same waker (each pending read, several a request) would only register it again.
#[derive(Debug)]
pub struct ClientIo<T> {
    inner: T,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// The waker the timer was last polled with, while that registration holds.
    registered: Option<Waker>,
    last_active: Instant,
    in_flight: InFlight,
    /// Also tells an HTTP/2 connection by its preface: its bytes are not activity, its requests
    /// are (see the module doc).
    screen: Option<FramingScreen>,
    /// Requests started as of the timer's last look.
    requests_seen: usize,
    /// Set while a write waits for the client to take bytes: it fails at this deadline.
    write_stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

impl<T> ClientIo<T> {
    /// Wraps `inner`; `in_flight` is shared with the connection's request handler.
    pub fn new(inner: T, idle: Duration, in_flight: InFlight) -> ClientIo<T> {
        let now = Instant::now();
        ClientIo {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            registered: None,
            last_active: now,
            in_flight,
            screen: None,
            requests_seen: 0,
            write_stall: None,
            stalled: false,
        }
    }

    /// Hands every byte read to `screen` too.
    pub fn screened(mut self, screen: FramingScreen) -> ClientIo<T> {
        self.screen = Some(screen);
        self
    }

    fn touch(&mut self) {
        self.last_active = Instant::now();
    }

    fn is_h2(&self) -> bool {
        self.screen.as_ref().is_some_and(FramingScreen::is_h2)
    }

    /// Whether the connection has been idle for `idle` with no request in flight; re-arms the
    /// timer (and registers `cx`) otherwise.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let same_waker = self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if same_waker && !self.timer.is_elapsed() {
            return false;
        }
        self.registered = Some(cx.waker().clone());
        while self.timer.as_mut().poll(cx).is_ready() {
            let due = self.last_active + self.idle;
            if due > Instant::now() {
                self.timer.as_mut().reset(due);
            } else if self.in_flight.any() || self.in_flight.started() != self.requests_seen {
                // Waiting on the upstream is not idleness, and a request since the last look
                // is activity: look again an `idle` from now.
                self.requests_seen = self.in_flight.started();
                self.touch();
            } else {
                return true;
            }
        }
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(res) => {
                if buf.filled().len() > before {
                    let read = &buf.filled()[before..];
                    if let Some(screen) = &mut this.screen {
                        screen.scan(read);
                    }
                    if !this.is_h2() {
                        this.touch();
                    }
                }
                Poll::Ready(res)
            }
            Poll::Pending => {
                if this.expired(cx) {
                    tracing::debug!("closing a connection idle for {:?}", this.idle);
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl<T> ClientIo<T> {
    /// After a write: progress is activity (on HTTP/1) and ends a stall; a write that must wait
    /// starts the stall's deadline, and fails once it passes.
    fn wrote(
        &mut self,
        res: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match res {
            Poll::Ready(Ok(n)) if n > 0 => {
                if !self.is_h2() {
                    self.touch();
                }
                self.stalled = false;
                res
            }
            Poll::Pending => {
                if !self.stalled {
                    self.stalled = true;
                    let deadline = Instant::now() + self.idle;
                    match &mut self.write_stall {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => {
                            self.write_stall = Some(Box::pin(tokio::time::sleep_until(deadline)))
                        }
                    }
                }
                let timer = self
                    .write_stall
                    .as_mut()
                    .expect("armed when the stall began");
                if timer.as_mut().poll(cx).is_ready() {
                    tracing::debug!(
                        "closing a connection whose client took nothing for {:?}",
                        self.idle
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(res, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(res, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_idle_stream_reads_as_ended_but_not_while_a_request_is_in_flight() {
        let (a, mut b) = tokio::io::duplex(64);
        let in_flight = InFlight::default();
        let mut io = ClientIo::new(a, Duration::from_millis(50), in_flight.clone());
        b.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);

        let guard = in_flight.start();
        let started = Instant::now();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let n = io.read(&mut buf).await.unwrap();
            (n, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !reader.is_finished(),
            "closed while a request was in flight"
        );
        drop(guard);
        let (n, ended) = reader.await.unwrap();
        assert_eq!(n, 0);
        assert!(ended - started >= Duration::from_millis(200));
        drop(b);
    }

    #[tokio::test]
    async fn traffic_postpones_the_close_until_idle_after_the_last_byte() {
        let (a, mut b) = tokio::io::duplex(64);
        let idle = Duration::from_millis(80);
        let mut io = ClientIo::new(a, idle, InFlight::default());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let mut last_byte = Instant::now();
            loop {
                match io.read(&mut buf).await.unwrap() {
                    0 => return (last_byte, Instant::now()),
                    _ => last_byte = Instant::now(),
                }
            }
        });
        // A byte every 30 ms for 300 ms: well past `idle` in all, never `idle` apart.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            b.write_all(b"x").await.unwrap();
        }
        let (last_byte, ended) = reader.await.unwrap();
        assert!(
            ended - last_byte >= idle,
            "closed {:?} after the last byte",
            ended - last_byte
        );
        drop(b);
    }
}
