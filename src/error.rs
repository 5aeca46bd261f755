//! The gateway's errors, mapped to HTTP answers in one place.
//!
//! Every refusal the gateway makes is a [`GatewayError`]. [`GatewayError::status`] and
//! [`GatewayError::code`] are exhaustive `match`es (no `_ =>` arm), so a new variant cannot ship
//! without a status; the client gets the short JSON code, the log gets the cause.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// Why the gateway answered a request itself instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// No key in the configured header nor in `Authorization: Bearer`.
    #[error("no API key presented")]
    MissingApiKey,
    /// The key is not in the table, is disabled, or is malformed (too long, not ASCII).
    #[error("API key not recognised")]
    InvalidApiKey,
    /// The key carries the configured prefix but its checksum is wrong (a typo).
    #[error("API key checksum mismatch")]
    BadChecksum,
    /// The key is known but its `expires` time has passed.
    #[error("API key expired")]
    ExpiredApiKey,
    /// Several key headers, or a key header and a Bearer token at once.
    #[error("more than one API key presented")]
    AmbiguousApiKey,
    /// The key's scopes do not cover this method and path.
    #[error("API key scope does not cover this request")]
    ForbiddenScope,
    /// The key's short-window rate is spent; admitted again after `retry_after` seconds.
    #[error("rate limit exceeded, retry after {retry_after}s")]
    RateLimited {
        /// Whole seconds (≥ 1) after which a request is admitted.
        retry_after: u64,
    },
    /// The key's long-window quota is spent; admitted again after `retry_after` seconds.
    #[error("quota exceeded, retry after {retry_after}s")]
    QuotaExceeded {
        /// Whole seconds (≥ 1) after which a request is admitted.
        retry_after: u64,
    },
    /// Too many failed key attempts from this client IP; no key but a valid one is judged
    /// until `retry_after` seconds have passed.
    #[error("too many failed key attempts, retry after {retry_after}s")]
    TooManyFailures {
        /// Whole seconds (≥ 1) until this address's attempts are judged again.
        retry_after: u64,
    },
    /// The client stopped sending its request body for longer than the body timeout.
    #[error("request body stalled")]
    RequestTimeout,
    /// The request is malformed in a way the gateway refuses to forward.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request states its body's length twice (see [`crate::framing`]); the connection
    /// closes after the answer, since where this request ends is in doubt.
    #[error("ambiguous request framing: {}", .0.message())]
    AmbiguousFraming(crate::framing::Ambiguity),
    /// The request body exceeds the allowed size.
    #[error("request body too large")]
    PayloadTooLarge,
    /// The upstream refused the connection, reset it, or is unreachable.
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    /// The upstream sent no response head within `upstream.timeout`.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The shared limit store is down and `on_store_error = "deny"`.
    #[error("limit store unavailable")]
    LimitStoreUnavailable,
}

/// A path keygate will not forward ([`crate::scope`]): 400 `bad_request`, whatever the key.
impl From<crate::scope::PathError> for GatewayError {
    fn from(err: crate::scope::PathError) -> GatewayError {
        GatewayError::BadRequest(match err {
            crate::scope::PathError::Ambiguous => {
                "Encoded slashes, backslashes, NULs and dot segments with parameters (..;) are not accepted in paths."
            }
            crate::scope::PathError::AboveRoot => "The path climbs above the root (/..).",
        })
    }
}

