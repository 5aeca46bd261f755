//! Long-window quotas (`10000/day`) beside the short-window rate, and how the two combine.
//!
//! A quota of `N/period` is a GCRA bucket of `N` requests that refills evenly over the period
//! (a rolling window: after spending the whole day's quota, one request comes back every
//! `period / N`). It lives beside the key's rate limiter in the same [`KeyEntry`], is shared by a
//! rotating key's old and new hash, and is carried across reloads by id while the quota stays.
//!
//! # Neither is charged when the other refuses
//!
//! governor can only check-and-take; it has no way to look without taking and no refund. So
//! the quota is a small GCRA of our own whose one piece of state, the theoretical arrival time
//! (TAT), sits in an atomic and can be handed back exactly: taking advances the TAT by one
//! emission interval, giving back moves it back by one. [`admit`] therefore
//!
//! 1. takes one from the quota; if it refuses, the request is refused and the rate was never
//!    asked;
//! 2. asks the rate limiter (governor, which takes); if it refuses, the quota's unit is given
//!    back, so the request cost nothing anywhere.
//!
//! Giving back is exact even with concurrent requests: GCRA takes are additive on the TAT, so
//! subtracting one interval restores exactly one unit whatever happened in between.
//!
//! [`KeyEntry`]: crate::keys::KeyEntry

use std::{
    fmt,
    num::NonZeroU32,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use http::HeaderValue;

use crate::limit::{self, Decision, KeyLimiter};

/// A quota: `count` requests per `per` (an hour, a day, a week or 30 days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuotaLimit {
    /// Requests per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
}

impl QuotaLimit {
    /// Parses `N/h`, `N/day`, `N/week` or `N/month` (30 days).
    pub fn parse(s: &str) -> Result<QuotaLimit, String> {
        let (count, per) = limit::RateLimit::parse_rate(s, true).map_err(|m| {
            m.replace("rate ", "quota ")
                .replace("N/s, N/min or N/h", "N/h, N/day, N/week or N/month")
        })?;
        if per < Duration::from_secs(3600) {
            return Err(format!(
                "quota {s:?}: use h, day, week or month (short windows belong in rate)"
            ));
        }
        Ok(QuotaLimit { count, per })
    }

    /// The `RateLimit-Policy` item of this quota: `"quota";q=<count>;w=<period in seconds>`.
    pub fn policy_item(&self) -> String {
        format!("\"quota\";q={};w={}", self.count, self.per.as_secs())
    }

    fn interval_nanos(&self) -> u64 {
        (self.per.as_nanos() / u128::from(self.count.get())).max(1) as u64
    }
}

impl fmt::Display for QuotaLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            3600 => "h",
            86_400 => "day",
            604_800 => "week",
            _ => "month",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// One key id's quota bucket (GCRA on an atomic TAT, in nanoseconds since `epoch`).
pub struct QuotaLimiter {
    limit: QuotaLimit,
    epoch: Instant,
    /// Theoretical arrival time: the bucket is full when `tat <= now`.
    tat: AtomicU64,
}

impl fmt::Debug for QuotaLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaLimiter")
            .field("limit", &self.limit)
            .finish()
    }
}

impl QuotaLimiter {
    /// A full bucket.
    pub fn new(limit: QuotaLimit) -> Self {
        QuotaLimiter {
            limit,
            epoch: Instant::now(),
            tat: AtomicU64::new(0),
        }
    }

    /// The quota this bucket enforces.
    pub fn limit(&self) -> &QuotaLimit {
        &self.limit
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Takes one request now.
    pub fn take(&self) -> Decision {
        self.take_at(self.now())
    }

    /// Takes one request at `now` (nanoseconds since the bucket was made).
    pub fn take_at(&self, now: u64) -> Decision {
        let t = self.limit.interval_nanos();
        let capacity = t.saturating_mul(u64::from(self.limit.count.get()));
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new_tat = tat.max(now).saturating_add(t);
            // Admitted while the bucket, after this request, holds no more than `count`.
            if new_tat > now.saturating_add(capacity) {
                let wait = new_tat - now - capacity;
                return Decision::Deny {
                    retry_after: limit::retry_after_secs(Duration::from_nanos(wait)),
                };
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let used = new_tat - now;
                    let remaining = (capacity - used) / t;
                    return Decision::Admit {
                        remaining: remaining as u32,
                        reset: Duration::from_nanos(used).as_secs()
                            + u64::from(!used.is_multiple_of(1_000_000_000)),
                    };
                }
                Err(actual) => tat = actual,
            }
        }
    }

    /// Gives back one request taken by [`take`](Self::take) that was not served after all.
    pub fn give_back(&self) {
        let t = self.limit.interval_nanos();
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(t))
            });
    }
}

