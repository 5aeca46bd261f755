//! The Redis limit store: one multiplexed connection, the GCRA script, and its answers turned
//! into the same [`Admission`]s the in-process limiters give.
//!
//! The script (`gcra.lua` beside this file) is loaded when a connection is made and then called
//! by its SHA (`EVALSHA`); the redis crate's [`Script`] reloads it by itself if Redis answers
//! `NOSCRIPT` (a restarted Redis without persistence). One call is one round trip, and the read,
//! the decision and the write happen atomically inside Redis, so any number of instances can
//! share a bucket.

use std::{fmt, sync::Arc, time::Duration};

use arc_swap::ArcSwapOption;
use redis::{aio::MultiplexedConnection, AsyncConnectionConfig, IntoConnectionInfo, Script};

use crate::{
    limit::{self, RateLimit},
    quota::{Admission, QuotaLimit},
};

/// Time allowed to open a connection (TCP, TLS, AUTH, SELECT) and load the script. Off the
/// request path: only start-up and the background probe connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Prefix of every key keygate writes in Redis.
pub const KEY_PREFIX: &str = "keygate:";

/// The key [`RedisStore::probe`] runs the script on. Key ids never contain `:`, so it is never
/// a budget's key (`keygate:<id>:<budget>`).
pub const PROBE_KEY: &str = "keygate:probe";

/// The GCRA, run inside Redis.
const GCRA_LUA: &str = include_str!("gcra.lua");

/// A Redis URL (`redis://` or `rediss://`, optionally `user:password@`, optionally `/db`).
///
/// Its `Debug` and `Display` hide the password, so the URL can be logged and printed.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl(String);

impl StoreUrl {
    /// Checks `s` is a Redis URL keygate can use; the message never repeats the URL (it may
    /// hold a password).
    pub fn parse(s: &str) -> Result<StoreUrl, String> {
        let s = s.trim();
        if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
            return Err(
                "store must be a URL like \"redis://host:6379/0\" or \"rediss://user:password@host:6380/0\""
                    .into(),
            );
        }
        match s.into_connection_info() {
            Ok(_) => Ok(StoreUrl(s.to_string())),
            Err(e) => Err(format!(
                "store is not a usable Redis URL ({})",
                e.detail().unwrap_or("malformed")
            )),
        }
    }

    /// Whether the connection uses TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }

    /// The URL with its password replaced by `***`, for logs.
    pub fn redacted(&self) -> String {
        let (scheme, rest) = self.0.split_once("://").expect("checked in parse");
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                let hidden = if userinfo.contains(':') || user.is_empty() {
                    ":***"
                } else {
                    ""
                };
                format!("{scheme}://{user}{hidden}@{host}{path}")
            }
            None => self.0.clone(),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({})", self.redacted())
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection is open (never made, or dropped after a failure).
    #[error("not connected")]
    NotConnected,
    /// Redis did not answer within the allowed time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Redis or the connection to it failed.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// The script answered something other than `{admitted, n}`.
    #[error("unexpected answer from the GCRA script")]
    Protocol,
}

/// A connection to the limit store and the GCRA script.
pub struct RedisStore {
    url: StoreUrl,
    client: redis::Client,
    script: Script,
    conn: ArcSwapOption<MultiplexedConnection>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The connection a [`RedisStore::check`] used, so a failure only drops that one.
pub type ConnHandle = Arc<MultiplexedConnection>;

impl RedisStore {
    /// A store for `url`; nothing is connected until [`connect`](Self::connect).
    pub fn new(url: &StoreUrl) -> Result<RedisStore, StoreError> {
        if url.is_tls() {
            crate::tls::install_crypto_provider();
        }
        Ok(RedisStore {
            url: url.clone(),
            client: redis::Client::open(url.0.as_str())?,
            script: Script::new(GCRA_LUA),
            conn: ArcSwapOption::empty(),
        })
    }

