//! keygate: a TLS-terminating API-key gateway in front of the Bookboost API.
//!
//! Partners call keygate exactly as they would call the API, adding their key. keygate checks
//! the key against an in-memory table of blake3 hashes, rate-limits each key, and streams what
//! it admits to the upstream.
//!
//! # Layout
//! - [`cli`]: the command line (`run`, `demo`, `hash`, `check`).
//! - [`config`]: gateway.toml → raw serde structs → validated [`config::Config`].
//! - [`keys`]: key format and checksum, blake3 hashing, the [`keys::KeyTable`].
//! - [`limit`]: per-key GCRA limiters that outlive reloads, rate-limit header fields.
//! - [`client_ip`]: the client's address: socket peer, trusted proxies' headers, PROXY v2.
//! - [`bruteforce`]: failed key attempts per client IP, and the 429 past the budget.
//! - [`body`]: body guards: the `max_body` size limit and the body idle timeout.
//! - [`proxy`]: the request path, phase by phase (authenticate, limit, rewrite, forward).
//! - [`upgrade`]: WebSocket / `Upgrade` pass-through after the key check.
//! - [`upstream`]: the pooled upstream client (HTTP and verified HTTPS).
//! - [`tls`]: the listener's rustls config and certificate loading.
//! - [`server`]: accept loop, HTTP/1.1 + HTTP/2 serving, graceful shutdown.
//! - [`conn`]: per-connection guards (the keep-alive idle timeout).
//! - [`reload`]: file watch + SIGHUP → validate → one atomic swap, or keep the old.
//! - [`error`]: the gateway's error enum → status + JSON body, in one place.
//! - [`telemetry`]: logging set-up; the access log.
//! - [`demo`]: `keygate demo`, a sample upstream with keygate in front.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod body;
pub mod bruteforce;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod conn;
pub mod demo;
pub mod error;
pub mod keys;
pub mod limit;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upgrade;
pub mod upstream;
