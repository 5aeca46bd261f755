//! API keys: their format, their hash, and the in-memory key table.
//!
//! A key is a password. keygate never stores one: the config holds `blake3:<hex>` of each key,
//! and a request's key is hashed once and looked up in a hash map ([`KeyTable`]) — one hash and
//! one lookup whatever the table size. [`KeyHash`]'s `Debug` is redacted so that a hash cannot
//! reach a log line by accident.
//!
//! Minted keys look like `bbk_<32 base62 chars><6 base62 chars>`: 190 bits from the OS CSPRNG,
//! then a CRC32 of everything before it (the scheme GitHub uses for its tokens), so a mistyped
//! key is told apart before any lookup and secret scanners can spot a leaked one.
//!
//! A rotating key has two hashes, the new one and its `previous_hash` (valid until
//! `previous_expires`); both map to the same `Arc<KeyEntry>`, so they share one rate limiter and
//! one quota.

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasherDefault, Hash, Hasher},
    sync::Arc,
    time::SystemTime,
};

use http::HeaderValue;

use crate::{
    config::{Config, KeyConfig},
    limit::KeyLimiter,
    quota::{self, QuotaLimiter},
    scope::Scope,
};

/// The prefix minted keys carry unless `[auth] key_prefix` says otherwise.
pub const DEFAULT_PREFIX: &str = "bbk_";
/// Random base62 characters in a minted key (≥ 190 bits).
pub const RANDOM_CHARS: usize = 32;
/// Base62 characters of the CRC32 checksum at the end of a minted key.
pub const CHECKSUM_CHARS: usize = 6;
/// Longest key value accepted from a request; longer values are refused without a lookup.
pub const MAX_KEY_LEN: usize = 512;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// blake3 of a key: what the config stores and the table is keyed by.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Hashes a presented key.
    pub fn of(key: &[u8]) -> Self {
        KeyHash(*blake3::hash(key).as_bytes())
    }

    /// Parses the config form `blake3:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s.strip_prefix("blake3:").ok_or_else(|| {
            "hash must start with \"blake3:\" (make one with `keygate hash`)".to_string()
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err("hash must be \"blake3:\" followed by 64 lowercase hex digits".into());
        }
        let mut out = [0u8; 32];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(chunk).expect("hex is ASCII");
            out[i] = u8::from_str_radix(s, 16).expect("checked hex");
        }
        Ok(KeyHash(out))
    }

    /// The config form `blake3:<64 lowercase hex>`.
    pub fn to_config_string(&self) -> String {
        let mut s = String::with_capacity(7 + 64);
        s.push_str("blake3:");
        for b in self.0 {
            s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        s
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(<redacted>)")
    }
}

impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // blake3 output is uniform: eight of its bytes are already a good hash.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// A hasher that passes on the u64 [`KeyHash`] feeds it (no second hashing of a hash).
#[derive(Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Mints a new key with `prefix`: random part from the OS CSPRNG, then the checksum.
pub fn mint(prefix: &str) -> String {
    use rand::TryRngCore;
    let mut key = String::with_capacity(prefix.len() + RANDOM_CHARS + CHECKSUM_CHARS);
    key.push_str(prefix);
    let mut filled = 0;
    let mut buf = [0u8; 64];
    while filled < RANDOM_CHARS {
        rand::rngs::OsRng
            .try_fill_bytes(&mut buf)
            .expect("the OS random number generator failed");
        for &b in &buf {
            // 248 = 4 × 62: rejecting the rest keeps every character equally likely.
            if b < 248 && filled < RANDOM_CHARS {
                key.push(char::from(BASE62[usize::from(b % 62)]));
                filled += 1;
            }
        }
    }
    let sum = checksum(&key);
    key.push_str(&sum);
    key
}

/// The base62 CRC32 of `s`, always [`CHECKSUM_CHARS`] characters.
pub fn checksum(s: &str) -> String {
    String::from_utf8(checksum_bytes(s).to_vec()).expect("base62 is ASCII")
}

