//! The request path, phase by phase.
//!
//! 1. **identify** – take the request id the client sent (when sane) or make one;
//! 2. **authenticate** – find the key (configured header, else `Authorization: Bearer`), hash it
//!    once with blake3, look it up in the live [`KeyTable`](crate::keys::KeyTable), refuse
//!    missing, unknown, disabled and expired keys (and a rotated key's old hash after its grace);
//! 3. **scope** – for a key with scopes, normalise the path ([`scope::normalise`]) and refuse
//!    with 403 what no scope covers; nothing is charged or forwarded;
//! 4. **limit** – ask the key's quota and rate ([`quota::admit`]: both are charged or neither);
//!    refuse with 429 and `Retry-After` when one is spent;
//! 5. **rewrite** – drop the key, hop-by-hop headers and any client-sent `X-Keygate-*`, set the
//!    forwarding and identity headers (and `X-Keygate-Signature` when configured), point the
//!    URI at the upstream (a scoped key's request goes with its normalised path);
//! 6. **forward** – send it on the pooled client, the body streamed both ways, with a deadline
//!    on the response head;
//! 7. **respond** – add the rate-limit fields and the request id; the access line and the
//!    request metrics are written when the response body is done ([`crate::access`]).
//!
//! A refusal in any phase is a [`GatewayError`], turned into a response in one place
//! ([`GatewayError::to_response`]).

use std::{
    net::SocketAddr,
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
    access::{AccessRecord, CountedBody, LoggedBody},
    config::Config,
    error::GatewayError,
    identity::Identity,
    keys::{self, KeyEntry, KeyHash, KeyTable},
    metrics::{Metrics, UpstreamErrorKind},
    quota::{self, Admission},
    scope::{self, NormalPath},
    upstream::UpstreamClient,
};

/// The body of every response keygate sends: the upstream's, streamed, or its own.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Keygate-Key-Id`: the admitted key's id, for the upstream.
pub static X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
/// `X-Keygate-Tenant`: the admitted key's tenant, for the upstream.
pub static X_KEYGATE_TENANT: HeaderName = HeaderName::from_static("x-keygate-tenant");
/// `X-Keygate-Signature`: `t=<unix seconds>,v1=<hex>`, see [`crate::identity`].
pub static X_KEYGATE_SIGNATURE: HeaderName = HeaderName::from_static("x-keygate-signature");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Everything the request path reads from configuration, swapped as one on reload.
#[derive(Debug)]
pub struct Live {
    /// The validated config this state was built from, with `keys` emptied: they live on in
    /// `table` (a second copy would double the memory of a large key table).
    pub config: Arc<Config>,
    /// hash → key entry.
    pub table: KeyTable,
}

impl Live {
    /// Builds the live state for `config`, keeping the limiters of `previous` where ids stay.
    pub fn new(mut config: Config, previous: Option<&Live>) -> Live {
        let table = KeyTable::build(&config, previous.map(|p| &p.table));
        config.keys = Vec::new();
        Live {
            config: Arc::new(config),
            table,
        }
    }
}

/// State shared by every connection: the live config and the upstream client.
pub struct Shared {
    /// The current live state; one `load` per request, one `store` per reload.
    pub live: ArcSwap<Live>,
    /// Pooled upstream connections.
    pub client: UpstreamClient,
    /// Where requests, refusals and upstream errors are counted.
    pub metrics: Arc<Metrics>,
}

/// What the request path knows about the client connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The peer's address, from the socket.
    pub peer: SocketAddr,
    /// Whether the client connection is TLS.
    pub tls: bool,
}

/// Where the presented key came from; decides which header is removed before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeySource {
    Header,
    Bearer,
}

/// What the request path learned about the caller, for the response headers and the log.
#[derive(Default)]
struct Caller {
    key: Option<Arc<KeyEntry>>,
    ratelimit: Option<HeaderValue>,
    /// Time to the upstream's response head, once forwarded.
    upstream: Option<Duration>,
    /// Request body bytes forwarded, once forwarding starts.
    bytes_in: Option<Arc<AtomicU64>>,
}

