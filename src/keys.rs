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
    hash::{BuildHasher, Hash, Hasher},
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use hashbrown::{DefaultHashBuilder, HashMap as FastMap, HashTable};
use http::HeaderValue;

use crate::{
    config::{Config, KeyConfig, KeySink},
    limit::{KeyLimiter, RateLimit},
    metrics::KeyCounters,
    quota::{self, QuotaLimit, QuotaLimiter},
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
        // A million of these are parsed per load of a large key table: one pass through a
        // table that decodes and validates together, no branch per digit.
        let mut out = [0u8; 32];
        let mut bad = hex.len() != 64;
        if !bad {
            let mut invalid = 0u8;
            for (o, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
                let (hi, lo) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
                invalid |= hi | lo;
                *o = hi << 4 | (lo & 0x0f);
            }
            bad = invalid & NOT_HEX != 0;
        }
        if bad {
            return Err("hash must be \"blake3:\" followed by 64 lowercase hex digits".into());
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

/// Marks a byte that is not a lowercase hex digit in [`HEX`].
const NOT_HEX: u8 = 0x10;

/// Lowercase hex digit → its value; anything else → [`NOT_HEX`].
const HEX: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

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
///
/// The table builds an entry the first time one of the key's hashes is looked up (see
/// [`KeyTable`]): a million idle keys cost no entries, only their compact records.
#[derive(Debug)]
pub struct KeyEntry {
    /// The key's id: unique, safe to log and to send upstream.
    pub id: Arc<str>,
    /// The hotel this key acts for (shared by every key of the tenant).
    pub tenant: Option<Arc<str>>,
    /// Refused with `invalid_api_key` while set.
    pub disabled: bool,
    /// Refused with `expired_api_key` from this time on.
    pub expires: Option<SystemTime>,
    /// This id's limiter, carried across reloads.
    pub limiter: Arc<KeyLimiter>,
    /// This id's long-window quota, carried across reloads; `None` without a quota.
    pub quota: Option<Arc<QuotaLimiter>>,
    /// What the key may call; empty means everything (shared by keys with the same list).
    pub scopes: Arc<[Scope]>,
    /// `RateLimit-Policy` value: the rate, and the quota when there is one (one shared buffer
    /// per distinct policy).
    pub policy_header: HeaderValue,
    /// `X-Keygate-Key-Id` value.
    pub id_header: HeaderValue,
    /// `X-Keygate-Tenant` value (shared by every key of the tenant).
    pub tenant_header: Option<HeaderValue>,
    /// Largest request body this key may send, in bytes.
    pub max_body: u64,
    /// This key's request counters (`keygate_requests_total`).
    pub counters: KeyCounters,
}

/// What a presented hash found in the table.
#[derive(Debug, Clone, Copy)]
pub struct Found<'a> {
    /// The key's entry (the same for a rotating key's old and new hash).
    pub entry: &'a Arc<KeyEntry>,
    /// For the old hash of a rotating key: the end of its grace period.
    pub previous_until: Option<SystemTime>,
}

/// What the table keeps for every configured key: 80 bytes, plus the id's bytes in the
/// table's one string of ids. Values many keys share (tenant, policy, scopes) are indexes into
/// [`Shared`].
///
/// Limiters are made on a key's first request (with its [`KeyEntry`]), as nginx's
/// `limit_req` keeps state only for keys that called: a million idle keys cost no limiter
/// (80 bytes each). A rebuild carries over the limiters a key has by then (its entry's, else
/// the ones it carried itself, kept beside the table in [`KeyTable::carried`]), so a limiter
/// outlives any number of reloads with or without requests in between. A key whose very first
/// request comes while a reload is being built may start the new table with a fresh limiter
/// (that is, its first few requests again).
struct Compact {
    hash: KeyHash,
    /// Built on the first lookup; dropped with the table.
    entry: OnceLock<Arc<KeyEntry>>,
    expires: Expiry,
    /// Where the id is in [`KeyTable::ids`].
    id_at: u32,
    tenant: u32,
    /// Rate, quota and largest body: an index into [`Shared::policies`].
    policy: u32,
    scopes: u32,
    id_len: u8,
    disabled: bool,
}

/// A key's expiry in 8 bytes rather than an `Option<SystemTime>`'s 16: nanoseconds from the
/// Unix epoch, `i64::MAX` for none. Times outside 1678–2262 are clamped to that range (a key
/// expiring in 2300 is refused from 2262 on; one that expired in 1500 is expired either way).
#[derive(Clone, Copy)]
struct Expiry(i64);

impl Expiry {
    const NEVER: Expiry = Expiry(i64::MAX);

    fn of(t: Option<SystemTime>) -> Expiry {
        let Some(t) = t else {
            return Expiry::NEVER;
        };
        let nanos = match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX - 1),
            Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
        };
        Expiry(nanos.min(i64::MAX - 1))
    }

    fn get(self) -> Option<SystemTime> {
        let nanos = self.0;
        match nanos {
            i64::MAX => None,
            0.. => Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64)),
            _ => Some(SystemTime::UNIX_EPOCH - Duration::from_nanos(nanos.unsigned_abs())),
        }
    }
}

