//! Logging: a tracing subscriber on stderr, `RUST_LOG` respected (default `info`).
//!
//! The access log is the `keygate::access` target, one line per request. Nothing the request
//! path logs contains a key, a key hash or an `Authorization` value.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; call once, from the binary.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
