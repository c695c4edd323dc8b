//! Upstream connections, kept per worker thread.
//!
//! Each worker runs its own single-threaded runtime, so its pool needs no lock and no hash:
//! a short list of upstream origins, each with a stack of idle HTTP/1 connections (the most
//! recently used on top: warm, and the least likely to have been closed by the other side),
//! or one HTTP/2 connection that its requests share when TLS negotiated HTTP/2. A request,
//! its upstream connection and the task that drives it stay on one core. Connecting (DNS,
//! TCP, TLS, ALPN) is hyper-rustls's connector; this module only keeps the connections.
//!
//! It replaces hyper-util's pooled client, which paid on every request for a lock, a SipHash
//! of the pool key and, whenever a connection was not idle yet when its response arrived, a
//! task spawned to return it later (`docs/benchmarks.md`, issue 19).
//!
//! Pools outlive config reloads, so warm connections survive them; a sweep on each worker
//! lets go of connections past use and forgets origins no longer called.

use std::cell::RefCell;
use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower_service::Service;

/// A request body sent upstream: rewritten JSON, or the app's body streamed through.
pub type UpstreamRequestBody = Either<Full<Bytes>, Limited<hyper::body::Incoming>>;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Idle upstream connections are not used again after this long: typical provider load
/// balancers close theirs at about 120 s, and a connection picked just as the other side
/// closes it fails the request.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often a worker closes the connections it no longer uses: without it, those of an
/// upstream a reload removed would stay open until that upstream closed them, if ever.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// HTTP/2 pings while requests are open: a connection whose other side vanished without a
/// reset (a NAT or load balancer that forgot it) is closed after this long, not left to
/// time out every request the worker sends on it.
const HTTP2_KEEP_ALIVE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (DNS, TCP, TLS, or the connect timeout): nothing was sent.
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    /// The connection failed while the request or the response head was on the way.
    #[error("the upstream connection failed")]
    Http(#[source] hyper::Error),
    /// A new connection closed before it took its first request: there is no other to try.
    #[error("the upstream closed a new connection before the request was sent")]
    ClosedBeforeSending,
    #[error("the upstream URL has no scheme or host")]
    NotAbsolute,
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

thread_local! {
    // One pool per connect timeout, the only connection setting that differs between
    // endpoints; within it, connections are kept by origin.
    static POOLS: RefCell<Vec<Pool>> = const { RefCell::new(Vec::new()) };
}

struct Pool {
    connect_timeout: Duration,
    connector: HttpsConnector<HttpConnector>,
    origins: Vec<Origin>,
}

struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// What HTTP/1 requests to this origin carry as `Host` (the port only if not the
    /// scheme's default), built once.
    host: HeaderValue,
    idle: Vec<IdleConnection>,
    shared_h2: Option<SharedHttp2>,
}

struct IdleConnection {
    sender: http1::SendRequest<UpstreamRequestBody>,
    since: Instant,
}

impl IdleConnection {
    fn is_usable(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < POOL_IDLE_TIMEOUT && !self.sender.is_closed()
    }
}

struct SharedHttp2 {
    sender: http2::SendRequest<UpstreamRequestBody>,
    last_used: Instant,
}

impl SharedHttp2 {
    fn is_usable(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_used) < POOL_IDLE_TIMEOUT
            && !self.sender.is_closed()
    }
}

enum Checkout {
    Http1(http1::SendRequest<UpstreamRequestBody>),
    Http2(http2::SendRequest<UpstreamRequestBody>),
}

/// Which pool and origin a connection goes back to.
#[derive(Clone)]
struct OriginKey {
    connect_timeout: Duration,
    scheme: Scheme,
    authority: Authority,
}

