//! The pooled client that carries admitted requests to the upstream.
//!
//! HTTP/1.1 over a small pool of connections, driven inside the request's own task: a request
//! takes an idle connection from a mutex-guarded stack (uncontended: one lock, one pop),
//! writes its head ([`crate::wire`]), streams its body if it has one, and reads the response
//! head; the response body ([`UpstreamBody`]) reads the rest from the same connection and puts
//! it back when it ends. This replaced hyper's low-level client, which runs each connection as
//! a task of its own and passes every request and response through two channels: measured under
//! callgrind (`benches/load/instructions.sh`) that was about a third of the gateway's work per
//! request.
//!
//! - `http://` upstreams: TCP with `TCP_NODELAY`, `SO_KEEPALIVE` 60 s, `connect_timeout` (read
//!   from the live config for each connection, so a reload changes it).
//! - `https://` upstreams: rustls, verified against `[upstream] ca_file` when set, else the
//!   webpki roots; ALPN `http/1.1`.
//! - Connections idle for more than 90 s are closed rather than reused; at most 1,024 idle
//!   connections are kept. A connection is reused only after a complete exchange: the request
//!   body all written, the response read to its end with nothing after it, no `Connection:
//!   close`, HTTP/1.1, a length-delimited body.
//! - An idle connection the upstream has closed is noticed when it is taken (its socket is
//!   readable; over TLS, the records that came are read: a `close_notify` or unasked data
//!   retires it, a session ticket does not) and passed over. A request whose reused connection
//!   fails before any byte of a response arrives is sent once more on a fresh connection when
//!   that is safe: an idempotent method (RFC 9110 §9.2.2) and no body byte taken yet, as nginx
//!   and Envoy do. So a keep-alive race never reaches a partner.
//! - The request body streams while the response is read: an upstream may answer early, or
//!   echo the body as it arrives. A response that ends before the request body was all sent
//!   closes the connection.
//! - Request trailers are dropped, as nginx drops them: a trailer section could carry again the
//!   fields keygate takes out of the head or writes itself (`X-Keygate-*`, `X-Forwarded-*`, the
//!   key), and an upstream that merges trailers into headers would believe them.
//! - `101 Switching Protocols`: the connection and any bytes already read are handed to
//!   [`crate::upgrade`] ([`UpstreamBody::take_upgraded`]).

