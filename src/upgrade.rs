//! WebSocket and other HTTP/1.1 `Upgrade` requests, passed through after the key check.
//!
//! An upgrade request is authenticated, limited and rewritten like any other (so the key is
//! stripped); only its `Connection: upgrade` and `Upgrade` fields, hop-by-hop by nature, are put
//! back before it goes upstream. When the upstream answers `101 Switching Protocols`, both
//! connections are taken over from hyper and spliced together, bytes copied both ways until
//! either side closes, or until no byte has gone either way for `[server] idle_timeout`: an
//! upgraded connection with no traffic at all (not even pings) is closed like any idle
//! connection, whatever the upstream does.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{header, HeaderMap, HeaderValue, Request};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use crate::upstream::Upgraded;

/// The `Upgrade` value of an HTTP/1.1 request that asks to switch protocols, if it does.
pub fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    // `Upgrade` first: most requests have none, and then `Connection` need not be read.
    let mut values = req.headers().get_all(header::UPGRADE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| value.clone())
}

/// Puts the upgrade fields back after the hop-by-hop headers were stripped.
pub fn restore(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// After a `101` from the upstream: waits for the client side to hand over its connection and
/// copies bytes between the two in a task of its own, which the connection's task then waits
/// for ([`crate::proxy::ConnInfo::splice`]). When no byte has gone either way for `idle`
/// (`[server] idle_timeout`, as nginx's `proxy_read_timeout` bounds a WebSocket), both sides
/// are closed: a silent client no longer keeps its slot behind an upstream that never closes
/// (the client side alone only ends the client's half).
pub fn splice(
    client: OnUpgrade,
    upstream: Upgraded,
    request_id: HeaderValue,
    idle: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let rid = request_id.to_str().unwrap_or("-").to_string();
        let client = match client.await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(request_id = rid, "upgrade failed: {e}");
                return;
            }
        };
        let activity = Activity::new();
        let mut client = Active::new(TokioIo::new(client), &activity);
        let mut upstream = Active::new(upstream, &activity);
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
                Ok((up, down)) => {
                    tracing::debug!(request_id = rid, up, down, "upgraded connection closed")
                }
                Err(e) => tracing::debug!(request_id = rid, "upgraded connection ended: {e}"),
            },
            () = activity.idle_for(idle) => {
                tracing::debug!(request_id = rid, "upgraded connection idle for {idle:?}: closed")
            }
        }
    })
}

/// When a byte last went either way through a splice.
struct Activity {
    start: Instant,
    /// Milliseconds from `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Returns once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let due = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One side of a splice, each byte read or written through it counted as activity.
struct Active<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T> Active<T> {
    fn new(io: T, activity: &Arc<Activity>) -> Self {
        Active {
            io,
            activity: Arc::clone(activity),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http11_requests_that_list_upgrade_in_connection_ask_to_switch() {
        let ws = Request::get("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert_eq!(requested(&ws).unwrap(), "websocket");
        let no_connection = Request::get("/")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(requested(&no_connection).is_none());
        let h2 = Request::get("/")
            .version(http::Version::HTTP_2)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(requested(&h2).is_none());
        let two = Request::get("/")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("upgrade", "h2c")
            .body(())
            .unwrap();
        assert!(requested(&two).is_none());
    }
}
