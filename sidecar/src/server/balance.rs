//! The app port's connections, spread over the worker threads by load: one accept loop
//! hands each new connection to the worker with the fewest open connections.
//!
//! With a listening socket per worker (`SO_REUSEPORT`) the kernel splits connections by a
//! hash of their addresses, blind to load: when an SDK opens a burst of connections for
//! concurrent streams, one worker gets more than its share and its streams' first tokens
//! wait (issue 19 measured a time-to-first-token p99 1.8× nginx's). Counting open
//! connections is the load measure: an SDK's HTTP/1.1 connection carries one request at a
//! time (an h2c connection may carry many, and counts as one).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::Accept;

/// A worker's end: the connections handed to it.
pub struct Inbox {
    connections: mpsc::UnboundedReceiver<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
}

/// The accept loop's end of one worker.
struct Worker {
    connections: mpsc::UnboundedSender<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
}

/// The accept loop's ends and the workers' inboxes, one per worker.
pub fn channels(workers: usize) -> (Balancer, Vec<Inbox>) {
    let (ends, inboxes) = (0..workers.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::unbounded_channel();
            let open = Arc::new(AtomicUsize::new(0));
            let worker = Worker {
                connections: tx,
                open: Arc::clone(&open),
            };
            (
                worker,
                Inbox {
                    connections: rx,
                    open,
                },
            )
        })
        .unzip();
    (Balancer { workers: ends }, inboxes)
}

pub struct Balancer {
    workers: Vec<Worker>,
}

impl Balancer {
    /// Accepts on `listener` and hands connections out until `shutdown` changes; then
    /// closes the listener (new connections are refused) and the inboxes.
    pub async fn run(mut self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        let mut next_tie_break = 0;
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        if let Ok(stream) = stream.into_std() {
                            self.hand_over(stream, next_tie_break);
                            next_tie_break = next_tie_break.wrapping_add(1);
                        }
                    }
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(listener = "app", %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// To the worker with the fewest open connections; among equals, in turn (so that
    /// idle workers share a burst rather than the first taking it all). A worker that has
    /// stopped is dropped from the choice, and the connection goes to another.
    fn hand_over(&mut self, stream: std::net::TcpStream, tie_break: usize) {
        let mut stream = stream;
        loop {
            let count = self.workers.len();
            let least_loaded = (0..count)
                .map(|i| tie_break.wrapping_add(i) % count)
                .min_by_key(|&i| self.workers.get(i).map_or(usize::MAX, Worker::load));
            let Some((index, worker)) = least_loaded.and_then(|i| Some((i, self.workers.get(i)?)))
            else {
                // No worker left: the connection is closed.
                return;
            };
            worker.open.fetch_add(1, Ordering::Relaxed);
            match worker.connections.send(stream) {
                Ok(()) => return,
                Err(returned) => {
                    worker.open.fetch_sub(1, Ordering::Relaxed);
                    tracing::error!(
                        worker = index,
                        "a worker has stopped: its connections go to the others"
                    );
                    self.workers.swap_remove(index);
                    stream = returned.0;
                }
            }
        }
    }
}

impl Worker {
    fn load(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Inbox {
    /// Wraps this worker's connections so that each counts as open until dropped.
    pub fn counter(&self) -> OpenCounter {
        OpenCounter {
            open: Arc::clone(&self.open),
        }
    }
}

impl Accept for Inbox {
    async fn next_connection(&mut self) -> Option<std::io::Result<TcpStream>> {
        let stream = self.connections.recv().await?;
        Some(TcpStream::from_std(stream).inspect_err(|_| {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }))
    }
}

#[derive(Clone)]
pub struct OpenCounter {
    open: Arc<AtomicUsize>,
}

impl OpenCounter {
    /// `stream`, counted as open (by the balancer, at handoff) until it is dropped.
    pub fn track(&self, stream: TcpStream) -> Counted {
        Counted {
            stream,
            open: Arc::clone(&self.open),
        }
    }
}

/// A connection that leaves its worker's open count when dropped.
pub struct Counted {
    stream: TcpStream,
    open: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn connected_pair(listener: &std::net::TcpListener) -> std::net::TcpStream {
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        // As the balancer's own accepted connections are (tokio's `into_std` keeps them so).
        server.set_nonblocking(true).unwrap();
        server
    }

    #[tokio::test]
    async fn connections_go_to_the_least_loaded_worker_and_leave_its_count_when_closed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut balancer, mut inboxes) = channels(3);
        // Worker 0 already holds two connections, worker 1 one.
        balancer.workers[0].open.store(2, Ordering::Relaxed);
        balancer.workers[1].open.store(1, Ordering::Relaxed);
        for turn in 0..3 {
            balancer.hand_over(connected_pair(&listener).await, turn);
        }
        let loads: Vec<usize> = balancer.workers.iter().map(Worker::load).collect();
        assert_eq!(loads, [2, 2, 2], "the new ones went to workers 2, 1 and 2");
        assert!(inboxes[0].connections.try_recv().is_err());

        let counter = inboxes[2].counter();
        let stream = inboxes[2].next_connection().await.unwrap().unwrap();
        let counted = counter.track(stream);
        assert_eq!(balancer.workers[2].load(), 2);
        drop(counted);
        assert_eq!(balancer.workers[2].load(), 1);
    }

    #[tokio::test]
    async fn equal_workers_take_turns() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut balancer, _inboxes) = channels(2);
        for turn in 0..4 {
            balancer.hand_over(connected_pair(&listener).await, turn);
        }
        let loads: Vec<usize> = balancer.workers.iter().map(Worker::load).collect();
        assert_eq!(loads, [2, 2]);
    }

    #[tokio::test]
    async fn a_stopped_worker_is_passed_over_and_its_connection_goes_to_another() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut balancer, mut inboxes) = channels(2);
        // Worker 0 stops; worker 1 is busier, but the only one left.
        drop(inboxes.remove(0));
        balancer.workers[1].open.store(5, Ordering::Relaxed);
        for turn in 0..3 {
            balancer.hand_over(connected_pair(&listener).await, turn);
        }
        assert_eq!(balancer.workers.len(), 1);
        assert_eq!(balancer.workers[0].load(), 8);
        for _ in 0..3 {
            assert!(inboxes[0].connections.try_recv().is_ok());
        }
        // With no worker left, connections are closed and nothing is counted.
        drop(inboxes);
        balancer.hand_over(connected_pair(&listener).await, 0);
        assert!(balancer.workers.is_empty());
    }
}