use std::{
    collections::VecDeque,
    future::poll_fn,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{uri::Authority, uri::Scheme, Method, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_util::io::poll_read_buf;

use crate::{
    body::{BodyError, GuardedBody},
    certs::{CertStore, ClientSessions},
    config::UpstreamConfig,
    timers::Progress,
    wire::{self, BodyKind, BodyReader, Fields, Malformed, RequestFraming, ResponseHead, Step},
};

/// The body type sent upstream: the client's own body, streamed through the `max_body` and
/// body-idle guards (which also count its bytes for the access log).
pub type RequestBody = GuardedBody<Incoming>;

/// Idle connections older than this are closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept at most.
const MAX_IDLE: usize = 1024;
/// Room made in a connection's read buffer before a read: at first, and most.
const READ_CHUNK: usize = 8 * 1024;
const MAX_READ_CHUNK: usize = 256 * 1024;

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (refused, unreachable, DNS, TLS, connect timeout).
    #[error("cannot connect to the upstream: {0}")]
    Connect(io::Error),
    /// Reading or writing the connection failed.
    #[error("upstream connection failed: {0}")]
    Io(io::Error),
    /// The upstream closed the connection without answering.
    #[error("the upstream closed the connection before answering")]
    Closed,
    /// The upstream's answer is not HTTP/1.1 as keygate reads it.
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// The client's request body failed (too large, stalled, cut off).
    #[error("the request body failed: {0}")]
    Body(BodyError),
    /// The request's URI has no scheme or authority (a bug in the rewrite phase).
    #[error("request URI has no upstream authority")]
    NoAuthority,
}

impl UpstreamError {
    /// Whether the connection could not be made at all.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// An upstream connection, plain or TLS.
enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Drop for Stream {
    /// A TLS connection ends with a `close_notify`, so the upstream sees a clean close rather
    /// than a truncation (nginx logs the latter); best effort, without waiting: the alert is
    /// written only if the socket takes it at once, as it does on an idle connection.
    fn drop(&mut self) {
        if let Stream::Tls(tls) = self {
            let (tcp, session) = tls.get_mut();
            session.send_close_notify();
            while session.wants_write() {
                if session.write_tls(&mut TryWrite(tcp)).is_err() {
                    break;
                }
            }
        }
    }
}

/// `io::Write` over a tokio socket's non-blocking `try_write`.
struct TryWrite<'a>(&'a TcpStream);

impl io::Write for TryWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection to the upstream and what goes with it between requests.
struct Conn {
    io: Stream,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// The request head being written (kept to reuse its allocation).
    head: Vec<u8>,
    /// Room to offer the next read (see [`Conn::poll_fill`]).
    read_chunk: usize,
    scheme: Scheme,
    authority: Authority,
    since: Instant,
}

impl Conn {
    /// Whether the upstream has closed this idle connection (or sent it something unasked).
    /// Costs no system call unless the socket became readable while idle.
    fn is_stale(&mut self, cx: &mut Context<'_>) -> bool {
        if let Stream::Tls(tls) = &mut self.io {
            // Records rustls already took in: a close_notify, or data nobody asked for.
            let mut byte = [0u8; 1];
            match io::Read::read(&mut tls.get_mut().1.reader(), &mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => return true,
            }
        }
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        match self.io.tcp().poll_peek(cx, &mut probe) {
            Poll::Pending => false,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(_)) => match self.io {
                Stream::Tcp(_) => true,
                // A TLS upstream sends records on its own: a session ticket (harmless), or a
                // close_notify before it closes, which a TCP peek cannot tell apart. Read them
                // through TLS: only a read that finds nothing to hand over (tickets taken in,
                // no data, no close) leaves the connection usable. Without this a close_notify
                // was noticed only when the next request read its answer, too late to resend
                // a request with a body.
                Stream::Tls(_) => self.poll_fill(cx).is_ready(),
            },
        }
    }

    /// Reads what is there into `buf`; the room offered doubles while reads fill it (a large
    /// body streams in large reads) and falls back when they do not.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(self.read_chunk);
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf))?;
        if n == room {
            self.read_chunk = (self.read_chunk * 2).min(MAX_READ_CHUNK);
        } else if n < room / 4 {
            self.read_chunk = READ_CHUNK;
        }
        Poll::Ready(Ok(n))
    }
}

/// The pool of idle upstream connections, and how to make new ones.
pub struct UpstreamClient {
    /// Boxed: a connection moves with its request several times; a pointer moves cheaply.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<Conn>>>,
    tls: TlsConnector,
    /// The certificate shown to an upstream that asks for one (`[upstream] client_cert`).
    client_cert: Option<Arc<CertStore>>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient").finish_non_exhaustive()
    }
}

/// The TLS client config for an `https://` upstream, without ALPN: its certificate is verified
/// against `[upstream] ca_file` when set, else against the webpki roots, and `client_cert` is
/// shown when the upstream asks for a certificate (none otherwise). Shared by the request path
/// and the readiness probe ([`crate::health`]), so both trust and show the same certificates.
pub fn tls_config(
    config: &UpstreamConfig,
    client_cert: Option<&Arc<CertStore>>,
) -> rustls::ClientConfig {
    crate::tls::install_crypto_provider();
    let roots = match &config.ca {
        Some(ca) => Arc::clone(&ca.roots),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            Arc::new(roots)
        }
    };
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match client_cert {
        Some(store) => {
            let mut config = builder.with_client_cert_resolver(Arc::clone(store) as _);
            let sessions = ClientSessions::new(Arc::clone(store));
            config.resumption = rustls::client::Resumption::store(Arc::new(sessions));
            config
        }
        None => builder.with_no_client_auth(),
    }
}

/// Builds the pooled upstream client. Its TLS roots are fixed here: a reload that changes
/// `[upstream] ca_file` takes effect after a restart. `client_cert` is read on each handshake,
/// so its renewals ([`CertStore::spawn_watcher`]) reach the next new connection.
pub fn client(config: &UpstreamConfig, client_cert: Option<Arc<CertStore>>) -> Arc<UpstreamClient> {
    let mut tls = tls_config(config, client_cert.as_ref());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(UpstreamClient {
        idle: Mutex::new(Vec::new()),
        tls: TlsConnector::from(Arc::new(tls)),
        client_cert,
    })
}

impl UpstreamClient {
    /// The certificate shown to an upstream that asks for one, when configured.
    pub fn client_cert(&self) -> Option<&Arc<CertStore>> {
        self.client_cert.as_ref()
    }

