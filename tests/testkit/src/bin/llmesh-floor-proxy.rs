//! The least a hyper and tokio reverse proxy can do, for `bench/run.py`'s `hyper-floor`
//! targets: the sidecar's thread layout (one single-threaded runtime per worker) with no
//! feature at all — read the request, add the key header, forward it, stream the answer back.
//! Run beside the sidecar and nginx, it splits the sidecar's cost into what the libraries it
//! is built on take and what its own features add.
//!
//! `--client legacy` forwards through hyper-util's pooled client, as the sidecar did until it
//! kept its own connections; `--client direct` keeps each worker's idle upstream connections
//! in a plain stack and speaks hyper's connection API, as the sidecar's `upstream_client` does.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::header::{HeaderValue, AUTHORIZATION};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, ValueEnum)]
enum ClientKind {
    Legacy,
    Direct,
}

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let key = HeaderValue::from_static("Bearer sk-bench-not-a-real-key");
    let mut threads = Vec::new();
    for _ in 0..cli.workers {
        let listener = reuse_port_listener(cli.listen)?;
        let key = key.clone();
        let (upstream, client) = (cli.upstream, cli.client);
        threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(
                    tokio::task::LocalSet::new().run_until(serve(listener, upstream, client, key)),
                )
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
    upstream: SocketAddr,
    kind: ClientKind,
    key: HeaderValue,
) -> anyhow::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let forwarder = Rc::new(Forwarder::new(kind, upstream));
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
}

#[derive(Default)]
struct IdleConnections(RefCell<Vec<SendRequest<Incoming>>>);

impl Forwarder {
    fn new(kind: ClientKind, upstream: SocketAddr) -> Self {
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
            Forwarder::Direct(idle, upstream) => direct(idle, *upstream, request).await,
        };
        answer.unwrap_or_else(|()| bad_gateway())
    }
}

async fn direct(
    idle: &Rc<IdleConnections>,
    upstream: SocketAddr,
    request: Request<Incoming>,
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
        },
    ))
}

/// The upstream's body, streamed; with the direct client, its connection goes back on the
/// idle stack at the body's end.
struct ProxyBody {
    inner: Option<Incoming>,
    returning: Option<(SendRequest<Incoming>, Rc<IdleConnections>)>,
}

impl ProxyBody {
    fn passed(inner: Incoming) -> Self {
        ProxyBody {
            inner: Some(inner),
            returning: None,
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
    });
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