/// Sends `request` (whose URI is absolute) on a kept connection to its origin, or a new one.
pub async fn send(
    connect_timeout: Duration,
    mut request: Request<UpstreamRequestBody>,
) -> Result<Response<UpstreamResponseBody>, SendError> {
    let key = OriginKey {
        connect_timeout,
        scheme: request
            .uri()
            .scheme()
            .cloned()
            .ok_or(SendError::NotAbsolute)?,
        authority: request
            .uri()
            .authority()
            .cloned()
            .ok_or(SendError::NotAbsolute)?,
    };
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // Kept connections first. One the other side closed before it took the request gives
    // the request back, which then goes on the next one, or a new one.
    while let Some(checked_out) = checkout(&key) {
        let sent = match checked_out {
            Checkout::Http1(sender) => send_http1(sender, &key, &path, request).await,
            Checkout::Http2(sender) => send_http2(sender, &key, &path, request).await,
        };
        match sent {
            Attempt::Answered(response) => return Ok(response),
            Attempt::Failed(error) => return Err(SendError::Http(error)),
            Attempt::Unsent(returned) => request = returned,
        }
    }
    // Boxed: connecting is rare, and its futures (TLS, the HTTP/2 handshake) are large; in
    // place they would make every request's future as large, and copied as often.
    let sent = match Box::pin(connect(&key)).await? {
        Checkout::Http1(sender) => send_http1(sender, &key, &path, request).await,
        Checkout::Http2(sender) => {
            with_origin(&key, |origin| {
                origin.shared_h2 = Some(SharedHttp2 {
                    sender: sender.clone(),
                    last_used: Instant::now(),
                })
            });
            send_http2(sender, &key, &path, request).await
        }
    };
    match sent {
        Attempt::Answered(response) => Ok(response),
        Attempt::Failed(error) => Err(SendError::Http(error)),
        Attempt::Unsent(_) => Err(SendError::ClosedBeforeSending),
    }
}

enum Attempt {
    Answered(Response<UpstreamResponseBody>),
    Failed(hyper::Error),
    Unsent(Request<UpstreamRequestBody>),
}

async fn send_http1(
    mut sender: http1::SendRequest<UpstreamRequestBody>,
    key: &OriginKey,
    path: &PathAndQuery,
    mut request: Request<UpstreamRequestBody>,
) -> Attempt {
    if sender.ready().await.is_err() {
        // Closed while idle: the request was not touched.
        return Attempt::Unsent(request);
    }
    let host = with_origin(key, |origin| origin.host.clone());
    if let Some(host) = host {
        request.headers_mut().entry(HOST).or_insert(host);
    }
    *request.uri_mut() = Uri::from(path.clone());
    match sender.try_send_request(request).await {
        Ok(response) => Attempt::Answered(kept_until_body_ends(response, sender, key)),
        Err(mut error) => match error.take_message() {
            Some(mut request) => {
                *request.uri_mut() = absolute_uri(key, path);
                request.headers_mut().remove(HOST);
                Attempt::Unsent(request)
            }
            None => Attempt::Failed(error.into_error()),
        },
    }
}

async fn send_http2(
    mut sender: http2::SendRequest<UpstreamRequestBody>,
    key: &OriginKey,
    path: &PathAndQuery,
    mut request: Request<UpstreamRequestBody>,
) -> Attempt {
    if sender.ready().await.is_err() {
        forget_closed_http2(key);
        return Attempt::Unsent(request);
    }
    *request.uri_mut() = absolute_uri(key, path);
    match sender.try_send_request(request).await {
        Ok(response) => Attempt::Answered(response.map(|body| UpstreamResponseBody {
            inner: body,
            returning: None,
        })),
        Err(mut error) => match error.take_message() {
            Some(request) => {
                forget_closed_http2(key);
                Attempt::Unsent(request)
            }
            None => Attempt::Failed(error.into_error()),
        },
    }
}

/// Another request may already have put a new connection in the closed one's place.
fn forget_closed_http2(key: &OriginKey) {
    with_origin(key, |origin| {
        origin.shared_h2.take_if(|shared| shared.sender.is_closed());
    });
}

fn kept_until_body_ends(
    response: Response<Incoming>,
    sender: http1::SendRequest<UpstreamRequestBody>,
    key: &OriginKey,
) -> Response<UpstreamResponseBody> {
    let (parts, inner) = response.into_parts();
    let mut returning = Some(Box::new(Returning {
        sender,
        key: key.clone(),
    }));
    if inner.is_end_stream() {
        give_back(&mut returning);
    }
    Response::from_parts(parts, UpstreamResponseBody { inner, returning })
}