    /// Sends the request `parts` (its own fields as `fields` lets them through, then the ones
    /// `fields` adds) with `body` (the URI carries the upstream's scheme and authority) and returns the
    /// response head; the body streams, and gives the connection back to the pool at its end.
    pub async fn request(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        fields: &(dyn Fields + Sync),
        body: RequestBody,
        connect_timeout: Duration,
        progress: &Progress,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (Some(scheme), Some(authority)) = (parts.uri.scheme(), parts.uri.authority()) else {
            return Err(UpstreamError::NoAuthority);
        };
        let empty = body.is_end_stream();
        let framing = RequestFraming::of(&parts.method, &parts.headers, empty);
        let mut upload = (!empty).then(|| {
            Box::new(Upload {
                body: Some(body),
                chunked: framing == RequestFraming::Chunked,
                queue: VecDeque::with_capacity(3),
                taken: false,
                state: UploadState::Sending,
                written: 0,
            })
        });
        let taken = poll_fn(|cx| Poll::Ready(self.take_idle(scheme, authority, cx))).await;
        let (mut conn, mut reused) = match taken {
            Some(conn) => (conn, true),
            // Boxed where it is awaited: the connect future (TCP and TLS handshakes) is large,
            // and inline it would enlarge every request's future for a step most skip.
            None => (
                Box::pin(self.connect(scheme, authority, connect_timeout)).await?,
                false,
            ),
        };
        // The connection is already to the authority: origin-form.
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        conn.head.clear();
        wire::encode_request(
            &parts.method,
            path,
            &parts.headers,
            fields,
            framing,
            &mut conn.head,
        );
        loop {
            let mut exchange = Exchange {
                conn,
                upload,
                written: 0,
                flushed: false,
                answered: false,
                write_error: None,
            };
            let result = poll_fn(|cx| exchange.poll_head(cx, &parts.method, progress)).await;
            match result {
                Ok(head) => return Ok(self.response(exchange, head)),
                Err(e) if reused && exchange.can_retry(&e, &parts.method) => {
                    tracing::debug!("reused upstream connection failed ({e}); retrying once");
                    let head = std::mem::take(&mut exchange.conn.head);
                    upload = exchange.upload;
                    conn = Box::pin(self.connect(scheme, authority, connect_timeout)).await?;
                    conn.head = head;
                    reused = false;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The response for a head read by `exchange`; a body-less one gives its connection back
    /// at once.
    fn response(
        self: &Arc<Self>,
        exchange: Exchange,
        head: ResponseHead,
    ) -> Response<UpstreamBody> {
        let ResponseHead {
            status,
            // The version stays on this hop: the partner is answered in its own (as nginx does).
            version: _,
            headers,
            body,
            keep_alive,
        } = head;
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        let mut body = UpstreamBody {
            conn: Some(exchange.conn),
            upload: exchange.upload,
            reader: BodyReader::new(if switching { BodyKind::Empty } else { body }),
            reusable: keep_alive && !switching,
            pool: Arc::clone(self),
        };
        if body.reader.is_done() && !switching {
            body.finish();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }

    fn take_idle(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        cx: &mut Context<'_>,
    ) -> Option<Box<Conn>> {
        loop {
            // One pop under the lock; the checks (a read over TLS) and the closing of a
            // connection passed over (a close_notify) happen outside it.
            let mut conn = self.idle.lock().expect("upstream pool lock").pop()?;
            // Authorities compared byte for byte (`==` on `Authority` folds case, byte by
            // byte): both come from the config, so a connection is only ever passed over after
            // a reload that changed the upstream's spelling.
            if conn.since.elapsed() < IDLE_TIMEOUT
                && conn.scheme == *scheme
                && conn.authority.as_str() == authority.as_str()
                && !conn.is_stale(cx)
            {
                return Some(conn);
            }
        }
    }

    fn put_back(&self, mut conn: Box<Conn>) {
        conn.since = Instant::now();
        // A connection that carried a large body gave its buffer room for large reads: an idle
        // one keeps no more than a first read needs.
        if conn.buf.capacity() > 2 * READ_CHUNK {
            conn.buf = BytesMut::new();
            conn.read_chunk = READ_CHUNK;
        }
        let mut idle = self.idle.lock().expect("upstream pool lock");
        // The oldest connection is at the bottom: close it once it is past reuse, so a pool
        // that shrank does not keep sockets open for ever.
        let expired = idle
            .first()
            .is_some_and(|c| conn.since.saturating_duration_since(c.since) >= IDLE_TIMEOUT)
            .then(|| idle.remove(0));
        let over = if idle.len() < MAX_IDLE {
            idle.push(conn);
            None
        } else {
            Some(conn)
        };
        // Closed (a close_notify written) once the lock is released.
        drop(idle);
        drop((expired, over));
    }

    async fn connect(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        timeout: Duration,
    ) -> Result<Box<Conn>, UpstreamError> {
        let https = *scheme == Scheme::HTTPS;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let connecting = async {
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            let sock = socket2::SockRef::from(&stream);
            sock.set_tcp_keepalive(
                &socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)),
            )?;
            if !https {
                return Ok(Stream::Tcp(stream));
            }
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            Ok(Stream::Tls(Box::new(self.tls.connect(name, stream).await?)))
        };
        let io = match tokio::time::timeout(timeout, connecting).await {
            Ok(result) => result.map_err(UpstreamError::Connect)?,
            Err(_) => {
                return Err(UpstreamError::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {timeout:?}"),
                )))
            }
        };
        Ok(Box::new(Conn {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            head: Vec::with_capacity(1024),
            read_chunk: READ_CHUNK,
            scheme: scheme.clone(),
            authority: authority.clone(),
            since: Instant::now(),
        }))
    }
}

/// Where a request body's upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UploadState {
    Sending,
    /// All of it written and flushed.
    Sent,
    /// The upstream stopped taking it (a write failed); its answer may still come.
    Refused,
}