/// Handles one request end to end; never fails (errors become responses). The access line is
/// written when the returned body is finished or dropped.
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<LoggedBody<ResponseBody>> {
    let start = Instant::now();
    let live = shared.live.load_full();
    let request_id = request_id(req.headers());
    let method = req.method().clone();
    let uri = req.uri().clone();

    let mut caller = Caller::default();
    let mut resp = match admit_and_forward(shared, &live, conn, req, &request_id, &mut caller).await
    {
        Ok(resp) => resp,
        Err(err) => {
            shared.metrics.refused(&err);
            refuse(&err, &request_id)
        }
    };
    let headers = resp.headers_mut();
    if let (Some(key), Some(ratelimit)) = (&caller.key, caller.ratelimit) {
        headers.insert(RATELIMIT_POLICY.clone(), key.policy_header.clone());
        headers.insert(RATELIMIT.clone(), ratelimit);
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());

    let record = AccessRecord {
        start,
        request_id,
        key: caller.key,
        method,
        uri,
        status: resp.status().as_u16(),
        upstream: caller.upstream,
        bytes_in: caller.bytes_in,
        client_ip: conn.peer.ip(),
        metrics: Arc::clone(&shared.metrics),
    };
    resp.map(|body| LoggedBody::new(body, record))
}

/// Phases 2 to 5; records the key and its rate-limit state in `caller` as soon as known.
async fn admit_and_forward(
    shared: &Shared,
    live: &Live,
    conn: &ConnInfo,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    caller: &mut Caller,
) -> Result<Response<ResponseBody>, GatewayError> {
    let (entry, source) = authenticate(live, req.headers())?;
    caller.key = Some(Arc::clone(&entry));
    let normal = check_scope(&entry, req.method(), req.uri())?;
    let admission = quota::admit(&entry.limiter, entry.quota.as_deref());
    caller.ratelimit = Some(quota::ratelimit_header(&admission));
    match admission {
        Admission::Admit { .. } => {}
        Admission::RateLimited { retry_after } => {
            return Err(GatewayError::RateLimited { retry_after })
        }
        Admission::QuotaExceeded { retry_after } => {
            return Err(GatewayError::QuotaExceeded { retry_after })
        }
    }
    let up = rewrite(live, conn, req, &entry, source, request_id, normal)?;
    let bytes_in = Arc::new(AtomicU64::new(0));
    caller.bytes_in = Some(Arc::clone(&bytes_in));
    let up = up.map(|body| CountedBody::new(body, bytes_in));
    let sent = Instant::now();
    let result = forward(shared, live, up, request_id).await;
    caller.upstream = Some(sent.elapsed());
    result
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

/// Phase 2: finds, hashes and looks up the key.
fn authenticate(
    live: &Live,
    headers: &HeaderMap,
) -> Result<(Arc<KeyEntry>, KeySource), GatewayError> {
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
    let (key, source) = match (header_key, bearer_key) {
        (Some(_), Some(_)) => return Err(GatewayError::AmbiguousApiKey),
        (Some(v), None) => (v.as_bytes(), KeySource::Header),
        (None, Some(t)) => (t, KeySource::Bearer),
        (None, None) => return Err(GatewayError::MissingApiKey),
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
    let found = live
        .table
        .lookup(&KeyHash::of(key))
        .ok_or(GatewayError::InvalidApiKey)?;
    let entry = found.entry;
    if entry.disabled {
        return Err(GatewayError::InvalidApiKey);
    }
    let now = SystemTime::now();
    if entry.expires.is_some_and(|e| e <= now) || found.previous_until.is_some_and(|e| e <= now) {
        return Err(GatewayError::ExpiredApiKey);
    }
    Ok((Arc::clone(entry), source))
}

/// Phase 3: for a key with scopes, the normalised path when a scope covers the request.
fn check_scope(
    entry: &KeyEntry,
    method: &Method,
    uri: &Uri,
) -> Result<Option<NormalPath>, GatewayError> {
    if entry.scopes.is_empty() {
        return Ok(None);
    }
    let normal = scope::normalise(uri.path()).map_err(|_| {
        GatewayError::BadRequest("Encoded slashes, backslashes and NULs are not accepted in paths.")
    })?;
    if !scope::allowed(&entry.scopes, method, &normal) {
        return Err(GatewayError::ForbiddenScope);
    }
    Ok(Some(normal))
}

/// The token of an `Authorization: Bearer <token>` value (scheme matched case-insensitively).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
        Some(value[7..].trim_ascii())
    } else {
        None
    }
}

