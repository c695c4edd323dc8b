//! The webhook's TLS when the operator manages it (no cert-manager): a CA and a serving
//! certificate kept in a Secret of the operator's namespace, the serving certificate renewed
//! when a third of its validity is left, the CA patched into the
//! MutatingWebhookConfiguration's `caBundle`.
//!
//! Every replica runs the same loop, so none depends on the leader: whoever finds the Secret
//! missing or due writes it (a write that conflicts means another replica did, and the next
//! round reads its result), and every replica serves what the Secret holds. The CA outlives
//! many serving certificates, so a renewal leaves `caBundle` unchanged; when the CA itself is
//! replaced, the bundle keeps the previous CA beside the new one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::metrics::Metrics;
use crate::webhook::tls::{ReloadingCert, TlsError, CERT_FILE, KEY_FILE};

pub const CA_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
/// Unix seconds after which the serving certificate and the CA expire, so that every
/// replica reads them without parsing X.509.
const NOT_AFTER_ANNOTATION: &str = "llmesh.io/not-after";
const CA_NOT_AFTER_ANNOTATION: &str = "llmesh.io/ca-not-after";
/// The CA lives this many serving certificates.
const CA_LIFETIMES: u32 = 10;
/// Issued certificates start a little in the past, so a node whose clock lags still
/// accepts them.
const BACKDATE: Duration = Duration::from_secs(60);
const CA_COMMON_NAME: &str = "llmesh-webhook-ca";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("the certificate validity does not fit the calendar")]
    Time,
    #[error("the Secret was written meanwhile and holds no certificate bundle")]
    Unreadable,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

#[derive(Debug, Clone)]
pub struct ManagedCertSettings {
    pub namespace: String,
    pub secret_name: String,
    /// The MutatingWebhookConfiguration whose `caBundle` this CA goes into.
    pub configuration_name: String,
    /// Subject alternative names: the Service's DNS names; entries that parse as IP
    /// addresses become IP names.
    pub names: Vec<String>,
    pub validity: Duration,
}

impl ManagedCertSettings {
    /// How often the Secret is checked: often enough to renew in time and to pick up what
    /// another replica wrote, at most once a minute.
    pub fn check_every(&self) -> Duration {
        (self.validity / 20).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// What the Secret holds. Its `Debug` leaves the private keys out.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The current CA first, then the previous one while certificates it signed may still
    /// be served.
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: i64,
    pub ca_not_after: i64,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("not_after", &self.not_after)
            .field("ca_not_after", &self.ca_not_after)
            .finish_non_exhaustive()
    }
}

impl Bundle {
    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
        let annotations = secret.metadata.annotations.as_ref()?;
        let seconds = |key: &str| annotations.get(key)?.parse::<i64>().ok();
        Some(Self {
            ca_pem: text(CA_FILE)?,
            ca_key_pem: text(CA_KEY_FILE)?,
            cert_pem: text(CERT_FILE)?,
            key_pem: text(KEY_FILE)?,
            not_after: seconds(NOT_AFTER_ANNOTATION)?,
            ca_not_after: seconds(CA_NOT_AFTER_ANNOTATION)?,
        })
    }

    fn to_secret(&self, settings: &ManagedCertSettings) -> Secret {
        let bytes = |text: &str| ByteString(text.as_bytes().to_vec());
        Secret {
            metadata: ObjectMeta {
                name: Some(settings.secret_name.clone()),
                namespace: Some(settings.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "llmesh-operator".to_string(),
                )])),
                annotations: Some(BTreeMap::from([
                    (NOT_AFTER_ANNOTATION.to_string(), self.not_after.to_string()),
                    (
                        CA_NOT_AFTER_ANNOTATION.to_string(),
                        self.ca_not_after.to_string(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                (CA_FILE.to_string(), bytes(&self.ca_pem)),
                (CA_KEY_FILE.to_string(), bytes(&self.ca_key_pem)),
                (CERT_FILE.to_string(), bytes(&self.cert_pem)),
                (KEY_FILE.to_string(), bytes(&self.key_pem)),
            ])),
            ..Secret::default()
        }
    }
}

