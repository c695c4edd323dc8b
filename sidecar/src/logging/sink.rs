//! Where log lines go: a buffer that a writer thread empties to stderr in batches, so that
//! a request's thread never makes the `write` syscall for its log line, and the writer wakes
//! once per batch rather than once per line (a per-line channel, as `tracing-appender`'s,
//! wakes it on every request).
//!
//! Nothing is dropped: when the writer falls behind (stderr blocked) by [`MAX_PENDING_BYTES`],
//! loggers wait for it, as they would on a blocking `write`. Lines reach stderr at most
//! [`BATCH_DELAY`] after they are logged, and all of them before the process exits: the
//! guard [`super::init`] returns, and the panic hook, flush what is pending.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer lets lines gather after the first one of a batch.
pub const BATCH_DELAY: Duration = Duration::from_millis(20);
/// Lines pending beyond this make loggers wait for the writer.
pub const MAX_PENDING_BYTES: usize = 1 << 20;
/// How many times (a millisecond apart) the panic hook tries for the pending lines.
const PANIC_FLUSH_ATTEMPTS: u32 = 200;

static SINK: OnceLock<Arc<LogSink>> = OnceLock::new();

#[derive(Default)]
pub struct LogSink {
    pending: Mutex<Pending>,
    /// Signalled when a batch starts (the buffer was empty) or the sink closes.
    batch_started: Condvar,
    /// Signalled when the writer has taken a batch.
    taken: Condvar,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closed: bool,
}

impl LogSink {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A thread that panicked while appending left whole lines or a partial one; either is
        // worth writing out rather than losing the log.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `line` (which ends in a newline) for stderr.
    pub fn write(&self, line: &[u8]) {
        let mut pending = self.lock();
        while pending.lines.len() >= MAX_PENDING_BYTES && !pending.closed {
            pending = self
                .taken
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if pending.closed {
            // After the writer's last batch (it holds stderr while writing it), not before.
            let mut stderr = std::io::stderr().lock();
            drop(pending);
            let _ = stderr.write_all(line);
            return;
        }
        let starts_batch = pending.lines.is_empty();
        pending.lines.extend_from_slice(line);
        drop(pending);
        if starts_batch {
            self.batch_started.notify_one();
        }
    }

    fn run_writer(&self) {
        let mut batch = Vec::new();
        loop {
            let mut pending = self.lock();
            while pending.lines.is_empty() && !pending.closed {
                pending = self
                    .batch_started
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if pending.closed && pending.lines.is_empty() {
                return;
            }
            if !pending.closed {
                drop(pending);
                std::thread::sleep(BATCH_DELAY);
                pending = self.lock();
            }
            std::mem::swap(&mut batch, &mut pending.lines);
            // Taken before `pending` is let go: a line written straight to stderr (after
            // close, or by the panic hook) waits for this batch, which is older.
            let mut stderr = std::io::stderr().lock();
            drop(pending);
            self.taken.notify_all();
            // Nowhere to report a failed write of the log itself.
            let _ = stderr.write_all(&batch);
            drop(stderr);
            batch.clear();
        }
    }

    /// Stops the writer once what is pending is written; later lines go straight to stderr.
    fn close(&self) {
        self.lock().closed = true;
        self.batch_started.notify_one();
        self.taken.notify_all();
    }

    /// Writes what is pending from the calling thread (a panicking one: with `panic =
    /// "abort"` the writer will not get to it), after the batch the writer is writing.
    /// Other threads hold the lock only briefly; if it stays taken (this very thread
    /// panicked while holding it), the lines are given up rather than the process hung.
    fn flush_now(&self) {
        for _ in 0..PANIC_FLUSH_ATTEMPTS {
            let mut pending = match self.pending.try_lock() {
                Ok(pending) => pending,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
            };
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(&pending.lines);
            pending.lines.clear();
            return;
        }
    }
}

fn write_to_stderr(bytes: &[u8]) {
    // Nowhere to report a failed write of the log itself.
    let _ = std::io::stderr().lock().write_all(bytes);
}

/// Writes `line` to the process's sink, or straight to stderr when there is none (unit
/// tests, or before [`start`]).
pub fn write_line(line: &[u8]) {
    match SINK.get() {
        Some(sink) => sink.write(line),
        None => write_to_stderr(line),
    }
}

/// Starts the process's sink and its writer thread (once).
pub fn start() -> std::io::Result<SinkGuard> {
    let sink = Arc::new(LogSink::default());
    if SINK.set(Arc::clone(&sink)).is_err() {
        return Ok(SinkGuard { writer: None });
    }
    let for_writer = Arc::clone(&sink);
    let writer = std::thread::Builder::new()
        .name("llmesh-log".to_string())
        .spawn(move || for_writer.run_writer())?;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        sink.flush_now();
        previous(info);
    }));
    Ok(SinkGuard {
        writer: Some(writer),
    })
}

/// Flushes the sink and stops its writer when dropped (at the end of `main`).
pub struct SinkGuard {
    writer: Option<JoinHandle<()>>,
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        if let (Some(sink), Some(writer)) = (SINK.get(), self.writer.take()) {
            sink.close();
            let _ = writer.join();
        }
    }
}

/// `tracing`'s writer: each event is one `write` of a whole line.
#[derive(Clone, Copy, Default)]
pub struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkWriter {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_written_whole_and_in_order_and_close_drains_it() {
        let sink = Arc::new(LogSink::default());
        sink.write(b"sink test line 1\n");
        sink.write(b"sink test line 2\n");
        assert_eq!(sink.lock().lines, b"sink test line 1\nsink test line 2\n");
        sink.close();
        // Closed: the writer writes what is pending and returns instead of waiting.
        let writer = {
            let sink = Arc::clone(&sink);
            std::thread::spawn(move || sink.run_writer())
        };
        writer.join().unwrap();
        assert!(sink.lock().lines.is_empty());
    }

    #[test]
    fn a_full_buffer_makes_loggers_wait_for_the_writer() {
        let sink = Arc::new(LogSink::default());
        let line = vec![b'x'; 1024];
        for _ in 0..MAX_PENDING_BYTES / line.len() {
            sink.write(&line);
        }
        let logger = {
            let (sink, line) = (Arc::clone(&sink), line.clone());
            std::thread::spawn(move || sink.write(&line))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !logger.is_finished(),
            "the logger waits while the buffer is full"
        );
        std::mem::take(&mut sink.lock().lines);
        sink.taken.notify_all();
        logger.join().unwrap();
        assert_eq!(sink.lock().lines, line);
    }
}