/// The limiters a key had in the table before, for its first request in this one.
#[derive(Default)]
struct Carried {
    limiter: Option<Arc<KeyLimiter>>,
    quota: Option<Arc<QuotaLimiter>>,
}

/// The old hash of a rotating key.
struct Previous {
    hash: KeyHash,
    key: u32,
    until: SystemTime,
}

/// Values shared by many keys, each stored once per table.
#[derive(Default)]
struct Shared {
    /// Tenant name and its `X-Keygate-Tenant` value.
    tenants: Vec<(Arc<str>, HeaderValue)>,
    /// Rate and quota, with their `RateLimit-Policy` value.
    policies: Vec<Policy>,
    /// Scope lists; index 0 is the empty list.
    scopes: Vec<Arc<[Scope]>>,
}

/// The limits some keys share, and the `RateLimit-Policy` value that states them.
struct Policy {
    limit: RateLimit,
    quota: Option<QuotaLimit>,
    max_body: u64,
    header: HeaderValue,
}

const NO_TENANT: u32 = u32::MAX;
/// Set in an index value that points into `previous` rather than `keys`.
const PREVIOUS_BIT: u32 = 1 << 31;

/// The key table: blake3 hash → entry. Immutable once built; a reload builds a new one.
///
/// Laid out for a million keys in a few hundred MB: the keys are one `Vec` of compact records,
/// and the hash index is a `hashbrown::HashTable<u32>` of positions in it (5 bytes a slot
/// rather than a map holding 32-byte hashes and pointers). There is no index by id: a rebuild
/// finds the limiters to carry over in a map of the few keys that have one
/// ([`KeyTableBuilder::new`]).
#[derive(Default)]
pub struct KeyTable {
    keys: Vec<Compact>,
    previous: Vec<Previous>,
    by_hash: HashTable<u32>,
    /// Every key's id, one after the other (one allocation rather than one per key).
    ids: String,
    /// The limiters carried over from the table before for keys not yet requested in this
    /// one, by position in `keys` (only keys that were requested at some point have any).
    carried: FastMap<u32, Carried>,
    shared: Shared,
}

impl fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyTable")
            .field("keys", &self.keys.len())
            .field("previous_hashes", &self.previous.len())
            .finish()
    }
}

fn hash_of(hash: &KeyHash) -> u64 {
    // blake3 output is uniform: eight of its bytes are already a good hash.
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.0[..8]);
    u64::from_le_bytes(first)
}

impl KeyTable {
    /// Builds the table for `config`, carrying over the limiters (rate and quota) of
    /// `previous` for every id whose limit did not change.
    pub fn build(config: &Config, previous: Option<&KeyTable>) -> KeyTable {
        let mut builder = KeyTableBuilder::new(previous);
        builder.reserve(config.keys.len());
        for key in &config.keys {
            builder.push(key);
        }
        builder.finish()
    }

    fn empty() -> KeyTable {
        KeyTable {
            shared: Shared {
                scopes: vec![Arc::from(Vec::new())],
                ..Shared::default()
            },
            ..KeyTable::default()
        }
    }

