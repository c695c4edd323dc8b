//! Why a request or response could not be put into the other dialect.

/// A request the sidecar cannot translate: answered with a 400 in the app's dialect, naming
/// the parameter, so that the app's SDK raises its usual `BadRequestError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// A parameter with no equivalent in the endpoint's API, whose loss would change the
    /// answer (dropping it silently would not be harmless).
    #[error("'{param}' cannot be sent to this endpoint: {why}")]
    Unsupported { param: String, why: &'static str },
    /// A parameter whose value is not what its API allows (wrong type, unknown role, ...).
    #[error("'{param}' is invalid: {why}")]
    Invalid { param: String, why: String },
    /// The upstream's answer is not what its API documents, so it cannot be translated.
    #[error("the upstream's response could not be translated: {0}")]
    Upstream(String),
}

impl TranslateError {
    /// The parameter the app should change, e.g. `messages[1].content[0].type`.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Unsupported { param, .. } | Self::Invalid { param, .. } => Some(param),
            Self::Upstream(_) => None,
        }
    }
}
