//! Brute-force guard: failed key attempts per client IP (`[auth] failures_per_ip`).
//!
//! Each failed attempt (an unknown key, a key with a bad checksum) spends one cell of the
//! client IP's GCRA budget (an IPv6 client's /64: an attacker holding one rotates through it
//! freely) (governor, keyed by IP in a dashmap). When an attempt finds the budget
//! spent, the IP is blocked until the next cell is earned back. While blocked, every request
//! from it gets 429 `too_many_failures` without a table lookup, but for the keys that address
//! has already used successfully since its first failure: those are still looked up (and
//! admitted when still valid), so a partner behind the same address (a NAT) that was calling
//! keygate when the guessing started keeps working, while a guess is never judged (a blocked
//! address cannot go on guessing and read a 200 as a hit). A key that address had not used
//! before the block waits for it to end, like a guess.
//!
//! The guard lives in [`Live`](crate::proxy::Live) and is carried over by a reload that keeps
//! the same rate, so a reload never forgives an attacker. Memory stays bounded by the number of
//! IPs that failed in one window (and [`KNOWN_KEYS`] fingerprints each): stale entries are
//! swept every few thousand failures.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use dashmap::DashMap;
use governor::{
    clock::{Clock, DefaultClock, Reference},
    middleware::NoOpMiddleware,
    state::keyed::DashMapStateStore,
    Quota, RateLimiter,
};

use crate::{keys::KeyHash, limit::RateLimit};

/// Failures between two sweeps of stale per-IP state.
const SWEEP_EVERY: u64 = 4096;

/// Keys remembered per failing address (the most recent ones): a NAT's partners, not a table.
pub const KNOWN_KEYS: usize = 8;

/// Per-IP failure budgets and the IPs currently blocked.
pub struct FailureGuard<C: Clock = DefaultClock> {
    limit: RateLimit,
    limiter: RateLimiter<IpAddr, DashMapStateStore<IpAddr>, C, NoOpMiddleware<C::Instant>>,
    blocked: DashMap<IpAddr, C::Instant>,
    /// Addresses that failed lately, with the keys they used successfully since.
    suspects: DashMap<IpAddr, Suspect<C::Instant>>,
    /// Whether `suspects` may hold anything: a successful request from a clean machine pays
    /// one load, not a map lookup.
    any_suspects: AtomicBool,
    clock: C,
    failures: AtomicU64,
}

/// An address that failed: when it last did, and fingerprints (a key hash's first 8 bytes) of
/// the keys it used successfully since its first failure, the latest [`KNOWN_KEYS`].
struct Suspect<I> {
    last_failure: I,
    known: [u64; KNOWN_KEYS],
    len: usize,
    next: usize,
}

impl<I> Suspect<I> {
    fn knows(&self, fingerprint: u64) -> bool {
        self.known[..self.len].contains(&fingerprint)
    }

    fn remember(&mut self, fingerprint: u64) {
        if self.knows(fingerprint) {
            return;
        }
        self.known[self.next] = fingerprint;
        self.next = (self.next + 1) % KNOWN_KEYS;
        self.len = (self.len + 1).min(KNOWN_KEYS);
    }
}

fn fingerprint(hash: &KeyHash) -> u64 {
    u64::from_le_bytes(hash.0[..8].try_into().expect("8 of 32 bytes"))
}

impl std::fmt::Debug for FailureGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureGuard")
            .field("limit", &self.limit)
            .field("blocked", &self.blocked.len())
            .finish()
    }
}

impl FailureGuard {
    /// A guard allowing `limit` failures per IP, on the real clock.
    pub fn new(limit: RateLimit) -> FailureGuard {
        FailureGuard::with_clock(limit, DefaultClock::default())
    }
}

impl<C: Clock + Clone> FailureGuard<C> {
    /// A guard on `clock` (tests use governor's `FakeRelativeClock`).
    pub fn with_clock(limit: RateLimit, clock: C) -> FailureGuard<C> {
        let quota = Quota::with_period(limit.period())
            .unwrap_or_else(|| Quota::per_second(limit.count))
            .allow_burst(limit.burst);
        FailureGuard {
            limit,
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            blocked: DashMap::new(),
            suspects: DashMap::new(),
            any_suspects: AtomicBool::new(false),
            clock,
            failures: AtomicU64::new(0),
        }
    }