    /// The entry for a presented key's hash, saying whether it was a rotating key's old hash.
    pub fn lookup(&self, hash: &KeyHash) -> Option<Found<'_>> {
        let v = self.lookup_index(hash)?;
        let (pos, previous_until) = if v & PREVIOUS_BIT == 0 {
            (v, None)
        } else {
            let p = &self.previous[(v & !PREVIOUS_BIT) as usize];
            (p.key, Some(p.until))
        };
        Some(Found {
            entry: self.keys[pos as usize]
                .entry
                .get_or_init(|| self.entry(pos)),
            previous_until,
        })
    }

    fn lookup_index(&self, hash: &KeyHash) -> Option<u32> {
        self.by_hash
            .find(hash_of(hash), |&v| {
                index_hash(&self.keys, &self.previous, v) == hash
            })
            .copied()
    }

    /// The id of a key of this table.
    fn id(&self, key: &Compact) -> &str {
        id_in(&self.ids, key)
    }

    /// The rate limiter and quota the key at `pos` has now: its entry's once it was
    /// requested, else the ones it carried over.
    fn current(&self, pos: u32) -> (Option<&Arc<KeyLimiter>>, Option<&Arc<QuotaLimiter>>) {
        match self.keys[pos as usize].entry.get() {
            Some(e) => (Some(&e.limiter), e.quota.as_ref()),
            None => self
                .carried
                .get(&pos)
                .map_or((None, None), |c| (c.limiter.as_ref(), c.quota.as_ref())),
        }
    }

    fn entry(&self, pos: u32) -> Arc<KeyEntry> {
        let key = &self.keys[pos as usize];
        let tenant = self.shared.tenants.get(key.tenant as usize);
        let policy = &self.shared.policies[key.policy as usize];
        let (carried_limiter, carried_quota) = self.current(pos);
        let id: Arc<str> = Arc::from(self.id(key));
        Arc::new(KeyEntry {
            counters: KeyCounters::new(Arc::clone(&id)),
            id_header: HeaderValue::try_from(&*id).expect("validated id"),
            id,
            tenant: tenant.map(|(t, _)| Arc::clone(t)),
            disabled: key.disabled,
            expires: key.expires.get(),
            limiter: match carried_limiter {
                Some(carried) => Arc::clone(carried),
                None => Arc::new(KeyLimiter::new(policy.limit)),
            },
            quota: policy.quota.map(|q| match carried_quota {
                Some(carried) => Arc::clone(carried),
                None => Arc::new(QuotaLimiter::new(q)),
            }),
            scopes: Arc::clone(&self.shared.scopes[key.scopes as usize]),
            policy_header: policy.header.clone(),
            tenant_header: tenant.map(|(_, h)| h.clone()),
            max_body: policy.max_body,
        })
    }

    /// How many hashes the table holds (a rotating key has two).
    pub fn len(&self) -> usize {
        self.keys.len() + self.previous.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys are in each status at `now` (what `keygate_keys` shows).
    pub fn status_counts(&self, now: SystemTime) -> StatusCounts {
        let mut counts = StatusCounts::default();
        for k in &self.keys {
            if k.disabled {
                counts.disabled += 1;
            } else if k.expires.get().is_some_and(|e| e <= now) {
                counts.expired += 1;
            } else {
                counts.active += 1;
            }
        }
        counts
    }
}

/// Builds a [`KeyTable`] one validated key at a time, so a reload can stream a key file into
/// it without holding all of its [`KeyConfig`]s (256 bytes each) in a vector first
/// ([`Config::load_into`]). Limiters of `previous` are carried over as by [`KeyTable::build`].
///
/// Keys are only appended while they come; the hash index is built, and duplicate ids and
/// hashes found, in one pass at the end ([`KeyTableBuilder::seal`]). Probing a million-slot
/// index per key as it arrived was half of a 1M-key reload: a cache miss or two per key and
/// per index (`perf`: 47% in the id and hash probes). Sorted by their slot, the inserts walk
/// the index from one end to the other.
pub struct KeyTableBuilder<'p> {
    table: KeyTable,
    /// The keys of `previous` that have a limiter or a quota to carry over, by id: only the
    /// keys that were requested, so usually a small map, where an index of every id would
    /// cost a miss per key to probe.
    carried: FastMap<&'p str, OldLimiters<'p>>,
    tenants: FastMap<Arc<str>, u32>,
    policies: HashMap<PolicyKey, u32>,
    // Most keys have the policy of the key before them: skip hashing it then.
    last_policy: Option<(PolicyKey, u32)>,
    scope_sets: HashMap<String, u32>,
    sealed: bool,
}

/// Rate, quota and largest body: what makes a [`Policy`].
type PolicyKey = (RateLimit, Option<QuotaLimit>, u64);

/// A key's limiters in the table before.
type OldLimiters<'p> = (Option<&'p Arc<KeyLimiter>>, Option<&'p Arc<QuotaLimiter>>);

impl<'p> KeyTableBuilder<'p> {
    /// An empty builder carrying limiters over from `previous`.
    ///
    /// What is carried is read from `previous` here: a key whose first request comes after
    /// this (while the new table is built) starts the new table with a fresh limiter.
    pub fn new(previous: Option<&'p KeyTable>) -> Self {
        let carried = previous
            .map(|t| {
                (0u32..)
                    .zip(&t.keys)
                    .filter(|(pos, k)| k.entry.get().is_some() || t.carried.contains_key(pos))
                    .map(|(pos, k)| (t.id(k), t.current(pos)))
                    .collect()
            })
            .unwrap_or_default();
        KeyTableBuilder {
            table: KeyTable::empty(),
            carried,
            tenants: FastMap::new(),
            policies: HashMap::new(),
            last_policy: None,
            scope_sets: HashMap::new(),
            sealed: false,
        }
    }

    /// The finished table.
    pub fn finish(mut self) -> KeyTable {
        let unique = self.seal();
        debug_assert!(unique, "keys pushed without validation");
        self.table
    }

