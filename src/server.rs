//! The accept loop, connection serving and graceful shutdown.
//!
//! [`Gateway::start_on`] takes a bound listener (tests bind `127.0.0.1:0`), serves HTTP/1.1 and
//! HTTP/2 (over TLS when configured, chosen by ALPN; h2c prior knowledge on plain listeners),
//! and starts the reload watcher. Accept errors (such as running out of file descriptors) are
//! logged and retried after a short back-off instead of ending the loop.
//!
//! It also starts what operations need: the admin listener ([`crate::admin`]) when `[admin]` is
//! set, the upstream readiness probe ([`crate::health`]) and, on TLS listeners, the certificate
//! watcher ([`crate::certs`]). [`Gateway::shutdown`] marks the gateway not ready, stops
//! accepting, closes idle keep-alive connections and lets requests in flight finish within the
//! grace period; the admin listener answers until the drain is over.
//!
//! Limits from `[server]` (read once at start): at most `max_connections` connections are
//! served at once (the loop stops accepting until one ends, so later ones wait in the listen
//! backlog); a request head must arrive within `header_timeout` and fit `max_header_bytes` /
//! `max_headers` (431 beyond); idle connections end after `idle_timeout` ([`conn`](crate::conn));
//! HTTP/2 connections get `h2_max_streams` concurrent streams and hyper's reset-flood guard.
//! With `proxy_protocol`, connections from `trusted_proxies` start with a PROXY v2 header.
//! Each connection is its own task: a panic in one ends that connection only.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{watch, Semaphore},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    admin::Admin,
    certs::{CertStore, ConfiguredCerts},
    client_ip,
    config::{Config, ServerConfig},
    conn::{ClientIo, InFlight, InFlightBody},
    drain::{Drain, Watcher},
    framing::FramingScreen,
    health::{self, Readiness},
    metrics::Metrics,
    proxy::{self, ConnInfo, Live, Shared},
    reload,
    store::Limits,
    timers::TimerPool,
    tls, upstream,
};

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's own HTTP/1.1 limit on header fields, applied when none is set. Setting the same
/// value explicitly would make hyper size its two parse arrays at run time (a `SmallVec`
/// filled slot by slot on every request head, ~1,700 instructions a request) instead of
/// using its fixed inline arrays, for the same limit and the same 431.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;
/// Streams an HTTP/2 client may reset before the server reads them, before it is sent away
/// (the CVE-2023-44487 "rapid reset" guard; hyper's default, pinned here).
const H2_MAX_PENDING_RESETS: usize = 20;

/// A running gateway: its listener, reload watcher and connections.
pub struct Gateway {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
    readiness: Arc<Readiness>,
    admin: Option<Admin>,
    certs: Option<Arc<CertStore>>,
}