/// [`checksum`] without an allocation, for the request path.
fn checksum_bytes(s: &str) -> [u8; CHECKSUM_CHARS] {
    let mut n = crc32fast::hash(s.as_bytes());
    let mut out = [b'0'; CHECKSUM_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// For a key with `prefix`: whether its last six characters are the checksum of the rest.
/// Keys without the prefix (minted elsewhere) are not checked and return `None`.
pub fn checksum_ok(key: &str, prefix: &str) -> Option<bool> {
    if prefix.is_empty() || !key.starts_with(prefix) {
        return None;
    }
    if key.len() < prefix.len() + RANDOM_CHARS + CHECKSUM_CHARS || !key.is_ascii() {
        return Some(false);
    }
    let (body, sum) = key.split_at(key.len() - CHECKSUM_CHARS);
    Some(checksum_bytes(body) == sum.as_bytes())
}

/// Whether a key is usable now, as `keygate check` and `keys list` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    /// Admitted.
    Active,
    /// `disabled = true`: refused.
    Disabled,
    /// Past `expires`: refused.
    Expired,
    /// Admitted, and its previous key is still in its grace period.
    Rotating,
}

impl KeyStatus {
    /// The status of a configured key at `now`.
    pub fn of(key: &KeyConfig, now: SystemTime) -> KeyStatus {
        if key.disabled {
            KeyStatus::Disabled
        } else if key.expires.is_some_and(|e| e <= now) {
            KeyStatus::Expired
        } else if key.previous.is_some_and(|p| p.expires > now) {
            KeyStatus::Rotating
        } else {
            KeyStatus::Active
        }
    }
}

/// How many configured keys are in each status; what `keygate check` and `keygate_keys` show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// Admitted, including keys in a rotation's grace.
    pub active: i64,
    /// `disabled = true`.
    pub disabled: i64,
    /// Past `expires`.
    pub expired: i64,
}

impl StatusCounts {
    /// Counts `keys` as of `now`.
    pub fn of(keys: &[KeyConfig], now: SystemTime) -> StatusCounts {
        let mut counts = StatusCounts::default();
        for key in keys {
            match KeyStatus::of(key, now) {
                KeyStatus::Active | KeyStatus::Rotating => counts.active += 1,
                KeyStatus::Disabled => counts.disabled += 1,
                KeyStatus::Expired => counts.expired += 1,
            }
        }
        counts
    }
}

/// One key id as the request path sees it, with what forwarding needs precomputed.
#[derive(Debug)]
pub struct KeyEntry {
    /// The key's id: unique, safe to log and to send upstream.
    pub id: Arc<str>,
    /// The hotel this key acts for.
    pub tenant: Option<Arc<str>>,
    /// Refused with `invalid_api_key` while set.
    pub disabled: bool,
    /// Refused with `expired_api_key` from this time on.
    pub expires: Option<SystemTime>,
    /// This id's limiter, carried across reloads.
    pub limiter: Arc<KeyLimiter>,
    /// This id's long-window quota, carried across reloads; `None` without a quota.
    pub quota: Option<Arc<QuotaLimiter>>,
    /// What the key may call; empty means everything.
    pub scopes: Vec<Scope>,
    /// `RateLimit-Policy` value: the rate, and the quota when there is one.
    pub policy_header: HeaderValue,
    /// `X-Keygate-Key-Id` value.
    pub id_header: HeaderValue,
    /// `X-Keygate-Tenant` value.
    pub tenant_header: Option<HeaderValue>,
    /// Largest request body this key may send, in bytes.
    pub max_body: u64,
}

/// What a presented hash found in the table.
#[derive(Debug, Clone, Copy)]
pub struct Found<'a> {
    /// The key's entry (the same for a rotating key's old and new hash).
    pub entry: &'a Arc<KeyEntry>,
    /// For the old hash of a rotating key: the end of its grace period.
    pub previous_until: Option<SystemTime>,
}

#[derive(Debug)]
struct Slot {
    entry: Arc<KeyEntry>,
    previous_until: Option<SystemTime>,
}

/// The key table: blake3 hash → entry. Immutable once built; a reload builds a new one.
#[derive(Debug, Default)]
pub struct KeyTable {
    by_hash: HashMap<KeyHash, Slot, BuildHasherDefault<PassThroughHasher>>,
}