    /// The rate this guard enforces.
    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// `Some(retry_after_secs)` while `ip` is blocked.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        let until = *self.blocked.get(&subscriber(ip))?;
        let now = self.clock.now();
        if now < until {
            Some(ceil_secs(until.duration_since(now).into()))
        } else {
            None
        }
    }

    /// Whether a blocked `ip` may still have the key hashed to `hash` looked up: one it used
    /// successfully since it first failed.
    pub fn knows(&self, ip: IpAddr, hash: &KeyHash) -> bool {
        self.suspects
            .get(&subscriber(ip))
            .is_some_and(|s| s.knows(fingerprint(hash)))
    }

    /// Notes a request from `ip` admitted with the key hashed to `hash`: if `ip` has failed
    /// lately, that key stays usable from it while it is blocked.
    pub fn record_success(&self, ip: IpAddr, hash: &KeyHash) {
        if !self.any_suspects.load(Ordering::Relaxed) {
            return;
        }
        if let Some(mut s) = self.suspects.get_mut(&subscriber(ip)) {
            s.remember(fingerprint(hash));
        }
    }

    /// Records one failed attempt from `ip`; `Some(retry_after_secs)` when it is now blocked.
    pub fn record_failure(&self, ip: IpAddr) -> Option<u64> {
        if self.failures.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        let ip = subscriber(ip);
        let now = self.clock.now();
        self.suspects
            .entry(ip)
            .and_modify(|s| s.last_failure = now)
            .or_insert_with(|| Suspect {
                last_failure: now,
                known: [0; KNOWN_KEYS],
                len: 0,
                next: 0,
            });
        // After the insert: a sweep that found the map empty just before cannot clear it.
        self.any_suspects.store(true, Ordering::Relaxed);
        match self.limiter.check_key(&ip) {
            Ok(()) => None,
            Err(not_until) => {
                let until = not_until.earliest_possible();
                self.blocked.insert(ip, until);
                Some(ceil_secs(not_until.wait_time_from(self.clock.now())))
            }
        }
    }

    /// How many IPs have live failure state (for tests and the soak script).
    pub fn tracked(&self) -> usize {
        self.limiter.len() + self.blocked.len() + self.suspects.len()
    }

    /// Drops the state of IPs whose budget is whole again and whose block has ended.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let now = self.clock.now();
        self.blocked.retain(|_, until| now < *until);
        self.blocked.shrink_to_fit();
        // A suspect is forgotten once a whole budget has been earned back since its last
        // failure, as its limiter state is.
        let refill = self.limit.period() * self.limit.burst.get();
        self.suspects.retain(|ip, s| {
            self.blocked.contains_key(ip)
                || Duration::from(now.duration_since(s.last_failure)) < refill
        });
        self.suspects.shrink_to_fit();
        if self.suspects.is_empty() {
            self.any_suspects.store(false, Ordering::Relaxed);
        }
    }
}

/// The unit a budget belongs to: an IPv4 address, or an IPv6 address's /64 (the block one
/// subscriber or host is given, which it can rotate through at will; as Cloudflare's and
/// Fastly's rate limits group IPv6).
fn subscriber(ip: IpAddr) -> IpAddr {
    match crate::client_ip::canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn per_min(n: u32) -> RateLimit {
        let n = NonZeroU32::new(n).unwrap();
        RateLimit {
            count: n,
            per: Duration::from_secs(60),
            burst: n,
        }
    }

    #[test]
    fn the_failure_past_the_budget_blocks_until_a_cell_is_earned_back() {
        let clock = FakeRelativeClock::default();
        let g = FailureGuard::with_clock(per_min(3), clock.clone());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(g.record_failure(ip), None);
            assert_eq!(g.blocked(ip), None);
        }
        assert_eq!(g.record_failure(ip), Some(20));
        assert_eq!(g.blocked(ip), Some(20));
        clock.advance(Duration::from_secs(19));
        assert_eq!(g.blocked(ip), Some(1));
        clock.advance(Duration::from_secs(1));
        assert_eq!(g.blocked(ip), None);
        // One cell earned back: one more failure is judged, the next blocks again.
        assert_eq!(g.record_failure(ip), None);
        assert!(g.record_failure(ip).is_some());
    }

    /// A blocked address keeps the keys it used since its first failure, no others; the
    /// memory of them goes with the rest of its state.
    #[test]
    fn a_blocked_address_keeps_only_the_keys_it_used_since_it_failed() {
        let clock = FakeRelativeClock::default();
        let g = FailureGuard::with_clock(per_min(1), clock.clone());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let (before, partner, other) = (
            KeyHash::of(b"used-before-any-failure"),
            KeyHash::of(b"partner"),
            KeyHash::of(b"other"),
        );
        g.record_success(ip, &before);
        assert_eq!(g.record_failure(ip), None);
        g.record_success(ip, &partner);
        assert!(g.record_failure(ip).is_some());
        assert!(g.knows(ip, &partner));
        assert!(!g.knows(ip, &other));
        assert!(!g.knows(ip, &before), "remembered before it ever failed");
        // Only the latest KNOWN_KEYS are kept.
        for i in 0..KNOWN_KEYS {
            g.record_success(ip, &KeyHash::of(format!("k{i}").as_bytes()));
        }
        assert!(!g.knows(ip, &partner));
        clock.advance(Duration::from_secs(180));
        g.sweep();
        assert_eq!(g.tracked(), 0);
        assert!(!g.knows(ip, &KeyHash::of(b"k0")));
    }

    #[test]
    fn other_ips_are_not_affected_and_stale_state_is_swept() {
        let clock = FakeRelativeClock::default();
        let g = FailureGuard::with_clock(per_min(1), clock.clone());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        g.record_failure(a);
        assert!(g.record_failure(a).is_some());
        assert_eq!(g.blocked(b), None);
        assert_eq!(g.record_failure(b), None);
        assert!(g.tracked() >= 2);
        clock.advance(Duration::from_secs(120));
        g.sweep();
        assert_eq!(g.tracked(), 0);
    }

    /// An IPv6 client cannot escape its budget by rotating through its /64; the next /64 is
    /// someone else.
    #[test]
    fn ipv6_budgets_belong_to_the_64() {
        let g = FailureGuard::with_clock(per_min(2), FakeRelativeClock::default());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(g.record_failure(ip("2001:db8:0:1::1")), None);
        assert_eq!(g.record_failure(ip("2001:db8:0:1:ffff::2")), None);
        assert!(g
            .record_failure(ip("2001:db8:0:1:aaaa:bbbb:cccc:3"))
            .is_some());
        assert!(g.blocked(ip("2001:db8:0:1::9")).is_some());
        assert_eq!(g.blocked(ip("2001:db8:0:2::1")), None);
        // IPv4, and IPv4-mapped IPv6, stay per address.
        assert_eq!(g.record_failure(ip("::ffff:192.0.2.1")), None);
        assert_eq!(g.record_failure(ip("192.0.2.1")), None);
        assert!(g.record_failure(ip("192.0.2.1")).is_some());
        assert_eq!(g.blocked(ip("192.0.2.2")), None);
    }
}
