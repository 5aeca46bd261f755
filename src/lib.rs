//! keygate: a TLS-terminating API-key gateway in front of the Bookboost API.
//!
//! Partners call keygate exactly as they would call the API, adding their key. keygate checks
//! the key against an in-memory table of blake3 hashes, rate-limits each key, and streams what
//! it admits to the upstream.
//!
//! # Layout
//! - [`cli`]: the command line (`run`, `demo`, `hash`, `check`, `certs`, `keys`).
//! - [`keys_cli`]: `keygate keys new|list|revoke|rotate`, a partner key's life from the CLI.
//! - [`keyfile`]: editing the key store in place: toml_edit, validation, lock, atomic write.
//! - [`config`]: gateway.toml → raw serde structs → validated [`config::Config`].
//! - [`keys`]: key format and checksum, blake3 hashing, the [`keys::KeyTable`].
//! - [`limit`]: per-key GCRA limiters that outlive reloads, rate-limit header fields.
//! - [`quota`]: long-window quotas beside the rate, charged together or not at all.
//! - [`scope`]: key scopes (`GET /v1/guests/**`) and the path normalisation they rely on.
//! - [`identity`]: the `X-Keygate-Signature` header the backend can verify.
//! - [`proxy`]: the request path, phase by phase (authenticate, scope, limit, rewrite, forward).
//! - [`store`]: limits shared by several instances through Redis, with a fallback.
//! - [`client_ip`]: the client's address: socket peer, trusted proxies' headers, PROXY v2.
//! - [`bruteforce`]: failed key attempts per client IP, and the 429 past the budget.
//! - [`body`]: body guards: the `max_body` size limit and the body idle timeout.
//! - [`upgrade`]: WebSocket / `Upgrade` pass-through after the key check.
//! - [`upstream`]: the pooled upstream client (HTTP and verified HTTPS, with an optional client
//!   certificate).
//! - [`wire`]: HTTP/1.1 on the upstream hop as bytes: request heads, response heads, framing.
//! - [`tls`]: the listener's rustls config and certificate loading.
//! - [`certs`]: certificate hot reload behind one `ArcSwap`, keeping the last good pair (the
//!   listener's, and the one shown to the upstream).
//! - [`server`]: accept loop, HTTP/1.1 + HTTP/2 serving, graceful shutdown.
//! - [`conn`]: the client byte stream's guards (keep-alive idle timeout, framing screen).
//! - [`framing`]: HTTP/1 request framing screened on the wire (repeated lengths, CL + TE).
//! - [`timers`]: recycled timers for the per-request deadlines (head timeout, upstream wait).
//! - [`drain`]: graceful shutdown of served connections (the drain signal and the wait).
//! - [`watch`]: directory watch + SIGHUP, debounced: the feed both reloads listen to.
//! - [`reload`]: file watch + SIGHUP → validate → one atomic swap, or keep the old.
//! - [`error`]: the gateway's error enum → status + JSON body, in one place.
//! - [`telemetry`]: logging set-up, text or json.
//! - [`access`]: the access line and request metrics, written when a response body is done.
//! - [`metrics`]: the Prometheus registry and its typed handles.
//! - [`health`]: the upstream readiness probe.
//! - [`admin`]: the admin listener: `/healthz`, `/readyz`, `/metrics`.
//! - [`demo`]: `keygate demo`, a sample upstream with keygate in front.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod body;
pub mod bruteforce;
pub mod certs;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod conn;
pub mod demo;
pub mod drain;
pub mod error;
pub mod framing;
pub mod health;
pub mod identity;
pub mod keyfile;
pub mod keys;
pub mod keys_cli;
pub mod limit;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod reload;
pub mod scope;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod timers;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod watch;
pub mod wire;
