//! Provider keys, read from files (mounted Secrets) and held only as sensitive header values.
//!
//! A key never leaves this module in a printable form: `Debug` is redacted, errors name the
//! file but never its content, and what is shown to people is a short SHA-256 fingerprint.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::config::{CredentialConfig, ProviderKind};
use crate::redact::KeyPattern;

/// A loaded key, ready to be put on an upstream request.
#[derive(Clone)]
pub struct Credential {
    header: HeaderName,
    value: HeaderValue,
    fingerprint: String,
    file: PathBuf,
    /// To mask the key in what the upstream sends back.
    pattern: Arc<KeyPattern>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("header", &self.header)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("credential file {path} cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("credential file {path} is empty")]
    Empty { path: PathBuf },
    #[error("credential file {path} holds characters that cannot be sent in an HTTP header")]
    NotAHeaderValue { path: PathBuf },
}

impl Credential {
    pub fn load(
        config: &CredentialConfig,
        provider: ProviderKind,
    ) -> Result<Self, CredentialError> {
        let path = &config.file;
        let bytes = std::fs::read(path).map_err(|e| CredentialError::Unreadable {
            path: path.clone(),
            reason: e.kind().to_string(),
        })?;
        let key = bytes.trim_ascii();
        if key.is_empty() {
            return Err(CredentialError::Empty { path: path.clone() });
        }
        let (header, prefix) = match &config.header {
            Some(name) => (
                // Validated at config load; a failure here would mean the config changed under us.
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| CredentialError::NotAHeaderValue { path: path.clone() })?,
                "",
            ),
            None => default_header(provider),
        };
        let mut raw = Vec::with_capacity(prefix.len() + key.len());
        raw.extend_from_slice(prefix.as_bytes());
        raw.extend_from_slice(key);
        let mut value = HeaderValue::from_bytes(&raw)
            .map_err(|_| CredentialError::NotAHeaderValue { path: path.clone() })?;
        // Keeps HTTP/2 from putting the key in its header compression table.
        value.set_sensitive(true);
        Ok(Self {
            header,
            value,
            fingerprint: fingerprint(key),
            file: path.clone(),
            pattern: Arc::new(KeyPattern::new(key)),
        })
    }

    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    pub fn value(&self) -> &HeaderValue {
        &self.value
    }

    /// `sha256:` and the first 12 hex digits of the key's hash: enough to tell keys apart
    /// (was the rotation picked up?), far too little to recover anything.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn pattern(&self) -> &Arc<KeyPattern> {
        &self.pattern
    }
}

fn default_header(provider: ProviderKind) -> (HeaderName, &'static str) {
    match provider {
        ProviderKind::AzureOpenai => (HeaderName::from_static("api-key"), ""),
        ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), ""),
        ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::Mock => {
            (http::header::AUTHORIZATION, "Bearer ")
        }
    }
}

fn fingerprint(key: &[u8]) -> String {
    let digest = Sha256::digest(key);
    let hex = crate::config::hex_digest(&digest[..6]);
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(content: &str) -> (tempfile::TempDir, CredentialConfig) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, content).unwrap();
        (dir, CredentialConfig { file, header: None })
    }

    #[test]
    fn openai_style_uses_bearer_and_trims_the_newline() {
        let (_dir, cfg) = write_key("sk-test-123\n");
        let cred = Credential::load(&cfg, ProviderKind::Openai).unwrap();
        assert_eq!(cred.header(), "authorization");
        assert_eq!(cred.value(), "Bearer sk-test-123");
        assert!(cred.value().is_sensitive());
    }

    #[test]
    fn azure_uses_api_key_and_custom_headers_are_raw() {
        let (_dir, mut cfg) = write_key("az-key");
        let cred = Credential::load(&cfg, ProviderKind::AzureOpenai).unwrap();
        assert_eq!(
            (cred.header().as_str(), cred.value().to_str().unwrap()),
            ("api-key", "az-key")
        );
        cfg.header = Some("x-api-key".into());
        let cred = Credential::load(&cfg, ProviderKind::Openai).unwrap();
        assert_eq!(
            (cred.header().as_str(), cred.value().to_str().unwrap()),
            ("x-api-key", "az-key")
        );
    }

    #[test]
    fn nothing_printable_contains_the_key() {
        let (_dir, cfg) = write_key("sk-very-secret");
        let cred = Credential::load(&cfg, ProviderKind::Openai).unwrap();
        let shown = format!("{cred:?} {}", cred.fingerprint());
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(cred.fingerprint().starts_with("sha256:") && cred.fingerprint().len() == 19);
    }

    #[test]
    fn errors_name_the_file_not_the_content() {
        let (_dir, cfg) = write_key("  \n");
        assert!(matches!(
            Credential::load(&cfg, ProviderKind::Openai),
            Err(CredentialError::Empty { .. })
        ));
        let (_dir, cfg) = write_key("sk-bad\u{7f}secret");
        let err = Credential::load(&cfg, ProviderKind::Openai)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        let missing = CredentialConfig {
            file: "/nonexistent/key".into(),
            header: None,
        };
        let err = Credential::load(&missing, ProviderKind::Openai)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "credential file /nonexistent/key cannot be read: entity not found"
        );
    }
}
