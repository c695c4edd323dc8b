//! Response bodies: frames are handed on one by one as they arrive (no buffering, no
//! coalescing), with the endpoint's idle and total deadlines enforced on upstream bodies, and
//! the request's log line and metrics recorded when the response ends, however it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::futures::Notified;
use tokio::time::{Instant, Sleep};

use super::log::{Outcome, RequestLog};
use super::usage::UsageTap;
use super::usage_strip::UsageChunkStripper;
use crate::cache::Recording;
use crate::dialect::sse::TranslatingStream;
use crate::dialect::Dialect;
use crate::drain;
use crate::error::ProxyError;
use crate::limits::Permit;
use crate::logging::request_scope;
use crate::metrics::TokenCount;
use crate::provider::mock::MockStream;
use crate::redact::BodyRedactor;
use crate::snapshot::Endpoint;
use crate::upstream_client::UpstreamResponseBody;
use crate::wait;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum BodyKind {
    Full(Option<Bytes>),
    Mock(MockStream),
    Upstream(UpstreamBody),
    /// A stream in the endpoint's API, handed on in the app's.
    Translated(Box<TranslatedBody>),
}

impl BodyKind {
    pub fn full(bytes: Bytes) -> Self {
        Self::Full(Some(bytes))
    }
}

/// What the app receives: a body plus the record to write when it ends.
pub struct ResponseBody {
    kind: BodyKind,
    log: RequestLog,
    accounting: Option<Accounting>,
    strip_usage: Option<UsageChunkStripper>,
}

/// A model call's response: its `usage` is read as it passes, and settles the call's
/// admission (concurrency slot, token reservation) when it ends.
pub struct Accounting {
    pub tap: UsageTap,
    pub permit: Option<Permit>,
    pub success: bool,
    /// Set when the sidecar asked the upstream for usage the app did not ask for.
    pub strip_usage: Option<UsageChunkStripper>,
    /// Set when the answer is to be stored in the endpoint's cache.
    pub recording: Option<Recording>,
    /// A translated JSON answer's usage as the upstream reported it.
    pub upstream_tap: Option<UsageTap>,
}

impl ResponseBody {
    pub fn new(kind: BodyKind, mut log: RequestLog, mut accounting: Option<Accounting>) -> Self {
        log.streamed = accounting.as_ref().is_some_and(|a| a.tap.is_sse());
        let strip_usage = accounting.as_mut().and_then(|a| a.strip_usage.take());
        Self {
            kind,
            log,
            accounting,
            strip_usage,
        }
    }

