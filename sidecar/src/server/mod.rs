//! Accept loops for the app and admin listeners, with graceful shutdown: stop accepting,
//! let requests and streams in flight finish within the grace period.
//!
//! The app port serves HTTP/1.1 and, for clients that speak it with prior knowledge (h2c:
//! gRPC-style clients, some SDK settings), HTTP/2; the first bytes of a connection tell which.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::reload::SharedState;

pub mod balance;

/// The app port's listening socket. One socket for all workers (not one each with
/// `SO_REUSEPORT`, whose hash split leaves one worker with more of a burst of new
/// connections than the other): [`balance`] hands each connection to the least loaded worker.
pub fn bind_app_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // Above std's 128: a burst of SDK clients connecting at once is not refused.
    socket.listen(1024)?;
    Ok(socket.into())
}

/// How long a client on the admin port (reachable from the pod network) may take to send
/// its request headers.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the app connections that [`balance`] hands to this worker.
pub async fn serve_app(
    inbox: balance::Inbox,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    // No header timeout on the app port: it is loopback only, and SDK connection pools
    // legitimately keep idle connections open.
    let builder = auto::Builder::new(TokioExecutor::new());
    let counted = inbox.counter();
    serve_wrapped(
        inbox,
        builder,
        shutdown,
        grace,
        "app",
        move |stream| std::future::ready(Some(counted.track(stream))),
        move |req| crate::proxy::handle(Arc::clone(&state), req),
    )
    .await;
}

/// Connection settings for a listener that serves HTTP/1.1 alone.
pub fn http1_only() -> auto::Builder<TokioExecutor> {
    auto::Builder::new(TokioExecutor::new()).http1_only()
}

pub async fn serve_admin(
    listener: TcpListener,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) {
    // HTTP/1.1 only: kubelet probes and Prometheus speak it, and the header timeout that
    // guards this port (reachable from the pod network) against slow clients is HTTP/1's.
    let mut builder = http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT);
    serve(
        listener,
        builder,
        shutdown,
        Duration::from_secs(1),
        "admin",
        move |req| crate::admin::handle(Arc::clone(&state), req),
    )
    .await;
}

/// The accept loop behind every llmesh HTTP listener: serves `handler` until `shutdown`
/// changes, then lets open connections finish for up to `grace`. `builder` sets the HTTP
/// versions (`http1_only()` for HTTP/1.1 alone) and their settings.
pub async fn serve<L, F, Fut, B>(
    listener: L,
    builder: auto::Builder<TokioExecutor>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
    name: &'static str,
    handler: F,
) where
    L: Accept,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let plain = |stream| std::future::ready(Some(stream));
    serve_wrapped(listener, builder, shutdown, grace, name, plain, handler).await;
}

/// [`serve`], each accepted connection first going through `wrap` (a TLS handshake, say) in
/// its own task; a connection that `wrap` turns into `None` is closed.
pub async fn serve_wrapped<L, W, WFut, S, F, Fut, B>(
    mut listener: L,
    builder: auto::Builder<TokioExecutor>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    name: &'static str,
    wrap: W,
    handler: F,
) where
    L: Accept,
    W: Fn(TcpStream) -> WFut,
    WFut: Future<Output = Option<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Shared rather than cloned into each connection: a connection borrows it.
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.next_connection() => {
                let stream = match accepted {
                    Some(Ok(stream)) => stream,
                    // The balancer stopped: the process is shutting down.
                    None => break,
                    Some(Err(error)) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(listener = name, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                // Subscribed before the task starts, so a shutdown signalled in between still
                // reaches this connection.
                let watcher = graceful.watcher();
                let builder = Arc::clone(&builder);
                let wrapped = wrap(stream);
                tokio::spawn(async move {
                    let Some(stream) = wrapped.await else {
                        return;
                    };
                    let connection = watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
                    if let Err(error) = connection.await {
                        tracing::debug!(listener = name, %error, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let all_finished = graceful.shutdown();
    tokio::pin!(all_finished);
    tokio::select! {
        () = &mut all_finished => tracing::info!(listener = name, "all connections finished"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(listener = name, grace = ?grace, "grace period over; ending responses still open");
            crate::drain::end_grace();
            // Streams still open end with a final error event: a moment to write it.
            let _ = tokio::time::timeout(FINAL_EVENT_TIME, &mut all_finished).await;
        }
    }
}

/// Where a serve loop's connections come from: a listener's accept, or [`balance`]'s handoff.
pub trait Accept {
    /// The next connection; `None` when no more will come.
    fn next_connection(
        &mut self,
    ) -> impl Future<Output = Option<std::io::Result<TcpStream>>> + Send;
}

impl Accept for TcpListener {
    async fn next_connection(&mut self) -> Option<std::io::Result<TcpStream>> {
        Some(self.accept().await.map(|(stream, _peer)| stream))
    }
}

/// How long responses still open when the grace period ends get to write their final event.
const FINAL_EVENT_TIME: Duration = Duration::from_millis(200);