    /// Adds `key` (whose id and hashes must be new to the table: [`Config`] validation checks
    /// that, or [`KeyTableBuilder::seal`] does for a stream of keys).
    pub fn push(&mut self, key: &KeyConfig) {
        let pos = self.table.keys.len();
        assert!(pos < PREVIOUS_BIT as usize, "more than 2^31 keys");
        self.sealed = false;
        let (old_limiter, old_quota) = match self.carried.is_empty() {
            true => (None, None),
            false => self
                .carried
                .get(key.id.as_str())
                .copied()
                .unwrap_or_default(),
        };
        let carried = Carried {
            limiter: old_limiter.filter(|l| *l.limit() == key.limit).cloned(),
            quota: key
                .quota
                .and_then(|q| old_quota.filter(|o| *o.limit() == q).cloned()),
        };
        let shared = &mut self.table.shared;
        let tenant = match key.tenant.as_deref() {
            None => NO_TENANT,
            Some(t) => match self.tenants.get(t) {
                Some(&i) => i,
                None => {
                    let name: Arc<str> = Arc::from(t);
                    let header = HeaderValue::try_from(t).expect("validated tenant");
                    shared.tenants.push((Arc::clone(&name), header));
                    let i = (shared.tenants.len() - 1) as u32;
                    self.tenants.insert(name, i);
                    i
                }
            },
        };
        let policy_key = (key.limit, key.quota, key.max_body);
        let policy = match self.last_policy {
            Some((p, i)) if p == policy_key => i,
            _ => {
                let i = *self.policies.entry(policy_key).or_insert_with(|| {
                    let header = quota::policy_header(&key.limit, key.quota.as_ref());
                    // One buffer for every key with this policy: clones share it.
                    let header = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(
                        header.as_bytes(),
                    ))
                    .expect("policy fields are ASCII");
                    shared.policies.push(Policy {
                        limit: key.limit,
                        quota: key.quota,
                        max_body: key.max_body,
                        header,
                    });
                    (shared.policies.len() - 1) as u32
                });
                self.last_policy = Some((policy_key, i));
                i
            }
        };
        let scopes = if key.scopes.is_empty() {
            0
        } else {
            let name = key
                .scopes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            *self.scope_sets.entry(name).or_insert_with(|| {
                shared.scopes.push(Arc::from(key.scopes.clone()));
                (shared.scopes.len() - 1) as u32
            })
        };
        let KeyTable {
            keys,
            previous,
            ids,
            carried: carried_by_pos,
            ..
        } = &mut self.table;
        let id_at = u32::try_from(ids.len()).expect("less than 4 GiB of key ids");
        ids.push_str(&key.id);
        keys.push(Compact {
            hash: key.hash,
            entry: OnceLock::new(),
            expires: Expiry::of(key.expires),
            id_at,
            tenant,
            policy,
            scopes,
            id_len: u8::try_from(key.id.len()).expect("ids are at most 64 bytes"),
            disabled: key.disabled,
        });
        if carried.limiter.is_some() || carried.quota.is_some() {
            carried_by_pos.insert(pos as u32, carried);
        }
        if let Some(prev) = key.previous {
            previous.push(Previous {
                hash: prev.hash,
                key: pos as u32,
                until: prev.expires,
            });
        }
    }

    /// Builds the hash index over every key pushed: `false` when two keys share an id, or a
    /// hash or previous hash (the table is then not to be used; [`Config::load_into`] clears
    /// it and reads the file again for the error and its line).
    pub fn seal(&mut self) -> bool {
        if self.sealed {
            return true;
        }
        let KeyTable {
            keys,
            previous,
            by_hash,
            ids: id_text,
            ..
        } = &mut self.table;
        // One scratch vector of (hash, position) pairs, for the ids and then for the hashes.
        let mut order: Vec<(u64, u32)> = Vec::with_capacity(keys.len() + previous.len());
        let ids = DefaultHashBuilder::default();
        order.extend(
            (0u32..)
                .zip(keys.iter())
                .map(|(i, k)| (ids.hash_one(id_in(id_text, k)), i)),
        );
        order.sort_unstable_by_key(|&(h, _)| h);
        let id_at = |i: u32| id_in(id_text, &keys[i as usize]);
        if any_same(&order, |a, b| id_at(a) == id_at(b)) {
            return false;
        }
        order.clear();
        order.extend(
            (0u32..)
                .zip(keys.iter())
                .map(|(i, k)| (hash_of(&k.hash), i)),
        );
        order.extend(
            (0u32..)
                .zip(previous.iter())
                .map(|(i, p)| (hash_of(&p.hash), i | PREVIOUS_BIT)),
        );
        *by_hash = HashTable::with_capacity(order.len());
        // hashbrown starts a probe at the slot `hash & (slots - 1)`: sorted by those low bits
        // first, each insert lands next to the one before. Only a matter of speed: the index
        // is right in any order.
        let slots = (by_hash.capacity() / 7 * 8).max(1).next_power_of_two();
        order.sort_unstable_by_key(|&(h, _)| h.rotate_right(slots.trailing_zeros()));
        if any_same(&order, |a, b| {
            index_hash(keys, previous, a) == index_hash(keys, previous, b)
        }) {
            return false;
        }
        for &(h, v) in &order {
            by_hash.insert_unique(h, v, |&v| hash_of(index_hash(keys, previous, v)));
        }
        // Only a table that passed: sealing one with duplicates again says so again.
        self.sealed = true;
        true
    }
}

