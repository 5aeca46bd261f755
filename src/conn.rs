//! Per-connection guards on the client's byte stream: the keep-alive idle timeout, and the
//! HTTP/1 framing screen ([`crate::framing`]), which sees every byte read.
//!
//! [`ClientIo`] wraps a client connection's byte stream. When neither a byte has been read or
//! written for `[server] idle_timeout` nor a request is in flight ([`InFlight`]), the next
//! read reports end of stream: hyper then closes an idle HTTP/1.1 connection cleanly and ends
//! an HTTP/2 one. A request waiting on a slow upstream keeps its connection (the upstream's own
//! timeouts bound that wait), and so does its response body for as long as it flows
//! ([`InFlightBody`]): while keygate waits on the upstream for the next piece (`[upstream]
//! body_timeout` bounds that wait), and for `idle_timeout` after each piece is passed on. For
//! HTTP/1.1 the shorter of `header_timeout` and `idle_timeout` applies between requests, since
//! hyper's header timer also runs while a connection waits for its next request.
//!
//! On HTTP/2 (told by its preface, however its bytes were split: the [`FramingScreen`] joins
//! them) bytes are not activity, requests are: PINGs or SETTINGS would otherwise hold a
//! connection (and its `max_connections` slot) for ever without a request, as Envoy's idle
//! timeout counts streams, not frames. A response body the client holds back (its flow-control
//! window stays shut) passes nothing on, so it does not keep the connection either. Until its
//! first request an HTTP/2 connection has `header_timeout` instead, when that is shorter (as
//! an HTTP/1.1 head has, by hyper's header timer): a head trickled in CONTINUATION frames is
//! not a request yet.
//!
//! A write, flush or shutdown that waits for the client to take bytes fails after
//! `idle_timeout` without progress (nginx's `send_timeout`): a client that stops reading a
//! response, or an upgraded connection's, no longer holds it whatever else it sends. (Over TLS
//! the wait is often the flush's alone: rustls takes writes into its own buffer.)

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

use bytes::Bytes;
use http::Version;
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use crate::framing::FramingScreen;

/// The requests of one connection: how many keygate is waiting on (for the response head, or
/// for the next piece of the response body), and a count of their events (a start, a piece of
/// body passed on, an end), each of which is activity.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    waiting: AtomicUsize,
    events: AtomicUsize,
}

impl InFlight {
    /// Marks a request as started and waited on; it counts until the returned guard is dropped,
    /// or handed to its response body ([`InFlightBody`]).
    pub fn start(&self) -> InFlightGuard {
        let mut guard = InFlightGuard {
            counts: Arc::clone(&self.0),
            waiting: false,
        };
        guard.wait();
        guard
    }

    fn any(&self) -> bool {
        self.0.waiting.load(Ordering::Acquire) > 0
    }

    fn events(&self) -> usize {
        self.0.events.load(Ordering::Relaxed)
    }
}

/// One request; see [`InFlight::start`].
#[derive(Debug)]
pub struct InFlightGuard {
    counts: Arc<Counts>,
    /// Counted in `waiting`.
    waiting: bool,
}

