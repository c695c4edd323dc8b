//! The least a hyper and tokio reverse proxy can do, for `bench/run.py`'s `hyper-floor`
//! targets: the sidecar's thread layout (one single-threaded runtime per worker) with no
//! feature at all — read the request, add the key header, forward it, stream the answer back.
//! Run beside the sidecar and nginx, it splits the sidecar's cost into what the libraries it
//! is built on take and what its own features add.
//!
//! `--client legacy` forwards through hyper-util's pooled client, as the sidecar did until it
//! kept its own connections; `--client direct` keeps each worker's idle upstream connections
//! in a plain stack and speaks hyper's connection API, as the sidecar's `upstream_client` does.
//! `--client direct-json` adds to `direct` the least an LLM-aware proxy cannot skip: the body
//! read whole and its top-level JSON fields split to find `model`, the body rewritten with the
//! upstream's model, and one JSON log line per request (to `--log`; nginx logs each request
//! too). No limits, token counting, usage, metrics or retries. Its split is the plainest one:
//! a map of borrowed names to raw values, so a body with an escaped top-level name gets a 502
//! (the benchmark's bodies have none); a line is written when the answer's last frame is
//! passed on, and the last part-filled batch is not flushed at exit.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, ValueEnum)]
enum ClientKind {
    Legacy,
    Direct,
    DirectJson,
}

/// What the direct client sends: the app's body as it streams in, or a rewritten one.
type UpstreamBody = Either<Incoming, Full<Bytes>>;

/// The model every request is rewritten to in `direct-json`.
const UPSTREAM_MODEL: &str = "upstream-model";
/// Log lines are written in batches of about this size, as the sidecar's writer does.
const LOG_BATCH: usize = 16 * 1024;

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, value_enum, default_value_t = ClientKind::Legacy)]
    client: ClientKind,
    /// Where `direct-json` writes its log lines.
    #[arg(long, default_value = "/dev/null")]
    log: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let key = HeaderValue::from_static("Bearer sk-bench-not-a-real-key");
    let mut threads = Vec::new();
    for _ in 0..cli.workers {
        let listener = reuse_port_listener(cli.listen)?;
        let key = key.clone();
        let (upstream, client) = (cli.upstream, cli.client);
        let log = File::options().create(true).append(true).open(&cli.log)?;
        threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let forwarder = Forwarder::new(client, upstream, log);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(tokio::task::LocalSet::new().run_until(serve(listener, forwarder, key)))
        }));
    }
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    Ok(())
}

fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

