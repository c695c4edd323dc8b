//! The configuration in force: a validated config with its credentials loaded. Immutable; hot reload builds a new one and swaps it in whole, so a
//! request holds one snapshot from start to end.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::cache::EndpointCache;
use crate::config::{EndpointConfig, LoadedConfig, MockConfig};
use crate::credentials::{Credential, CredentialError};
use crate::provider::{Target, TargetError};
use crate::resilience::Resilience;

pub struct Snapshot {
    pub config_hash: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Endpoints the pod expects whose config has not arrived yet (`--expect-endpoints`).
    pub missing: Vec<String>,
    /// An injected pod's sidecar (`--expect-endpoints`): see [`Snapshot::is_ready`].
    expecting: bool,
    by_name: HashMap<String, usize>,
    by_model: HashMap<String, usize>,
    default: Option<usize>,
}

pub struct Endpoint {
    pub config: EndpointConfig,
    /// The name as the `x-llmesh-endpoint` response header, made once rather than per
    /// response; `None` for a name that is not a valid header value.
    pub name_header: Option<HeaderValue>,
    pub backend: Backend,
    pub resilience: Arc<Resilience>,
    /// `config.fallbacks` that exist in this snapshot, in order.
    pub fallbacks: Vec<String>,
    /// Set when `config.cache` is; kept across reloads that leave it alone.
    pub cache: Option<Arc<EndpointCache>>,
}

pub enum Backend {
    Mock(MockConfig),
    Upstream(Box<Upstream>),
}

pub struct Upstream {
    pub target: Target,
    pub credential: CredentialState,
    /// `dropRequestHeaders`, parsed once here rather than on every request.
    pub dropped_request_headers: Box<[HeaderName]>,
}

#[derive(Debug, Clone)]
pub enum CredentialState {
    /// The endpoint sends no key (an `openai-compatible` server without auth).
    NotConfigured,
    Loaded(Arc<Credential>),
    Unavailable(CredentialError),
}

impl Endpoint {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Why this endpoint cannot serve requests now, if it cannot.
    pub fn unavailable_reason(&self) -> Option<&CredentialError> {
        match &self.backend {
            Backend::Upstream(upstream) => match &upstream.credential {
                CredentialState::Unavailable(e) => Some(e),
                _ => None,
            },
            Backend::Mock(_) => None,
        }
    }

