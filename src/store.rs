//! Limits shared by several instances: the [`Limits`] front the request path asks, the Redis
//! store behind it, and the fallback when Redis does not answer.
//!
//! Without `[limits] store`, [`Limits::check`] is the in-process limiter and nothing else (no
//! allocation, no lock, no await that can suspend). With a store, each check is one `EVALSHA`
//! round trip to Redis ([`redis::RedisStore`]) bounded by [`STORE_TIMEOUT`]; the GCRA there is
//! the same as in process, so the `RateLimit`, `RateLimit-Policy` and `Retry-After` fields are
//! the same whichever answers.
//!
//! The mode is a small state machine, readable at any time through [`Limits::mode`]:
//!
//! ```text
//!             call fails or times out                        (one warn line)
//!   Shared ───────────────────────────────────▶ Fallback
//!      ▲                                            │  on_store_error applies to every request:
//!      └────────────────────────────────────────────┘  local | allow | deny (503)
//!        the background probe connects, loads the script and   (one info line)
//!        runs it once on its probe key within STORE_TIMEOUT
//! ```
//!
//! In `Fallback` no request waits for Redis: a probe task reconnects every [`PROBE_INTERVAL`]
//! (the first one an interval after the trip) and flips the mode back when Redis runs the
//! script (`keygate:probe`, a key no key id can name) as fast as requests wait for it: a store
//! that is up but slow, or that answers but refuses writes, stays in fallback, instead of being
//! taken back and tripping again at each request. The budgets are keyed by key **id**
//! (`keygate:<id>:rate`), never by hash, so every hash of one id (a rotating key) and every
//! instance share one budget, and a reload or a revocation changes nothing in Redis.

pub mod redis;

use std::{
    fmt,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::{watch, Notify};

use crate::{
    error::GatewayError,
    keys::KeyEntry,
    quota::{self, Admission, QuotaLimiter},
};

use self::redis::{RedisStore, StoreError, StoreUrl};

/// The longest a request waits for Redis before the fallback answers instead. Loopback and
/// same-zone round trips take well under a millisecond; 100 ms only trips on a Redis that is
/// down, overloaded or cut off, and bounds what a partner waits in that case.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(100);

/// How often the background probe tries to reach Redis while in fallback.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// `[limits] on_store_error`: what to do while the store does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreError {
    /// Each instance enforces the limits with its own in-process limiter (the default). With N
    /// instances a partner may get up to N times its limit until Redis is back.
    #[default]
    Local,
    /// Admit every request with a valid key, without rate-limit fields.
    Allow,
    /// Refuse every request with a valid key: 503 `limit_store_unavailable`.
    Deny,
}

impl OnStoreError {
    /// Parses the config value.
    pub fn parse(s: &str) -> Result<OnStoreError, String> {
        match s {
            "local" => Ok(OnStoreError::Local),
            "allow" => Ok(OnStoreError::Allow),
            "deny" => Ok(OnStoreError::Deny),
            other => Err(format!(
                "on_store_error {other:?} is not one of \"local\", \"allow\", \"deny\""
            )),
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Local => "local",
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        }
    }
}

/// `[limits] store` and `on_store_error`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Where the shared budgets live.
    pub url: StoreUrl,
    /// What to do while it does not answer.
    pub on_error: OnStoreError,
}

/// Where limits are decided right now; see the module doc for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LimitMode {
    /// No store configured: each instance's own limiter (gauge value 0).
    InProcess = 0,
    /// Redis answers: budgets shared by every instance (gauge value 1).
    Shared = 1,
    /// A store is configured but does not answer: `on_store_error` applies (gauge value 2).
    Fallback = 2,
}

impl LimitMode {
    /// The mode as a number, for a gauge.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The mode's name, for logs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitMode::InProcess => "in_process",
            LimitMode::Shared => "shared",
            LimitMode::Fallback => "fallback",
        }
    }

    fn from_u8(v: u8) -> LimitMode {
        match v {
            1 => LimitMode::Shared,
            2 => LimitMode::Fallback,
            _ => LimitMode::InProcess,
        }
    }
}

impl fmt::Display for LimitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The front the request path asks for every limit: in process, or Redis with a fallback.
#[derive(Debug)]
pub struct Limits {
    store: Option<Arc<StoreLink>>,
}

/// A configured store, its fallback and its current mode.
#[derive(Debug)]
struct StoreLink {
    redis: RedisStore,
    on_error: OnStoreError,
    mode: AtomicU8,
    wake: Notify,
}

impl Limits {
    /// In-process limits only.
    pub fn in_process() -> Limits {
        Limits { store: None }
    }

    /// Limits for `store`: connects once (up to [`redis::CONNECT_TIMEOUT`]), then starts the
    /// background probe, which ends when `stop` turns `Some`. An unreachable store does not stop
    /// the gateway: it starts in fallback and switches over when Redis answers.
    pub async fn start(
        store: Option<&StoreConfig>,
        stop: watch::Receiver<Option<Duration>>,
    ) -> Result<Limits, StoreError> {
        let Some(config) = store else {
            return Ok(Limits::in_process());
        };
        let link = Arc::new(StoreLink {
            redis: RedisStore::new(&config.url)?,
            on_error: config.on_error,
            mode: AtomicU8::new(LimitMode::Fallback.as_u8()),
            wake: Notify::new(),
        });
        match link.share().await {
            Ok(()) => {
                tracing::info!(
                    store = %link.redis.url(),
                    "limits shared through the limit store"
                );
            }
            Err(e) => tracing::warn!(
                store = %link.redis.url(),
                on_store_error = link.on_error.as_str(),
                "limit store unavailable at start-up ({}); applying on_store_error until it answers",
                describe(&e)
            ),
        }
        tokio::spawn(probe(Arc::clone(&link), stop));
        Ok(Limits { store: Some(link) })
    }