    /// Settles the admission and records the request; only the first call does anything.
    fn finish(&mut self, outcome: Outcome) {
        let log = &mut self.log;
        if let Some(accounting) = self.accounting.take() {
            // A translation's usage is the one the upstream reported (or did not): the app's
            // dialect may need usage fields the translation can only fill with zeros.
            let upstream_tap = match &self.kind {
                BodyKind::Translated(translated) => Some(&translated.upstream_tap),
                _ => accounting.upstream_tap.as_ref(),
            };
            let counted = upstream_tap.unwrap_or(&accounting.tap);
            let usage = counted.usage();
            let chunks = counted.streamed_chunks();
            let prompt_estimate = accounting.permit.as_ref().map(|p| p.prompt_tokens());
            if log.wants_finish_reasons() {
                log.finish_reasons = accounting.tap.finish_reasons();
            }
            log.tokens = match (usage, prompt_estimate) {
                (Some(u), _) => Some(TokenCount {
                    input: u.prompt_tokens,
                    output: u.completion_tokens,
                    reported: true,
                    cache_read: u.cache_read_tokens,
                    cache_write: u.cache_write_tokens,
                }),
                // No usage (a stream without `stream_options.include_usage`): the prompt as
                // counted at admission and one token per streamed chunk.
                (None, Some(prompt)) if accounting.success => Some(TokenCount {
                    input: prompt,
                    output: chunks.unwrap_or(0),
                    reported: false,
                    cache_read: 0,
                    cache_write: 0,
                }),
                (None, _) => None,
            };
            let streamed_to_its_end = !accounting.tap.is_sse() || accounting.tap.stream_ended();
            // What settling logs (shared limits' Redis going away) names the request.
            request_scope::within(Arc::clone(&log.ids), || {
                if let Some(permit) = accounting.permit {
                    permit.settle_from_response(
                        usage.map(|u| u.total()),
                        chunks,
                        accounting.success,
                    );
                }
                if let Some(recording) = accounting.recording {
                    recording.finish(
                        accounting.success && outcome == Outcome::Completed && streamed_to_its_end,
                    );
                }
            });
        }
        log.finish(outcome);
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before its end: hyper gave up on the connection. Unless the stream's final
        // event had already passed (SDKs close as soon as they read `[DONE]`, sometimes
        // before the upstream's end of body arrives), the app went away.
        let completed = self
            .accounting
            .as_ref()
            .is_some_and(|a| a.tap.stream_ended());
        let outcome = if completed {
            Outcome::Completed
        } else {
            Outcome::ClientDisconnected
        };
        self.finish(outcome);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let polled = poll_kind(&mut this.kind, cx);
            if let Poll::Ready(Some(Ok(frame))) = &polled {
                if let Some(data) = frame.data_ref() {
                    if this.log.first_chunk_after.is_none() && !data.is_empty() {
                        this.log.first_chunk_after = Some(this.log.started.elapsed());
                    }
                    if let Some(accounting) = &mut this.accounting {
                        accounting.tap.observe(data);
                        if let Some(recording) = &mut accounting.recording {
                            recording.observe(data);
                        }
                    }
                }
            }
            // The usage chunk the sidecar asked for is taken out after the tap has read it.
            let polled = match (polled, &mut this.strip_usage) {
                (Poll::Ready(Some(Ok(frame))), Some(strip)) => match frame.into_data() {
                    Ok(data) => {
                        let kept = strip.filter(data);
                        if kept.is_empty() && !this.kind_is_end_stream() {
                            continue;
                        }
                        Poll::Ready(Some(Ok(Frame::data(kept))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                (Poll::Ready(None), Some(strip)) => match strip.finish() {
                    Some(rest) => Poll::Ready(Some(Ok(Frame::data(rest)))),
                    None => Poll::Ready(None),
                },
                (polled, _) => polled,
            };
            let ended = match &polled {
                Poll::Ready(None | Some(Err(_))) => true,
                // hyper stops polling once a body says it is at its end, so record it now.
                Poll::Ready(Some(Ok(_))) => this.at_end(),
                Poll::Pending => false,
            };
            if ended {
                let outcome = this.ended_outcome();
                this.finish(outcome);
            }
            return polled;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.at_end()
    }

    fn size_hint(&self) -> SizeHint {
        if self.strip_usage.is_some() {
            // Removing the usage chunk changes the length.
            return SizeHint::default();
        }
        match &self.kind {
            BodyKind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            BodyKind::Full(None) => SizeHint::with_exact(0),
            BodyKind::Mock(m) => m.size_hint(),
            BodyKind::Upstream(u) => u.inner.size_hint(),
            BodyKind::Translated(_) => SizeHint::default(),
        }
    }
}

impl ResponseBody {
    /// The inner body is done and nothing is held back by the usage-chunk filter.
    fn at_end(&self) -> bool {
        self.kind_is_end_stream()
            && self
                .strip_usage
                .as_ref()
                .is_none_or(UsageChunkStripper::is_empty)
    }

    fn kind_is_end_stream(&self) -> bool {
        kind_is_end_stream(&self.kind)
    }

    fn ended_outcome(&self) -> Outcome {
        ended_outcome(&self.kind)
    }
}

fn poll_kind(
    kind: &mut BodyKind,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    match kind {
        BodyKind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        BodyKind::Mock(stream) => match Pin::new(stream).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(|never| match never {}))),
            Poll::Pending => Poll::Pending,
        },
        BodyKind::Upstream(upstream) => Pin::new(upstream).poll_frame(cx),
        BodyKind::Translated(translated) => translated.poll(cx),
    }
}

fn kind_is_end_stream(kind: &BodyKind) -> bool {
    match kind {
        BodyKind::Full(bytes) => bytes.is_none(),
        BodyKind::Mock(m) => m.is_end_stream(),
        BodyKind::Upstream(u) => u.is_end_stream(),
        BodyKind::Translated(t) => t.done,
    }
}

fn ended_outcome(kind: &BodyKind) -> Outcome {
    match kind {
        BodyKind::Upstream(u) => u.failure.unwrap_or(Outcome::Completed),
        BodyKind::Translated(t) => ended_outcome(&t.inner),
        _ => Outcome::Completed,
    }
}

/// A stream translated event by event: each upstream frame is handed on as soon as the
/// events it completes are translated; only a partial event is held.
pub struct TranslatedBody {
    inner: BodyKind,
    stream: TranslatingStream,
    /// Reads usage from the upstream's own events, before translation.
    upstream_tap: UsageTap,
    /// The inner body ended and the translator's last events were given.
    done: bool,
}

impl TranslatedBody {
    pub fn new(inner: BodyKind, stream: TranslatingStream) -> Self {
        Self {
            inner,
            stream,
            upstream_tap: UsageTap::new(true),
            done: false,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            return match poll_kind(&mut self.inner, cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.upstream_tap.observe(&data);
                        match self.stream.push(&data) {
                            Ok(out) if out.is_empty() => continue,
                            Ok(out) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(out))))),
                            Err(error) => {
                                // An upstream event that never ends: cut off, as a body that
                                // breaks is, rather than held in memory.
                                self.done = true;
                                tracing::warn!(%error, "upstream stream could not be translated");
                                Poll::Ready(Some(Err(error.into())))
                            }
                        }
                    }
                    Err(trailers) => Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(None) => {
                    self.done = true;
                    let last = self.stream.finish();
                    if last.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(Bytes::from(last)))))
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    self.done = true;
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// The body of an upstream response, with the idle-gap and total deadlines applied.
///
/// When the upstream fails or stalls mid-response, a Server-Sent Events stream is ended
/// cleanly with a final error event in its API's envelope (SDKs raise it as an APIError);
/// any other body is cut off, so the app sees a truncated response rather than a
/// well-formed but incomplete one.
pub struct UpstreamBody {
    inner: UpstreamResponseBody,
    endpoint: String,
    sse: bool,
    idle: Duration,
    deadline: Instant,
    total_limit: Duration,
    timer: Pin<Box<Sleep>>,
    /// The last bytes forwarded, to know whether a partial SSE event must be closed first.
    tail: [u8; 2],
    /// Masks the endpoint's key if the upstream echoes it.
    redactor: Option<BodyRedactor>,
    /// The API of the stream, for the error event that ends it early.
    dialect: Dialect,
    /// Trailers that arrived while the redactor held bytes back: sent after those bytes.
    pending_trailers: Option<Box<http::HeaderMap>>,
    /// The shutdown grace period running out ends the response cleanly.
    grace_ends: Pin<Box<Notified<'static>>>,
    finished: bool,
    failure: Option<Outcome>,
}

