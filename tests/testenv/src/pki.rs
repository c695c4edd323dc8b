//! The test cluster's certificate authority and the certificates it issues.

use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::ServingCert;

pub(crate) type Ca = CertifiedIssuer<'static, KeyPair>;

pub(crate) fn new_ca() -> anyhow::Result<Ca> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "llmesh-testenv-ca");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

pub(crate) fn issue(
    ca: &Ca,
    common_name: &str,
    dns_names: &[&str],
    server: bool,
    organizations: &[&str],
    extra_ips: &[Ipv4Addr],
) -> anyhow::Result<ServingCert> {
    let mut params =
        CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    for org in organizations {
        params
            .distinguished_name
            .push(DnType::OrganizationName, *org);
    }
    if server {
        for ip in std::iter::once(&Ipv4Addr::LOCALHOST).chain(extra_ips) {
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(*ip)));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok(ServingCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

pub(crate) fn kubeconfig_yaml(server: &str, ca_pem: &str, admin: &ServingCert) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: testenv
  context: {{cluster: testenv, user: admin}}
current-context: testenv
",
        ca = b64(ca_pem),
        cert = b64(&admin.cert_pem),
        key = b64(&admin.key_pem),
    )
}
