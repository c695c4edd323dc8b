//! HTTP clients for upstream calls, one set per worker thread.
//!
//! Each worker runs its own single-threaded runtime; a client (and so its connection pool)
//! that belongs to the thread keeps a request, its upstream connection and the task that
//! drives it on one core, with no cross-thread wake-ups on the hot path. Clients outlive
//! config reloads, so warm connections survive them.

use std::cell::RefCell;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// A request body sent upstream: rewritten JSON, or the app's body streamed through.
pub type UpstreamRequestBody = Either<Full<Bytes>, Limited<hyper::body::Incoming>>;
pub type HttpClient = Client<HttpsConnector<HttpConnector>, UpstreamRequestBody>;

/// Idle upstream connections are closed before typical provider load balancers (~120 s) do,
/// so a pooled connection is rarely found dead when a request picks it.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

thread_local! {
    // Keyed by connect timeout, the only client setting that differs between endpoints
    // (the pool itself is keyed by upstream host).
    static CLIENTS: RefCell<Vec<(Duration, HttpClient)>> = const { RefCell::new(Vec::new()) };
}

/// This thread's client for upstreams with the given connect timeout.
pub fn for_connect_timeout(connect_timeout: Duration) -> HttpClient {
    CLIENTS.with(|clients| {
        let mut clients = clients.borrow_mut();
        if let Some((_, client)) = clients.iter().find(|(t, _)| *t == connect_timeout) {
            return client.clone();
        }
        let client = build(connect_timeout);
        clients.push((connect_timeout, client.clone()));
        client
    })
}

fn build(connect_timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(https)
}
