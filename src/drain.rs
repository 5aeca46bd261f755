//! Graceful shutdown of served connections: the drain signal, and the wait for them to end.
//!
//! The same contract as hyper-util's `GracefulShutdown` (which this replaces): a [`Watcher`]
//! taken when a connection is accepted counts it as open; once [`Drain::shutdown`] starts, each
//! watched connection is told to shut down gracefully (hyper closes it when idle and lets the
//! request in flight finish), and `shutdown` returns when every counted connection has ended.
//!
//! Why not hyper-util's: its watcher polls a `watch::Receiver::changed` future on every poll of
//! the connection (about 200 instructions a request, measured). Here a poll loads one atomic
//! flag; the connection's waker is registered with the drain's `Notify` once, and again only
//! if the connection is polled with a waker that would not wake the same task.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
};

use hyper::body::{Body, Incoming};
use hyper_util::server::conn::auto;
use tokio::sync::{futures::OwnedNotified, Notify};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection that can be asked to finish what it is doing and close.
pub trait GracefulConnection: Future {
    /// Starts the graceful shutdown of the connection.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulConnection for auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        auto::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, E, B> GracefulConnection for auto::Connection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        auto::Connection::graceful_shutdown(self);
    }
}

#[derive(Debug, Default)]
struct State {
    /// Set once, when the drain starts; `started` is notified right after.
    draining: AtomicBool,
    started: Arc<Notify>,
    /// Watchers and watched connections alive; `ended` is notified when it drops to zero.
    open: AtomicUsize,
    ended: Notify,
}

/// The drain signal for a listener's connections.
#[derive(Debug, Default)]
pub struct Drain {
    state: Arc<State>,
}

impl Drain {
    /// A drain with no connections yet.
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Counts a connection as open (call it on accept, before any handshake).
    pub fn watcher(&self) -> Watcher {
        self.state.open.fetch_add(1, Ordering::AcqRel);
        Watcher {
            state: Arc::clone(&self.state),
        }
    }

    /// Tells every watched connection to shut down gracefully, then waits until all counted
    /// connections have ended.
    pub async fn shutdown(self) {
        self.state.draining.store(true, Ordering::Release);
        self.state.started.notify_waiters();
        loop {
            let ended = self.state.ended.notified();
            tokio::pin!(ended);
            // Registered before the count is read, so a last connection ending in between
            // still wakes this wait.
            ended.as_mut().enable();
            if self.state.open.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// One accepted connection, counted as open until it (or what it wraps) is dropped.
#[derive(Debug)]
pub struct Watcher {
    state: Arc<State>,
}

impl Watcher {
    /// Wraps the served connection; it shuts down gracefully when the drain starts.
    pub fn watch<C: GracefulConnection>(self, conn: C) -> Watched<C> {
        let started = Arc::clone(&self.state.started).notified_owned();
        Watched {
            conn: Box::pin(conn),
            started: Box::pin(started),
            registered: None,
            shutting_down: false,
            watcher: self,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if self.state.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.ended.notify_waiters();
        }
    }
}

/// A connection under a [`Drain`]; see [`Watcher::watch`].
pub struct Watched<C> {
    conn: Pin<Box<C>>,
    started: Pin<Box<OwnedNotified>>,
    /// The waker `started` was last polled with.
    registered: Option<Waker>,
    shutting_down: bool,
    watcher: Watcher,
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        if !this.shutting_down {
            if !this
                .registered
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                // Registered before the flag is read, so a drain starting in between still
                // wakes this connection. Ready means the drain has started: the flag says so.
                let _ = this.started.as_mut().poll(cx);
                this.registered = Some(cx.waker().clone());
            }
            if this.watcher.state.draining.load(Ordering::Acquire) {
                this.shutting_down = true;
                this.conn.as_mut().graceful_shutdown();
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connection that ends when asked to shut down.
    struct Idle {
        asked: bool,
    }

    impl Future for Idle {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<&'static str> {
            if self.asked {
                Poll::Ready("closed")
            } else {
                Poll::Pending
            }
        }
    }

    impl GracefulConnection for Idle {
        fn graceful_shutdown(mut self: Pin<&mut Self>) {
            self.asked = true;
        }
    }

    fn idle() -> Idle {
        Idle { asked: false }
    }

    #[tokio::test]
    async fn shutdown_asks_every_connection_and_waits_for_all_of_them() {
        let drain = Drain::new();
        let a = tokio::spawn(drain.watcher().watch(idle()));
        let b = tokio::spawn(drain.watcher().watch(idle()));
        // Accepted, still in its handshake: counted, not yet watched.
        let handshaking = drain.watcher();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let shutdown = tokio::spawn(drain.shutdown());
        assert_eq!(a.await.unwrap(), "closed");
        assert_eq!(b.await.unwrap(), "closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!shutdown.is_finished(), "returned with a connection open");
        // Watched after the drain started: shuts down on its first poll.
        assert_eq!(handshaking.watch(idle()).await, "closed");
        tokio::time::timeout(Duration::from_secs(1), shutdown)
            .await
            .expect("the drain ended")
            .unwrap();
    }

    #[tokio::test]
    async fn a_drain_without_connections_ends_at_once() {
        let drain = Drain::new();
        drop(drain.watcher());
        tokio::time::timeout(Duration::from_secs(1), drain.shutdown())
            .await
            .unwrap();
    }
}
