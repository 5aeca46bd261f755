//! The request path, phase by phase.
//!
//! 1. **identify** – take the request id the client sent (when sane) or make one;
//! 2. **screen** – refuse a head whose length is stated twice ([`crate::framing`]: repeated
//!    `Content-Length`, or with `Transfer-Encoding`; the connection closes), a repeated
//!    `Host`, an HTTP/1.1 request without `Host`, and what is never forwarded (`CONNECT`,
//!    absolute-form and `*` targets), before anything else is read;
//! 3. **authenticate** – find the key (configured header, else `Authorization: Bearer`, else
//!    the query parameter when `allow_query_key`), hash it once with blake3, look it up in the
//!    live [`KeyTable`], refuse missing, unknown, disabled and expired
//!    keys (and a rotated key's old hash after its grace); count failures per client IP
//!    ([`bruteforce`](crate::bruteforce)) and answer 429 to an address past its budget (there
//!    only the keys it used before are looked up);
//! 4. **path** – resolve the path's dot segments ([`scope::resolve_dots`], `%2e` read as `.`)
//!    and refuse with 400 a path that climbs above the root, so that none leaves the
//!    `[upstream] url` path; for a key with scopes, normalise the path ([`scope::normalise`])
//!    and refuse with 403 what no scope covers; nothing is charged or forwarded;
//! 5. **limit** – ask the key's quota and rate through [`Limits`] (in process, or shared in
//!    Redis; both are charged or neither); refuse with 429 and `Retry-After` when one is spent;
//!    refuse a body the key may not send (`max_body`, 413);
//! 6. **rewrite** – drop the key, hop-by-hop headers and any client-sent `X-Keygate-*`, set the
//!    forwarding and identity headers (and `X-Keygate-Signature` when configured), point the
//!    URI at the upstream (with its dot segments resolved, a scoped key's with its normalised
//!    path); an `Upgrade` request keeps its upgrade fields and, on `101`, is spliced through
//!    ([`upgrade`]);
//! 7. **forward** – send it on the pooled client, the body streamed both ways through
//!    [`GuardedBody`] (size limit, idle timeout), with a deadline on the response head;
//! 8. **respond** – add the rate-limit fields and the request id; the access line and the
//!    request metrics are written when the response body is done ([`crate::access`]).
//!
//! A refusal in any phase is a [`GatewayError`], turned into a response in one place
//! ([`GatewayError::to_response`]).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{
    header::{self, HeaderName},
    uri::PathAndQuery,
    HeaderMap, HeaderValue, Method, Request, Response, Uri, Version,
};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::{
    access::{AccessRecord, LoggedBody},
    body::{BodyOutcome, GuardedBody},
    bruteforce::FailureGuard,
    client_ip::X_FORWARDED_FOR,
    config::Config,
    error::GatewayError,
    framing::Framing,
    identity::Identity,
    keys::{self, KeyEntry, KeyHash, KeyTable},
    metrics::{Metrics, UpstreamErrorKind},
    quota::{self, Admission},
    scope,
    store::Limits,
    timers::{Progress, TimerPool},
    upgrade,
    upstream::{RequestBody, UpstreamBody, UpstreamClient},
    wire,
};