/// Phase 4: the request as the upstream will see it.
fn rewrite(
    live: &Live,
    conn: &ConnInfo,
    req: Request<Incoming>,
    entry: &KeyEntry,
    source: KeySource,
    request_id: &HeaderValue,
    normal: Option<NormalPath>,
) -> Result<Request<Incoming>, GatewayError> {
    let (mut parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        return Err(GatewayError::BadRequest("CONNECT is not supported."));
    }
    if parts.version < Version::HTTP_2 && parts.uri.scheme().is_some() {
        return Err(GatewayError::BadRequest(
            "Absolute-form request targets are not accepted.",
        ));
    }
    let upstream = &live.config.upstream;
    let normalised;
    let path_and_query = match (&normal, parts.uri.query()) {
        (Some(n), Some(q)) => {
            normalised = format!("{}?{q}", n.encoded);
            &normalised
        }
        (Some(n), None) => &n.encoded,
        (None, _) => parts.uri.path_and_query().map_or("/", PathAndQuery::as_str),
    };
    if !path_and_query.starts_with('/') {
        return Err(GatewayError::BadRequest(
            "The request target must be a path.",
        ));
    }
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

    rewrite_headers(
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
            path: parts.uri.path(),
        };
        parts
            .headers
            .insert(X_KEYGATE_SIGNATURE.clone(), key.header(now, &who));
    }
    Ok(Request::from_parts(parts, body))
}

/// Phase 5's header part (public for the criterion bench): drops the key (`bearer`: it came
/// in `Authorization`), hop-by-hop and client-sent `X-Keygate-*` headers, and sets the
/// forwarding, request id and identity headers.
pub fn rewrite_headers(
    live: &Live,
    conn: &ConnInfo,
    headers: &mut HeaderMap,
    entry: &KeyEntry,
    bearer: bool,
    original_host: Option<HeaderValue>,
    request_id: &HeaderValue,
) {
    let upstream = &live.config.upstream;
    strip_hop_by_hop(headers);
    headers.remove(&live.config.auth.header);
    if bearer {
        headers.remove(header::AUTHORIZATION);
    }
    strip_keygate_headers(headers);

    let peer_ip = conn.peer.ip().to_string();
    let xff = match forwarded_for(headers) {
        Some(prior) => format!("{prior}, {peer_ip}"),
        None => peer_ip,
    };
    headers.insert(
        X_FORWARDED_FOR.clone(),
        HeaderValue::try_from(xff).expect("IP addresses are ASCII"),
    );
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    match original_host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    headers.insert(
        header::HOST,
        HeaderValue::try_from(upstream.authority.as_str()).expect("authority is a valid header"),
    );
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    headers.insert(X_KEYGATE_KEY_ID.clone(), entry.id_header.clone());
    if let Some(tenant) = &entry.tenant_header {
        headers.insert(X_KEYGATE_TENANT.clone(), tenant.clone());
    }
}

/// The client's `X-Forwarded-For` values joined, if any.
fn forwarded_for(headers: &HeaderMap) -> Option<String> {
    let mut joined: Option<String> = None;
    for v in headers.get_all(&X_FORWARDED_FOR) {
        let v = v.to_str().ok()?.trim();
        if v.is_empty() {
            continue;
        }
        match &mut joined {
            Some(j) => {
                j.push_str(", ");
                j.push_str(v);
            }
            None => joined = Some(v.to_string()),
        }
    }
    joined
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
}

/// Removes every client-sent `X-Keygate-*` header, so an identity cannot be spoofed.
fn strip_keygate_headers(headers: &mut HeaderMap) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-keygate-"))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// Phase 5: sends the request upstream and waits for the head within `upstream.timeout`.
async fn forward(
    shared: &Shared,
    live: &Live,
    req: Request<crate::upstream::RequestBody>,
    request_id: &HeaderValue,
) -> Result<Response<ResponseBody>, GatewayError> {
    let deadline = live.config.upstream.timeout;
    let sent = Instant::now();
    let result = tokio::time::timeout(deadline, shared.client.request(req)).await;
    match &result {
        Ok(Ok(_)) => shared.metrics.upstream_head(sent.elapsed()),
        Ok(Err(err)) if err.is_connect() => {
            shared.metrics.upstream_error(UpstreamErrorKind::Connect)
        }
        Ok(Err(_)) => shared.metrics.upstream_error(UpstreamErrorKind::Reset),
        Err(_) => shared.metrics.upstream_error(UpstreamErrorKind::Timeout),
    }
    match result {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, Either::Left(body)))
        }
        Ok(Err(err)) => {
            tracing::warn!(
                request_id = request_id.to_str().unwrap_or("-"),
                "upstream request failed: {}",
                error_chain(&err)
            );
            Err(GatewayError::UpstreamUnavailable)
        }
        Err(_) => {
            tracing::warn!(
                request_id = request_id.to_str().unwrap_or("-"),
                "upstream sent no response head within {deadline:?}"
            );
            Err(GatewayError::UpstreamTimeout)
        }
    }
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
    HeaderValue::try_from(format!("{prefix:016x}{n:016x}")).expect("hex is ASCII")
}

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
            HeaderValue::from_static("close, x-secret-hop"),
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