/// The id of `key` in a table's string of ids.
fn id_in<'a>(ids: &'a str, key: &Compact) -> &'a str {
    &ids[key.id_at as usize..][..key.id_len as usize]
}

/// Whether two of `sorted` (pairs of a hash and what it is the hash of, equal hashes next to
/// each other) stand for the `same` thing: only pairs with equal hashes are compared.
fn any_same(sorted: &[(u64, u32)], same: impl Fn(u32, u32) -> bool) -> bool {
    sorted.chunk_by(|a, b| a.0 == b.0).any(|run| {
        run.iter()
            .enumerate()
            .any(|(i, a)| run[i + 1..].iter().any(|b| same(a.1, b.1)))
    })
}

impl KeySink for KeyTableBuilder<'_> {
    fn reserve(&mut self, additional: usize) {
        self.table.keys.reserve(additional);
        // Ids are mostly short: room for 16 bytes each, grown if need be.
        self.table.ids.reserve(additional * 16);
    }

    fn checks_when_sealed(&self) -> bool {
        true
    }

    /// Never asked ([`KeySink::checks_when_sealed`]): duplicates are found by `seal`.
    fn has_id(&self, _id: &str) -> bool {
        false
    }

    /// Never asked, as `has_id`.
    fn has_hash(&self, _hash: &KeyHash) -> bool {
        false
    }

    fn push(&mut self, key: KeyConfig) {
        KeyTableBuilder::push(self, &key);
    }

    fn seal(&mut self) -> bool {
        KeyTableBuilder::seal(self)
    }

    fn clear(&mut self) {
        let carried = std::mem::take(&mut self.carried);
        *self = KeyTableBuilder::new(None);
        self.carried = carried;
    }
}

