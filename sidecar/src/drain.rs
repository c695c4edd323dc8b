//! The end of the shutdown grace period, as seen by responses still streaming then: each
//! ends with a final error event, as on any other failure mid-stream, instead of being cut
//! off when the process exits (an SDK raises a clear error rather than a connection reset).

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

static GRACE_OVER: AtomicBool = AtomicBool::new(false);
static GRACE_OVER_NOTIFY: Notify = Notify::const_new();

/// Called once, when the grace period after SIGTERM runs out.
pub fn end_grace() {
    GRACE_OVER.store(true, Ordering::Release);
    GRACE_OVER_NOTIFY.notify_waiters();
}

pub fn grace_over() -> bool {
    GRACE_OVER.load(Ordering::Acquire)
}

/// Resolves when the grace period runs out (check [`grace_over`] too: a waiter created
/// after the end is not woken).
pub fn grace_ends() -> Notified<'static> {
    GRACE_OVER_NOTIFY.notified()
}