/// The body of every response keygate sends: the upstream's, streamed, or its own.
pub type ResponseBody = Either<GuardedBody<UpstreamBody>, Full<Bytes>>;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Keygate-Key-Id`: the admitted key's id, for the upstream.
pub static X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
/// `X-Keygate-Tenant`: the admitted key's tenant, for the upstream.
pub static X_KEYGATE_TENANT: HeaderName = HeaderName::from_static("x-keygate-tenant");
/// `X-Keygate-Signature`: `t=<unix seconds>,v2=<hex>`, see [`crate::identity`].
pub static X_KEYGATE_SIGNATURE: HeaderName = HeaderName::from_static("x-keygate-signature");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Everything the request path reads from configuration, swapped as one on reload.
#[derive(Debug)]
pub struct Live {
    /// The validated config this state was built from, with `keys` emptied: they live on in
    /// `table` (a second copy would double the memory of a large key table).
    pub config: Arc<Config>,
    /// hash → key entry.
    pub table: KeyTable,
    /// Failed attempts per client IP; `None` when `failures_per_ip = "off"`.
    pub failures: Option<Arc<FailureGuard>>,
}

impl Live {
    /// Builds the live state for `config`, keeping the limiters of `previous` where ids stay.
    pub fn new(config: Config, previous: Option<&Live>) -> Live {
        let table = KeyTable::build(&config, previous.map(|p| &p.table));
        Live::with_table(config, table, previous)
    }

    /// The live state for `config` whose keys are already in `table` (a reload streams a key
    /// file straight into a table); the failure budgets of `previous` are kept when they fit.
    pub fn with_table(mut config: Config, table: KeyTable, previous: Option<&Live>) -> Live {
        // Like the key limiters, the failure budgets survive a reload that keeps their rate.
        let failures = config.auth.failures_per_ip.map(|limit| {
            match previous.and_then(|p| p.failures.as_ref()) {
                Some(old) if *old.limit() == limit => Arc::clone(old),
                _ => Arc::new(FailureGuard::new(limit)),
            }
        });
        config.keys = Vec::new();
        Live {
            config: Arc::new(config),
            table,
            failures,
        }
    }
}

/// State shared by every connection: the live config, the limits front and the upstream client.
pub struct Shared {
    /// The current live state; one `load` per request, one `store` per reload.
    pub live: ArcSwap<Live>,
    /// Where limits are decided (in process, or Redis with a fallback); outlives reloads.
    pub limits: Limits,
    /// Pooled upstream connections.
    pub client: Arc<UpstreamClient>,
    /// Where requests, refusals and upstream errors are counted.
    pub metrics: Arc<Metrics>,
    /// Recycled timers for the per-request deadlines (this gateway's runtime's).
    pub timers: TimerPool,
}

/// What the request path knows about the client connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// The peer's address: from the socket, or from the PROXY v2 header a trusted proxy sent.
    pub peer: SocketAddr,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// The peer's IP as a header value, made once per connection for `X-Forwarded-For`.
    peer_ip: HeaderValue,
    /// The HTTP/1 framing verdicts of this connection's request heads.
    pub framing: Arc<Framing>,
    /// Whether a trusted peer's forwarding headers may name the client: not on a connection
    /// whose PROXY header named no source (`LOCAL`, or not TCP), where the peer is the load
    /// balancer, which writes no such header: whatever is there came from the client.
    pub forwarding_headers: bool,
    /// The task copying bytes for this connection once upgraded: the connection (its
    /// `max_connections` slot, its count in the gauge and in the drain) lasts until it ends.
    pub splice: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// `[server] idle_timeout` as the listener started with it (a restart-only field): the
    /// connection's, and its splice's once upgraded.
    pub idle_timeout: std::time::Duration,
}

impl ConnInfo {
    /// The connection from `peer`, over TLS or not.
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        let peer_ip = HeaderValue::try_from(peer.ip().to_string()).expect("IP addresses are ASCII");
        ConnInfo {
            peer,
            tls,
            peer_ip,
            framing: Arc::default(),
            forwarding_headers: true,
            splice: std::sync::Mutex::new(None),
            idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Where the presented key came from; decides which header is removed before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeySource {
    Header,
    Bearer,
    Query,
}

/// What the request path learned about the caller, for the response headers and the log.
#[derive(Default)]
struct Caller {
    key: Option<Arc<KeyEntry>>,
    ratelimit: Option<HeaderValue>,
    /// Time to the upstream's response head, once forwarded.
    upstream: Option<Duration>,
    /// Request body bytes forwarded, once forwarding starts.
    bytes_in: Option<Arc<BodyOutcome>>,
    /// The client's address (behind trusted proxies, the one they name), once known.
    client_ip: Option<IpAddr>,
}

/// Handles one request end to end; never fails (errors become responses). The access line is
/// written when the returned body is finished or dropped, or with status 499 when the client
/// goes away before the response head ([`Pending`]).
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<LoggedBody<ResponseBody>> {
    let mut pending = Pending {
        shared,
        conn,
        gathered: Some(Gathered {
            start: Instant::now(),
            request_id: request_id(req.headers()),
            method: req.method().clone(),
            uri: req.uri().clone(),
            caller: Caller::default(),
        }),
    };
    let live = shared.live.load_full();
    let Gathered {
        request_id, caller, ..
    } = pending.gathered.as_mut().expect("taken only below");
    let result = admit_and_forward(shared, &live, conn, req, request_id, caller).await;
    let mut gathered = pending.gathered.take().expect("taken only here");
    let mut resp = match result {
        Ok(resp) => resp,
        Err(err) => {
            shared.metrics.refused(&err);
            refuse(&err, &gathered.request_id)
        }
    };
    let headers = resp.headers_mut();
    // The two per-request values go out as HPACK "never indexed" literals on HTTP/2 (HTTP/1.1
    // ignores the flag): indexing a value that never repeats only churns both sides' tables,
    // evicting the stable fields. 58,646 → 56,936 instructions an h2 request
    // (`benches/load/instructions.sh --h2 --requests 40000`).
    let caller = &mut gathered.caller;
    if let (Some(key), Some(mut ratelimit)) = (&caller.key, caller.ratelimit.take()) {
        headers.insert(RATELIMIT_POLICY.clone(), key.policy_header.clone());
        ratelimit.set_sensitive(true);
        headers.insert(RATELIMIT.clone(), ratelimit);
    }
    let mut id = gathered.request_id.clone();
    id.set_sensitive(true);
    headers.insert(X_REQUEST_ID.clone(), id);

    let record = gathered.record(shared, conn, resp.status().as_u16());
    resp.map(|body| LoggedBody::new(body, record))
}

/// HTTP status logged for a request whose client went away before its response head (nginx's).
pub const CLIENT_CLOSED: u16 = 499;

/// A request being handled. When its future is dropped before the response head (hyper drops
/// it when the client closes the connection or resets the stream), what was gathered is still
/// there, and the access line and the request metrics are written with [`CLIENT_CLOSED`]: its
/// rate and quota were charged, and the upstream may have worked on it.
struct Pending<'a> {
    shared: &'a Shared,
    conn: &'a ConnInfo,
    /// Taken when the answer is ready.
    gathered: Option<Gathered>,
}

/// What the access line needs, gathered along the request path.
struct Gathered {
    start: Instant,
    request_id: HeaderValue,
    method: Method,
    uri: Uri,
    caller: Caller,
}

impl Gathered {
    /// The access record with `status`.
    fn record(self, shared: &Shared, conn: &ConnInfo, status: u16) -> AccessRecord {
        AccessRecord {
            start: self.start,
            request_id: self.request_id,
            key: self.caller.key,
            method: self.method,
            uri: self.uri,
            status,
            upstream: self.caller.upstream,
            bytes_in: self.caller.bytes_in,
            client_ip: self.caller.client_ip.unwrap_or(conn.peer.ip()),
            metrics: Arc::clone(&shared.metrics),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(gathered) = self.gathered.take() {
            gathered
                .record(self.shared, self.conn, CLIENT_CLOSED)
                .finish(0);
        }
    }
}

/// Phases 2 to 7; records the key and its rate-limit state in `caller` as soon as known.
async fn admit_and_forward(
    shared: &Shared,
    live: &Live,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    request_id: &HeaderValue,
    caller: &mut Caller,
) -> Result<Response<ResponseBody>, GatewayError> {
    conn.framing
        .admit()
        .map_err(GatewayError::AmbiguousFraming)?;
    screen(req.method(), req.uri(), req.version(), req.headers())?;
    let client_ip = if conn.forwarding_headers {
        live.config
            .server
            .trusted_proxies
            .client_ip(conn.peer.ip(), req.headers())
    } else {
        conn.peer.ip()
    };
    caller.client_ip = Some(client_ip);
    let blocked = live.failures.as_ref().and_then(|g| g.blocked(client_ip));
    // While the address is blocked, only the keys it used before are looked up at all.
    let known = |hash: &KeyHash| {
        blocked.is_none()
            || live
                .failures
                .as_ref()
                .is_some_and(|g| g.knows(client_ip, hash))
    };
    let (entry, source, hash) = match authenticate(live, req.headers(), req.uri(), &known) {
        Ok(found) => found,
        Err(err) => return Err(judge_failure(live, client_ip, blocked, err)),
    };
    if let Some(guard) = &live.failures {
        guard.record_success(client_ip, &hash);
    }
    caller.key = Some(Arc::clone(&entry));
    let path = check_path(&entry, req.method(), req.uri())?;
    let admission = shared.limits.check(&entry).await?;
    if let Some(admission) = &admission {
        caller.ratelimit = Some(quota::ratelimit_header(admission));
    }
    match admission {
        Some(Admission::Admit { .. }) => {}
        Some(Admission::RateLimited { retry_after }) => {
            return Err(GatewayError::RateLimited { retry_after })
        }
        Some(Admission::QuotaExceeded { retry_after }) => {
            return Err(GatewayError::QuotaExceeded { retry_after })
        }
        // Store down under on_store_error = "allow": no limit applies, so none is advertised.
        None => {}
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > entry.max_body) {
        return Err(GatewayError::PayloadTooLarge);
    }
    let upgrade = upgrade::requested(&req);
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    // Rewritten in place and lent to the client: the parts are not moved again.
    let (mut parts, body) = req.into_parts();
    let forwarding = rewrite(live, conn, &mut parts, &entry, source, request_id, path)?;
    if let Some(value) = upgrade {
        upgrade::restore(&mut parts.headers, value);
    }
    let body = GuardedBody::new(
        body,
        Some(entry.max_body),
        live.config.upstream.body_timeout,
    );
    let outcome = body.outcome();
    caller.bytes_in = Some(Arc::clone(&outcome));
    let mut resp = forward(
        shared,
        live,
        &parts,
        &forwarding,
        body,
        &outcome,
        &mut caller.upstream,
    )
    .await?;
    if let Some(client) = client_upgrade {
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            if let Either::Left(body) = resp.body_mut() {
                if let Some(upstream) = body.get_mut().take_upgraded() {
                    conn.framing.stop();
                    let task =
                        upgrade::splice(client, upstream, request_id.clone(), conn.idle_timeout);
                    *conn.splice.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
                }
            }
        }
    }
    Ok(resp)
}

/// Phase 2: refuses, before any key is looked at, what keygate never forwards (CONNECT,
/// absolute-form and asterisk-form targets) and a request whose length or target is stated
/// twice, or whose target is missing, so that no proxy in front of or behind keygate can read
/// it differently. (On
/// HTTP/1 repeated lengths never get here: hyper refuses conflicting ones and [`crate::framing`]
/// the rest; the length check here guards HTTP/2.)
fn screen(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<(), GatewayError> {
    // What keygate never forwards, refused before the key is looked at (or charged).
    if *method == Method::CONNECT {
        return Err(GatewayError::BadRequest("CONNECT is not supported."));
    }
    if version < Version::HTTP_2 && uri.scheme().is_some() {
        return Err(GatewayError::BadRequest(
            "Absolute-form request targets are not accepted.",
        ));
    }
    // `OPTIONS *` and the like: there is no path to check a scope against or forward.
    if !uri.path().starts_with('/') {
        return Err(GatewayError::BadRequest(
            "The request target must be a path.",
        ));
    }
    if headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(GatewayError::BadRequest(
            "Send at most one Content-Length header.",
        ));
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let (first_host, second_host) = (hosts.next(), hosts.next());
    if second_host.is_some() {
        return Err(GatewayError::BadRequest("Send at most one Host header."));
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host is answered 400.
    if version == Version::HTTP_11 && first_host.is_none() {
        return Err(GatewayError::BadRequest(
            "HTTP/1.1 requests need a Host header.",
        ));
    }
    Ok(())
}

/// The answer to a failed authentication from `client_ip`, counting the failure against the
/// address's budget. `blocked` is the address's state before this request.
fn judge_failure(
    live: &Live,
    client_ip: IpAddr,
    blocked: Option<u64>,
    err: GatewayError,
) -> GatewayError {
    let Some(guard) = &live.failures else {
        return err;
    };
    if let Some(retry_after) = blocked {
        return GatewayError::TooManyFailures { retry_after };
    }
    match err {
        GatewayError::InvalidApiKey | GatewayError::BadChecksum => {
            match guard.record_failure(client_ip) {
                Some(retry_after) => {
                    tracing::warn!(%client_ip, "too many failed key attempts; address blocked for {retry_after}s");
                    GatewayError::TooManyFailures { retry_after }
                }
                None => err,
            }
        }
        other => other,
    }
}

/// Turns a refusal into its response and logs the cause once.
fn refuse(err: &GatewayError, request_id: &HeaderValue) -> Response<ResponseBody> {
    tracing::debug!(
        request_id = request_id.to_str().unwrap_or("-"),
        reason = err.reason(),
        "refused: {err}"
    );
    err.to_response().map(Either::Right)
}

/// Phase 3: finds, hashes and looks up the key (only when `may_look_up` allows its hash: a
/// blocked address's guesses are not judged); the entry, where the key came from, its hash.
fn authenticate(
    live: &Live,
    headers: &HeaderMap,
    uri: &Uri,
    may_look_up: &dyn Fn(&KeyHash) -> bool,
) -> Result<(Arc<KeyEntry>, KeySource, KeyHash), GatewayError> {
    let auth = &live.config.auth;
    let mut from_header = headers.get_all(&auth.header).iter();
    let header_key = from_header.next();
    if from_header.next().is_some() {
        return Err(GatewayError::AmbiguousApiKey);
    }
    let mut bearer_key = None;
    for value in headers.get_all(header::AUTHORIZATION) {
        if let Some(token) = bearer_token(value.as_bytes()) {
            if bearer_key.replace(token).is_some() {
                return Err(GatewayError::AmbiguousApiKey);
            }
        }
    }
    let query_key = query_key(uri, &auth.query_key)?;
    if query_key.is_some() && !auth.allow_query_key {
        return Err(GatewayError::BadRequest(
            "API keys are not accepted in the query string; send the key in a header.",
        ));
    }
    let (key, source) = match (header_key, bearer_key, query_key.as_deref()) {
        (Some(v), None, None) => (v.as_bytes(), KeySource::Header),
        (None, Some(t), None) => (t, KeySource::Bearer),
        (None, None, Some(q)) => (q, KeySource::Query),
        (None, None, None) => return Err(GatewayError::MissingApiKey),
        _ => return Err(GatewayError::AmbiguousApiKey),
    };
    if key.is_empty() {
        return Err(GatewayError::MissingApiKey);
    }
    // Junk is refused before it costs a hash or a lookup.
    if key.len() > keys::MAX_KEY_LEN || !key.iter().all(|b| b.is_ascii_graphic()) {
        return Err(GatewayError::InvalidApiKey);
    }
    let key_str = std::str::from_utf8(key).map_err(|_| GatewayError::InvalidApiKey)?;
    if keys::checksum_ok(key_str, &auth.key_prefix) == Some(false) {
        return Err(GatewayError::BadChecksum);
    }
    let hash = KeyHash::of(key);
    if !may_look_up(&hash) {
        return Err(GatewayError::InvalidApiKey);
    }
    let found = live
        .table
        .lookup(&hash)
        .ok_or(GatewayError::InvalidApiKey)?;
    let entry = found.entry;
    if entry.disabled {
        return Err(GatewayError::InvalidApiKey);
    }
    let now = SystemTime::now();
    if entry.expires.is_some_and(|e| e <= now) || found.previous_until.is_some_and(|e| e <= now) {
        return Err(GatewayError::ExpiredApiKey);
    }
    Ok((Arc::clone(entry), source, hash))
}

/// Phase 4: the path to forward when it is not the request's own: its dot segments resolved
/// ([`scope::resolve_dots`]) for every key, so that no path climbs out of the `[upstream] url`
/// path; for a key with scopes, normalised ([`scope::normalise`]) and refused unless a scope
/// covers it.
fn check_path(
    entry: &KeyEntry,
    method: &Method,
    uri: &Uri,
) -> Result<Option<String>, GatewayError> {
    if entry.scopes.is_empty() {
        return Ok(scope::resolve_dots(uri.path())?);
    }
    let normal = scope::normalise(uri.path())?;
    if !scope::allowed(&entry.scopes, method, &normal) {
        return Err(GatewayError::ForbiddenScope);
    }
    Ok(Some(normal.encoded))
}

/// The percent-decoded value of the `name` query parameter; two of them are ambiguous.
fn query_key(uri: &Uri, name: &str) -> Result<Option<Vec<u8>>, GatewayError> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name && found.replace(percent_decode(v)).is_some() {
            return Err(GatewayError::AmbiguousApiKey);
        }
    }
    Ok(found)
}

/// `%XX` decoding (and `+` as a space, which no valid key contains); bad escapes stay as they
/// are, and the key check refuses them.
fn percent_decode(s: &str) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    out
}

/// `query` without the `name` parameter; `None` when nothing is left.
fn strip_query_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    let joined = kept.join("&");
    (!joined.is_empty()).then_some(joined)
}

/// The token of an `Authorization: Bearer <token>` value (scheme matched case-insensitively).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
        Some(value[7..].trim_ascii())
    } else {
        None
    }
}

/// Phase 6: the request as the upstream will see it: its target rewritten in place, and the
/// fields keygate sets.
fn rewrite<'a>(
    live: &'a Live,
    conn: &ConnInfo,
    parts: &mut http::request::Parts,
    entry: &KeyEntry,
    source: KeySource,
    request_id: &HeaderValue,
    path: Option<String>,
) -> Result<Forwarding<'a>, GatewayError> {
    let upstream = &live.config.upstream;
    let rebuilt;
    let path_and_query = if path.is_none() && source != KeySource::Query {
        parts.uri.path_and_query().map_or("/", PathAndQuery::as_str)
    } else {
        // A path with dot segments goes resolved (a scoped key's normalised); a query key is
        // taken out of the query.
        let path = path.as_deref().unwrap_or(parts.uri.path());
        let query = match (source, parts.uri.query()) {
            (KeySource::Query, Some(q)) => strip_query_param(q, &live.config.auth.query_key),
            (_, q) => q.map(str::to_string),
        };
        rebuilt = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        rebuilt.as_str()
    };
    let path_and_query = if upstream.path_prefix.is_empty() {
        PathAndQuery::try_from(path_and_query)
    } else {
        PathAndQuery::try_from(format!("{}{}", upstream.path_prefix, path_and_query))
    }
    .map_err(|_| GatewayError::BadRequest("The request target is malformed."))?;
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::try_from(a.as_str()).ok())
    });
    parts.uri = Uri::from_parts({
        let mut u = http::uri::Parts::default();
        u.scheme = Some(upstream.scheme.clone());
        u.authority = Some(upstream.authority.clone());
        u.path_and_query = Some(path_and_query);
        u
    })
    .map_err(|_| GatewayError::BadRequest("The request target is malformed."))?;
    parts.version = Version::HTTP_11;

    let mut forwarding = Forwarding::new(
        live,
        conn,
        &mut parts.headers,
        entry,
        source == KeySource::Bearer,
        original_host,
        request_id,
    );
    if let Some(key) = &upstream.identity {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let who = Identity {
            key_id: &entry.id,
            tenant: entry.tenant.as_deref(),
            method: parts.method.as_str(),
            target: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        };
        forwarding.signature = Some(key.header(now, &who));
    }
    Ok(forwarding)
}

/// Phase 6's header part: the fields keygate sets on a forwarded request (public for the
/// criterion bench).
///
/// The client's own copies of them (`Host`, `X-Forwarded-For`/`-Proto`/`-Host`,
/// `X-Request-Id`) and its other forwarding fields (`Forwarded`, `X-Real-IP`, any other
/// `X-Forwarded-*`), its key (and `Authorization` when the key came as a bearer token) and any
/// `X-Keygate-*` field it sent stay behind: [`passes`](wire::Fields::passes) leaves them out
/// as the head is written ([`crate::wire::encode_request`]) and [`added`](wire::Fields::added)
/// writes keygate's after the client's fields. Removing them from the map and inserting
/// keygate's, hashing each name, was a sixth of the request path's work. Hop-by-hop fields are
/// removed from the map here (rarely present, and a `Connection` may name more).
pub struct Forwarding<'a> {
    key_header: &'a HeaderName,
    bearer: bool,
    /// The key has scopes: method overrides stay behind ([`METHOD_OVERRIDES`]).
    scoped: bool,
    /// The peer is a trusted proxy: its forwarding fields go on (but those keygate writes).
    trusted_hop: bool,
    host: HeaderValue,
    forwarded_for: HeaderValue,
    forwarded_proto: HeaderValue,
    forwarded_host: Option<HeaderValue>,
    request_id: HeaderValue,
    key_id: HeaderValue,
    tenant: Option<HeaderValue>,
    /// `X-Keygate-Signature`, when an identity secret is configured.
    pub signature: Option<HeaderValue>,
}

impl<'a> Forwarding<'a> {
    /// The fields for the request whose `headers` came from `conn`, admitted with `entry`
    /// (`bearer`: the key came in `Authorization`); `original_host` is the client's `Host`.
    pub fn new(
        live: &'a Live,
        conn: &ConnInfo,
        headers: &mut HeaderMap,
        entry: &KeyEntry,
        bearer: bool,
        original_host: Option<HeaderValue>,
        request_id: &HeaderValue,
    ) -> Forwarding<'a> {
        strip_hop_by_hop(headers);
        let forwarded_for = match forwarded_for(headers) {
            Some(mut chain) => {
                chain.extend_from_slice(b", ");
                chain.extend_from_slice(conn.peer_ip.as_bytes());
                HeaderValue::from_bytes(&chain)
                    .expect("field values joined with an address are a field value")
            }
            None => conn.peer_ip.clone(),
        };
        Forwarding {
            key_header: &live.config.auth.header,
            bearer,
            scoped: !entry.scopes.is_empty(),
            trusted_hop: conn.forwarding_headers
                && live
                    .config
                    .server
                    .trusted_proxies
                    .trusts_peer(conn.peer.ip()),
            host: live.config.upstream.host_header.clone(),
            forwarded_for,
            forwarded_proto: HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
            forwarded_host: original_host,
            request_id: request_id.clone(),
            key_id: entry.id_header.clone(),
            tenant: entry.tenant_header.clone(),
            signature: None,
        }
    }
}

impl Forwarding<'_> {
    /// Whether the client's field `name` (lower case) is one keygate takes out or writes itself.
    ///
    /// A client's forwarding fields stay behind, not only the ones keygate writes: `Forwarded`,
    /// `X-Real-IP` and any `X-Forwarded-*` (`-Port`, `-Prefix`, `-Ssl`, …) would reach the
    /// upstream beside keygate's `X-Forwarded-*`, and upstreams that prefer them (Rack, Spring)
    /// would take the client's word for its address, host and scheme. A trusted proxy's go on
    /// (`Forwarded` with the chain keygate believed, Envoy's `X-Forwarded-Client-Cert`, an auth
    /// proxy's `X-Forwarded-User`), all but the three keygate writes. Path overrides
    /// ([`PATH_OVERRIDES`]) stay behind for every key: they would take a request out of the
    /// `[upstream] url` path.
    fn reserved(&self, name: &str) -> bool {
        name == header::HOST.as_str()
            || name == self.key_header.as_str()
            || (self.bearer && name == header::AUTHORIZATION.as_str())
            || (name == header::FORWARDED.as_str() && !self.trusted_hop)
            || (self.scoped && METHOD_OVERRIDES.contains(&name))
            || (name.starts_with("x-")
                && (name.starts_with("x-keygate-")
                    || name == X_FORWARDED_FOR.as_str()
                    || name == X_FORWARDED_PROTO.as_str()
                    || name == X_FORWARDED_HOST.as_str()
                    || name == X_REQUEST_ID.as_str()
                    || PATH_OVERRIDES.contains(&name)
                    || (!self.trusted_hop
                        && (name.starts_with("x-forwarded-") || name == X_REAL_IP))))
    }
}

/// `X-Real-IP`: nginx's client address field, which upstreams read like `X-Forwarded-For`.
const X_REAL_IP: &str = "x-real-ip";

/// Fields by which an upstream may take another method than the request line's: a scoped key
/// was checked against that line, so they do not go upstream with its requests.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Fields by which an upstream may serve another path than the request line's (IIS URL
/// Rewrite, Symfony, Zend): the `[upstream] url` path and a scoped key's check were both made
/// against that line, so they go upstream with no request.
const PATH_OVERRIDES: [&str; 2] = ["x-original-url", "x-rewrite-url"];

impl wire::Fields for Forwarding<'_> {
    fn passes(&self, name: &HeaderName) -> bool {
        let name = name.as_str();
        // Servers that hand fields over CGI-style (PHP-FPM, uWSGI, older Puma and gunicorn)
        // read `_` as `-`: `x_keygate_tenant` would reach them as `X-Keygate-Tenant`.
        !(self.reserved(name) || name.contains('_') && self.reserved(&name.replace('_', "-")))
    }

    fn added(&self, field: &mut dyn FnMut(&HeaderName, &HeaderValue)) {
        field(&header::HOST, &self.host);
        field(&X_FORWARDED_FOR, &self.forwarded_for);
        field(&X_FORWARDED_PROTO, &self.forwarded_proto);
        if let Some(host) = &self.forwarded_host {
            field(&X_FORWARDED_HOST, host);
        }
        field(&X_REQUEST_ID, &self.request_id);
        field(&X_KEYGATE_KEY_ID, &self.key_id);
        if let Some(tenant) = &self.tenant {
            field(&X_KEYGATE_TENANT, tenant);
        }
        if let Some(signature) = &self.signature {
            field(&X_KEYGATE_SIGNATURE, signature);
        }
    }
}

/// The client's `X-Forwarded-For` values joined, if any.
fn forwarded_for(headers: &HeaderMap) -> Option<Vec<u8>> {
    let mut joined: Option<Vec<u8>> = None;
    // Bytes, not text: a proxy before keygate appended its hop to whatever the client sent,
    // and one non-ASCII byte there must not cost the upstream the hops after it.
    for v in headers.get_all(&X_FORWARDED_FOR) {
        let v = v.as_bytes().trim_ascii();
        if v.is_empty() {
            continue;
        }
        match &mut joined {
            Some(j) => {
                j.extend_from_slice(b", ");
                j.extend_from_slice(v);
            }
            None => joined = Some(v.to_vec()),
        }
    }
    joined
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names, and
/// `Trailer` ([`wire::request_hop_names`]: a request's trailers are not forwarded; a `101`,
/// the one answer this also runs on, has none).
///
/// Both messages of every request pass through here (most responses carry
/// `Connection: keep-alive`), so it allocates nothing in the common cases: one pass over the
/// names (no hashing) marks which fixed hop-by-hop fields are present, only those are removed,
/// and a name listed in `Connection` is only turned into a `HeaderName` (an allocation for a
/// non-standard name) when it is not one of the fixed ones and the message has such a field.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let fixed = wire::request_hop_names();
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = fixed.iter().position(|f| *f == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| {
            !fixed.iter().any(|f| f.as_str().eq_ignore_ascii_case(name))
                && headers.contains_key(*name)
        })
        .filter_map(|name| HeaderName::try_from(name).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for (i, name) in fixed.into_iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Phase 7: sends the request upstream and waits for the head within `upstream.timeout`;
/// `waited` gets the time spent waiting (the access log's `upstream_ms`).
async fn forward(
    shared: &Shared,
    live: &Live,
    parts: &http::request::Parts,
    forwarding: &Forwarding<'_>,
    body: RequestBody,
    request_body: &BodyOutcome,
    waited: &mut Option<Duration>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let request_id = &forwarding.request_id;
    let deadline = live.config.upstream.timeout;
    let sent = Instant::now();
    // The deadline counts from the request body's last write: an upload may take longer than
    // `timeout`, an upstream that stops reading it may not (Envoy starts its route timeout at
    // the request's end likewise).
    let progress = Progress::since(sent);
    let request = std::pin::pin!(shared.client.request(
        parts,
        forwarding,
        body,
        live.config.upstream.connect_timeout,
        &progress,
    ));
    let answer = shared.timers.timeout(deadline, request, &progress).await;
    let elapsed = sent.elapsed();
    *waited = Some(elapsed);
    let err = match answer {
        Ok(Ok(resp)) => {
            shared.metrics.upstream_head(elapsed);
            let (mut parts, body) = resp.into_parts();
            // The client left out the hop-by-hop fields of every answer but a `101`, whose
            // `Upgrade` goes on to the partner.
            if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
                let switched = parts.headers.get(header::UPGRADE).cloned();
                strip_hop_by_hop(&mut parts.headers);
                if let Some(value) = switched {
                    upgrade::restore(&mut parts.headers, value);
                }
            }
            let body = GuardedBody::new(body, None, live.config.upstream.body_timeout);
            return Ok(Response::from_parts(parts, Either::Left(body)));
        }
        Ok(Err(err)) => err,
        Err(_) => {
            shared.metrics.upstream_error(UpstreamErrorKind::Timeout);
            tracing::warn!(
                request_id = request_id.to_str().unwrap_or("-"),
                "upstream sent no response head within {deadline:?}"
            );
            return Err(GatewayError::UpstreamTimeout);
        }
    };
    // The request body was cut by keygate: the client's fault, not the upstream's.
    if request_body.too_large() {
        return Err(GatewayError::PayloadTooLarge);
    }
    if request_body.idle() {
        return Err(GatewayError::RequestTimeout);
    }
    if request_body.broken() {
        return Err(GatewayError::BadRequest(
            "The request body ended before it was complete.",
        ));
    }
    shared.metrics.upstream_error(if err.is_connect() {
        UpstreamErrorKind::Connect
    } else {
        UpstreamErrorKind::Reset
    });
    tracing::warn!(
        request_id = request_id.to_str().unwrap_or("-"),
        "upstream request failed: {}",
        error_chain(&err)
    );
    Err(GatewayError::UpstreamUnavailable)
}

/// An error and its sources, `: `-joined, for one log line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

/// Phase 1: the client's `X-Request-Id` when it is sane (1–128 of `A-Z a-z 0-9 . _ : -`),
/// otherwise a new unique id.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// A process-unique id: a random 64-bit prefix drawn at start-up and a counter, in hex.
pub fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(rand::random::<u64>);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Both halves as one 128-bit number, written nibble by nibble from the right.
    let mut id = u128::from(prefix) << 64 | u128::from(n);
    let mut hex = [0u8; 32];
    for digit in hex.iter_mut().rev() {
        *digit = HEX[(id & 15) as usize];
        id >>= 4;
    }
    HeaderValue::from_bytes(&hex).expect("hex is ASCII")
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_found_case_insensitively() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret-Hop, Keep-Alive, x-absent"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn query_keys_are_decoded_found_once_and_stripped_alone() {
        let uri: Uri = "/v1/x?a=1&api_key=k%65y+&b=%zz".parse().unwrap();
        assert_eq!(query_key(&uri, "api_key").unwrap().unwrap(), b"key ");
        assert_eq!(query_key(&uri, "key").unwrap(), None);
        let twice: Uri = "/v1/x?api_key=a&api_key=b".parse().unwrap();
        assert_eq!(
            query_key(&twice, "api_key"),
            Err(GatewayError::AmbiguousApiKey)
        );
        assert_eq!(percent_decode("%"), b"%");
        assert_eq!(percent_decode("%4"), b"%4");
        assert_eq!(percent_decode("a%41"), b"aA");
        assert_eq!(
            strip_query_param("a=1&api_key=x&api_keys=2&b", "api_key").as_deref(),
            Some("a=1&api_keys=2&b")
        );
        assert_eq!(strip_query_param("api_key=x", "api_key"), None);
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        let made = request_id(&h);
        assert_eq!(made.len(), 32);
        assert_ne!(request_id(&HeaderMap::new()), made);
    }
}
