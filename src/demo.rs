//! `keygate demo`: a sample Bookboost-like upstream, keygate in front of it, and a fresh key.
//!
//! Everything runs in one process on 127.0.0.1 over plain HTTP. The demo's gateway.toml is
//! written to a temporary directory and printed, so a visitor can edit it and watch the reload.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::{
    config::Config,
    keys::{self, KeyHash},
    server::Gateway,
};

/// Starts a sample upstream that answers like the Bookboost API:
/// `GET /v1/guests` lists guests who just checked out, `POST /v1/messages` queues a message;
/// both echo which key id and tenant called (from keygate's identity headers).
pub async fn start_sample_upstream() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(sample_api))
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn sample_api(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map_or("null".to_string(), crate::error::json_string)
    };
    let called_by = format!(
        "{{\"key_id\":{},\"tenant\":{}}}",
        header("x-keygate-key-id"),
        header("x-keygate-tenant")
    );
    let (status, body) = match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/v1/guests") => (
            StatusCode::OK,
            format!(
                "{{\"guests\":[{{\"id\":\"g-1001\",\"name\":\"Ada Lovelace\",\"checked_out\":\"2026-11-25T10:02:00Z\"}},\
                 {{\"id\":\"g-1002\",\"name\":\"Alan Turing\",\"checked_out\":\"2026-11-25T11:40:00Z\"}}],\
                 \"called_by\":{called_by}}}"
            ),
        ),
        (Method::POST, "/v1/messages") => {
            let size = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            (
                StatusCode::CREATED,
                format!("{{\"status\":\"queued\",\"bytes\":{size},\"called_by\":{called_by}}}"),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "{\"error\":\"not_found\",\"message\":\"Try GET /v1/guests or POST /v1/messages.\"}"
                .to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// A directory of the demo's own under the temp dir, made now (mode 0700 on Unix), under a
/// name nobody could have made before it: another local user cannot pre-create it and edit
/// the watched config, or plant a symlink for the write to follow.
fn private_dir() -> std::io::Result<PathBuf> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    loop {
        let dir = std::env::temp_dir().join(format!(
            "keygate-demo-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Runs the demo until Ctrl-C. `port` is tried first; a busy port falls back to a free one.
pub async fn run(port: u16) -> anyhow::Result<()> {
    let upstream = start_sample_upstream().await?;
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind("127.0.0.1:0").await?,
    };
    let addr = listener.local_addr()?;
    let key = keys::mint(keys::DEFAULT_PREFIX);
    let dir = private_dir()?;
    let path: PathBuf = dir.join("gateway.toml");
    let text = format!(
        r#"# keygate demo config: edit it while the demo runs and watch it reload.
[server]
listen = "{addr}"

[upstream]
url = "http://{upstream}"
timeout = "10s"

[limits]
rate = "1/s"
burst = 5

[[keys]]
id = "demo-review-platform"
hash = "{hash}"
tenant = "hotel-1042"
"#,
        hash = KeyHash::of(key.as_bytes()).to_config_string()
    );
    std::fs::write(&path, text)?;
    let config = Config::load(&path)?;
    let gateway = Gateway::start_on(listener, config).await?;
    let base = format!("http://{addr}");
    println!(
        r#"
keygate demo: a sample Bookboost API on http://{upstream}, keygate in front of it on {base}
config: {config}

Your demo API key (shown once; only its blake3 hash is in the config):

    {key}

Accepted (200, the upstream echoes the key id and tenant it was told about):
    curl -i -H 'x-api-key: {key}' {base}/v1/guests
    curl -i -H 'Authorization: Bearer {key}' -d '{{"guest":"g-1001","text":"Thanks for staying!"}}' {base}/v1/messages

Rejected without a key (401 missing_api_key) and with a wrong one (401 invalid_api_key):
    curl -i {base}/v1/guests
    curl -i -H 'x-api-key: bbk_not-a-real-key' {base}/v1/guests

Rate-limited (burst 5, then 1/s: the later ones get 429 rate_limited with Retry-After):
    for i in $(seq 1 8); do curl -s -o /dev/null -w '%{{http_code}}\n' -H 'x-api-key: {key}' {base}/v1/guests; done

Press Ctrl-C to stop.
"#,
        config = path.display()
    );
    tokio::signal::ctrl_c().await?;
    gateway.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
