//! The webhook's serving certificate, re-read from its files while the server runs: a
//! renewed certificate (a rotated Secret volume, cert-manager's renewal) is served to the
//! next handshake, without a restart.

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
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("the certificate and key do not make a usable pair: {0}")]
    Unusable(rustls::Error),
}

/// The PEM files as last read, kept to tell whether a new read changed anything.
struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certified: Arc<CertifiedKey>,
}

/// A rustls certificate resolver that serves the latest good pair of `tls.crt` and
/// `tls.key` from one directory.
pub struct ReloadingCert {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Reads the pair once; the server does not start without one.
    pub fn load(dir: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = read_pair(dir, &provider)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            provider,
            current: ArcSwap::from_pointee(loaded),
        }))
    }

    /// Re-reads the files; returns whether a new pair is now served. A pair that does not
    /// load (for example read half-way through the kubelet's swap of the volume, a new
    /// certificate with the old key) leaves the previous one in place until the next read.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = read_files(&self.dir)?;
        let current = self.current.load();
        if current.cert_pem == cert_pem && current.key_pem == key_pem {
            return Ok(false);
        }
        let certified = certified_key(&self.dir, &cert_pem, &key_pem, &self.provider)?;
        self.current.store(Arc::new(Loaded {
            cert_pem,
            key_pem,
            certified,
        }));
        Ok(true)
    }

    /// Re-reads the files every `every`, for as long as the server runs.
    pub async fn keep_reloading(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(dir = %self.dir.display(), "serving a new webhook certificate")
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

fn read_pair(dir: &Path, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    let (cert_pem, key_pem) = read_files(dir)?;
    let certified = certified_key(dir, &cert_pem, &key_pem, provider)?;
    Ok(Loaded {
        cert_pem,
        key_pem,
        certified,
    })
}

fn certified_key(
    dir: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    // Errors name the file, never its content: the key must not reach a log.
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: dir.join(CERT_FILE),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::NoKey {
        path: dir.join(KEY_FILE),
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
        assert!(!resolver.reload().unwrap(), "nothing changed");

        let second = write_pair(dir.path(), "second.example");
        assert!(resolver.reload().unwrap());
        assert_eq!(served(&resolver), second.cert.der().to_vec());

        // A new certificate beside the old key (a read during the volume swap) keeps the
        // pair that works.
        let third = rcgen::generate_simple_self_signed(vec!["third.example".into()]).unwrap();
        std::fs::write(dir.path().join(CERT_FILE), third.cert.pem()).unwrap();
        assert!(matches!(resolver.reload(), Err(TlsError::Unusable(_))));
        assert_eq!(served(&resolver), second.cert.der().to_vec());

        std::fs::write(dir.path().join(KEY_FILE), "not a key").unwrap();
        let error = resolver.reload().unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{} holds no PEM private key",
                dir.path().join(KEY_FILE).display()
            )
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