impl Gateway {
    /// Binds `server.listen` and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        Gateway::start_live(Live::new(config, None)).await
    }

    /// Binds `server.listen` and starts serving `live`: a config whose keys are already in its
    /// table (`keygate run` streams the keys file straight into one, as a reload does).
    pub async fn start_live(live: Live) -> anyhow::Result<Gateway> {
        let listen = live.config.server.listen;
        let listener =
            bind(listen).map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        Gateway::start_on_live(listener, live).await
    }

    /// Starts serving on an already bound listener.
    pub async fn start_on(listener: TcpListener, config: Config) -> anyhow::Result<Gateway> {
        Gateway::start_on_live(listener, Live::new(config, None)).await
    }

    async fn start_on_live(listener: TcpListener, live: Live) -> anyhow::Result<Gateway> {
        let config = Arc::clone(&live.config);
        let certs = ConfiguredCerts::load(&config)?;
        let acceptor = match &certs.listener {
            Some(c) => Some(TlsAcceptor::from(tls::server_config_with_resolver(
                c.clone(),
            )?)),
            None => None,
        };
        let local_addr = listener.local_addr()?;
        let client = upstream::client(&config.upstream, certs.upstream_client.clone());
        let admin_listen = config.admin.as_ref().map(|a| a.listen);
        let (stop, stop_rx) = watch::channel(None);
        let limits = Limits::start(config.limit_store.as_ref(), stop_rx.clone()).await?;
        let shared = Arc::new(Shared {
            live: ArcSwap::from_pointee(live),
            limits,
            client,
            metrics: Arc::new(Metrics::new()),
            timers: TimerPool::default(),
        });
        let readiness = Arc::new(Readiness::default());
        reload::spawn(Arc::clone(&shared), stop_rx.clone())?;
        for store in certs.iter() {
            store.spawn_watcher(Arc::clone(&shared.metrics), stop_rx.clone())?;
        }
        // Readiness is only reported by the admin listener: no probes unless one is asked for.
        if admin_listen.is_some() {
            health::spawn(Arc::clone(&shared), Arc::clone(&readiness), stop_rx.clone());
        }
        // The `[server]` this started with, taken now: a reload landing before the task first
        // runs must not hand it restart-only values.
        let task = tokio::spawn(accept_loop(
            listener,
            acceptor,
            Arc::new(config.server.clone()),
            Arc::clone(&shared),
            stop_rx,
        ));
        tracing::info!(
            "keygate listening on {}://{local_addr}",
            if local_addr_is_tls(&shared) {
                "https"
            } else {
                "http"
            }
        );
        // After the "listening on" line, which tools and tests wait for.
        let admin = match admin_listen {
            Some(listen) => {
                Some(Admin::start(listen, Arc::clone(&shared), Arc::clone(&readiness)).await?)
            }
            None => None,
        };
        Ok(Gateway {
            local_addr,
            shared,
            stop,
            task,
            readiness,
            admin,
            certs: certs.listener,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The state shared by the request path (the live config and the upstream client).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Admin::local_addr)
    }

    /// Whether the gateway is ready for traffic, and if not, why (what `/readyz` reports).
    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.readiness
    }

    /// The listener's certificate store, on TLS listeners.
    pub fn certs(&self) -> Option<&Arc<CertStore>> {
        self.certs.as_ref()
    }

    /// Stops accepting, closes idle connections, lets requests in flight finish for up to
    /// `grace`, then stops the admin listener and returns.
    pub async fn shutdown(self, grace: Duration) {
        self.readiness.set_draining();
        let _ = self.stop.send(Some(grace));
        let _ = self.task.await;
        if let Some(admin) = self.admin {
            admin.shutdown().await;
        }
    }
}

/// Connections the kernel may hold for the accept loop (capped by `net.core.somaxconn`): a burst
/// of new connections, or those waiting while `max_connections` are served, queue here instead
/// of having their SYNs dropped and retried a second later. The standard library's 128 is
/// small for a gateway; nginx uses 511, this takes what the system allows up to 4096.
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket on `addr` with `LISTEN_BACKLOG` (and `SO_REUSEADDR`, as usual for
/// servers, so a restart does not wait out TIME_WAIT), its connections deferred until they
/// send something ([`defer_accept`]).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    if let Err(e) = defer_accept(&socket) {
        tracing::warn!("connections on {addr} are accepted before they send anything: {e}");
    }
    TcpListener::from_std(socket.into())
}

/// How long the kernel holds a connection that has sent nothing before handing it over
/// anyway (`TCP_DEFER_ACCEPT`, in seconds; Linux rounds it up to one SYN-ACK retransmission).
/// One second, as nginx's `listen … deferred`.
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// `TCP_DEFER_ACCEPT` on the listener: the kernel hands a connection to the accept loop once
/// its first bytes (a ClientHello, a request line or a PROXY header; every client of an HTTP
/// gateway speaks first) have arrived, instead of at the end of the TCP handshake. The accept
/// and the first read then take one wake-up instead of two, which per new TLS connection is
/// about 4% more requests a second on the load harness (the README's performance section);
/// and a connection that never sends anything waits in the kernel (accepted after
/// [`DEFER_ACCEPT_SECS`], then subject to `header_timeout` and the handshake timeout) instead of
/// holding a `max_connections` slot from its first moment. nginx offers the same as
/// `listen … deferred`, HAProxy as `defer-accept`.
///
/// This is keygate's one `unsafe` block: neither std (`set_deferaccept` is unstable,
/// rust-lang/rust#119639) nor socket2, rustix or nix offer this option. Elsewhere than Linux,
/// nothing is set.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn defer_accept(socket: &socket2::Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = DEFER_ACCEPT_SECS;
    // SAFETY: `setsockopt` reads `size_of::<c_int>()` bytes through the pointer, which points
    // at `seconds`, alive on this frame for the whole call; the descriptor belongs to
    // `socket`, borrowed (so open) for the call. No memory is written.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_: &socket2::Socket) -> std::io::Result<()> {
    Ok(())
}