impl UpstreamBody {
    /// The body of `endpoint`'s response, in `dialect`'s API (a stream if `sse`).
    pub fn new(
        inner: UpstreamResponseBody,
        endpoint: &Endpoint,
        sse: bool,
        deadline: Instant,
        dialect: Dialect,
    ) -> Self {
        let timeouts = &endpoint.config.timeouts;
        let idle = timeouts.idle.get();
        let redactor = endpoint
            .credential()
            .map(|credential| BodyRedactor::new(Arc::clone(credential.pattern())));
        let first_alarm = wait::after(Instant::now(), idle).min(deadline);
        Self {
            inner,
            endpoint: endpoint.name().to_string(),
            sse,
            idle,
            deadline,
            total_limit: timeouts.total.get(),
            timer: Box::pin(tokio::time::sleep_until(first_alarm)),
            tail: *b"\n\n",
            redactor,
            dialect,
            pending_trailers: None,
            grace_ends: Box::pin(drain::grace_ends()),
            finished: false,
            failure: None,
        }
    }

    fn is_end_stream(&self) -> bool {
        (self.finished && self.pending_trailers.is_none())
            || (self.inner.is_end_stream()
                && self.pending_trailers.is_none()
                && self.redactor.as_ref().is_none_or(BodyRedactor::is_empty))
    }

