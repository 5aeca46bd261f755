//! The signed identity header `X-Keygate-Signature`, so the backend can trust who called.
//!
//! With `[upstream] identity_secret` (or `identity_secret_file`) set, keygate adds
//!
//! ```text
//! X-Keygate-Signature: t=<unix seconds>,v2=<64 hex>
//! ```
//!
//! where `v2` is the blake3 keyed hash, under the key `blake3::derive_key(CONTEXT, secret)`, of
//!
//! ```text
//! <t>\n<key id>\n<tenant or empty>\n<METHOD>\n<path and query as the upstream receives them>
//! ```
//!
//! (`v1` signed the path without the query: one signed request seen by someone who can reach
//! the upstream could be replayed with any query for the skew window. The body is not signed:
//! it streams, and the header goes first.)
//!
//! None of the fields can hold a newline (ids and tenants are `A-Za-z0-9._-`, methods are tokens,
//! paths have no raw whitespace), so the message is unambiguous. The backend recomputes it from
//! the request and the `X-Keygate-*` headers, compares in constant time, and refuses a `t` too
//! far from its clock (the README suggests five minutes). [`verify`] is that check.

use std::{fmt, time::Duration};

use http::HeaderValue;

/// The blake3 key-derivation context; the backend must use the same string.
pub const CONTEXT: &str = "keygate 2026-11 X-Keygate-Signature v2";
/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// The signing key derived from the configured secret; its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentityKey([u8; 32]);

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityKey(<redacted>)")
    }
}

impl IdentityKey {
    /// Derives the key from a secret of at least [`MIN_SECRET_LEN`] bytes.
    pub fn from_secret(secret: &[u8]) -> Result<IdentityKey, String> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the identity secret must be at least {MIN_SECRET_LEN} bytes (try `openssl rand -hex 32`)"
            ));
        }
        Ok(IdentityKey(blake3::derive_key(CONTEXT, secret)))
    }

    /// The signature of one request's identity at `timestamp` (unix seconds).
    pub fn sign(&self, timestamp: u64, who: &Identity<'_>) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(timestamp.to_string().as_bytes());
        for field in [who.key_id, who.tenant.unwrap_or(""), who.method, who.target] {
            h.update(b"\n");
            h.update(field.as_bytes());
        }
        h.finalize()
    }

    /// The `X-Keygate-Signature` value: `t=<timestamp>,v2=<hex>`.
    pub fn header(&self, timestamp: u64, who: &Identity<'_>) -> HeaderValue {
        let mac = self.sign(timestamp, who);
        HeaderValue::try_from(format!("t={timestamp},v2={}", mac.to_hex()))
            .expect("digits and hex are ASCII")
    }
}

/// What a signature vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<'a> {
    /// The key id (`X-Keygate-Key-Id`).
    pub key_id: &'a str,
    /// The tenant (`X-Keygate-Tenant`), if the key has one.
    pub tenant: Option<&'a str>,
    /// The request method.
    pub method: &'a str,
    /// The path and query as the upstream receives them (`/api/v1/guests?lang=en`).
    pub target: &'a str,
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The header is not `t=<digits>,v2=<64 hex>`.
    #[error("malformed signature header")]
    Malformed,
    /// `t` is further than the allowed skew from now.
    #[error("signature timestamp outside the allowed window")]
    Stale,
    /// The hash does not match: another secret, or a changed field.
    #[error("signature does not match")]
    Mismatch,
}

/// The backend-side check: recomputes the signature and compares in constant time.
pub fn verify(
    key: &IdentityKey,
    header: &str,
    now: u64,
    max_skew: Duration,
    who: &Identity<'_>,
) -> Result<(), VerifyError> {
    let (t, v2) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v2=")?)))
        .ok_or(VerifyError::Malformed)?;
    let t: u64 = t.parse().map_err(|_| VerifyError::Malformed)?;
    let given = blake3::Hash::from_hex(v2).map_err(|_| VerifyError::Malformed)?;
    if now.abs_diff(t) > max_skew.as_secs() {
        return Err(VerifyError::Stale);
    }
    // blake3::Hash's == is constant-time.
    if key.sign(t, who) != given {
        return Err(VerifyError::Mismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn signature_verifies_with_the_secret_only() {
        let key = IdentityKey::from_secret(SECRET).unwrap();
        let who = Identity {
            key_id: "review",
            tenant: Some("hotel-1"),
            method: "GET",
            target: "/v1/guests",
        };
        let h = key.header(1_000, &who);
        let h = h.to_str().unwrap();
        let skew = Duration::from_secs(300);
        assert_eq!(verify(&key, h, 1_010, skew, &who), Ok(()));
        let other = IdentityKey::from_secret(b"another secret of at least 32 bytes").unwrap();
        assert_eq!(
            verify(&other, h, 1_010, skew, &who),
            Err(VerifyError::Mismatch)
        );
        let other_tenant = Identity {
            tenant: Some("hotel-2"),
            ..who
        };
        assert_eq!(
            verify(&key, h, 1_010, skew, &other_tenant),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(verify(&key, h, 2_000, skew, &who), Err(VerifyError::Stale));
        assert_eq!(
            verify(&key, "v2=00", 1_000, skew, &who),
            Err(VerifyError::Malformed)
        );
        assert!(IdentityKey::from_secret(b"short").is_err());
        assert_eq!(format!("{key:?}"), "IdentityKey(<redacted>)");
    }

    #[test]
    fn the_documented_construction_is_what_is_signed() {
        let key = IdentityKey::from_secret(SECRET).unwrap();
        let derived = blake3::derive_key(CONTEXT, SECRET);
        let expected = blake3::keyed_hash(&derived, b"7\nid\n\nPOST\n/api/v1/messages?lang=en");
        let who = Identity {
            key_id: "id",
            tenant: None,
            method: "POST",
            target: "/api/v1/messages?lang=en",
        };
        assert_eq!(key.sign(7, &who), expected);
    }

    /// A fixed vector for backend implementers; the README's Python check produces the same.
    #[test]
    fn test_vector() {
        let key = IdentityKey::from_secret(SECRET).unwrap();
        let who = Identity {
            key_id: "review",
            tenant: Some("hotel-1042"),
            method: "GET",
            target: "/api/v1/guests?lang=en",
        };
        // Computed with the README's Python check's construction (pip's blake3).
        assert_eq!(
            key.sign(1_700_000_000, &who).to_hex().as_str(),
            "bb30514ce4b8e85f15dd143258e099dda3bd741bb4a12e14959ef4357fb82ff5"
        );
    }
}
