//! WebSocket and other HTTP/1.1 `Upgrade` requests, passed through after the key check.
//!
//! An upgrade request is authenticated, limited and rewritten like any other (so the key is
//! stripped); only its `Connection: upgrade` and `Upgrade` fields, hop-by-hop by nature, are put
//! back before it goes upstream. When the upstream answers `101 Switching Protocols`, both
//! connections are taken over from hyper and spliced together, bytes copied both ways until
//! either side closes. The client side stays under `[server] idle_timeout`, so an upgraded
//! connection with no traffic at all (not even pings) is closed like any idle connection.

use http::{header, HeaderMap, HeaderValue, Request};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::upstream::Upgraded;

/// The `Upgrade` value of an HTTP/1.1 request that asks to switch protocols, if it does.
pub fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    // `Upgrade` first: most requests have none, and then `Connection` need not be read.
    let mut values = req.headers().get_all(header::UPGRADE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| value.clone())
}

/// Puts the upgrade fields back after the hop-by-hop headers were stripped.
pub fn restore(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// After a `101` from the upstream: waits for the client side to hand over its connection and
/// copies bytes between the two in a task of its own, which the connection's task then waits
/// for ([`crate::proxy::ConnInfo::splice`]).
pub fn splice(
    client: OnUpgrade,
    mut upstream: Upgraded,
    request_id: HeaderValue,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let rid = request_id.to_str().unwrap_or("-").to_string();
        let client = match client.await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(request_id = rid, "upgrade failed: {e}");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => {
                tracing::debug!(request_id = rid, up, down, "upgraded connection closed")
            }
            Err(e) => tracing::debug!(request_id = rid, "upgraded connection ended: {e}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http11_requests_that_list_upgrade_in_connection_ask_to_switch() {
        let ws = Request::get("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert_eq!(requested(&ws).unwrap(), "websocket");
        let no_connection = Request::get("/")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(requested(&no_connection).is_none());
        let h2 = Request::get("/")
            .version(http::Version::HTTP_2)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(requested(&h2).is_none());
        let two = Request::get("/")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("upgrade", "h2c")
            .body(())
            .unwrap();
        assert!(requested(&two).is_none());
    }
}
