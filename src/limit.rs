//! Per-key rate limiting: a GCRA limiter (governor) per key id, and the IETF rate-limit headers.
//!
//! A [`KeyLimiter`] lives in an `Arc` shared by the key table entries that carry the same id
//! (a rotating key's old and new hash share one). When the table is rebuilt on reload, the
//! limiter of an id whose [`RateLimit`] did not change is carried over, so a reload never hands
//! out a fresh budget; limiters of removed ids are dropped with the old table. Changing a key's
//! rate or burst starts it on a fresh limiter (the old GCRA state means nothing under a new rate).

use std::{fmt, num::NonZeroU32, time::Duration};

use governor::{
    clock::{Clock, MonotonicClock},
    middleware::StateInformationMiddleware,
    state::{InMemoryState, NotKeyed},
    Quota, RateLimiter,
};
use http::HeaderValue;

/// A rate: `count` requests per `per`, with a burst of `burst` requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// Requests replenished per window.
    pub count: NonZeroU32,
    /// The window the count is given for (1 s, 1 min, 1 h, ...).
    pub per: Duration,
    /// How many requests may arrive at once on a full budget.
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// Parses `N/s`, `N/min`, `N/h` (and `N/day`, `N/week`, `N/month` where `long` is true)
    /// into a count and a window.
    pub fn parse_rate(s: &str, long: bool) -> Result<(NonZeroU32, Duration), String> {
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("rate {s:?} is not of the form N/s, N/min or N/h"))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("rate {s:?}: {n:?} is not a whole number"))?;
        let n = NonZeroU32::new(n).ok_or_else(|| format!("rate {s:?} must be at least 1"))?;
        let per = match (unit.trim(), long) {
            ("s" | "sec" | "second", _) => Duration::from_secs(1),
            ("m" | "min" | "minute", _) => Duration::from_secs(60),
            ("h" | "hour", _) => Duration::from_secs(3600),
            ("d" | "day", true) => Duration::from_secs(86_400),
            ("week", true) => Duration::from_secs(7 * 86_400),
            ("month", true) => Duration::from_secs(30 * 86_400),
            (u, false) => return Err(format!("rate {s:?}: unit {u:?} is not one of s, min, h")),
            (u, true) => {
                return Err(format!(
                    "quota {s:?}: unit {u:?} is not one of h, day, week, month"
                ))
            }
        };
        Ok((n, per))
    }

    /// The time it takes to earn back one request.
    pub fn period(&self) -> Duration {
        self.per / self.count.get()
    }

    /// Whether the whole burst's worth of time fits the limiter's arithmetic: governor keeps
    /// it in `u64` nanoseconds (584 years) unchecked, so `rate = "1/h"` with `burst = 6000000`
    /// would wrap to a burst of ~876,000 (and the Redis path, in floating point, disagree).
    /// Checked against 500 years, when the config is read.
    pub fn fits(&self) -> bool {
        const LIMIT_NANOS: u128 = 500 * 365 * 24 * 3600 * 1_000_000_000;
        self.period().as_nanos() * u128::from(self.burst.get()) <= LIMIT_NANOS
    }

    /// Seconds to refill the whole burst: the `w` of `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        ceil_secs(self.period() * self.burst.get()).max(1)
    }

    /// The `RateLimit-Policy` field value for this limit under `name`.
    pub fn policy_field(&self, name: &str) -> String {
        format!("\"{name}\";q={};w={}", self.burst, self.window_secs())
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            86_400 => "day",
            604_800 => "week",
            2_592_000 => "month",
            _ => "?",
        };
        write!(f, "{}/{} burst {}", self.count, unit, self.burst)
    }
}

// `MonotonicClock` (std `Instant`) rather than governor's default quanta clock: the quanta
// clock is 40 bytes held in every limiter (and we kept a second copy), which at a million keys
// is 80 MB of clocks. A zero-sized clock keeps the limiter at 64 bytes.
type Gcra = RateLimiter<NotKeyed, InMemoryState, MonotonicClock, StateInformationMiddleware>;

/// The outcome of asking a limiter for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; `remaining` requests left in the burst, `reset` seconds until it is full again.
    Admit {
        /// Requests that may follow at once.
        remaining: u32,
        /// Whole seconds until the burst is whole again.
        reset: u64,
    },
    /// Refused; admitted again after `retry_after` whole seconds (≥ 1).
    Deny {
        /// Whole seconds to wait.
        retry_after: u64,
    },
}

