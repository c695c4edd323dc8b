//! The sidecar's Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Names follow OpenTelemetry's GenAI semantic conventions where they define the same thing
//! (operation duration, time to first chunk, token usage), translated the way OpenTelemetry
//! exports to Prometheus (dots become underscores, the unit becomes a suffix); the rest are
//! `llmesh_*`. Every label value comes from the config or from a fixed set: never a request
//! id, user input or key. docs/metrics.md lists them all.

mod call_series;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::config::PriceConfig;
use crate::pod::PodIdentity;
use crate::snapshot::Snapshot;

/// Seconds, from 10 ms to 11 minutes: embeddings answer in tens of milliseconds, reasoning
/// models stream for many minutes. The first 14 are the GenAI conventions' own boundaries.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84,
    327.68, 655.36,
];
/// The GenAI conventions' boundaries for token counts.
const TOKEN_BUCKETS: &[f64] = &[
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];
/// Distinct `model` label values kept; later ones are reported as `other`. Models come from
/// the config, so this only bites when reloads keep introducing new ones.
const MAX_MODEL_LABELS: usize = 64;
pub const OTHER_MODEL: &str = "other";

/// Numbers each `Metrics`, so that series cached per thread are found in their own.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

pub struct Metrics {
    id: u64,
    registry: Registry,
    requests: IntCounterVec,
    in_flight: IntGauge,
    duration: HistogramVec,
    first_chunk: HistogramVec,
    tokens: HistogramVec,
    cache_tokens: IntCounterVec,
    cost: CounterVec,
    attempts: IntCounterVec,
    retries: IntCounterVec,
    rate_limited: IntCounterVec,
    breaker_open: IntGaugeVec,
    cache_bytes: IntGaugeVec,
    cache_saved_tokens: IntCounterVec,
    cache_saved_cost: CounterVec,
    credential: IntGaugeVec,
    missing: IntGaugeVec,
    reloads: IntCounterVec,
    reload_ok: IntGauge,
    models: Mutex<HashSet<String>>,
}

/// The labels every model call shares.
#[derive(Debug, Clone, Copy)]
pub struct CallLabels<'a> {
    pub endpoint: &'a str,
    pub model: &'a str,
    pub operation: &'a str,
    pub provider: &'a str,
}

/// One finished request, as the metrics see it.
pub struct FinishedRequest<'a> {
    pub call: CallLabels<'a>,
    pub status: &'a str,
    /// What the response cache did ([`crate::cache::CacheOutcome`]).
    pub cache: &'a str,
    /// Set when the request failed: the sidecar's error code or the upstream's status.
    pub error_type: Option<&'a str>,
    pub seconds: f64,
    /// Streamed successful responses only.
    pub first_chunk_seconds: Option<f64>,
    pub tokens: Option<TokenCount>,
    pub price: Option<PriceConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCount {
    pub input: u64,
    pub output: u64,
    /// False when the response carried no `usage` and the counts are the sidecar's estimate.
    pub reported: bool,
    /// Input tokens read from the provider's prompt cache (part of `input`).
    pub cache_read: u64,
    /// Input tokens written to the provider's prompt cache (part of `input`; Anthropic bills them apart).
    pub cache_write: u64,
}