    /// Where limits are decided right now (a metrics layer can read this at any time).
    pub fn mode(&self) -> LimitMode {
        match &self.store {
            None => LimitMode::InProcess,
            Some(link) => LimitMode::from_u8(link.mode.load(Ordering::Acquire)),
        }
    }

    /// Takes one request from `key`'s rate and quota (both are charged or neither): from its
    /// in-process limiters, or from Redis when a store is configured and answering.
    ///
    /// `Ok(Some(admission))` is the limiters' answer; `Ok(None)` means admitted without a limit
    /// (`on_store_error = "allow"` while the store is down: no rate-limit fields are sent);
    /// `Err` is [`GatewayError::LimitStoreUnavailable`] under `"deny"`.
    pub async fn check(&self, key: &KeyEntry) -> Result<Option<Admission>, GatewayError> {
        let Some(link) = &self.store else {
            return Ok(Some(quota::admit(&key.limiter, key.quota.as_deref())));
        };
        if link.mode.load(Ordering::Acquire) == LimitMode::Shared.as_u8() {
            let quota = key.quota.as_deref().map(QuotaLimiter::limit);
            let call = link.redis.check(&key.id, key.limiter.limit(), quota);
            let failure = match tokio::time::timeout(STORE_TIMEOUT, call).await {
                Ok(Ok(admission)) => return Ok(Some(admission)),
                Ok(Err((e, used))) => {
                    if let Some(used) = used {
                        link.redis.disconnect(&used);
                    }
                    e
                }
                Err(_) => StoreError::Timeout(STORE_TIMEOUT),
            };
            link.trip(&failure);
        }
        link.fallback(key)
    }
}

impl StoreLink {
    /// Connects (and loads the script), then runs the script once on its probe key within
    /// [`STORE_TIMEOUT`], the request path's own deadline; from then on limits are decided in
    /// the store. Otherwise a store that connects within a second but answers slower than the
    /// requests wait, or one that answers `PING` but refuses the script's write (a read-only
    /// replica, `maxmemory` with `noeviction`, a read-only ACL user), would be taken back and
    /// trip again at the next request, flipping between shared and fallback a few times a
    /// second.
    async fn share(&self) -> Result<(), StoreError> {
        self.redis.connect().await?;
        self.redis.probe(STORE_TIMEOUT).await?;
        self.mode
            .store(LimitMode::Shared.as_u8(), Ordering::Release);
        Ok(())
    }

    /// Shared → Fallback, logged once by whichever request saw the failure first.
    fn trip(&self, cause: &StoreError) {
        if self
            .mode
            .compare_exchange(
                LimitMode::Shared.as_u8(),
                LimitMode::Fallback.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            tracing::warn!(
                store = %self.redis.url(),
                on_store_error = self.on_error.as_str(),
                "limit store unavailable ({}); applying on_store_error until it answers",
                describe(cause)
            );
            self.wake.notify_one();
        }
    }

    fn fallback(&self, key: &KeyEntry) -> Result<Option<Admission>, GatewayError> {
        match self.on_error {
            OnStoreError::Local => Ok(Some(quota::admit(&key.limiter, key.quota.as_deref()))),
            OnStoreError::Allow => Ok(None),
            OnStoreError::Deny => Err(GatewayError::LimitStoreUnavailable),
        }
    }
}

/// While in fallback, reconnects every [`PROBE_INTERVAL`]; flips back to shared on success.
async fn probe(link: Arc<StoreLink>, mut stop: watch::Receiver<Option<Duration>>) {
    loop {
        if link.mode.load(Ordering::Acquire) != LimitMode::Fallback.as_u8() {
            tokio::select! {
                _ = link.wake.notified() => {}
                _ = stop.wait_for(Option::is_some) => return,
            }
            // Just tripped: the store gets a probe interval before it is asked again.
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => continue,
                _ = stop.wait_for(Option::is_some) => return,
            }
        }
        match link.share().await {
            Ok(()) => {
                tracing::info!(
                    store = %link.redis.url(),
                    "limit store answering again; limits shared through it"
                );
                continue;
            }
            Err(e) => tracing::debug!(
                store = %link.redis.url(),
                "limit store still unavailable: {}",
                describe(&e)
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = stop.wait_for(Option::is_some) => return,
        }
    }
}

/// An error and its sources for one log line, leaving out a source the message already
/// repeats (the redis crate's errors print their I/O cause and also return it as the source).
fn describe(err: &StoreError) -> String {
    let mut s = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        let text = e.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_store_error_values() {
        assert_eq!(OnStoreError::parse("local"), Ok(OnStoreError::Local));
        assert_eq!(OnStoreError::parse("allow"), Ok(OnStoreError::Allow));
        assert_eq!(OnStoreError::parse("deny"), Ok(OnStoreError::Deny));
        assert!(OnStoreError::parse("Deny").is_err());
        assert_eq!(OnStoreError::default(), OnStoreError::Local);
    }

    #[test]
    fn modes_round_trip_through_their_gauge_value() {
        for m in [LimitMode::InProcess, LimitMode::Shared, LimitMode::Fallback] {
            assert_eq!(LimitMode::from_u8(m.as_u8()), m);
        }
        assert_eq!(Limits::in_process().mode(), LimitMode::InProcess);
    }

    #[test]
    fn causes_are_described_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let text = io.to_string();
        let described = describe(&StoreError::Redis(io.into()));
        assert_eq!(described.matches(&text).count(), 1, "{described}");
        assert_eq!(
            describe(&StoreError::Timeout(STORE_TIMEOUT)),
            "no answer within 100ms"
        );
    }
}