    fn note_tail(&mut self, data: &[u8]) {
        match data.len() {
            0 => {}
            1 => self.tail = [self.tail[1], data[0]],
            n => self.tail = [data[n - 2], data[n - 1]],
        }
    }

    fn fail(
        &mut self,
        error: ProxyError,
        outcome: Outcome,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.finished = true;
        self.failure = Some(outcome);
        tracing::warn!(endpoint = %self.endpoint, %error, "upstream response failed after it started");
        if !self.sse {
            return Poll::Ready(Some(Err(error.into())));
        }
        let event = error.sse_event(self.dialect);
        let at_boundary = &self.tail == b"\n\n";
        let mut bytes = Vec::with_capacity(event.len() + 2);
        if !at_boundary {
            bytes.extend_from_slice(b"\n\n");
        }
        bytes.extend_from_slice(&event);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(trailers) = this.pending_trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let next_alarm = wait::after(Instant::now(), this.idle).min(this.deadline);
                    this.timer.as_mut().reset(next_alarm);
                    let frame = match (frame.into_data(), &mut this.redactor) {
                        (Ok(data), Some(redactor)) => {
                            let passed = redactor.filter(data);
                            if passed.is_empty() {
                                // All of it may be the start of the key: wait for more.
                                continue;
                            }
                            Frame::data(passed)
                        }
                        (Ok(data), None) => Frame::data(data),
                        (Err(frame), redactor) => match (frame.into_trailers(), redactor) {
                            (Ok(mut trailers), Some(redactor)) => {
                                redactor.pattern().redact_headers(&mut trailers);
                                match redactor.finish() {
                                    Some(held) => {
                                        this.pending_trailers = Some(Box::new(trailers));
                                        Frame::data(held)
                                    }
                                    None => Frame::trailers(trailers),
                                }
                            }
                            (Ok(trailers), None) => Frame::trailers(trailers),
                            (Err(frame), _) => frame,
                        },
                    };
                    if let Some(data) = frame.data_ref() {
                        this.note_tail(data);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    let error = ProxyError::UpstreamBrokeMidResponse {
                        endpoint: this.endpoint.clone(),
                        reason: super::forward::root_cause(&e),
                    };
                    this.fail(error, Outcome::UpstreamFailed)
                }
                Poll::Ready(None) => {
                    this.finished = true;
                    match this.redactor.as_mut().and_then(BodyRedactor::finish) {
                        Some(rest) => Poll::Ready(Some(Ok(Frame::data(rest)))),
                        None => Poll::Ready(None),
                    }
                }
                Poll::Pending => {
                    let grace_over =
                        this.grace_ends.as_mut().poll(cx).is_ready() || drain::grace_over();
                    if grace_over {
                        let error = ProxyError::ShutdownGraceOver {
                            endpoint: this.endpoint.clone(),
                        };
                        return this.fail(error, Outcome::ShutdownGraceOver);
                    }
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let (what, limit) = if Instant::now() >= this.deadline {
                        ("finish the response", this.total_limit)
                    } else {
                        ("send the next chunk", this.idle)
                    };
                    let error = ProxyError::UpstreamTimeout {
                        endpoint: this.endpoint.clone(),
                        what,
                        limit: crate::config::Duration::from_millis(limit.as_millis() as u64)
                            .to_string(),
                    };
                    this.fail(error, Outcome::UpstreamTimedOut)
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        UpstreamBody::is_end_stream(self)
    }
}