    /// The store's URL (its `Display` hides the password).
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    /// Opens a new connection, loads the script, and makes it the one requests use.
    ///
    /// [`CONNECT_TIMEOUT`] also bounds each later call on the connection, as a backstop: the
    /// request path puts its own, shorter deadline around [`check`](Self::check).
    pub async fn connect(&self) -> Result<(), StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(CONNECT_TIMEOUT);
        let open = async {
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            self.script.load_async(&mut conn).await?;
            Ok::<_, StoreError>(conn)
        };
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| StoreError::Timeout(CONNECT_TIMEOUT))??;
        self.conn.store(Some(Arc::new(conn)));
        Ok(())
    }

    /// One run of the GCRA script on [`PROBE_KEY`] over the current connection within
    /// `within`: whether the store can decide a request (read, write, within the request
    /// path's deadline), not merely whether it answers. A Redis that answers `PING` and
    /// `SCRIPT LOAD` but refuses the script's `SET` (a read-only replica after a failover,
    /// `maxmemory` with `noeviction`, an ACL user without write access) fails here. The
    /// connection is dropped when it does not succeed.
    pub async fn probe(&self, within: Duration) -> Result<(), StoreError> {
        let Some(handle) = self.conn.load_full() else {
            return Err(StoreError::NotConnected);
        };
        let mut conn = MultiplexedConnection::clone(&handle);
        // t = 1 µs and a burst of a million: always admitted, so the script always reaches its
        // SET, which leaves a state Redis forgets 1 ms later.
        let mut invocation = self.script.key(PROBE_KEY);
        invocation.arg(1u64).arg(1_000_000u32);
        let run = invocation.invoke_async::<(u8, i64, i64, i64)>(&mut conn);
        let result = match tokio::time::timeout(within, run).await {
            Ok(Ok((1, ..))) => Ok(()),
            Ok(Ok(_)) => Err(StoreError::Protocol),
            Ok(Err(e)) => Err(StoreError::from(e)),
            Err(_) => Err(StoreError::Timeout(within)),
        };
        if result.is_err() {
            self.disconnect(&handle);
        }
        result
    }

    /// Forgets `used` if it is still the current connection (a later one is kept).
    pub fn disconnect(&self, used: &ConnHandle) {
        let current = self.conn.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, used)) {
            self.conn.compare_and_swap(&*current, None);
        }
    }

    /// Takes one request from key `key_id`'s rate and (when it has one) quota, atomically across
    /// every instance: both budgets are tested before either is charged.
    ///
    /// The clock is the Redis server's, so there is no `now` argument: instances whose clocks
    /// disagree still share one timeline. On failure the connection used is returned with the
    /// error, so the caller can drop it.
    pub async fn check(
        &self,
        key_id: &str,
        rate: &RateLimit,
        quota: Option<&QuotaLimit>,
    ) -> Result<Admission, (StoreError, Option<ConnHandle>)> {
        let Some(handle) = self.conn.load_full() else {
            return Err((StoreError::NotConnected, None));
        };
        let mut conn = MultiplexedConnection::clone(&handle);
        let mut invocation = self.script.key(bucket_key(key_id, "rate"));
        invocation.arg(period_micros(rate)).arg(rate.burst.get());
        if let Some(q) = quota {
            invocation
                .key(bucket_key(key_id, "quota"))
                .arg(quota_period_micros(q))
                .arg(q.count.get());
        }
        let answer: Result<(u8, i64, i64, i64), _> = invocation.invoke_async(&mut conn).await;
        match answer {
            Ok(answer) => admission(rate, quota, answer).map_err(|e| (e, Some(handle))),
            Err(e) => Err((StoreError::Redis(e), Some(handle))),
        }
    }
}

/// The Redis key of a key id's budget (`keygate:<id>:<budget>`).
pub fn bucket_key(key_id: &str, budget: &str) -> String {
    let mut key = String::with_capacity(KEY_PREFIX.len() + key_id.len() + 1 + budget.len());
    key.push_str(KEY_PREFIX);
    key.push_str(key_id);
    key.push(':');
    key.push_str(budget);
    key
}