    pub fn credential(&self) -> Option<&Arc<Credential>> {
        match &self.backend {
            Backend::Upstream(upstream) => match &upstream.credential {
                CredentialState::Loaded(c) => Some(c),
                _ => None,
            },
            Backend::Mock(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Target(#[from] TargetError),
}

impl Snapshot {
    /// Builds a snapshot from a validated config, reading credential files now.
    ///
    /// `previous` lends its credentials: a key file that disappears or empties keeps the last
    /// good key in use rather than failing every request.
    pub fn build(
        loaded: &LoadedConfig,
        previous: Option<&Snapshot>,
    ) -> Result<Self, SnapshotError> {
        let mut endpoints = Vec::with_capacity(loaded.config.endpoints.len());
        for config in &loaded.config.endpoints {
            let previous_endpoint = previous.and_then(|p| p.by_name(&config.name));
            let backend = match Target::for_endpoint(config)? {
                None => Backend::Mock(config.mock.unwrap_or_default()),
                Some(target) => Backend::Upstream(Box::new(Upstream {
                    target,
                    credential: load_credential(config, previous_endpoint),
                    // Validated at load, so none is skipped here.
                    dropped_request_headers: config
                        .drop_request_headers
                        .iter()
                        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                        .collect(),
                })),
            };
            let resilience = match previous_endpoint {
                Some(p) => Resilience::carried_over(&p.resilience, config),
                None => Arc::new(Resilience::new(config)),
            };
            let config_changed = previous.is_none_or(|p| p.config_hash != loaded.hash);
            let fallbacks = config
                .fallbacks
                .iter()
                .filter(|name| {
                    let known = loaded.config.endpoints.iter().any(|e| &e.name == *name);
                    if !known && config_changed {
                        tracing::warn!(endpoint = %config.name, fallback = %name, "fallback names no endpoint of this sidecar; skipping it");
                    }
                    known
                })
                .cloned()
                .collect();
            let cache = config.cache.as_ref().map(|settings| {
                let previous = previous_endpoint.and_then(|p| p.cache.as_ref());
                EndpointCache::carried_over(previous, &config.name, settings)
            });
            endpoints.push(Arc::new(Endpoint {
                name_header: HeaderValue::from_str(&config.name).ok(),
                config: config.clone(),
                backend,
                resilience,
                fallbacks,
                cache,
            }));
        }
        let mut by_name = HashMap::new();
        let mut by_model = HashMap::new();
        let mut default = None;
        for (i, e) in endpoints.iter().enumerate() {
            by_name.insert(e.config.name.clone(), i);
            by_model.insert(e.config.name.clone(), i);
            for alias in &e.config.aliases {
                by_model.insert(alias.clone(), i);
            }
            if e.config.default {
                default = Some(i);
            }
        }
        Ok(Self {
            config_hash: loaded.hash.clone(),
            endpoints,
            missing: loaded.missing.clone(),
            expecting: loaded.expecting,
            by_name,
            by_model,
            default,
        })
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.by_name.get(name).map(|&i| &self.endpoints[i])
    }

    /// The endpoint whose name or alias is `model`.
    pub fn by_model(&self, model: &str) -> Option<&Arc<Endpoint>> {
        self.by_model.get(model).map(|&i| &self.endpoints[i])
    }

    /// True when `name` is an endpoint the pod expects but has no config for yet.
    pub fn is_missing(&self, name: &str) -> bool {
        self.missing.iter().any(|m| m == name)
    }

    pub fn default_endpoint(&self) -> Option<&Arc<Endpoint>> {
        self.default.map(|i| &self.endpoints[i])
    }

    /// True when every endpoint can serve (has its credential if it needs one). Expected
    /// endpoints whose config has not arrived do not count: the pod's app must start (the
    /// startup probe holds it until this is true) and get a clear 503 for those alone.
    /// Every endpoint has its key. In an injected pod an endpoint's key arrives in its own
    /// volume, which the kubelet may update after the config's: until then that endpoint
    /// answers 503 `credential_unavailable`, but the pod stays ready for the others, as it
    /// does while an endpoint's config is missing.
    pub fn is_ready(&self) -> bool {
        self.expecting
            || self
                .endpoints
                .iter()
                .all(|e| e.unavailable_reason().is_none())
    }

    /// A digest of every endpoint's credential state, so the reloader can tell a rotation (or a
    /// key appearing) from no change.
    pub fn credentials_digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for e in &self.endpoints {
            hasher.update(e.name().as_bytes());
            match (e.credential(), e.unavailable_reason()) {
                (Some(c), _) => hasher.update(c.fingerprint().as_bytes()),
                (None, Some(error)) => hasher.update(error.to_string().as_bytes()),
                (None, None) => hasher.update(b"-"),
            }
        }
        hasher.finalize().into()
    }
}

fn load_credential(config: &EndpointConfig, previous: Option<&Arc<Endpoint>>) -> CredentialState {
    let Some(cred_config) = &config.credential else {
        return CredentialState::NotConfigured;
    };
    match Credential::load(cred_config, config.provider) {
        Ok(c) => CredentialState::Loaded(Arc::new(c)),
        Err(error) => {
            let last_good = previous
                .and_then(|p| p.credential())
                .filter(|c| c.file() == cred_config.file);
            match last_good {
                Some(c) => {
                    tracing::warn!(
                        endpoint = %config.name,
                        %error,
                        fingerprint = c.fingerprint(),
                        "credential file became unusable; keeping the last good key"
                    );
                    CredentialState::Loaded(Arc::clone(c))
                }
                None => CredentialState::Unavailable(error),
            }
        }
    }
}