/// What the Secret should hold at `now` (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub bundle: Bundle,
    /// Whether the bundle differs from the stored one and must be written.
    pub issued: bool,
}

/// The bundle to serve at `now`: `existing`, or a new one when there is none or it is due.
/// Pure, so every rule is unit-tested.
pub fn plan(
    existing: Option<Bundle>,
    now: i64,
    settings: &ManagedCertSettings,
) -> Result<Planned, CertError> {
    let validity = i64::try_from(settings.validity.as_secs()).map_err(|_| CertError::Time)?;
    let renew_before = validity / 3;
    let ca_validity = validity
        .checked_mul(i64::from(CA_LIFETIMES))
        .ok_or(CertError::Time)?;
    match existing {
        // A serving certificate can be issued that the CA outlives: keep the CA.
        Some(bundle) if bundle.ca_not_after.saturating_sub(now) > validity => {
            if bundle.not_after.saturating_sub(now) > renew_before {
                return Ok(Planned {
                    bundle,
                    issued: false,
                });
            }
            let ca_key = KeyPair::from_pem(&bundle.ca_key_pem)?;
            let (cert_pem, key_pem, not_after) =
                issue_serving(&ca_key, now, validity, &settings.names)?;
            Ok(Planned {
                bundle: Bundle {
                    cert_pem,
                    key_pem,
                    not_after,
                    ..bundle
                },
                issued: true,
            })
        }
        previous => {
            let (ca_pem, ca_key, ca_not_after) = issue_ca(now, ca_validity)?;
            let (cert_pem, key_pem, not_after) =
                issue_serving(&ca_key, now, validity, &settings.names)?;
            // The API server may still reach a replica serving the previous certificate
            // until each has read the new one.
            let previous_ca = previous
                .as_ref()
                .and_then(|b| {
                    b.ca_pem
                        .split_inclusive("-----END CERTIFICATE-----\n")
                        .next()
                })
                .unwrap_or_default();
            Ok(Planned {
                bundle: Bundle {
                    ca_pem: format!("{ca_pem}{previous_ca}"),
                    ca_key_pem: ca_key.serialize_pem(),
                    cert_pem,
                    key_pem,
                    not_after,
                    ca_not_after,
                },
                issued: true,
            })
        }
    }
}

fn validity_window(
    params: &mut CertificateParams,
    now: i64,
    validity: i64,
) -> Result<i64, CertError> {
    let backdate = i64::try_from(BACKDATE.as_secs()).map_err(|_| CertError::Time)?;
    let not_after = now.checked_add(validity).ok_or(CertError::Time)?;
    let at = |seconds: i64| {
        time::OffsetDateTime::from_unix_timestamp(seconds).map_err(|_| CertError::Time)
    };
    params.not_before = at(now.saturating_sub(backdate))?;
    params.not_after = at(not_after)?;
    Ok(not_after)
}

/// The CA's parameters: the same every time, so that an issuer rebuilt from the stored key
/// signs as the stored CA certificate says.
fn ca_params() -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn issue_ca(now: i64, validity: i64) -> Result<(String, KeyPair, i64), CertError> {
    let mut params = ca_params()?;
    let not_after = validity_window(&mut params, now, validity)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key, not_after))
}

fn issue_serving(
    ca_key: &KeyPair,
    now: i64,
    validity: i64,
    names: &[String],
) -> Result<(String, String, i64), CertError> {
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for name in names {
        params.subject_alt_names.push(match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        });
    }
    params
        .distinguished_name
        .push(DnType::CommonName, "llmesh-webhook");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let not_after = validity_window(&mut params, now, validity)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem(), not_after))
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .unwrap_or_default()
}