/// The GCRA's `t` in whole microseconds (at least 1), the script's resolution.
pub fn period_micros(limit: &RateLimit) -> u64 {
    u64::try_from(limit.period().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The quota's `t` in whole microseconds (at least 1).
pub fn quota_period_micros(quota: &QuotaLimit) -> u64 {
    u64::try_from((quota.per / quota.count.get()).as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The script's `{admitted, n, m, used}` as an [`Admission`], rounded as the in-process limiters
/// round.
pub fn admission(
    rate: &RateLimit,
    quota: Option<&QuotaLimit>,
    (admitted, n, m, used): (u8, i64, i64, i64),
) -> Result<Admission, StoreError> {
    let count = |v: i64| u32::try_from(v).map_err(|_| StoreError::Protocol);
    let wait = |v: i64| {
        u64::try_from(v)
            .map(|us| limit::retry_after_secs(Duration::from_micros(us)))
            .map_err(|_| StoreError::Protocol)
    };
    match (admitted, m, quota) {
        (1, _, None) => {
            let remaining = count(n)?;
            Ok(Admission::Admit {
                remaining,
                reset: limit::reset_secs(rate, remaining),
                quota: None,
            })
        }
        (1, m, Some(_)) => {
            let remaining = count(n)?;
            let q_remaining = count(m)?;
            // The exact time until the quota is whole, as in process (not counted from the
            // whole requests remaining, which is up to one period more).
            let q_reset =
                Duration::from_micros(u64::try_from(used).map_err(|_| StoreError::Protocol)?);
            Ok(Admission::Admit {
                remaining,
                reset: limit::reset_secs(rate, remaining),
                quota: Some((
                    q_remaining,
                    q_reset.as_secs() + u64::from(q_reset.subsec_nanos() > 0),
                )),
            })
        }
        (0, 1, _) => Ok(Admission::RateLimited {
            retry_after: wait(n)?,
        }),
        (0, 2, Some(_)) => Ok(Admission::QuotaExceeded {
            retry_after: wait(n)?,
        }),
        _ => Err(StoreError::Protocol),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::limit::test_limit as limit;

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        let u = StoreUrl::parse("redis://app:s3cret@10.0.0.5:6380/2").unwrap();
        assert_eq!(u.to_string(), "redis://app:***@10.0.0.5:6380/2");
        assert!(!format!("{u:?}").contains("s3cret"));
        let u = StoreUrl::parse("rediss://:s3cret@cache.internal").unwrap();
        assert!(u.is_tls());
        assert_eq!(u.to_string(), "rediss://:***@cache.internal");
        let u = StoreUrl::parse("redis://127.0.0.1:6379/0").unwrap();
        assert_eq!(u.to_string(), "redis://127.0.0.1:6379/0");
        assert!(StoreUrl::parse("http://127.0.0.1:6379").is_err());
        assert!(StoreUrl::parse("127.0.0.1:6379").is_err());
        let err = StoreUrl::parse("redis://u:s3cret@host:notaport/0").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn script_answers_round_like_the_in_process_limiter() {
        let l = limit("10/s", 20);
        assert_eq!(period_micros(&l), 100_000);
        assert_eq!(
            admission(&l, None, (1, 19, -1, -1)).unwrap(),
            Admission::Admit {
                remaining: 19,
                reset: 1,
                quota: None
            }
        );
        assert_eq!(
            admission(&l, None, (0, 1, 1, 0)).unwrap(),
            Admission::RateLimited { retry_after: 1 }
        );
        assert_eq!(
            admission(&limit("1/min", 3), None, (0, 59_999_001, 1, 0)).unwrap(),
            Admission::RateLimited { retry_after: 60 }
        );
        assert!(admission(&l, None, (2, 0, 0, 0)).is_err());
        assert!(
            admission(&l, None, (0, 5, 2, 0)).is_err(),
            "a quota refusal without a quota"
        );
        assert_eq!(period_micros(&limit("4000000/s", 1)), 1);
    }

    #[test]
    fn quota_answers_carry_the_quota_state() {
        let l = limit("10/s", 20);
        let q = QuotaLimit::parse("100/h").unwrap();
        assert_eq!(quota_period_micros(&q), 36_000_000);
        assert_eq!(
            admission(&l, Some(&q), (1, 19, 98, 71_000_001)).unwrap(),
            Admission::Admit {
                remaining: 19,
                reset: 1,
                quota: Some((98, 72))
            }
        );
        assert!(admission(&l, Some(&q), (1, 19, 98, -1)).is_err());
        assert_eq!(
            admission(&l, Some(&q), (0, 36_000_000, 2, 0)).unwrap(),
            Admission::QuotaExceeded { retry_after: 36 }
        );
    }

    #[test]
    fn bucket_keys_are_namespaced_by_id_and_budget() {
        assert_eq!(bucket_key("partner-a", "rate"), "keygate:partner-a:rate");
        // A budget's key has a ':' after the prefix and its id; ids cannot hold one, and the
        // probe's key has none: no key id makes a budget's key the probe's.
        assert!(!crate::config::valid_id("a:b"));
        assert!(PROBE_KEY.starts_with(KEY_PREFIX));
        assert!(!PROBE_KEY[KEY_PREFIX.len()..].contains(':'));
    }
}