/// One key id's limiter. Kept small (one per configured key): the `RateLimit-Policy` value
/// lives, shared, in the key table entry.
pub struct KeyLimiter {
    limit: RateLimit,
    gcra: Gcra,
}

impl fmt::Debug for KeyLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyLimiter")
            .field("limit", &self.limit)
            .finish()
    }
}

impl KeyLimiter {
    /// A fresh limiter with a full burst.
    pub fn new(limit: RateLimit) -> Self {
        let quota = Quota::with_period(limit.period())
            .unwrap_or_else(|| Quota::per_second(limit.count))
            .allow_burst(limit.burst);
        let gcra = RateLimiter::direct_with_clock(quota, MonotonicClock)
            .with_middleware::<StateInformationMiddleware>();
        KeyLimiter { limit, gcra }
    }

    /// The limit this limiter enforces.
    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// Takes one request from the budget, or says how long to wait.
    pub fn check(&self) -> Decision {
        match self.gcra.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision::Admit {
                    remaining,
                    reset: reset_secs(&self.limit, remaining),
                }
            }
            Err(not_until) => Decision::Deny {
                retry_after: retry_after_secs(not_until.wait_time_from(MonotonicClock.now())),
            },
        }
    }
}

/// Seconds until a burst with `remaining` left is whole again.
pub fn reset_secs(limit: &RateLimit, remaining: u32) -> u64 {
    let missing = limit.burst.get().saturating_sub(remaining);
    ceil_secs(limit.period() * missing)
}

/// A wait rounded up to whole seconds, at least 1: after it, the request is admitted.
pub fn retry_after_secs(wait: Duration) -> u64 {
    ceil_secs(wait).max(1)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The `RateLimit` field value: `"default";r=<remaining>;t=<reset>`.
pub fn ratelimit_field(remaining: u32, reset: u64) -> HeaderValue {
    HeaderValue::try_from(format!("\"default\";r={remaining};t={reset}"))
        .expect("ASCII header value")
}

/// A limit from its written form, for tests.
#[cfg(test)]
pub(crate) fn test_limit(rate: &str, burst: u32) -> RateLimit {
    let (count, per) = RateLimit::parse_rate(rate, false).expect("a valid test rate");
    RateLimit {
        count,
        per,
        burst: NonZeroU32::new(burst).expect("a positive test burst"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_limit as limit;

    #[test]
    fn parses_rates_and_refuses_nonsense() {
        assert_eq!(
            RateLimit::parse_rate("10/s", false).unwrap(),
            (NonZeroU32::new(10).unwrap(), Duration::from_secs(1))
        );
        assert_eq!(
            RateLimit::parse_rate("600/min", false).unwrap().1,
            Duration::from_secs(60)
        );
        assert_eq!(
            RateLimit::parse_rate("5/h", false).unwrap().1,
            Duration::from_secs(3600)
        );
        assert!(RateLimit::parse_rate("10/day", false).is_err());
        assert!(RateLimit::parse_rate("10000/day", true).is_ok());
        assert!(RateLimit::parse_rate("0/s", false).is_err());
        assert!(RateLimit::parse_rate("ten/s", false).is_err());
        assert!(RateLimit::parse_rate("10", false).is_err());
    }

    #[test]
    fn policy_window_is_time_to_refill_the_burst() {
        assert_eq!(
            limit("10/s", 20).policy_field("default"),
            "\"default\";q=20;w=2"
        );
        assert_eq!(limit("1/min", 5).window_secs(), 300);
        assert_eq!(limit("100/s", 1).window_secs(), 1);
    }

    #[test]
    fn burst_is_admitted_then_refused_with_a_retry_after() {
        let l = KeyLimiter::new(limit("1/s", 3));
        for expected_remaining in [2, 1, 0] {
            match l.check() {
                Decision::Admit { remaining, .. } => assert_eq!(remaining, expected_remaining),
                d => panic!("expected admit, got {d:?}"),
            }
        }
        assert_eq!(l.check(), Decision::Deny { retry_after: 1 });
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn ratelimit_field_format() {
        assert_eq!(ratelimit_field(4, 2), "\"default\";r=4;t=2");
        assert_eq!(reset_secs(&limit("10/s", 20), 19), 1);
        assert_eq!(reset_secs(&limit("10/s", 20), 20), 0);
    }

    #[test]
    fn a_limiter_stays_small_because_there_is_one_per_key() {
        // A million keys hold a million limiters: 64 bytes each, not the 176 of a quanta clock
        // and a header copy per limiter.
        assert!(std::mem::size_of::<KeyLimiter>() <= 64);
    }
}