/// One round: make the Secret current, put its CA into `caBundle`, then serve its
/// certificate (in that order, so that the API server trusts a new CA before it meets it).
/// Returns the bundle now served.
pub async fn reconcile(
    client: &kube::Client,
    settings: &ManagedCertSettings,
) -> Result<Bundle, CertError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let stored = secrets.get_opt(&settings.secret_name).await?;
    let existing = stored.as_ref().and_then(Bundle::from_secret);
    let planned = plan(existing, now_unix(), settings)?;
    let bundle = if planned.issued {
        let new = planned.bundle;
        let mut secret = new.to_secret(settings);
        let written = match &stored {
            Some(stored) => {
                secret.metadata.resource_version = stored.metadata.resource_version.clone();
                secrets
                    .replace(&settings.secret_name, &PostParams::default(), &secret)
                    .await
            }
            None => secrets.create(&PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => {
                tracing::info!(secret = %settings.secret_name, not_after = new.not_after, "issued a new webhook certificate");
                new
            }
            // Another replica wrote first: serve what it wrote.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let stored = secrets.get(&settings.secret_name).await?;
                Bundle::from_secret(&stored).ok_or(CertError::Unreadable)?
            }
            Err(error) => return Err(error.into()),
        }
    } else {
        planned.bundle
    };
    patch_ca_bundle(client, settings, &bundle.ca_pem).await?;
    Ok(bundle)
}