/// A request body on its way up: frames taken from the client's body, framed, and written.
struct Upload {
    body: Option<RequestBody>,
    chunked: bool,
    /// Framed bytes not yet written.
    queue: VecDeque<Bytes>,
    /// Whether a frame has been taken from the body (the request can no longer be resent).
    taken: bool,
    state: UploadState,
    /// Framed bytes written so far.
    written: u64,
}

impl Upload {
    /// Writes what it can; `Ready(Ok)` once all is written (or the upstream refused it),
    /// `Ready(Err)` when the client's body failed.
    fn poll(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Poll<Result<(), BodyError>> {
        while self.state == UploadState::Sending {
            if let Err(e) = ready!(self.poll_write_queue(io, cx)) {
                tracing::debug!("upstream stopped taking the request body: {e}");
                self.state = UploadState::Refused;
                self.body = None;
                break;
            }
            let Some(body) = &mut self.body else {
                self.state = UploadState::Sent;
                break;
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    self.taken = true;
                    match frame.into_data() {
                        Ok(data) if data.is_empty() => {}
                        Ok(data) if self.chunked => {
                            self.queue.push_back(wire::chunk_line(data.len()));
                            self.queue.push_back(data);
                            self.queue.push_back(Bytes::from_static(b"\r\n"));
                        }
                        Ok(data) => self.queue.push_back(data),
                        // Trailers: dropped (module doc).
                        Err(_trailers) => {
                            if self.chunked {
                                self.queue.push_back(Bytes::from_static(wire::LAST_CHUNK));
                                self.chunked = false;
                            }
                            self.body = None;
                        }
                    }
                }
                Some(Err(e)) => {
                    self.taken = true;
                    self.body = None;
                    return Poll::Ready(Err(e));
                }
                None => {
                    if self.chunked {
                        self.queue.push_back(Bytes::from_static(wire::LAST_CHUNK));
                        self.chunked = false;
                    }
                    self.body = None;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_queue(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(front) = self.queue.front_mut() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, front))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            front.advance(n);
            self.written += n as u64;
            if front.is_empty() {
                self.queue.pop_front();
            }
        }
        Pin::new(io).poll_flush(cx)
    }
}

/// One request on one connection, up to the response head.
struct Exchange {
    conn: Box<Conn>,
    upload: Option<Box<Upload>>,
    /// Bytes of the head written.
    written: usize,
    flushed: bool,
    /// Whether any byte of a response was read.
    answered: bool,
    write_error: Option<io::Error>,
}

impl Exchange {
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
        progress: &Progress,
    ) -> Poll<Result<ResponseHead, UpstreamError>> {
        let conn = &mut *self.conn;
        while self.written < conn.head.len() {
            match ready!(Pin::new(&mut conn.io).poll_write(cx, &conn.head[self.written..])) {
                Ok(0) => {
                    return Poll::Ready(Err(UpstreamError::Io(io::ErrorKind::WriteZero.into())))
                }
                Ok(n) => self.written += n,
                Err(e) => return Poll::Ready(Err(UpstreamError::Io(e))),
            }
        }
        match &mut self.upload {
            Some(upload) => {
                let before = (upload.written, upload.state);
                let polled = upload.poll(&mut conn.io, cx);
                // The head deadline counts from the upload's last step ([`Progress`]), and
                // not while the upload waits for the client's bytes.
                if (upload.written, upload.state) != before {
                    progress.moved();
                }
                progress.client_turn(
                    polled.is_pending()
                        && upload.queue.is_empty()
                        && upload.state == UploadState::Sending,
                );
                if let Poll::Ready(Err(e)) = polled {
                    return Poll::Ready(Err(UpstreamError::Body(e)));
                }
            }
            None if !self.flushed => match ready!(Pin::new(&mut conn.io).poll_flush(cx)) {
                Ok(()) => self.flushed = true,
                Err(e) => self.write_error = Some(e),
            },
            None => {}
        }
        loop {
            if !conn.buf.is_empty() {
                if let Some(head) = wire::parse_response(&mut conn.buf, method)? {
                    // Interim answers (`100 Continue`, `103 Early Hints`) are not passed on.
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        continue;
                    }
                    return Poll::Ready(Ok(head));
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if conn.buf.is_empty() && !self.answered => {
                    return Poll::Ready(Err(match self.write_error.take() {
                        Some(e) => UpstreamError::Io(e),
                        None => UpstreamError::Closed,
                    }))
                }
                Ok(0) => return Poll::Ready(Err(Malformed("connection closed mid-head").into())),
                Ok(_) => self.answered = true,
                Err(e) => return Poll::Ready(Err(UpstreamError::Io(e))),
            }
        }
    }