impl InFlightGuard {
    /// Keygate waits on the upstream for it: the connection is not idle meanwhile.
    fn wait(&mut self) {
        if !self.waiting {
            self.waiting = true;
            self.counts.waiting.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Something was passed on: activity, and no longer waiting.
    fn progress(&mut self) {
        if self.waiting {
            self.waiting = false;
            self.counts.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        self.counts.events.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.progress();
    }
}

/// What a response body passes on at a time over HTTP/2 (its default frame size). hyper asks
/// for the next piece once the stream has window and send-buffer room for it, so each piece
/// passed on tells that the client took about this much, however large the upstream's reads
/// (up to 256 KiB: as one piece, a slow but steady reader could take longer than
/// `idle_timeout` over it).
const H2_PIECE: usize = 16 * 1024;

/// A response body that keeps its request in flight while it flows: waited on while its
/// source keeps keygate waiting (the upstream, bounded by `[upstream] body_timeout`), each
/// piece passed on counted as activity, done when it ends or is dropped. While the client
/// holds it back (a full socket, a shut HTTP/2 window) it is not polled and counts for
/// nothing: the connection's idle timeout and write stall deadline apply as to any other.
/// Over HTTP/2, data goes out in pieces of at most [`H2_PIECE`] bytes.
#[derive(Debug)]
pub struct InFlightBody<B> {
    inner: B,
    guard: InFlightGuard,
    /// The largest piece of data passed on at once.
    piece: usize,
    /// What is left of a data frame larger than `piece`.
    rest: Option<Bytes>,
}

impl<B> InFlightBody<B> {
    /// The body `inner` of the request `guard` counts, answered over `version`; its response
    /// head is ready.
    pub fn new(inner: B, mut guard: InFlightGuard, version: Version) -> InFlightBody<B> {
        guard.progress();
        let piece = if version == Version::HTTP_2 {
            H2_PIECE
        } else {
            usize::MAX
        };
        InFlightBody {
            inner,
            guard,
            piece,
            rest: None,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for InFlightBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(rest) = &mut this.rest {
            let piece = rest.split_to(this.piece.min(rest.len()));
            if rest.is_empty() {
                this.rest = None;
            }
            this.guard.progress();
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match polled {
            Poll::Pending => {
                this.guard.wait();
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame)))
                if frame.data_ref().is_some_and(|d| d.len() > this.piece) =>
            {
                this.guard.progress();
                let mut data = frame.into_data().unwrap_or_else(|_| unreachable!());
                let piece = data.split_to(this.piece);
                this.rest = Some(data);
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
            Poll::Ready(other) => {
                this.guard.progress();
                Poll::Ready(other)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(rest) = &self.rest {
            let rest = rest.len() as u64;
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + rest);
            }
            hint.set_lower(hint.lower() + rest);
        }
        hint
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
    /// How long an HTTP/2 connection may go without its first request
    /// ([`first_request_within`](Self::first_request_within)).
    first_request: Duration,
    timer: Pin<Box<Sleep>>,
    /// The waker the timer was last polled with, while that registration holds.
    registered: Option<Waker>,
    last_active: Instant,
    in_flight: InFlight,
    /// Also tells an HTTP/2 connection by its preface: its bytes are not activity, its requests
    /// are (see the module doc).
    screen: Option<FramingScreen>,
    /// Request events as of the timer's last look.
    events_seen: usize,
    /// Set while a write (or flush, or shutdown) waits for the client to take bytes: it fails
    /// at this deadline.
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
            first_request: idle,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            registered: None,
            last_active: now,
            in_flight,
            screen: None,
            events_seen: 0,
            write_stall: None,
            stalled: false,
        }
    }

    /// Hands every byte read to `screen` too.
    pub fn screened(mut self, screen: FramingScreen) -> ClientIo<T> {
        self.screen = Some(screen);
        self
    }

    /// Closes an HTTP/2 connection that has had no request within `within` (`[server]
    /// header_timeout`), when that is shorter than `idle`: a preface followed by PINGs, or a
    /// head trickled in CONTINUATION frames, is cut as an HTTP/1.1 head is (hyper's header
    /// timer), not after the longer idle timeout.
    pub fn first_request_within(mut self, within: Duration) -> ClientIo<T> {
        if within < self.idle {
            self.first_request = within;
            self.timer.as_mut().reset(self.last_active + within);
        }
        self
    }

    /// The idle limit now: `first_request` on an HTTP/2 connection that has had no request.
    fn limit(&self) -> Duration {
        if self.is_h2() && !self.in_flight.any() && self.in_flight.events() == 0 {
            self.first_request
        } else {
            self.idle
        }
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
            let due = self.last_active + self.limit();
            if due > Instant::now() {
                self.timer.as_mut().reset(due);
            } else if self.in_flight.any() || self.in_flight.events() != self.events_seen {
                // Waiting on the upstream is not idleness, and a request started, answered in
                // part or ended since the last look is activity: look again an `idle` from now.
                self.events_seen = self.in_flight.events();
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
    /// is a stall ([`ClientIo::stall`]).
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
            Poll::Pending => self.stall(cx),
            other => other,
        }
    }

    /// After a flush or shutdown: done, it ends a stall; one that must wait is a stall like a
    /// write's. A TLS stream takes writes into its own buffer and reports them written while
    /// the socket is full: what then waits on the client is its flush (or the shutdown that
    /// sends close_notify), and that wait must end too.
    fn flushed(&mut self, res: Poll<io::Result<()>>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match res {
            Poll::Ready(Ok(())) => {
                self.stalled = false;
                res
            }
            Poll::Pending => self.stall(cx),
            other => other,
        }
    }

    /// The client takes nothing: starts the stall's deadline (`idle` from now) unless it runs
    /// already, and fails once it passes.
    fn stall<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if !self.stalled {
            self.stalled = true;
            let deadline = Instant::now() + self.idle;
            match &mut self.write_stall {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.write_stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
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
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        this.flushed(res, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.flushed(res, cx)
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
    async fn a_response_body_keeps_its_connection_while_waited_on_not_while_held_back() {
        use http_body_util::{BodyExt, StreamBody};

        let (a, b) = tokio::io::duplex(64);
        let in_flight = InFlight::default();
        let mut io = ClientIo::new(a, Duration::from_millis(50), in_flight.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let source = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(Frame::data(chunk)), rx))
        });
        let mut body = InFlightBody::new(
            StreamBody::new(Box::pin(source)),
            in_flight.start(),
            Version::HTTP_2,
        );
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            io.read(&mut buf).await.unwrap()
        });
        // Waiting on its source for four times `idle`: the connection stays.
        let waited = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
        assert!(waited.is_err(), "the source had nothing to give");
        assert!(
            !reader.is_finished(),
            "closed while the body waited on its source"
        );
        // A piece passed on, and the body not asked for more (the client holds it back): the
        // connection is idle again.
        tx.send(Bytes::from_static(b"piece")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let n = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("a body held back by the client kept the connection")
            .unwrap();
        assert_eq!(n, 0);
        drop((b, tx, body));
    }

    #[tokio::test]
    async fn over_http2_a_large_data_frame_goes_out_in_pieces() {
        use http_body_util::{BodyExt, Full};

        let data = Bytes::from(vec![7u8; 2 * H2_PIECE + 100]);
        for (version, want) in [
            (Version::HTTP_2, vec![H2_PIECE, H2_PIECE, 100]),
            (Version::HTTP_11, vec![2 * H2_PIECE + 100]),
        ] {
            let in_flight = InFlight::default();
            let mut body = InFlightBody::new(Full::new(data.clone()), in_flight.start(), version);
            let mut sizes = Vec::new();
            let mut whole = Vec::new();
            while let Some(frame) = body.frame().await {
                let piece = frame.unwrap().into_data().unwrap();
                sizes.push(piece.len());
                whole.extend_from_slice(&piece);
                let left = (data.len() - whole.len()) as u64;
                assert_eq!(body.size_hint().exact(), Some(left));
                assert_eq!(body.is_end_stream(), left == 0);
            }
            assert_eq!(sizes, want, "{version:?}");
            assert_eq!(whole, data);
            drop(body);
            assert!(!in_flight.any());
        }
    }

    /// Takes every write into a buffer of its own (as a TLS stream does) and never gets it
    /// out: its flush and its shutdown wait for ever.
    struct NeverDrains;

    impl AsyncWrite for NeverDrains {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_flush_or_shutdown_the_client_never_lets_finish_fails_after_idle() {
        let idle = Duration::from_millis(50);
        let mut io = ClientIo::new(NeverDrains, idle, InFlight::default());
        io.write_all(b"taken, never sent").await.unwrap();
        let flushed = tokio::time::timeout(Duration::from_secs(5), io.flush()).await;
        let err = flushed.expect("a flush the client never lets finish still waits after 5 s");
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::TimedOut);

        let mut io = ClientIo::new(NeverDrains, idle, InFlight::default());
        io.write_all(b"taken, never sent").await.unwrap();
        let shut = tokio::time::timeout(Duration::from_secs(5), io.shutdown()).await;
        let err = shut.expect("a shutdown the client never lets finish still waits after 5 s");
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::TimedOut);
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