impl GatewayError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::BadChecksum
            | GatewayError::ExpiredApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::AmbiguousApiKey
            | GatewayError::BadRequest(_)
            | GatewayError::AmbiguousFraming(_) => StatusCode::BAD_REQUEST,
            GatewayError::ForbiddenScope => StatusCode::FORBIDDEN,
            GatewayError::RateLimited { .. }
            | GatewayError::QuotaExceeded { .. }
            | GatewayError::TooManyFailures { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::LimitStoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The short machine-readable code in the JSON body (also the metrics `reason` label).
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey => "missing_api_key",
            // A typo'd key is refused like any unknown key; it is only counted apart.
            GatewayError::InvalidApiKey | GatewayError::BadChecksum => "invalid_api_key",
            GatewayError::ExpiredApiKey => "expired_api_key",
            GatewayError::AmbiguousApiKey => "ambiguous_api_key",
            GatewayError::ForbiddenScope => "forbidden_scope",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::QuotaExceeded { .. } => "quota_exceeded",
            GatewayError::TooManyFailures { .. } => "too_many_failures",
            GatewayError::RequestTimeout => "request_timeout",
            GatewayError::BadRequest(_) | GatewayError::AmbiguousFraming(_) => "bad_request",
            GatewayError::PayloadTooLarge => "payload_too_large",
            GatewayError::UpstreamUnavailable => "upstream_unavailable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::LimitStoreUnavailable => "limit_store_unavailable",
        }
    }

    /// The reason recorded in metrics and logs; finer than [`code`](Self::code) where a
    /// distinction matters to operators but must not be revealed to clients.
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::BadChecksum => "bad_checksum",
            GatewayError::AmbiguousFraming(_) => "ambiguous_framing",
            other => other.code(),
        }
    }

    /// One sentence for the client; never contains anything the client sent.
    pub fn message(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey => {
                "Send your API key in the configured header or as an Authorization Bearer token."
            }
            GatewayError::InvalidApiKey | GatewayError::BadChecksum => "The API key is not valid.",
            GatewayError::ExpiredApiKey => "The API key has expired.",
            GatewayError::AmbiguousApiKey => "Send exactly one API key per request.",
            GatewayError::ForbiddenScope => "The API key is not allowed to call this endpoint.",
            GatewayError::RateLimited { .. } => {
                "Too many requests; retry after the indicated time."
            }
            GatewayError::QuotaExceeded { .. } => {
                "The API key's quota is used up; retry after the indicated time."
            }
            GatewayError::TooManyFailures { .. } => {
                "Too many failed API key attempts from this address; retry after the indicated time."
            }
            GatewayError::RequestTimeout => "The request body stopped arriving.",
            GatewayError::BadRequest(why) => why,
            GatewayError::AmbiguousFraming(why) => why.message(),
            GatewayError::PayloadTooLarge => "The request body is too large.",
            GatewayError::UpstreamUnavailable => "The upstream service is unavailable.",
            GatewayError::UpstreamTimeout => "The upstream service did not answer in time.",
            GatewayError::LimitStoreUnavailable => {
                "The rate-limit store is unavailable; try again shortly."
            }
        }
    }

    /// The complete response: status, JSON body and the headers this error calls for.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = format!(
            "{{\"error\":\"{}\",\"message\":{}}}",
            self.code(),
            json_string(self.message())
        );
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            GatewayError::MissingApiKey => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate\""),
                );
            }
            GatewayError::InvalidApiKey
            | GatewayError::BadChecksum
            | GatewayError::ExpiredApiKey => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"invalid_token\""),
                );
            }
            GatewayError::RateLimited { retry_after }
            | GatewayError::QuotaExceeded { retry_after }
            | GatewayError::TooManyFailures { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            GatewayError::AmbiguousFraming(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

/// Encodes `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the public contract: status and code for every variant.
    #[test]
    fn every_error_maps_to_its_status_and_code() {
        let cases = [
            (GatewayError::MissingApiKey, 401, "missing_api_key"),
            (GatewayError::InvalidApiKey, 401, "invalid_api_key"),
            (GatewayError::BadChecksum, 401, "invalid_api_key"),
            (GatewayError::ExpiredApiKey, 401, "expired_api_key"),
            (GatewayError::AmbiguousApiKey, 400, "ambiguous_api_key"),
            (GatewayError::ForbiddenScope, 403, "forbidden_scope"),
            (
                GatewayError::RateLimited { retry_after: 3 },
                429,
                "rate_limited",
            ),
            (
                GatewayError::QuotaExceeded { retry_after: 3 },
                429,
                "quota_exceeded",
            ),
            (
                GatewayError::TooManyFailures { retry_after: 3 },
                429,
                "too_many_failures",
            ),
            (GatewayError::RequestTimeout, 408, "request_timeout"),
            (GatewayError::BadRequest("x"), 400, "bad_request"),
            (
                GatewayError::AmbiguousFraming(crate::framing::Ambiguity::RepeatedLength),
                400,
                "bad_request",
            ),
            (GatewayError::PayloadTooLarge, 413, "payload_too_large"),
            (
                GatewayError::UpstreamUnavailable,
                502,
                "upstream_unavailable",
            ),
            (GatewayError::UpstreamTimeout, 504, "upstream_timeout"),
            (
                GatewayError::LimitStoreUnavailable,
                503,
                "limit_store_unavailable",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code, "{err:?}");
            let resp = err.to_response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        }
        assert_eq!(GatewayError::BadChecksum.reason(), "bad_checksum");
    }

    #[test]
    fn unauthorized_answers_carry_www_authenticate_and_retry_after_on_429() {
        assert!(GatewayError::MissingApiKey
            .to_response()
            .headers()
            .contains_key(header::WWW_AUTHENTICATE));
        let r = GatewayError::RateLimited { retry_after: 7 }.to_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
    }

    #[test]
    fn json_string_escapes() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