async fn serve(
    listener: std::net::TcpListener,
    forwarder: Forwarder,
    key: HeaderValue,
) -> anyhow::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let forwarder = Rc::new(forwarder);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let forwarder = Rc::clone(&forwarder);
        let key = key.clone();
        tokio::task::spawn_local(async move {
            let service = service_fn(move |mut request: Request<Incoming>| {
                request.headers_mut().insert(AUTHORIZATION, key.clone());
                let forwarder = Rc::clone(&forwarder);
                async move { Ok::<_, Infallible>(forwarder.forward(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

enum Forwarder {
    Legacy(Box<Client<HttpConnector, Incoming>>, http::uri::Authority),
    Direct(Rc<IdleConnections>, SocketAddr),
    DirectJson(Rc<IdleConnections>, SocketAddr, Rc<AccessLog>),
}

#[derive(Default)]
struct IdleConnections(RefCell<Vec<SendRequest<UpstreamBody>>>);

impl Forwarder {
    fn new(kind: ClientKind, upstream: SocketAddr, log: File) -> Self {
        match kind {
            ClientKind::Legacy => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                let client = Client::builder(TokioExecutor::new()).build(connector);
                let authority = upstream
                    .to_string()
                    .parse()
                    .unwrap_or_else(|_| http::uri::Authority::from_static("127.0.0.1"));
                Forwarder::Legacy(Box::new(client), authority)
            }
            ClientKind::Direct => Forwarder::Direct(Rc::default(), upstream),
            ClientKind::DirectJson => Forwarder::DirectJson(
                Rc::default(),
                upstream,
                Rc::new(AccessLog {
                    file: log,
                    batch: RefCell::new(Vec::with_capacity(LOG_BATCH * 2)),
                }),
            ),
        }
    }

    async fn forward(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let answer = match self {
            Forwarder::Legacy(client, authority) => {
                let (mut parts, body) = request.into_parts();
                let path = parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
                parts.uri = match http::Uri::builder()
                    .scheme("http")
                    .authority(authority.clone())
                    .path_and_query(path)
                    .build()
                {
                    Ok(uri) => uri,
                    Err(_) => return bad_gateway(),
                };
                client
                    .request(Request::from_parts(parts, body))
                    .await
                    .map(|response| response.map(ProxyBody::passed))
                    .map_err(|_| ())
            }
            Forwarder::Direct(idle, upstream) => {
                direct(idle, *upstream, request.map(Either::Left)).await
            }
            Forwarder::DirectJson(idle, upstream, log) => {
                direct_json(idle, *upstream, request, log).await
            }
        };
        answer.unwrap_or_else(|()| bad_gateway())
    }
}

/// The body read whole and split into its top-level fields as raw JSON, `model` replaced;
/// with the model the app asked for. `None` if the body is not a JSON object.
fn rewrite_model(body: &[u8]) -> Option<(String, Vec<u8>)> {
    let fields: BTreeMap<&str, &RawValue> = serde_json::from_slice(body).ok()?;
    let asked = fields
        .get("model")
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + UPSTREAM_MODEL.len());
    out.push(b'{');
    for (i, (key, value)) in fields.iter().filter(|(k, _)| **k != "model").enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, key).ok()?;
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    if out.len() > 1 {
        out.push(b',');
    }
    out.extend_from_slice(b"\"model\":");
    serde_json::to_writer(&mut out, UPSTREAM_MODEL).ok()?;
    out.push(b'}');
    Some((asked, out))
}

async fn direct_json(
    idle: &Rc<IdleConnections>,
    upstream: SocketAddr,
    request: Request<Incoming>,
    log: &Rc<AccessLog>,
) -> Result<Response<ProxyBody>, ()> {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    let body = body.collect().await.map_err(|_| ())?.to_bytes();
    let (model, body) = rewrite_model(&body).ok_or(())?;
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    let (method, path) = (parts.method.clone(), parts.uri.path().to_string());
    let upstream_request = Request::from_parts(parts, Either::Right(Full::new(Bytes::from(body))));
    let mut response = direct(idle, upstream, upstream_request).await?;
    let entry = LogEntry {
        log: Rc::clone(log),
        started,
        method,
        path,
        model,
        status: response.status().as_u16(),
    };
    let body = response.body_mut();
    if body.is_end_stream() {
        entry.write();
    } else {
        body.finished = Some(entry);
    }
    Ok(response)
}

/// A worker's access log: lines batched, written when a batch is full.
struct AccessLog {
    file: File,
    batch: RefCell<Vec<u8>>,
}

/// What is logged of a request, once its answer has been sent.
struct LogEntry {
    log: Rc<AccessLog>,
    started: Instant,
    method: http::Method,
    path: String,
    model: String,
    status: u16,
}

impl LogEntry {
    fn write(self) {
        let mut batch = self.log.batch.borrow_mut();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let _ = write!(
            batch,
            "{{\"time\":{}.{:06},\"method\":\"{}\",\"path\":",
            now.as_secs(),
            now.subsec_micros(),
            self.method
        );
        let _ = serde_json::to_writer(&mut *batch, &self.path);
        let _ = write!(batch, ",\"model\":");
        let _ = serde_json::to_writer(&mut *batch, &self.model);
        let _ = writeln!(
            batch,
            ",\"status\":{},\"latency_ms\":{:.2}}}",
            self.status,
            self.started.elapsed().as_secs_f64() * 1000.0
        );
        if batch.len() >= LOG_BATCH {
            let _ = (&self.log.file).write_all(&batch);
            batch.clear();
        }
    }
}

async fn direct(
    idle: &Rc<IdleConnections>,
    upstream: SocketAddr,
    request: Request<UpstreamBody>,
) -> Result<Response<ProxyBody>, ()> {
    let pooled = idle.0.borrow_mut().pop();
    let mut sender = match pooled {
        Some(sender) if sender.is_ready() => sender,
        _ => {
            let stream = TcpStream::connect(upstream).await.map_err(|_| ())?;
            stream.set_nodelay(true).map_err(|_| ())?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|_| ())?;
            tokio::task::spawn_local(connection);
            sender
        }
    };
    let response = sender.send_request(request).await.map_err(|_| ())?;
    let (parts, body) = response.into_parts();
    let returning = if body.is_end_stream() {
        idle.0.borrow_mut().push(sender);
        None
    } else {
        Some((sender, Rc::clone(idle)))
    };
    Ok(Response::from_parts(
        parts,
        ProxyBody {
            inner: Some(body),
            returning,
            finished: None,
        },
    ))
}

/// The upstream's body, streamed; with the direct client, its connection goes back on the
/// idle stack at the body's end, and with `direct-json` the request is logged then.
struct ProxyBody {
    inner: Option<Incoming>,
    returning: Option<(SendRequest<UpstreamBody>, Rc<IdleConnections>)>,
    finished: Option<LogEntry>,
}

impl ProxyBody {
    fn passed(inner: Incoming) -> Self {
        ProxyBody {
            inner: Some(inner),
            returning: None,
            finished: None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        let ended = frame.is_none() || self.inner.as_ref().is_none_or(|b| b.is_end_stream());
        if ended {
            if let Some((sender, idle)) = self.returning.take() {
                idle.0.borrow_mut().push(sender);
            }
            if let Some(entry) = self.finished.take() {
                entry.write();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
}

fn bad_gateway() -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody {
        inner: None,
        returning: None,
        finished: None,
    });
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
