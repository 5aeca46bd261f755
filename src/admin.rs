//! The admin listener (`[admin] listen`): health, readiness and metrics for the platform.
//!
//! Plain HTTP on its own address, never the partner-facing one, no API key:
//! - `GET /healthz`: 200 `ok` while the process serves;
//! - `GET /readyz`: 200 `{"status":"ready"}`, or 503 `{"status":"not_ready","reason":…}` when the
//!   last upstream probe failed or keygate is shutting down ([`crate::health`]);
//! - `GET /metrics`: the Prometheus exposition ([`crate::metrics`]).
//!
//! It keeps answering while the partner listener drains, and stops after it.
//!
//! Its connections are bounded like the partner listener's, if more simply: at most
//! [`MAX_CONNECTIONS`] at once (more wait in the backlog), closed after `[server]
//! header_timeout` without a byte from the client, and kept at most [`CONNECTION_LIFETIME`]
//! (a scraper reconnects), so a peer
//! that opens connections and sends nothing cannot hold descriptors the partner listener
//! needs.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
    task::JoinHandle,
};

use crate::{
    conn::{ClientIo, InFlight},
    drain::Drain,
    error::json_string,
    health::Readiness,
    proxy::Shared,
};

/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest an admin connection is kept (a Prometheus scrape takes milliseconds).
pub const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(300);

/// The running admin listener.
#[derive(Debug)]
pub struct Admin {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Admin {
    /// Binds `listen` and starts answering.
    pub async fn start(
        listen: SocketAddr,
        shared: Arc<Shared>,
        readiness: Arc<Readiness>,
    ) -> anyhow::Result<Admin> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for [admin]: {e}"))?;
        let local_addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        // Taken now, not when the task first runs: a reload in between must not change it.
        let header_timeout = shared.live.load().config.server.header_timeout;
        let task = tokio::spawn(serve(listener, shared, readiness, header_timeout, stop_rx));
        tracing::info!("admin endpoints (/healthz /readyz /metrics) on http://{local_addr}");
        Ok(Admin {
            local_addr,
            stop,
            task,
        })
    }

    /// The address the admin listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits (briefly) for open admin requests.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    readiness: Arc<Readiness>,
    header_timeout: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let drain = Drain::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A head trickled a byte at a time is cut at `header_timeout` too: 64 such connections
    // would otherwise hold every admin slot, and the probes of `/readyz` wait behind them.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let readiness = Arc::clone(&readiness);
        let service = service_fn(move |req| {
            let resp = answer(&shared, &readiness, &req);
            async move { Ok::<_, Infallible>(resp) }
        });
        // Closed once it has sent nothing for `header_timeout` (answers take no time here).
        let io = ClientIo::new(stream, header_timeout, InFlight::default());
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let conn = drain.watcher().watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain.shutdown()).await;
}

/// Answers one admin request.
fn answer(
    shared: &Shared,
    readiness: &Readiness,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match readiness.check() {
            Ok(()) => reply(
                StatusCode::OK,
                "application/json",
                "{\"status\":\"ready\"}".into(),
            ),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                format!(
                    "{{\"status\":\"not_ready\",\"reason\":{}}}",
                    json_string(&why)
                ),
            ),
        },
        "/metrics" => {
            let live = shared.live.load();
            reply(
                StatusCode::OK,
                crate::metrics::CONTENT_TYPE,
                shared.metrics.encode(&live.table, shared.limits.mode()),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
