//! Per-endpoint state that outlives a config reload: the retry budget, the circuit breaker
//! and the limiter. Kept across reloads while the settings they come from are unchanged, so
//! that touching an unrelated field does not reset a breaker or refill a bucket.

pub mod breaker;
pub mod budget;
pub mod retry;

use std::sync::Arc;

use crate::config::{CircuitBreakerConfig, EndpointConfig, LimitsConfig, RetryConfig};
use crate::limits::tokens::Encoding;
use crate::limits::Limiter;
use breaker::CircuitBreaker;
use budget::RetryBudget;

pub struct Resilience {
    pub retry: RetryConfig,
    pub budget: RetryBudget,
    pub breaker: CircuitBreaker,
    breaker_config: CircuitBreakerConfig,
    pub limiter: Arc<Limiter>,
    limits_config: LimitsConfig,
    /// The tokenizer of the endpoint's upstream model, for tokens-per-minute reservations.
    pub encoding: Encoding,
}

impl Resilience {
    pub fn new(config: &EndpointConfig) -> Self {
        let encoding = Encoding::for_model(&config.model);
        if config.limits.tokens_per_minute.is_some() {
            encoding.warm_up();
        }
        Self {
            retry: config.retry,
            budget: RetryBudget::new(config.retry.budget),
            breaker: CircuitBreaker::new(&config.name, config.circuit_breaker),
            breaker_config: config.circuit_breaker,
            limiter: Limiter::new(&config.name, &config.limits),
            limits_config: config.limits.clone(),
            encoding,
        }
    }

    /// This state if `config` still produces it, else a fresh one.
    pub fn carried_over(previous: &Arc<Resilience>, config: &EndpointConfig) -> Arc<Resilience> {
        let same = previous.retry == config.retry
            && previous.breaker_config == config.circuit_breaker
            && previous.limits_config == config.limits
            && previous.encoding == Encoding::for_model(&config.model);
        if same {
            Arc::clone(previous)
        } else {
            Arc::new(Resilience::new(config))
        }
    }
}
