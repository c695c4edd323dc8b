//! The one log line written per request, when its response ends.

use http::Method;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    ClientDisconnected,
    UpstreamFailed,
    UpstreamTimedOut,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::ClientDisconnected => "client_disconnected",
            Self::UpstreamFailed => "upstream_failed",
            Self::UpstreamTimedOut => "upstream_timed_out",
        }
    }
}

pub struct RequestLog {
    pub request_id: String,
    pub method: Method,
    pub path: String,
    pub endpoint: Option<String>,
    /// The model the app asked for, as sent (not the rewritten upstream model).
    pub model: Option<String>,
    pub status: u16,
    pub started: Instant,
    pub headers_sent_after: Option<std::time::Duration>,
    pub attempts: u32,
    pub usage: Option<super::usage::Usage>,
}

impl RequestLog {
    pub fn new(request_id: String, method: Method, path: String) -> Self {
        Self {
            request_id,
            method,
            path,
            endpoint: None,
            model: None,
            status: 0,
            started: Instant::now(),
            headers_sent_after: None,
            attempts: 0,
            usage: None,
        }
    }

    pub fn write(self, outcome: Outcome) {
        let millis = |d: std::time::Duration| (d.as_secs_f64() * 100_000.0).round() / 100.0;
        let latency_ms = millis(self.started.elapsed());
        let headers_ms = self.headers_sent_after.map(millis);
        tracing::info!(
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            endpoint = self.endpoint.as_deref().unwrap_or("-"),
            model = self.model.as_deref().unwrap_or("-"),
            status = self.status,
            latency_ms,
            headers_ms,
            attempts = self.attempts,
            prompt_tokens = self.usage.map(|u| u.prompt_tokens),
            completion_tokens = self.usage.map(|u| u.completion_tokens),
            outcome = outcome.as_str(),
            "request"
        );
    }
}