/// A kept connection to `key`'s origin: the newest idle HTTP/1 one that is ready for a
/// request, else the shared HTTP/2 one.
///
/// An idle connection is not ready while it still sends a request body the upstream answered
/// before reading it all (an early 401 or 413 to a streamed upload): it stays on the stack
/// for later rather than hold this request until that upload ends.
fn checkout(key: &OriginKey) -> Option<Checkout> {
    with_origin(key, |origin| {
        let now = Instant::now();
        while origin.idle.last().is_some_and(|top| !top.is_usable(now)) {
            origin.idle.pop();
        }
        if let Some(at) = origin
            .idle
            .iter()
            .rposition(|idle| idle.sender.is_ready() && idle.is_usable(now))
        {
            return Some(Checkout::Http1(origin.idle.remove(at).sender));
        }
        match &mut origin.shared_h2 {
            Some(shared) if shared.is_usable(now) => {
                shared.last_used = now;
                Some(Checkout::Http2(shared.sender.clone()))
            }
            _ => None,
        }
    })
    .flatten()
}

async fn connect(key: &OriginKey) -> Result<Checkout, SendError> {
    let mut connector = POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        pool_for(&mut pools, key.connect_timeout).connector.clone()
    });
    let uri = absolute_uri(key, &PathAndQuery::from_static("/"));
    std::future::poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(SendError::Connect)?;
    let stream = connector.call(uri).await.map_err(SendError::Connect)?;
    if stream.connected().is_negotiated_h2() {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_KEEP_ALIVE)
            .keep_alive_timeout(HTTP2_KEEP_ALIVE)
            .handshake(stream)
            .await
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        tokio::spawn(async move {
            // Its end (closed by either side) shows in the sender; nothing else to do.
            let _ = connection.await;
        });
        Ok(Checkout::Http2(sender))
    } else {
        let (sender, connection) = http1::handshake(stream)
            .await
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Checkout::Http1(sender))
    }
}

fn pool_for(pools: &mut Vec<Pool>, connect_timeout: Duration) -> &mut Pool {
    let at = match pools
        .iter()
        .position(|p| p.connect_timeout == connect_timeout)
    {
        Some(at) => at,
        None => {
            if pools.is_empty() {
                start_sweeping();
            }
            pools.push(Pool {
                connect_timeout,
                connector: connector(connect_timeout),
                origins: Vec::new(),
            });
            pools.len() - 1
        }
    };
    &mut pools[at]
}

/// Sweeps this thread's pools every [`SWEEP_INTERVAL`] for as long as its runtime runs.
/// Each worker has a single-threaded runtime, so the task runs on the thread whose pools
/// it sweeps.
fn start_sweeping() {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async {
            let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                POOLS.with(|pools| sweep(&mut pools.borrow_mut(), Instant::now()));
            }
        });
    }
}

/// Drops idle connections past use (which closes them) and origins left with none.
fn sweep(pools: &mut [Pool], now: Instant) {
    for pool in pools {
        pool.origins.retain_mut(|origin| {
            origin.idle.retain(|idle| idle.is_usable(now));
            origin.shared_h2.take_if(|shared| !shared.is_usable(now));
            !origin.idle.is_empty() || origin.shared_h2.is_some()
        });
    }
}

/// Runs `f` on this thread's record of `key`'s origin, made on first use; `None` only if
/// the origin's `Host` value cannot be built (an authority always makes a valid one).
fn with_origin<T>(key: &OriginKey, f: impl FnOnce(&mut Origin) -> T) -> Option<T> {
    POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        let pool = pool_for(&mut pools, key.connect_timeout);
        let at = match pool
            .origins
            .iter()
            .position(|o| o.authority == key.authority && o.scheme == key.scheme)
        {
            Some(at) => at,
            None => {
                pool.origins.push(Origin {
                    scheme: key.scheme.clone(),
                    authority: key.authority.clone(),
                    host: host_header(&key.scheme, &key.authority)?,
                    idle: Vec::new(),
                    shared_h2: None,
                });
                pool.origins.len() - 1
            }
        };
        pool.origins.get_mut(at).map(f)
    })
}