async fn patch_ca_bundle(
    client: &kube::Client,
    settings: &ManagedCertSettings,
    ca_pem: &str,
) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut configuration) = api.get_opt(&settings.configuration_name).await? else {
        tracing::debug!(configuration = %settings.configuration_name, "no webhook configuration to patch yet");
        return Ok(());
    };
    let wanted = ByteString(ca_pem.as_bytes().to_vec());
    let mut changed = false;
    for webhook in configuration.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&wanted) {
            webhook.client_config.ca_bundle = Some(wanted.clone());
            changed = true;
        }
    }
    if changed {
        match api
            .replace(
                &settings.configuration_name,
                &PostParams::default(),
                &configuration,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(configuration = %settings.configuration_name, "caBundle updated")
            }
            // Changed meanwhile (another replica, or the chart): the next round looks again.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Runs rounds until the first succeeds, and returns the resolver serving its certificate.
pub async fn first_certificate(
    client: &kube::Client,
    settings: &ManagedCertSettings,
    metrics: &Metrics,
) -> Arc<ReloadingCert> {
    loop {
        match reconcile(client, settings).await {
            Ok(bundle) => {
                match ReloadingCert::from_pem(
                    bundle.cert_pem.as_bytes(),
                    bundle.key_pem.as_bytes(),
                    &secret_label(settings),
                ) {
                    Ok(resolver) => {
                        metrics.certificate_expiry.set(bundle.not_after);
                        return resolver;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the webhook Secret holds no usable certificate; retrying")
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot set up the webhook certificate; retrying"),
        }
        tokio::time::sleep(settings.check_every()).await;
    }
}

/// Keeps the Secret, `caBundle` and the served certificate current, for as long as the
/// server runs.
pub async fn keep_current(
    client: kube::Client,
    settings: ManagedCertSettings,
    resolver: Arc<ReloadingCert>,
    metrics: Arc<Metrics>,
) {
    loop {
        tokio::time::sleep(settings.check_every()).await;
        let served = reconcile(&client, &settings).await.and_then(|bundle| {
            let changed = resolver.set(
                bundle.cert_pem.as_bytes(),
                bundle.key_pem.as_bytes(),
                &secret_label(&settings),
            )?;
            metrics.certificate_expiry.set(bundle.not_after);
            Ok(changed)
        });
        match served {
            Ok(true) => tracing::info!(
                not_after = metrics.certificate_expiry.get(),
                "serving a new webhook certificate"
            ),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot renew the webhook certificate; serving the previous one")
            }
        }
    }
}

fn secret_label(settings: &ManagedCertSettings) -> String {
    format!("Secret {}/{}", settings.namespace, settings.secret_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(validity: Duration) -> ManagedCertSettings {
        ManagedCertSettings {
            namespace: "llmesh-system".into(),
            secret_name: "llmesh-webhook-tls".into(),
            configuration_name: "llmesh-sidecar-injector".into(),
            names: vec![
                "llmesh-operator-webhook.llmesh-system.svc".into(),
                "127.0.0.1".into(),
            ],
            validity,
        }
    }

    const DAY: i64 = 86_400;

    #[test]
    fn a_missing_secret_gets_a_ca_and_a_serving_certificate_that_rustls_accepts() {
        let settings = settings(Duration::from_secs(90 * 86_400));
        let now = 1_800_000_000;
        let planned = plan(None, now, &settings).unwrap();
        assert!(planned.issued);
        let bundle = planned.bundle;
        assert_eq!(bundle.not_after, now + 90 * DAY);
        assert_eq!(bundle.ca_not_after, now + 900 * DAY);
        assert_eq!(bundle.ca_pem.matches("BEGIN CERTIFICATE").count(), 1);
        ReloadingCert::from_pem(
            bundle.cert_pem.as_bytes(),
            bundle.key_pem.as_bytes(),
            "test",
        )
        .unwrap();
        // The serving certificate chains to the CA, for the names asked for.
        let ca =
            rustls::pki_types::CertificateDer::from_pem_slice(bundle.ca_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let leaf =
            rustls::pki_types::CertificateDer::from_pem_slice(bundle.cert_pem.as_bytes()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(now + DAY).unwrap(),
        ));
        for name in ["llmesh-operator-webhook.llmesh-system.svc", "127.0.0.1"] {
            verifier
                .verify_server_cert(&leaf, &[], &name.try_into().unwrap(), &[], at)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;

    #[test]
    fn the_serving_certificate_is_renewed_with_the_same_ca_when_a_third_is_left() {
        let settings = settings(Duration::from_secs(90 * 86_400));
        let now = 1_800_000_000;
        let first = plan(None, now, &settings).unwrap().bundle;
        let kept = plan(Some(first.clone()), now + 59 * DAY, &settings).unwrap();
        assert!(!kept.issued);
        assert_eq!(kept.bundle, first);
        let renewed = plan(Some(first.clone()), now + 61 * DAY, &settings).unwrap();
        assert!(renewed.issued);
        let renewed = renewed.bundle;
        assert_eq!(renewed.ca_pem, first.ca_pem, "caBundle unchanged");
        assert_eq!(renewed.ca_key_pem, first.ca_key_pem);
        assert_ne!(renewed.cert_pem, first.cert_pem);
        assert_eq!(renewed.not_after, now + 151 * DAY);
    }

    #[test]
    fn a_ca_near_its_end_is_replaced_and_the_bundle_keeps_the_previous_one() {
        let settings = settings(Duration::from_secs(90 * 86_400));
        let now = 1_800_000_000;
        let first = plan(None, now, &settings).unwrap().bundle;
        let later = now + 811 * DAY;
        let replaced = plan(Some(first.clone()), later, &settings).unwrap().bundle;
        assert_ne!(replaced.ca_key_pem, first.ca_key_pem);
        assert_eq!(replaced.ca_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(replaced.ca_pem.ends_with(&first.ca_pem));
        // The next replacement drops the oldest.
        let again = plan(Some(replaced), later + 811 * DAY, &settings)
            .unwrap()
            .bundle;
        assert_eq!(again.ca_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(!again.ca_pem.contains(first.ca_pem.trim()));
    }

    #[test]
    fn the_check_interval_follows_the_validity() {
        assert_eq!(
            settings(Duration::from_secs(30)).check_every(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            settings(Duration::from_secs(90 * 86_400)).check_every(),
            Duration::from_secs(60)
        );
    }
}