/// The hash an index value stands for.
fn index_hash<'a>(keys: &'a [Compact], previous: &'a [Previous], v: u32) -> &'a KeyHash {
    if v & PREVIOUS_BIT == 0 {
        &keys[v as usize].hash
    } else {
        &previous[(v & !PREVIOUS_BIT) as usize].hash
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
        assert!(KeyHash::parse(&format!("blake3:{}", "0".repeat(65))).is_err());
        // One wrong character anywhere, including the neighbours of the digit ranges and a
        // two-byte character that keeps the length at 64 bytes.
        let good = "0123456789abcdef".repeat(4);
        assert_eq!(
            KeyHash::parse(&format!("blake3:{good}")).unwrap().0,
            [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef].repeat(4)[..]
        );
        for i in 0..64 {
            for bad in ["g", "G", "/", ":", "`", "{", " ", "F"] {
                let s = format!("blake3:{}{bad}{}", &good[..i], &good[i + 1..]);
                assert!(KeyHash::parse(&s).is_err(), "{s}");
            }
            if i < 63 {
                let s = format!("blake3:{}é{}", &good[..i], &good[i + 2..]);
                assert!(KeyHash::parse(&s).is_err(), "{s}");
            }
        }
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

    fn config(keys: &str) -> Config {
        Config::parse(
            std::path::Path::new("gw.toml"),
            &format!("[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://x\"\n{keys}"),
        )
        .unwrap()
    }

    fn keys(rate_of_b: &str) -> String {
        let h = |k: &str| KeyHash::of(k.as_bytes()).to_config_string();
        format!(
            "[[keys]]\nid = \"a\"\nhash = \"{}\"\ntenant = \"hotel\"\n\
             [[keys]]\nid = \"b\"\nhash = \"{}\"\ntenant = \"hotel\"\nrate = \"{rate_of_b}\"\n\
             previous_hash = \"{}\"\nprevious_expires = 2030-01-01T00:00:00Z\n\
             [[keys]]\nid = \"c\"\nhash = \"{}\"\ndisabled = true\nscopes = [\"GET /v1/**\"]\n\
             [[keys]]\nid = \"d\"\nhash = \"{}\"\nexpires = 2001-01-01T00:00:00Z\n",
            h("ka"),
            h("kb"),
            h("kb-old"),
            h("kc"),
            h("kd")
        )
    }

    #[test]
    fn the_table_finds_every_hash_and_shares_what_keys_share() {
        let table = KeyTable::build(&config(&keys("5/s")), None);
        assert_eq!(table.len(), 5, "four keys and one previous hash");
        assert!(table.lookup(&KeyHash::of(b"nope")).is_none());
        let a = table.lookup(&KeyHash::of(b"ka")).unwrap();
        assert_eq!(&*a.entry.id, "a");
        assert_eq!(a.entry.id_header, "a");
        assert_eq!(a.entry.tenant_header.as_ref().unwrap(), "hotel");
        assert!(a.previous_until.is_none() && a.entry.scopes.is_empty());
        assert_eq!(a.entry.policy_header, "\"default\";q=20;w=2");
        // The entry is built once and then the same for every lookup.
        let again = table.lookup(&KeyHash::of(b"ka")).unwrap();
        assert!(Arc::ptr_eq(a.entry, again.entry));

        let b = table.lookup(&KeyHash::of(b"kb")).unwrap();
        let b_old = table.lookup(&KeyHash::of(b"kb-old")).unwrap();
        assert!(
            Arc::ptr_eq(b.entry, b_old.entry),
            "old and new hash share an entry"
        );
        assert!(b.previous_until.is_none() && b_old.previous_until.is_some());
        assert_eq!(b.entry.tenant, a.entry.tenant);
        assert_eq!(b.entry.policy_header, "\"default\";q=20;w=4");

        let c = table.lookup(&KeyHash::of(b"kc")).unwrap();
        assert!(c.entry.disabled);
        assert_eq!(c.entry.scopes[0].to_string(), "GET /v1/**");
        assert!(c.entry.tenant.is_none() && c.entry.tenant_header.is_none());

        let now = SystemTime::now();
        let counts = table.status_counts(now);
        assert_eq!((counts.active, counts.disabled, counts.expired), (2, 1, 1));
        assert_eq!(counts, StatusCounts::of(&config(&keys("5/s")).keys, now));
    }

    #[test]
    fn a_rebuild_carries_limiters_over_by_id_unless_the_limit_changed() {
        let first = KeyTable::build(&config(&keys("5/s")), None);
        let a1 = Arc::clone(first.lookup(&KeyHash::of(b"ka")).unwrap().entry);
        let b1 = Arc::clone(first.lookup(&KeyHash::of(b"kb")).unwrap().entry);
        let same = KeyTable::build(&config(&keys("5/s")), Some(&first));
        let a2 = same.lookup(&KeyHash::of(b"ka")).unwrap().entry;
        let b2 = same.lookup(&KeyHash::of(b"kb")).unwrap().entry;
        assert!(Arc::ptr_eq(&a1.limiter, &a2.limiter));
        assert!(Arc::ptr_eq(&b1.limiter, &b2.limiter));
        let changed = KeyTable::build(&config(&keys("6/s")), Some(&first));
        let a3 = changed.lookup(&KeyHash::of(b"ka")).unwrap().entry;
        let b3 = changed.lookup(&KeyHash::of(b"kb")).unwrap().entry;
        assert!(Arc::ptr_eq(&a1.limiter, &a3.limiter));
        assert!(
            !Arc::ptr_eq(&b1.limiter, &b3.limiter),
            "a new rate starts afresh"
        );
    }

    #[test]
    fn limiters_are_made_on_first_request_and_outlive_reloads_without_requests() {
        let quota = |q: &str| {
            format!(
                "{}[[keys]]\nid = \"q\"\nhash = \"{}\"\nquota = \"{q}\"\n",
                keys("5/s"),
                KeyHash::of(b"kq").to_config_string()
            )
        };
        let first = KeyTable::build(&config(&quota("100/day")), None);
        let no_limiters = |t: &KeyTable| {
            (0..t.keys.len() as u32).all(|pos| matches!(t.current(pos), (None, None)))
        };
        assert!(no_limiters(&first) && first.carried.is_empty());
        // Nothing requested yet: nothing to carry, and the next table makes its own.
        let second = KeyTable::build(&config(&quota("100/day")), Some(&first));
        assert!(no_limiters(&second) && second.carried.is_empty());
        let a2 = Arc::clone(second.lookup(&KeyHash::of(b"ka")).unwrap().entry);
        let q2 = Arc::clone(second.lookup(&KeyHash::of(b"kq")).unwrap().entry);
        assert!(q2.quota.is_some() && a2.quota.is_none());
        // Requested in the second table, not in the third: the fourth still has them.
        let third = KeyTable::build(&config(&quota("100/day")), Some(&second));
        let fourth = KeyTable::build(&config(&quota("100/day")), Some(&third));
        let a4 = fourth.lookup(&KeyHash::of(b"ka")).unwrap().entry;
        let q4 = fourth.lookup(&KeyHash::of(b"kq")).unwrap().entry;
        assert!(Arc::ptr_eq(&a2.limiter, &a4.limiter));
        assert!(Arc::ptr_eq(&q2.limiter, &q4.limiter));
        assert!(Arc::ptr_eq(
            q2.quota.as_ref().unwrap(),
            q4.quota.as_ref().unwrap()
        ));
        // A changed quota starts afresh, the unchanged rate does not.
        let fifth = KeyTable::build(&config(&quota("50/day")), Some(&third));
        let q5 = fifth.lookup(&KeyHash::of(b"kq")).unwrap().entry;
        assert!(Arc::ptr_eq(&q2.limiter, &q5.limiter));
        assert!(!Arc::ptr_eq(
            q2.quota.as_ref().unwrap(),
            q5.quota.as_ref().unwrap()
        ));
        assert_eq!(q5.quota.as_ref().unwrap().limit().to_string(), "50/day");
    }

    #[test]
    fn expiries_keep_their_time_in_eight_bytes() {
        use std::time::UNIX_EPOCH;
        assert_eq!(std::mem::size_of::<Compact>(), 80);
        assert_eq!(Expiry::of(None).get(), None);
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_900_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(315_532_800, 1), // 1960
        ] {
            assert_eq!(Expiry::of(Some(t)).get(), Some(t));
        }
        // Beyond 2262: clamped, still an expiry, still after anything before it.
        let far = UNIX_EPOCH + Duration::from_secs(10_500_000_000); // 2302
        let clamped = Expiry::of(Some(far)).get().unwrap();
        assert!(clamped < far && clamped > UNIX_EPOCH + Duration::from_secs(9_000_000_000));
        let long_ago = UNIX_EPOCH - Duration::from_secs(15_000_000_000);
        assert!(Expiry::of(Some(long_ago)).get().unwrap() < UNIX_EPOCH);
    }

    #[test]
    fn keys_that_differ_only_in_body_limit_keep_their_own() {
        let table = KeyTable::build(
            &config(&format!(
                "[[keys]]\nid = \"small\"\nhash = \"{}\"\nmax_body = \"1KiB\"\n\
                 [[keys]]\nid = \"default\"\nhash = \"{}\"\n",
                KeyHash::of(b"ks").to_config_string(),
                KeyHash::of(b"kd").to_config_string()
            )),
            None,
        );
        let small = table.lookup(&KeyHash::of(b"ks")).unwrap().entry;
        let default = table.lookup(&KeyHash::of(b"kd")).unwrap().entry;
        assert_eq!(small.max_body, 1024);
        assert_eq!(default.max_body, 16 << 20, "[server] max_body's default");
        assert_eq!(small.policy_header, default.policy_header);
    }

    #[test]
    fn sealing_finds_the_duplicates_that_pushing_did_not_check() {
        let valid = config(&keys("5/s")).keys;
        let sealed = |keys: &[KeyConfig]| {
            let mut builder = KeyTableBuilder::new(None);
            for k in keys {
                builder.push(k);
            }
            builder.seal()
        };
        assert!(sealed(&valid));
        let mut same_id = valid.clone();
        same_id[3].id = "b".into();
        assert!(!sealed(&same_id), "two keys with id b");
        // Asked again, it still refuses (not "already sealed").
        let mut builder = KeyTableBuilder::new(None);
        for k in &same_id {
            builder.push(k);
        }
        assert!(!builder.seal() && !builder.seal());
        let mut same_hash = valid.clone();
        same_hash[3].hash = same_hash[0].hash;
        assert!(!sealed(&same_hash), "d has a's hash");
        let mut previous_is_a_hash = valid.clone();
        previous_is_a_hash[1].previous.as_mut().unwrap().hash = valid[2].hash;
        assert!(
            !sealed(&previous_is_a_hash),
            "b's previous hash is c's hash"
        );

        // Hashes alike in the eight bytes the index hashes by are still two keys.
        let mut alike = valid.clone();
        let mut h = valid[0].hash;
        h.0[31] ^= 1;
        alike[3].hash = h;
        let mut builder = KeyTableBuilder::new(None);
        for k in &alike {
            builder.push(k);
        }
        assert!(builder.seal());
        let table = builder.finish();
        assert_eq!(&*table.lookup(&valid[0].hash).unwrap().entry.id, "a");
        assert_eq!(&*table.lookup(&h).unwrap().entry.id, "d");
    }

    #[test]
    fn an_index_built_at_the_end_finds_every_hash_of_a_large_table() {
        let n: usize = 50_000;
        let text: String = (0..n)
            .map(|i| {
                let previous = match i % 7 {
                    0 => format!(
                        "previous_hash = \"{}\"\nprevious_expires = 2030-01-01T00:00:00Z\n",
                        KeyHash::of(format!("old-{i}").as_bytes()).to_config_string()
                    ),
                    _ => String::new(),
                };
                format!(
                    "[[keys]]\nid = \"k{i}\"\nhash = \"{}\"\n{previous}",
                    KeyHash::of(format!("key-{i}").as_bytes()).to_config_string()
                )
            })
            .collect();
        let table = KeyTable::build(&config(&text), None);
        assert_eq!(table.len(), n + n.div_ceil(7));
        for i in 0..n {
            let found = table.lookup(&KeyHash::of(format!("key-{i}").as_bytes()));
            assert_eq!(found.map(|f| f.entry.id.to_string()), Some(format!("k{i}")));
            let old = table.lookup(&KeyHash::of(format!("old-{i}").as_bytes()));
            assert_eq!(old.is_some(), i % 7 == 0, "old-{i}");
        }
        assert!(table.lookup(&KeyHash::of(b"key-x")).is_none());
    }

    #[test]
    fn a_key_file_streams_into_a_table_that_carries_limiters_over() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("gw.toml");
        std::fs::write(
            &main,
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://x\"\n\
             [auth]\nkeys_file = \"keys.toml\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("keys.toml"), keys("5/s")).unwrap();
        let first = KeyTable::build(&Config::load(&main).unwrap(), None);
        // Requested before the reload (limiters are made on a key's first request).
        let keys_seen = [&b"ka"[..], b"kb", b"kb-old", b"kc", b"kd"];
        for key in keys_seen {
            first.lookup(&KeyHash::of(key)).unwrap();
        }
        let mut builder = KeyTableBuilder::new(Some(&first));
        let config = Config::load_into(&main, &mut builder).unwrap();
        assert!(config.keys.is_empty(), "the keys went to the builder");
        let second = builder.finish();
        assert_eq!(second.len(), first.len());
        for key in keys_seen {
            let (a, b) = (
                first.lookup(&KeyHash::of(key)).unwrap(),
                second.lookup(&KeyHash::of(key)).unwrap(),
            );
            assert_eq!(a.entry.id, b.entry.id);
            assert_eq!(a.previous_until, b.previous_until);
            assert!(Arc::ptr_eq(&a.entry.limiter, &b.entry.limiter));
        }
        // A file the line scanner leaves to the toml crate (an escape in the last key) after
        // streaming some keys: the builder starts again and ends with every key once.
        std::fs::write(
            dir.path().join("keys.toml"),
            format!(
                "{}[[keys]]\nid = \"e\"\nhash = \"{}\"\ntenant = \"h\\u0041\"\n",
                keys("5/s"),
                KeyHash::of(b"ke").to_config_string()
            ),
        )
        .unwrap();
        let mut builder = KeyTableBuilder::new(None);
        Config::load_into(&main, &mut builder).unwrap();
        let table = builder.finish();
        assert_eq!(table.len(), 6);
        let e = table.lookup(&KeyHash::of(b"ke")).unwrap().entry;
        assert_eq!(e.tenant.as_deref(), Some("hA"));
        // A duplicate is still refused where it stands when the keys stream into a table.
        std::fs::write(
            dir.path().join("keys.toml"),
            format!(
                "{}[[keys]]\nid = \"a\"\nhash = \"{}\"\n",
                keys("5/s"),
                KeyHash::of(b"ke").to_config_string()
            ),
        )
        .unwrap();
        let err = Config::load_into(&main, &mut KeyTableBuilder::new(None)).unwrap_err();
        assert!(
            err.to_string().ends_with(":22:6: duplicate key id \"a\""),
            "{err}"
        );
        // So are a hash and a previous hash that an earlier key has (found only when the
        // streamed table is sealed), with the message reading the file whole gives.
        for (extra, message) in [
            (
                format!("hash = \"{}\"\n", KeyHash::of(b"kc").to_config_string()),
                ":23:8: key \"e\" has the same hash as an earlier key",
            ),
            (
                format!(
                    "hash = \"{}\"\nprevious_hash = \"{}\"\nprevious_expires = 2030-01-01T00:00:00Z\n",
                    KeyHash::of(b"ke").to_config_string(),
                    KeyHash::of(b"kb-old").to_config_string()
                ),
                ":24:17: key \"e\": previous_hash is already the hash of a key",
            ),
        ] {
            std::fs::write(
                dir.path().join("keys.toml"),
                format!("{}[[keys]]\nid = \"e\"\n{extra}", keys("5/s")),
            )
            .unwrap();
            let streamed = Config::load_into(&main, &mut KeyTableBuilder::new(None)).unwrap_err();
            let whole = Config::load(&main).unwrap_err();
            assert!(streamed.to_string().ends_with(message), "{streamed}");
            assert_eq!(streamed.to_string(), whole.to_string());
        }
    }
}
