//! The pooled client that carries admitted requests to the upstream.
//!
//! hyper-util's pooled client over an HTTP connector (TCP_NODELAY, connect timeout) wrapped by
//! hyper-rustls, so `https://` upstreams are verified against the webpki roots. Connections are
//! kept alive and reused; idle ones are closed after 90 s.

use std::time::Duration;

use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use crate::config::UpstreamConfig;

/// The body type sent upstream: the client's own body, streamed through the `max_body` and
/// body-idle guards.
pub type RequestBody = crate::body::GuardedBody<Incoming>;

/// The upstream client type.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// Builds the pooled upstream client.
pub fn client(config: &UpstreamConfig) -> UpstreamClient {
    crate::tls::install_crypto_provider();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .build(https)
}