impl KeyTable {
    /// Builds the table for `config`, carrying over the limiters (rate and quota) of
    /// `previous` for every id whose limit did not change.
    pub fn build(config: &Config, previous: Option<&KeyTable>) -> KeyTable {
        let old: HashMap<&str, &Arc<KeyEntry>> = previous
            .map(|t| {
                t.by_hash
                    .values()
                    .map(|s| (&*s.entry.id, &s.entry))
                    .collect()
            })
            .unwrap_or_default();
        let mut by_hash = HashMap::with_capacity_and_hasher(config.keys.len(), Default::default());
        for key in &config.keys {
            let old_entry = old.get(key.id.as_str());
            let limiter = match old_entry {
                Some(e) if *e.limiter.limit() == key.limit => Arc::clone(&e.limiter),
                _ => Arc::new(KeyLimiter::new(key.limit)),
            };
            let quota = key
                .quota
                .map(|q| match old_entry.and_then(|e| e.quota.as_ref()) {
                    Some(old) if *old.limit() == q => Arc::clone(old),
                    _ => Arc::new(QuotaLimiter::new(q)),
                });
            let entry = Arc::new(KeyEntry {
                id: Arc::from(key.id.as_str()),
                tenant: key.tenant.as_deref().map(Arc::from),
                disabled: key.disabled,
                expires: key.expires,
                limiter,
                quota,
                scopes: key.scopes.clone(),
                policy_header: quota::policy_header(&key.limit, key.quota.as_ref()),
                id_header: HeaderValue::try_from(key.id.as_str()).expect("validated id"),
                tenant_header: key
                    .tenant
                    .as_deref()
                    .map(|t| HeaderValue::try_from(t).expect("validated tenant")),
                max_body: key.max_body,
            });
            if let Some(prev) = key.previous {
                by_hash.insert(
                    prev.hash,
                    Slot {
                        entry: Arc::clone(&entry),
                        previous_until: Some(prev.expires),
                    },
                );
            }
            by_hash.insert(
                key.hash,
                Slot {
                    entry,
                    previous_until: None,
                },
            );
        }
        KeyTable { by_hash }
    }

    /// The entry for a presented key's hash, saying whether it was a rotating key's old hash.
    pub fn lookup(&self, hash: &KeyHash) -> Option<Found<'_>> {
        self.by_hash.get(hash).map(|s| Found {
            entry: &s.entry,
            previous_until: s.previous_until,
        })
    }

    /// How many hashes the table holds.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trips_through_config_form() {
        let h = KeyHash::of(b"secret");
        let s = h.to_config_string();
        assert!(s.starts_with("blake3:") && s.len() == 71);
        assert_eq!(KeyHash::parse(&s).unwrap(), h);
        assert_eq!(s, format!("blake3:{}", blake3::hash(b"secret").to_hex()));
    }

    #[test]
    fn malformed_hashes_are_refused() {
        assert!(KeyHash::parse("sha256:00").is_err());
        assert!(KeyHash::parse(&format!("blake3:{}", "A".repeat(64))).is_err());
        assert!(KeyHash::parse(&format!("blake3:{}", "0".repeat(63))).is_err());
    }

    #[test]
    fn debug_never_shows_the_hash() {
        let h = KeyHash::of(b"secret");
        let hex = blake3::hash(b"secret").to_hex().to_string();
        assert!(!format!("{h:?}").contains(&hex[..16]));
    }

    #[test]
    fn minted_keys_have_the_format_and_a_valid_checksum() {
        let a = mint(DEFAULT_PREFIX);
        let b = mint(DEFAULT_PREFIX);
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + RANDOM_CHARS + CHECKSUM_CHARS);
        assert!(a.starts_with("bbk_"));
        assert!(a[4..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(checksum_ok(&a, DEFAULT_PREFIX), Some(true));
    }

    #[test]
    fn a_one_character_typo_fails_the_checksum() {
        let key = mint(DEFAULT_PREFIX);
        for i in 4..key.len() {
            let mut bytes = key.clone().into_bytes();
            bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
            let typo = String::from_utf8(bytes).unwrap();
            assert_eq!(
                checksum_ok(&typo, DEFAULT_PREFIX),
                Some(false),
                "typo at {i}"
            );
        }
        assert_eq!(checksum_ok("legacy-key-123", DEFAULT_PREFIX), None);
    }
}
