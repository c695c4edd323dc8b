//! The webhook's serving certificate, replaced while the server runs: re-read from its
//! files (a mounted Secret that cert-manager renews) or set from the Secret the operator
//! manages, and served from the next handshake on, without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin} holds no PEM certificate")]
    NoCertificate { origin: String },
    #[error("{origin} holds no PEM private key")]
    NoKey { origin: String },
    #[error("the certificate and key do not make a usable pair: {0}")]
    Unusable(rustls::Error),
}

/// The PEM files as last read, kept to tell whether a new read changed anything.
struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certified: Arc<CertifiedKey>,
}

/// A rustls certificate resolver that serves the latest good certificate and key.
pub struct ReloadingCert {
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert").finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Starts from a PEM pair; `source` names it in errors (never its content: the key
    /// must not reach a log).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], source: &str) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = certified_key(cert_pem, key_pem, source, &provider)?;
        Ok(Arc::new(Self {
            provider,
            current: ArcSwap::from_pointee(Loaded {
                cert_pem: cert_pem.to_vec(),
                key_pem: key_pem.to_vec(),
                certified,
            }),
        }))
    }

    /// Reads `tls.crt` and `tls.key` from `dir` once; the server does not start without them.
    pub fn load(dir: &Path) -> Result<Arc<Self>, TlsError> {
        let (cert_pem, key_pem) = read_files(dir)?;
        Self::from_pem(&cert_pem, &key_pem, &dir.display().to_string())
    }

    /// Serves this pair from now on, unless it is the one served already; returns whether it
    /// changed. A pair that does not load leaves the previous one in place.
    pub fn set(&self, cert_pem: &[u8], key_pem: &[u8], source: &str) -> Result<bool, TlsError> {
        let current = self.current.load();
        if current.cert_pem == cert_pem && current.key_pem == key_pem {
            return Ok(false);
        }
        let certified = certified_key(cert_pem, key_pem, source, &self.provider)?;
        self.current.store(Arc::new(Loaded {
            cert_pem: cert_pem.to_vec(),
            key_pem: key_pem.to_vec(),
            certified,
        }));
        Ok(true)
    }

    /// Re-reads the files of `dir`; returns whether a new pair is now served. A pair that
    /// does not load (for example read half-way through the kubelet's swap of the volume, a
    /// new certificate with the old key) leaves the previous one in place until the next read.
    pub fn reload(&self, dir: &Path) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = read_files(dir)?;
        self.set(&cert_pem, &key_pem, &dir.display().to_string())
    }

    /// Re-reads the files of `dir` every `every`, for as long as the server runs.
    pub async fn keep_reloading(self: Arc<Self>, dir: PathBuf, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload(&dir) {
                Ok(true) => {
                    tracing::info!(dir = %dir.display(), "serving a new webhook certificate")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot reload the webhook certificate; serving the previous one")
                }
            }
        }
    }

    /// The TLS settings of the webhook server: this resolver, HTTP/2 or HTTP/1.1 by ALPN
    /// (the API server speaks HTTP/2 when offered).
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Unusable)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.load().certified))
    }
}

fn read_files(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| TlsError::Read { path, source })
    };
    Ok((read(CERT_FILE)?, read(KEY_FILE)?))
}

fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    source: &str,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            origin: source.to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::NoKey {
        origin: source.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(TlsError::Unusable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let pair = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(dir.join(CERT_FILE), pair.cert.pem()).unwrap();
        std::fs::write(dir.join(KEY_FILE), pair.signing_key.serialize_pem()).unwrap();
        pair
    }

    fn served(resolver: &ReloadingCert) -> Vec<u8> {
        resolver.current.load().certified.cert[0].to_vec()
    }

    #[test]
    fn a_renewed_pair_is_served_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_pair(dir.path(), "first.example");
        let resolver = ReloadingCert::load(dir.path()).unwrap();
        assert_eq!(served(&resolver), first.cert.der().to_vec());
        assert!(!resolver.reload(dir.path()).unwrap(), "nothing changed");

        let second = write_pair(dir.path(), "second.example");
        assert!(resolver.reload(dir.path()).unwrap());
        assert_eq!(served(&resolver), second.cert.der().to_vec());

        // A new certificate beside the old key (a read during the volume swap) keeps the
        // pair that works.
        let third = rcgen::generate_simple_self_signed(vec!["third.example".into()]).unwrap();
        std::fs::write(dir.path().join(CERT_FILE), third.cert.pem()).unwrap();
        assert!(matches!(
            resolver.reload(dir.path()),
            Err(TlsError::Unusable(_))
        ));
        assert_eq!(served(&resolver), second.cert.der().to_vec());

        std::fs::write(dir.path().join(KEY_FILE), "not a key").unwrap();
        let error = resolver.reload(dir.path()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("{} holds no PEM private key", dir.path().display())
        );
    }

    #[test]
    fn loading_needs_both_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ReloadingCert::load(dir.path()),
            Err(TlsError::Read { .. })
        ));
        std::fs::write(dir.path().join(CERT_FILE), "junk").unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "junk").unwrap();
        assert!(matches!(
            ReloadingCert::load(dir.path()),
            Err(TlsError::NoCertificate { .. })
        ));
    }
}