/// What [`admit`] decided, with what the response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Both admit. `quota` is the quota's remaining and reset, when the key has one.
    Admit {
        /// Requests left in the rate burst.
        remaining: u32,
        /// Seconds until the burst is whole again.
        reset: u64,
        /// The quota's remaining and reset seconds.
        quota: Option<(u32, u64)>,
    },
    /// The rate refused; nothing was charged.
    RateLimited {
        /// Whole seconds (≥ 1) to wait.
        retry_after: u64,
    },
    /// The quota refused; nothing was charged.
    QuotaExceeded {
        /// Whole seconds (≥ 1) to wait.
        retry_after: u64,
    },
}

/// Asks the quota (when there is one) and the rate, charging both or neither.
pub fn admit(rate: &KeyLimiter, quota: Option<&QuotaLimiter>) -> Admission {
    let quota_state = match quota.map(QuotaLimiter::take) {
        Some(Decision::Deny { retry_after }) => return Admission::QuotaExceeded { retry_after },
        Some(Decision::Admit { remaining, reset }) => Some((remaining, reset)),
        None => None,
    };
    match rate.check() {
        Decision::Admit { remaining, reset } => Admission::Admit {
            remaining,
            reset,
            quota: quota_state,
        },
        Decision::Deny { retry_after } => {
            if let Some(q) = quota {
                q.give_back();
            }
            Admission::RateLimited { retry_after }
        }
    }
}

/// The `RateLimit` field for an admission: `"default";r=..;t=..` for the rate, then
/// `"quota";r=..;t=..` when there is a quota; a refusal names only the policy that refused.
///
/// Written on every admitted request, so it is built in a stack buffer with `itoa` rather than
/// with `format!` (whose formatting machinery and growing `String` cost about twice as much):
/// the header value's own copy is the one allocation.
pub fn ratelimit_header(a: &Admission) -> HeaderValue {
    let mut v = FieldBuf::default();
    match *a {
        Admission::Admit {
            remaining,
            reset,
            quota,
        } => {
            v.item("default", remaining.into(), reset);
            if let Some((q_remaining, q_reset)) = quota {
                v.push(b", ");
                v.item("quota", q_remaining.into(), q_reset);
            }
        }
        Admission::RateLimited { retry_after } => v.item("default", 0, retry_after),
        Admission::QuotaExceeded { retry_after } => v.item("quota", 0, retry_after),
    }
    HeaderValue::from_bytes(v.as_bytes()).expect("ASCII header value")
}

/// A `RateLimit` value being written: two items of at most 61 bytes each and a separator.
struct FieldBuf {
    buf: [u8; 128],
    len: usize,
}

impl Default for FieldBuf {
    fn default() -> Self {
        FieldBuf {
            buf: [0; 128],
            len: 0,
        }
    }
}

