//! Readiness: the upstream probe and the state `/readyz` reports.
//!
//! Every `[upstream] health_interval` (default 5 s) the probe either opens a TCP connection to
//! the upstream's host and port, or, when `health_path` is set, sends `GET health_path` to the
//! upstream's scheme and authority (the url's path prefix is not added) and wants a 2xx or 3xx
//! answer. The probe reads the live config each round, so a reload that changes the upstream is
//! probed from the next round on (its TLS roots, `[upstream] ca_file`, are those of the start-up
//! config, as on the request path). The probe runs only when `[admin]` is configured, since
//! `/readyz` and `keygate_upstream_up` are where its result is seen. keygate is ready when the last probe succeeded and it is not
//! shutting down; a valid config is always loaded (start-up refuses an invalid one and a broken
//! reload keeps the running one).

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{uri::Scheme, Request, Uri};
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::sync::watch;

use crate::{config::UpstreamConfig, proxy::Shared, upstream::UpstreamClient};

/// Whether keygate should receive traffic, and if not, why.
#[derive(Debug)]
pub struct Readiness {
    state: ArcSwap<Result<(), String>>,
    draining: std::sync::atomic::AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            state: ArcSwap::from_pointee(Err("the upstream has not been probed yet".into())),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Readiness {
    /// `Ok` when ready; otherwise the reason, in one sentence.
    pub fn check(&self) -> Result<(), String> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        (**self.state.load()).clone()
    }

    /// Marks the gateway as shutting down: not ready from now on.
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records a probe result, logging when readiness changes.
    fn set_probe(&self, result: Result<(), String>) {
        let old = self.state.swap(Arc::new(result.clone()));
        match (&*old, &result) {
            (Err(_), Ok(())) => tracing::info!("upstream is reachable: ready"),
            (Ok(()), Err(why)) => tracing::warn!("upstream probe failed, not ready: {why}"),
            (Err(before), Err(why)) if before != why => {
                tracing::warn!("upstream probe failed, not ready: {why}")
            }
            _ => {}
        }
    }
}

type ProbeClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Starts the probe loop; it probes at once, then every `health_interval`, until `stop`.
pub fn spawn(
    shared: Arc<Shared>,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    // The TLS roots of the start-up config, as the request path's client uses
    // (`[upstream] ca_file` changes take effect after a restart for both).
    let client = probe_client(&shared.live.load().config.upstream, &shared.client);
    tokio::spawn(async move {
        loop {
            let live = shared.live.load_full();
            let upstream = &live.config.upstream;
            let result = probe(&client, upstream).await;
            shared.metrics.set_upstream_up(result.is_ok());
            readiness.set_probe(result);
            tokio::select! {
                _ = tokio::time::sleep(upstream.health_interval) => {}
                _ = stop.wait_for(Option::is_some) => break,
            }
        }
    });
}

/// The probe's client: `https://` upstreams are verified as the request path verifies them
/// ([`crate::upstream::tls_config`]: `[upstream] ca_file`, else the webpki roots) and shown
/// the request path's `client_cert`.
fn probe_client(upstream: &UpstreamConfig, requests: &UpstreamClient) -> ProbeClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(crate::upstream::tls_config(
            upstream,
            requests.client_cert(),
        ))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    // No pooling: each probe opens a fresh connection, as a new partner request might.
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(https)
}

/// One probe: a TCP connect, or `GET health_path` when set.
async fn probe(client: &ProbeClient, upstream: &UpstreamConfig) -> Result<(), String> {
    let host = upstream.authority.host();
    let port = upstream
        .authority
        .port_u16()
        .unwrap_or(if upstream.scheme == Scheme::HTTPS {
            443
        } else {
            80
        });
    // A limit so one hung probe cannot stall readiness for a whole `timeout`.
    let limit = upstream
        .timeout
        .min(upstream.health_interval.max(Duration::from_secs(1)))
        .max(upstream.connect_timeout);
    let Some(path) = &upstream.health_path else {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        return match tokio::time::timeout(
            upstream.connect_timeout,
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot connect to the upstream {host}:{port}: {e}")),
            Err(_) => Err(format!(
                "no TCP connection to the upstream {host}:{port} within {:?}",
                upstream.connect_timeout
            )),
        };
    };
    let uri = Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(path.as_str())
        .build()
        .map_err(|e| format!("health_path cannot be requested: {e}"))?;
    let req = Request::get(uri)
        .header(http::header::USER_AGENT, "keygate-health")
        .body(Empty::new())
        .map_err(|e| format!("health_path cannot be requested: {e}"))?;
    match tokio::time::timeout(limit, client.request(req)).await {
        Ok(Ok(resp)) if resp.status().is_success() || resp.status().is_redirection() => Ok(()),
        Ok(Ok(resp)) => Err(format!(
            "the upstream answered {path} with {}",
            resp.status()
        )),
        Ok(Err(e)) => Err(format!(
            "the upstream health check {path} failed: {}",
            crate::proxy::error_chain(&e)
        )),
        Err(_) => Err(format!(
            "the upstream did not answer {path} within {limit:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_starts_unready_and_draining_wins() {
        let r = Readiness::default();
        assert!(r.check().unwrap_err().contains("not been probed"));
        r.set_probe(Ok(()));
        assert_eq!(r.check(), Ok(()));
        r.set_draining();
        assert_eq!(r.check(), Err("shutting down".to_string()));
    }
}
