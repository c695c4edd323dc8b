//! The MutatingWebhookConfiguration that sends pods to the webhook. The tests register it
//! as it is here; the Helm chart renders the same settings.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::ByteString;
use kube::api::ObjectMeta;

use crate::webhook::inject::{INJECT_DISABLED, INJECT_ENABLED, INJECT_LABEL};

/// The webhook's name in the configuration (a DNS name the project owns).
pub const WEBHOOK_NAME: &str = "inject.llmesh.io";
/// Namespaces that are never matched, label or not: a broken webhook must not stop the
/// cluster's own pods.
pub const NEVER_INJECTED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// The API server gives up on the webhook after this long and admits the pod as it is.
pub const TIMEOUT_SECONDS: i32 = 5;

/// The configuration named `name`, calling the webhook through `client` (a Service in a
/// cluster, a URL in tests), trusting `ca_bundle` (PEM), never matching
/// `operator_namespace`.
pub fn mutating_webhook_configuration(
    name: &str,
    client: WebhookClientConfig,
    ca_bundle: Option<&str>,
    operator_namespace: &str,
) -> MutatingWebhookConfiguration {
    let excluded = NEVER_INJECTED
        .iter()
        .map(|n| n.to_string())
        .chain(std::iter::once(operator_namespace.to_string()))
        .collect();
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "llmesh-operator".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK_NAME.into(),
            admission_review_versions: vec!["v1".into()],
            client_config: WebhookClientConfig {
                ca_bundle: ca_bundle.map(|pem| ByteString(pem.as_bytes().to_vec())),
                ..client
            },
            // A webhook that is down or slow admits pods without the sidecar (counted by the
            // operator) rather than blocking every deployment.
            failure_policy: Some("Ignore".into()),
            side_effects: "None".into(),
            reinvocation_policy: Some("IfNeeded".into()),
            timeout_seconds: Some(TIMEOUT_SECONDS),
            match_policy: Some("Equivalent".into()),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![
                    requirement(INJECT_LABEL, "In", vec![INJECT_ENABLED.into()]),
                    requirement("kubernetes.io/metadata.name", "NotIn", excluded),
                ]),
                ..LabelSelector::default()
            }),
            // Opted-out pods are not even sent.
            object_selector: Some(LabelSelector {
                match_expressions: Some(vec![requirement(
                    INJECT_LABEL,
                    "NotIn",
                    vec![INJECT_DISABLED.into()],
                )]),
                ..LabelSelector::default()
            }),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            ..MutatingWebhook::default()
        }]),
    }
}

fn requirement(key: &str, operator: &str, values: Vec<String>) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: Some(values),
    }
}