/// `Host` as HTTP/1 clients send it: the port only when it is not the scheme's default.
fn host_header(scheme: &Scheme, authority: &Authority) -> Option<HeaderValue> {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let text = match authority.port_u16() {
        Some(port) if port != default_port => format!("{}:{port}", authority.host()),
        _ => authority.host().to_string(),
    };
    HeaderValue::from_str(&text).ok()
}

fn absolute_uri(key: &OriginKey, path: &PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(key.scheme.clone());
    parts.authority = Some(key.authority.clone());
    parts.path_and_query = Some(path.clone());
    // A scheme, an authority and a path taken from a valid URI make a valid one.
    Uri::from_parts(parts).unwrap_or_default()
}

fn connector(connect_timeout: Duration) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

/// An upstream response's body. An HTTP/1 connection goes back to its pool when the body
/// has been read to its end; one dropped before that is closed (what is left of the
/// response would otherwise be read as the next one's).
pub struct UpstreamResponseBody {
    inner: Incoming,
    /// Boxed, so that the response enums this body is part of stay small.
    returning: Option<Box<Returning>>,
}

struct Returning {
    sender: http1::SendRequest<UpstreamRequestBody>,
    key: OriginKey,
}

fn give_back(returning: &mut Option<Box<Returning>>) {
    if let Some(returning) = returning.take() {
        let Returning { sender, key } = *returning;
        with_origin(&key, |origin| {
            let now = Instant::now();
            // The oldest idle connection, if past use, is let go on the way: a stack that
            // grew in a burst shrinks as the connections at its bottom age or are closed by
            // the other side, also between sweeps.
            if origin
                .idle
                .first()
                .is_some_and(|oldest| !oldest.is_usable(now))
            {
                origin.idle.remove(0);
            }
            origin.idle.push(IdleConnection { sender, since: now })
        });
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => give_back(&mut self.returning),
            Some(Ok(_)) if self.inner.is_end_stream() => give_back(&mut self.returning),
            // An error leaves the connection in no state to be used again.
            Some(Err(_)) => self.returning = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// An upstream that answers every request `ok`, keeping each connection open for
    /// `per_connection` requests, and records the request heads and connections it saw, and
    /// how many of those connections have ended.
    struct RawUpstream {
        port: u16,
        connections: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    impl RawUpstream {
        async fn start(per_connection: usize) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let connections = Arc::new(AtomicUsize::new(0));
            let ended = Arc::new(AtomicUsize::new(0));
            let heads = Arc::new(Mutex::new(Vec::new()));
            let (counted, counted_ends, seen) = (
                Arc::clone(&connections),
                Arc::clone(&ended),
                Arc::clone(&heads),
            );
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let (seen, counted_ends) = (Arc::clone(&seen), Arc::clone(&counted_ends));
                    tokio::spawn(async move {
                        for _ in 0..per_connection {
                            let Some(head) = read_request(&mut stream).await else {
                                break;
                            };
                            seen.lock().unwrap().push(head);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                break;
                            }
                        }
                        // Closed without a `connection: close`, as an idle timeout does.
                        drop(stream);
                        counted_ends.fetch_add(1, Ordering::SeqCst);
                    });
                }
            });
            RawUpstream {
                port,
                connections,
                ended,
                heads,
            }
        }

        fn uri(&self, path: &str) -> String {
            format!("http://127.0.0.1:{}{path}", self.port)
        }
    }

    /// The head of one request (its body, by content-length, read and dropped).
    async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).ok()?;
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.ok()?;
        Some(head)
    }

    fn post(uri: &str) -> Request<UpstreamRequestBody> {
        let mut request = Request::new(Either::Left(Full::new(Bytes::from_static(b"{}"))));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri.parse().unwrap();
        request
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(2));
        request
    }

    async fn call(uri: &str) -> Result<String, SendError> {
        let response = send(Duration::from_secs(5), post(uri)).await?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(SendError::Http)?;
        Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    }

    #[tokio::test]
    async fn a_connection_is_used_again_once_its_answer_was_read() {
        let upstream = RawUpstream::start(usize::MAX).await;
        for _ in 0..3 {
            assert_eq!(call(&upstream.uri("/v1/chat")).await.unwrap(), "ok");
        }
        assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn requests_go_in_origin_form_with_the_host_of_the_url() {
        let upstream = RawUpstream::start(usize::MAX).await;
        call(&upstream.uri("/v1/chat/completions?api-version=1"))
            .await
            .unwrap();
        let heads = upstream.heads.lock().unwrap();
        let head = heads[0].to_ascii_lowercase();
        assert!(
            head.starts_with("post /v1/chat/completions?api-version=1 http/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nhost: 127.0.0.1:{}\r\n", upstream.port)),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_replaced() {
        let upstream = RawUpstream::start(1).await;
        for _ in 0..3 {
            assert_eq!(call(&upstream.uri("/v1/chat")).await.unwrap(), "ok");
            // Let the close reach the kept connection, as an idle timeout would.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(upstream.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_answer_dropped_unread_closes_its_connection() {
        let upstream = RawUpstream::start(usize::MAX).await;
        let response = send(Duration::from_secs(5), post(&upstream.uri("/a")))
            .await
            .unwrap();
        drop(response);
        assert_eq!(call(&upstream.uri("/b")).await.unwrap(), "ok");
        assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn origins_keep_their_own_connections() {
        let (first, second) = (
            RawUpstream::start(usize::MAX).await,
            RawUpstream::start(usize::MAX).await,
        );
        for _ in 0..2 {
            call(&first.uri("/x")).await.unwrap();
            call(&second.uri("/x")).await.unwrap();
        }
        assert_eq!(first.connections.load(Ordering::SeqCst), 1);
        assert_eq!(second.connections.load(Ordering::SeqCst), 1);
        assert_eq!(second.heads.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_connection_still_sending_a_body_the_upstream_answered_early_is_not_handed_on() {
        // Answers as soon as it has a request's head, and reads nothing after it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\nno";
                    let _ = stream.write_all(answer).await;
                    std::future::pending::<()>().await;
                });
            }
        });
        let uri = format!("http://127.0.0.1:{port}/v1/files");
        // Far more than the sockets' buffers hold: the upload stalls with the answer read.
        let upload_size = 32 << 20;
        let mut upload = Request::new(Either::Left(Full::new(Bytes::from(vec![
            b'x';
            upload_size
        ]))));
        *upload.method_mut() = http::Method::POST;
        *upload.uri_mut() = uri.parse().unwrap();
        upload
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(upload_size));
        let answer = send(Duration::from_secs(5), upload).await.unwrap();
        assert_eq!(answer.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        answer.into_body().collect().await.unwrap();

        let next = tokio::time::timeout(Duration::from_secs(5), call(&uri)).await;
        assert_eq!(next.expect("waited on the stalled upload").unwrap(), "no");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_sweep_closes_connections_past_use_and_forgets_their_origin() {
        let upstream = RawUpstream::start(usize::MAX).await;
        call(&upstream.uri("/v1/chat")).await.unwrap();
        POOLS.with(|pools| sweep(&mut pools.borrow_mut(), Instant::now()));
        assert_eq!(
            upstream.ended.load(Ordering::SeqCst),
            0,
            "a fresh one was let go"
        );

        let later = Instant::now() + POOL_IDLE_TIMEOUT;
        POOLS.with(|pools| sweep(&mut pools.borrow_mut(), later));
        tokio::time::timeout(Duration::from_secs(5), async {
            while upstream.ended.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the idle connection was not closed");
        POOLS.with(|pools| assert!(pools.borrow().iter().all(|p| p.origins.is_empty())));
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let error = call(&format!("http://127.0.0.1:{port}/v1"))
            .await
            .unwrap_err();
        assert!(error.is_connect(), "{error:?}");
    }

    #[test]
    fn host_carries_the_port_only_when_it_is_not_the_default() {
        let host = |scheme: Scheme, authority: &str| {
            host_header(&scheme, &authority.parse().unwrap()).unwrap()
        };
        assert_eq!(host(Scheme::HTTPS, "api.openai.com:443"), "api.openai.com");
        assert_eq!(host(Scheme::HTTPS, "api.openai.com"), "api.openai.com");
        assert_eq!(host(Scheme::HTTP, "vllm:80"), "vllm");
        assert_eq!(host(Scheme::HTTP, "vllm:8000"), "vllm:8000");
        assert_eq!(host(Scheme::HTTPS, "gw.example:8443"), "gw.example:8443");
    }
}