fn local_addr_is_tls(shared: &Shared) -> bool {
    shared.live.load().config.server.tls.is_some()
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    server: Arc<ServerConfig>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut http1 = builder.http1();
    http1
        .timer(shared.timers.clone())
        .header_read_timeout(server.header_timeout)
        .max_buf_size(server.max_header_bytes)
        // One flat buffer per write (head and body copied together) instead of a queue of
        // buffers for writev: most responses are small, and the queue's bookkeeping costs more
        // than the copy (with the same choice upstream, ~800 instructions a request less; a
        // body chunk is copied once at most). TLS streams get flat writes either way.
        .writev(false)
        .keep_alive(true);
    if server.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        http1.max_headers(server.max_headers);
    }
    builder
        .http2()
        .timer(shared.timers.clone())
        .max_concurrent_streams(server.h2_max_streams)
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(server.max_connections));
    let drain = Drain::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.wait_for(Option::is_some) => break,
        };
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = stop.wait_for(Option::is_some) => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => {
                backoff = Duration::from_millis(5);
                conn
            }
            Err(e) => {
                tracing::warn!("accept failed, retrying in {backoff:?}: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let open = shared.metrics.connection_opened();
        let shared = Arc::clone(&shared);
        let builder = Arc::clone(&builder);
        let server = Arc::clone(&server);
        let acceptor = acceptor.clone();
        let watcher = drain.watcher();
        // Held for an upgraded connection's splice too (hyper's watcher ends with hyper's part).
        let upgraded = drain.watcher();
        tokio::spawn(async move {
            let _open = open;
            let _permit = permit;
            let mut stream = stream;
            let mut peer = peer;
            let mut forwarding_headers = true;
            // The live list, as the request path reads it: a reload applies to both at once.
            if server.proxy_protocol
                && shared
                    .live
                    .load()
                    .config
                    .server
                    .trusted_proxies
                    .contains(peer.ip())
            {
                match tokio::time::timeout(
                    server.header_timeout,
                    client_ip::read_proxy_v2(&mut stream),
                )
                .await
                {
                    Ok(Ok(Some(source))) => peer = source,
                    // No source (LOCAL, or not TCP): the peer stays the load balancer, and
                    // headers behind a TCP balancer are the client's own.
                    Ok(Ok(None)) => forwarding_headers = false,
                    Ok(Err(e)) => return tracing::debug!(%peer, "PROXY header refused: {e}"),
                    Err(_) => return tracing::debug!(%peer, "PROXY header timed out"),
                }
            }
            let mut info = ConnInfo::new(peer, acceptor.is_some());
            info.forwarding_headers = forwarding_headers;
            info.idle_timeout = server.idle_timeout;
            let info = Arc::new(info);
            let conn = Arc::clone(&info);
            match acceptor {
                None => serve(stream, &builder, &server, shared, conn, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => serve(tls, &builder, &server, shared, conn, watcher).await,
                        Ok(Err(e)) => {
                            shared.metrics.tls_handshake_failed();
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                        }
                        Err(_) => {
                            shared.metrics.tls_handshake_failed();
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                }
            }
            // Upgraded: hyper is done with the connection, its splice is not. The slot, the
            // gauge and the drain keep counting it until the splice ends.
            let splice = info.splice.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(task) = splice {
                let _ = task.await;
            }
            drop(upgraded);
        });
        // One connection per turn of the scheduler, as nginx's default `multi_accept off`:
        // taking a burst of them at once (up to tokio's budget of 128) queues their handshakes
        // ahead of requests that arrived meanwhile on connections already open. Measured per new
        // TLS connection (interleaved 5 s runs, 64 connections): p99 lower in 12 rounds of 12,
        // about 6%, req/s and CPU unchanged.
        tokio::task::yield_now().await;
    }
    drop(listener);
    let grace = stop.borrow().unwrap_or_default();
    if tokio::time::timeout(grace, drain.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {grace:?}; closing them");
    }
}

async fn serve<IO>(
    io: IO,
    builder: &auto::Builder<TokioExecutor>,
    server: &ServerConfig,
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    watcher: Watcher,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let in_flight = InFlight::default();
    let screen = FramingScreen::new(Arc::clone(&info.framing), server.max_header_bytes);
    let io = ClientIo::new(io, server.idle_timeout, in_flight.clone())
        .screened(screen)
        .first_request_within(server.header_timeout);
    let peer = info.peer;
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        let info = Arc::clone(&info);
        let started = in_flight.start();
        let version = req.version();
        async move {
            let resp = proxy::handle(&shared, &info, req).await;
            // In flight until its body has ended, not just its head.
            Ok::<_, Infallible>(resp.map(|body| InFlightBody::new(body, started, version)))
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, "connection ended with an error: {e}");
    }
}