impl Metrics {
    pub fn new(pod: &PodIdentity) -> prometheus::Result<Self> {
        let call = ["endpoint", "model", "operation", "provider"];
        let requests = IntCounterVec::new(
            Opts::new(
                "llmesh_requests_total",
                "Requests from the app, by endpoint, upstream model, operation, HTTP status and what the response cache did (off, bypass, miss, hit-memory, hit-shared).",
            ),
            &["endpoint", "model", "operation", "status", "cache"],
        )?;
        let in_flight = IntGauge::new(
            "llmesh_requests_in_flight",
            "Requests whose response has not ended (a stream counts until its last event).",
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_operation_duration_seconds",
                "From the app's request to the end of the response, streams included.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["endpoint", "model", "operation", "provider", "error_type"],
        )?;
        let first_chunk = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_operation_time_to_first_chunk_seconds",
                "From the app's request to the first chunk of a successful streamed response.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &call,
        )?;
        let tokens = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_token_usage",
                "Tokens per successful model call, by type (input, output) and source (reported by the provider, or estimated when the response had no usage).",
            )
            .buckets(TOKEN_BUCKETS.to_vec()),
            &["endpoint", "model", "operation", "provider", "token_type", "source"],
        )?;
        let cache_tokens = IntCounterVec::new(
            Opts::new(
                "llmesh_prompt_cache_tokens_total",
                "Input tokens served from (kind=read) or written to (kind=write) the provider's prompt cache, as its usage reports them; they are also counted in gen_ai_client_token_usage's input.",
            ),
            &["endpoint", "model", "kind"],
        )?;
        let cost = CounterVec::new(
            Opts::new(
                "llmesh_cost_usd_total",
                "Estimated spend in US dollars: tokens times the endpoint's configured price.",
            ),
            &["endpoint", "model"],
        )?;
        let attempts = IntCounterVec::new(
            Opts::new(
                "llmesh_upstream_attempts_total",
                "Calls sent to an upstream, retries included.",
            ),
            &["endpoint"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "llmesh_upstream_retries_total",
                "Attempts that failed retryably, by reason, and whether another attempt followed (retried) or not (budget, deadline, attempts or breaker said no).",
            ),
            &["endpoint", "reason", "retried"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "llmesh_rate_limited_total",
                "Requests refused with 429 by the sidecar's own limits, by the limit that was hit.",
            ),
            &["endpoint", "limit"],
        )?;
        let cache_bytes = IntGaugeVec::new(
            Opts::new(
                "llmesh_cache_memory_bytes",
                "Bytes of answers the endpoint's response cache holds in this pod's memory.",
            ),
            &["endpoint"],
        )?;
        let cache_saved_tokens = IntCounterVec::new(
            Opts::new(
                "llmesh_cache_saved_tokens_total",
                "Provider tokens not spent because the response cache answered, by type (input, output), as the stored answers' usage says.",
            ),
            &["endpoint", "token_type"],
        )?;
        let cache_saved_cost = CounterVec::new(
            Opts::new(
                "llmesh_cache_saved_cost_usd_total",
                "Estimated spend avoided by the response cache: the saved tokens times the endpoint's configured price.",
            ),
            &["endpoint"],
        )?;
        let breaker_open = IntGaugeVec::new(
            Opts::new(
                "llmesh_circuit_breaker_open",
                "1 while the endpoint's circuit breaker is open or half-open.",
            ),
            &["endpoint"],
        )?;
        let credential = IntGaugeVec::new(
            Opts::new(
                "llmesh_endpoint_credential_info",
                "The key each endpoint uses, by fingerprint (never the key): 1 while loaded, 0 with fingerprint=\"\" while the key file is missing or unusable. Endpoints without a key (mock) are absent.",
            ),
            &["endpoint", "fingerprint"],
        )?;
        let missing = IntGaugeVec::new(
            Opts::new(
                "llmesh_endpoint_missing",
                "1 for each endpoint the pod expects (--expect-endpoints) whose config has not arrived; its requests get 503 endpoint_not_ready.",
            ),
            &["endpoint"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "llmesh_config_reloads_total",
                "Changed configurations seen, by result (success, failure).",
            ),
            &["result"],
        )?;
        let reload_ok = IntGauge::new(
            "llmesh_config_last_reload_successful",
            "0 while the newest configuration on disk is rejected and the last good one serves.",
        )?;
        reload_ok.set(1);
        // Both results exist from the start, so that `increase()` sees the first failure.
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new("llmesh_build_info", "The running sidecar's version."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // One info series rather than these labels on every series: existing queries stay
        // valid, and a join (`* on(pod) group_left(service_account)`) adds them where needed.
        let pod_info = IntGaugeVec::new(
            Opts::new(
                "llmesh_pod_info",
                "The pod this sidecar serves: its namespace and ServiceAccount as the downward API gave them (\"\" when not given).",
            ),
            &["namespace", "service_account"],
        )?;
        pod_info
            .with_label_values(&[
                pod.namespace.as_deref().unwrap_or(""),
                pod.service_account.as_deref().unwrap_or(""),
            ])
            .set(1);
        let registry = Registry::new();
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(first_chunk.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(cache_tokens.clone()))?;
        registry.register(Box::new(cost.clone()))?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(breaker_open.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(cache_saved_tokens.clone()))?;
        registry.register(Box::new(cache_saved_cost.clone()))?;
        registry.register(Box::new(credential.clone()))?;
        registry.register(Box::new(missing.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(reload_ok.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(pod_info))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            requests,
            in_flight,
            duration,
            first_chunk,
            tokens,
            cache_tokens,
            cost,
            attempts,
            retries,
            rate_limited,
            breaker_open,
            cache_bytes,
            cache_saved_tokens,
            cache_saved_cost,
            credential,
            missing,
            reloads,
            reload_ok,
            models: Mutex::new(HashSet::new()),
        })
    }

    /// The `model` label for this model name: itself, or `other` once the cap is reached.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        let Ok(mut models) = self.models.lock() else {
            return OTHER_MODEL;
        };
        if models.contains(model) {
            return model;
        }
        if models.len() < MAX_MODEL_LABELS {
            models.insert(model.to_string());
            return model;
        }
        OTHER_MODEL
    }

    pub fn request_started(&self) {
        self.in_flight.inc();
    }

    pub fn request_finished(&self, r: &FinishedRequest<'_>) {
        let c = r.call;
        self.in_flight.dec();
        let labels = [
            c.endpoint,
            c.model,
            c.operation,
            c.provider,
            r.status,
            r.cache,
            r.error_type.unwrap_or(""),
        ];
        let series = call_series::series(self.id, labels, || self.resolve_series(labels));
        series.requests.inc();
        series.duration.observe(r.seconds);
        let call = [c.endpoint, c.model, c.operation, c.provider];
        if let Some(seconds) = r.first_chunk_seconds {
            series
                .first_chunk
                .get_or_init(|| self.first_chunk.with_label_values(&call))
                .observe(seconds);
        }
        let Some(tokens) = r.tokens else {
            return;
        };
        let (by_source, source) = if tokens.reported {
            (&series.reported_tokens, "reported")
        } else {
            (&series.estimated_tokens, "estimated")
        };
        let [input, output] = by_source.get_or_init(|| {
            ["input", "output"].map(|token_type| {
                let [endpoint, model, operation, provider] = call;
                self.tokens
                    .with_label_values(&[endpoint, model, operation, provider, token_type, source])
            })
        });
        input.observe(tokens.input as f64);
        output.observe(tokens.output as f64);
        // Looked up each time: only calls that hit a provider's prompt cache get here.
        for (kind, count) in [("read", tokens.cache_read), ("write", tokens.cache_write)] {
            if count > 0 {
                self.cache_tokens
                    .with_label_values(&[c.endpoint, c.model, kind])
                    .inc_by(count);
            }
        }
        if let Some(price) = r.price {
            series
                .cost
                .get_or_init(|| self.cost.with_label_values(&[c.endpoint, c.model]))
                .inc_by(price.cost_usd(tokens.input, tokens.output));
        }
    }

    fn resolve_series(&self, labels: call_series::CallLabels<'_>) -> call_series::CallSeries {
        let [endpoint, model, operation, provider, status, cache, error_type] = labels;
        call_series::CallSeries {
            requests: self
                .requests
                .with_label_values(&[endpoint, model, operation, status, cache]),
            duration: self
                .duration
                .with_label_values(&[endpoint, model, operation, provider, error_type]),
            first_chunk: Default::default(),
            reported_tokens: Default::default(),
            estimated_tokens: Default::default(),
            cost: Default::default(),
        }
    }

    /// A cache hit: the tokens (and their price) the stored answer's usage says were saved.
    pub fn cache_saved(&self, endpoint: &str, input: u64, output: u64, price: Option<PriceConfig>) {
        for (token_type, count) in [("input", input), ("output", output)] {
            self.cache_saved_tokens
                .with_label_values(&[endpoint, token_type])
                .inc_by(count);
        }
        if let Some(price) = price {
            self.cache_saved_cost
                .with_label_values(&[endpoint])
                .inc_by(price.cost_usd(input, output));
        }
    }

    pub fn attempt(&self, endpoint: &str) {
        self.attempts.with_label_values(&[endpoint]).inc();
    }

    pub fn retryable_failure(&self, endpoint: &str, reason: &str, retried: bool) {
        self.retries
            .with_label_values(&[endpoint, reason, if retried { "true" } else { "false" }])
            .inc();
    }

    pub fn rate_limited(&self, endpoint: &str, limit: &str) {
        self.rate_limited
            .with_label_values(&[endpoint, limit])
            .inc();
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.with_label_values(&[result]).inc();
        self.reload_ok.set(i64::from(ok));
    }

    /// The exposition text. State that lives elsewhere (breakers, credentials) is read now,
    /// so the data path pays nothing for it.
    pub fn render(&self, snapshot: &Snapshot) -> Vec<u8> {
        self.breaker_open.reset();
        self.credential.reset();
        self.cache_bytes.reset();
        for endpoint in &snapshot.endpoints {
            if let Some(cache) = &endpoint.cache {
                self.cache_bytes
                    .with_label_values(&[endpoint.name()])
                    .set(i64::try_from(cache.bytes_held()).unwrap_or(i64::MAX));
            }
            self.breaker_open
                .with_label_values(&[endpoint.name()])
                .set(i64::from(endpoint.resilience.breaker.is_open()));
            // A rotation shows as the fingerprint label changing, so it can be checked (and
            // alerted on) from Prometheus, as from `/readyz`.
            match (endpoint.credential(), endpoint.unavailable_reason()) {
                (Some(key), _) => self
                    .credential
                    .with_label_values(&[endpoint.name(), key.fingerprint()])
                    .set(1),
                (None, Some(_)) => self
                    .credential
                    .with_label_values(&[endpoint.name(), ""])
                    .set(0),
                (None, None) => {}
            }
        }
        self.missing.reset();
        for name in &snapshot.missing {
            self.missing.with_label_values(&[name]).set(1);
        }
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding well-formed metrics into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// `gen_ai.operation.name` for an API path under `/v1`.
pub fn operation(api_path: &str) -> &'static str {
    match api_path {
        "/chat/completions" | "/messages" => "chat",
        "/completions" => "text_completion",
        "/embeddings" => "embeddings",
        "/responses" => "generate_content",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_capped() {
        let m = Metrics::new(&PodIdentity::default()).unwrap();
        for i in 0..MAX_MODEL_LABELS {
            assert_eq!(m.model_label(&format!("m{i}")), format!("m{i}"));
        }
        assert_eq!(m.model_label("one-too-many"), OTHER_MODEL);
        assert_eq!(m.model_label("m0"), "m0", "known models keep their label");
    }

    fn sample_call(m: &Metrics, status: &'static str, reported: bool) {
        m.request_started();
        m.request_finished(&FinishedRequest {
            call: CallLabels {
                endpoint: "chat",
                model: "gpt-4o",
                operation: "chat",
                provider: "openai",
            },
            status,
            cache: "off",
            error_type: None,
            seconds: 0.5,
            first_chunk_seconds: None,
            tokens: Some(TokenCount {
                input: 10,
                output: 5,
                reported,
                cache_read: 0,
                cache_write: 0,
            }),
            price: None,
        });
    }

    fn series_lines(m: &Metrics, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn cached_series_count_in_their_own_metrics_and_only_what_was_observed_exists() {
        let (first, second) = (
            Metrics::new(&PodIdentity::default()).unwrap(),
            Metrics::new(&PodIdentity::default()).unwrap(),
        );
        for _ in 0..3 {
            sample_call(&first, "200", true);
        }
        sample_call(&first, "500", true);
        sample_call(&second, "200", false);
        let requests = series_lines(&first, "llmesh_requests_total");
        assert!(
            requests
                .iter()
                .any(|l| l.contains("status=\"200\"") && l.ends_with(" 3")),
            "{requests:?}"
        );
        assert!(
            requests
                .iter()
                .any(|l| l.contains("status=\"500\"") && l.ends_with(" 1")),
            "{requests:?}"
        );
        let second_requests = series_lines(&second, "llmesh_requests_total");
        assert_eq!(second_requests.len(), 1, "{second_requests:?}");
        assert!(second_requests[0].ends_with(" 1"));
        // No stream and no price: no first-chunk or cost series; tokens only by their source.
        assert!(series_lines(
            &first,
            "gen_ai_client_operation_time_to_first_chunk_seconds_count"
        )
        .is_empty());
        assert!(series_lines(&first, "llmesh_cost_usd_total").is_empty());
        let token_counts = series_lines(&first, "gen_ai_client_token_usage_count");
        assert_eq!(
            token_counts.len(),
            2,
            "input and output, reported: {token_counts:?}"
        );
        assert!(token_counts
            .iter()
            .all(|l| l.contains("source=\"reported\"") && l.ends_with(" 4")));
    }

    #[test]
    fn cost_follows_the_price_per_million() {
        let price = PriceConfig {
            input_per_million_tokens: 2.5,
            output_per_million_tokens: 10.0,
        };
        let cost = price.cost_usd(1_000, 500);
        assert!((cost - 0.0075).abs() < 1e-12, "{cost}");
    }
}