    /// Whether the request may go again on a fresh connection after `err` on a reused one:
    /// nothing came back, no body byte was taken, and sending it twice is harmless (or it was
    /// never all written).
    fn can_retry(&self, err: &UpstreamError, method: &Method) -> bool {
        let idempotent = matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        matches!(err, UpstreamError::Io(_) | UpstreamError::Closed)
            && !self.answered
            // Untouched and still held: a refused upload has dropped its body.
            && self
                .upload
                .as_ref()
                .is_none_or(|u| !u.taken && u.state == UploadState::Sending)
            && (idempotent || self.written < self.conn.head.len())
    }
}

/// The upstream's response body; hands its connection back to the pool when it ends.
pub struct UpstreamBody {
    /// `None` once the body is over (the connection pooled or closed).
    conn: Option<Box<Conn>>,
    /// The request body, when it is still being sent.
    upload: Option<Box<Upload>>,
    reader: BodyReader,
    /// Whether the connection may be reused once this exchange is complete.
    reusable: bool,
    pool: Arc<UpstreamClient>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

/// An upstream connection after `101 Switching Protocols`: bytes already read come first.
pub struct Upgraded {
    io: Stream,
    read: BytesMut,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl UpstreamBody {
    /// After `101 Switching Protocols`: the connection, for [`crate::upgrade::splice`].
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        if self.reusable {
            return None;
        }
        let conn = self.conn.take()?;
        Some(Upgraded {
            io: conn.io,
            read: conn.buf,
        })
    }

    /// The response is complete: the connection goes back to the pool if the exchange left it
    /// clean, and is closed otherwise.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let sent = self
            .upload
            .as_ref()
            .is_none_or(|u| u.state == UploadState::Sent);
        if self.reusable && sent && conn.buf.is_empty() {
            self.pool.put_back(conn);
        }
        self.upload = None;
    }

    /// Aborts: the connection is closed.
    fn fail(&mut self, err: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.conn = None;
        self.upload = None;
        Poll::Ready(Some(Err(err)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        // The request body keeps going while the response is read (an echo needs both).
        if let Some(upload) = &mut this.upload {
            if let Poll::Ready(Err(e)) = upload.poll(&mut conn.io, cx) {
                return this.fail(UpstreamError::Body(e));
            }
        }
        loop {
            match this.reader.next(&mut conn.buf) {
                Err(e) => return this.fail(e.into()),
                Ok(Step::Data(data)) => {
                    if this.reader.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Trailers(trailers)) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    if let Err(e) = this.reader.at_eof() {
                        return this.fail(e.into());
                    }
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(_) => {}
                Err(e) => return this.fail(UpstreamError::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A finished body has given its connection back (or closed it) the moment its reader
        // was done; only a `101`'s keeps it, for `take_upgraded`.
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reader.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
