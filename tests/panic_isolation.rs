//! A panic inside one connection's request handling ends that connection only (issue 6).
//!
//! The panic is real and comes from inside the request path: a tracing layer (the extension
//! point operators plug log shippers into) panics on the event the gateway logs when it refuses
//! the request with id `panic-in-this-request`. This file is its own test binary because the
//! layer is the process-wide subscriber (a per-thread one races with other tests over tracing's
//! shared callsite cache).

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing_subscriber::layer::SubscriberExt;

const KEY: &str = "partner-key-0123456789abcdefghijklmnop";
const PANIC_ID: &str = "panic-in-this-request";

/// Panics on any event with a field that mentions [`PANIC_ID`], counting the panics.
struct PanicOn(Arc<AtomicUsize>);

struct Finds(bool);

impl tracing::field::Visit for Finds {
    fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0 |= format!("{value:?}").contains(PANIC_ID);
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PanicOn {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut finds = Finds(false);
        event.record(&mut finds);
        if finds.0 {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("a layer panics inside the request path");
        }
    }
}

/// Writes `request` on `conn` and reads until a whole response head arrives or the connection
/// ends; returns what came.
async fn ask(conn: &mut TcpStream, request: &str) -> String {
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn fresh(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// The client whose request panics sees its connection end without an answer; a client
/// connected before and clients connecting after are served, and the panicked connections gave
/// back their `max_connections` slots.
#[tokio::test]
async fn a_panic_in_one_connection_ends_that_connection_only() {
    let panics = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(PanicOn(Arc::clone(&panics))),
    )
    .unwrap();

    let up = start_upstream().await;
    let text = config_text(&up.url(), &key_entry("partner", KEY, "")).replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nmax_connections = 2\n",
    );
    let gw = start_gateway(&text).await;
    let good = format!("GET /v1/ok HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\r\n");
    let mut bystander = fresh(gw.addr()).await;
    assert!(ask(&mut bystander, &good).await.starts_with("HTTP/1.1 200"));

    let boom = format!("GET /v1/a HTTP/1.1\r\nHost: x\r\nX-Request-Id: {PANIC_ID}\r\n\r\n");
    for _ in 0..3 {
        let got = ask(&mut fresh(gw.addr()).await, &boom).await;
        assert_eq!(got, "", "the panicking connection ends without an answer");
    }
    assert_eq!(
        panics.load(Ordering::SeqCst),
        3,
        "the request path panicked"
    );

    assert!(ask(&mut bystander, &good).await.starts_with("HTTP/1.1 200"));
    drop(bystander);
    // With max_connections = 2, connection slots leaked by the panics would leave these
    // waiting in the listen backlog.
    for _ in 0..3 {
        let got = ask(&mut fresh(gw.addr()).await, &good).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    }
    assert_eq!(up.hits(), 5);
}