impl FieldBuf {
    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// `"<policy>";r=<remaining>;t=<reset>`.
    fn item(&mut self, policy: &str, remaining: u64, reset: u64) {
        let mut n = itoa::Buffer::new();
        self.push(b"\"");
        self.push(policy.as_bytes());
        self.push(b"\";r=");
        self.push(n.format(remaining).as_bytes());
        self.push(b";t=");
        self.push(n.format(reset).as_bytes());
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The `RateLimit-Policy` value for a rate and an optional quota.
pub fn policy_header(rate: &limit::RateLimit, quota: Option<&QuotaLimit>) -> HeaderValue {
    let mut v = rate.policy_field("default");
    if let Some(q) = quota {
        v.push_str(", ");
        v.push_str(&q.policy_item());
    }
    HeaderValue::try_from(v).expect("policy fields are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_fields_read_the_same_for_every_admission() {
        let admit = |quota| Admission::Admit {
            remaining: 7,
            reset: 12,
            quota,
        };
        assert_eq!(ratelimit_header(&admit(None)), "\"default\";r=7;t=12");
        assert_eq!(
            ratelimit_header(&admit(Some((99, 86_400)))),
            "\"default\";r=7;t=12, \"quota\";r=99;t=86400"
        );
        assert_eq!(
            ratelimit_header(&Admission::RateLimited { retry_after: 3 }),
            "\"default\";r=0;t=3"
        );
        assert_eq!(
            ratelimit_header(&Admission::QuotaExceeded { retry_after: 60 }),
            "\"quota\";r=0;t=60"
        );
        let widest = Admission::Admit {
            remaining: u32::MAX,
            reset: u64::MAX,
            quota: Some((u32::MAX, u64::MAX)),
        };
        let expected = format!(
            "\"default\";r={0};t={1}, \"quota\";r={0};t={1}",
            u32::MAX,
            u64::MAX
        );
        assert_eq!(ratelimit_header(&widest), expected.as_str());
    }

    const SEC: u64 = 1_000_000_000;

    fn quota(s: &str) -> QuotaLimiter {
        QuotaLimiter::new(QuotaLimit::parse(s).unwrap())
    }

    #[test]
    fn parses_long_windows_only() {
        assert_eq!(
            QuotaLimit::parse("10000/day").unwrap().per,
            Duration::from_secs(86_400)
        );
        assert_eq!(QuotaLimit::parse("5/h").unwrap().to_string(), "5/h");
        assert_eq!(
            QuotaLimit::parse("7/month").unwrap().per,
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(QuotaLimit::parse("7/week").unwrap().to_string(), "7/week");
        assert!(QuotaLimit::parse("10/s")
            .unwrap_err()
            .contains("short windows"));
        assert!(QuotaLimit::parse("10/fortnight").is_err());
        assert!(QuotaLimit::parse("0/day").is_err());
        assert_eq!(
            QuotaLimit::parse("3/day").unwrap().policy_item(),
            "\"quota\";q=3;w=86400"
        );
    }

    #[test]
    fn the_whole_quota_is_usable_then_it_refills_evenly() {
        let q = quota("3/h"); // one back every 20 minutes
        let t0 = 10 * SEC;
        for want in [2, 1, 0] {
            assert!(
                matches!(q.take_at(t0), Decision::Admit { remaining, .. } if remaining == want)
            );
        }
        assert_eq!(q.take_at(t0), Decision::Deny { retry_after: 1200 });
        assert_eq!(
            q.take_at(t0 + 600 * SEC),
            Decision::Deny { retry_after: 600 }
        );
        assert!(matches!(
            q.take_at(t0 + 1200 * SEC),
            Decision::Admit { remaining: 0, .. }
        ));
    }

    #[test]
    fn giving_back_restores_exactly_one() {
        let q = quota("2/day");
        assert!(matches!(q.take_at(SEC), Decision::Admit { .. }));
        assert!(matches!(q.take_at(SEC), Decision::Admit { .. }));
        assert!(matches!(q.take_at(SEC), Decision::Deny { .. }));
        q.give_back();
        assert!(matches!(
            q.take_at(SEC),
            Decision::Admit { remaining: 0, .. }
        ));
        assert!(matches!(q.take_at(SEC), Decision::Deny { .. }));
    }

    #[test]
    fn a_rate_refusal_costs_no_quota_and_a_quota_refusal_costs_no_rate() {
        let rate = KeyLimiter::new(limit::RateLimit {
            count: NonZeroU32::new(1).unwrap(),
            per: Duration::from_secs(3600),
            burst: NonZeroU32::new(2).unwrap(),
        });
        let q = quota("3/day");
        assert!(matches!(
            admit(&rate, Some(&q)),
            Admission::Admit {
                quota: Some((2, _)),
                ..
            }
        ));
        assert!(matches!(
            admit(&rate, Some(&q)),
            Admission::Admit {
                quota: Some((1, _)),
                ..
            }
        ));
        for _ in 0..5 {
            assert!(matches!(
                admit(&rate, Some(&q)),
                Admission::RateLimited { .. }
            ));
        }
        // The five rate refusals left the quota at 1.
        assert!(matches!(q.take(), Decision::Admit { remaining: 0, .. }));
        assert!(matches!(
            admit(&rate, Some(&q)),
            Admission::QuotaExceeded { .. }
        ));

        let rate = KeyLimiter::new(limit::RateLimit {
            count: NonZeroU32::new(1).unwrap(),
            per: Duration::from_secs(3600),
            burst: NonZeroU32::new(2).unwrap(),
        });
        let spent = quota("1/day");
        assert!(matches!(spent.take(), Decision::Admit { .. }));
        for _ in 0..5 {
            assert!(matches!(
                admit(&rate, Some(&spent)),
                Admission::QuotaExceeded { .. }
            ));
        }
        // The five quota refusals left the rate's burst of 2 whole.
        assert!(matches!(rate.check(), Decision::Admit { remaining: 1, .. }));
    }
}
