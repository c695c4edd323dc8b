//! Pods that asked for the sidecar and have none, so that skipped injection is never
//! silent: the webhook was down or too slow (its failurePolicy is Ignore), the pod predates
//! its namespace's `llmesh.io/inject` label, or the webhook could not inject it. Counted
//! from a metadata-only watch of pods: an injected pod carries the
//! `llmesh.io/injected-endpoints` annotation, so names and annotations are enough.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;

use crate::webhook::config::NEVER_INJECTED;
use crate::webhook::inject::{
    ENDPOINTS_ANNOTATION, INJECTED_ENDPOINTS_ANNOTATION, INJECT_DISABLED, INJECT_LABEL,
};

pub type PodIndex = Store<PartialObjectMeta<Pod>>;

/// The pods of every namespace (or of `namespace`), names, labels and annotations only:
/// the store, and the watch that fills it (to be spawned).
pub fn pod_index(
    client: kube::Client,
    namespace: Option<&str>,
) -> (PodIndex, impl std::future::Future<Output = ()> + Send) {
    let (reader, writer) = reflector::store();
    let api: Api<PartialObjectMeta<Pod>> = match namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    };
    let watch = watcher(api, watcher::Config::default())
        // Managed fields are most of a pod's metadata and nothing here reads them.
        .modify(|pod| pod.managed_fields_mut().clear())
        .default_backoff()
        .reflect(writer)
        .for_each(|event| async move {
            if let Err(error) = event {
                tracing::warn!(%error, "watching pods for skipped injection; retrying");
            }
        });
    (reader, watch)
}

/// The number of pods without the sidecar they asked for, by namespace. Opted-out pods and
/// the namespaces the webhook never serves are not counted: they are never injected.
pub fn without_sidecar(
    pods: &[Arc<PartialObjectMeta<Pod>>],
    operator_namespace: &str,
) -> BTreeMap<String, i64> {
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for pod in pods {
        let Some(namespace) = pod.namespace() else {
            continue;
        };
        let never = NEVER_INJECTED.contains(&namespace.as_str()) || namespace == operator_namespace;
        let asked = pod.annotations().contains_key(ENDPOINTS_ANNOTATION);
        let injected = pod
            .annotations()
            .contains_key(INJECTED_ENDPOINTS_ANNOTATION);
        let opted_out = pod.labels().get(INJECT_LABEL).map(String::as_str) == Some(INJECT_DISABLED);
        if asked && !injected && !opted_out && !never {
            let count = counts.entry(namespace).or_default();
            *count = count.saturating_add(1);
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(
        namespace: &str,
        annotations: serde_json::Value,
        labels: serde_json::Value,
    ) -> Arc<PartialObjectMeta<Pod>> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p", "namespace": namespace, "annotations": annotations, "labels": labels},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn only_pods_that_asked_and_could_have_been_injected_count() {
        let asks = json!({ENDPOINTS_ANNOTATION: "chat"});
        let pods = [
            pod("shop", asks.clone(), json!({})),
            pod("shop", asks.clone(), json!({})),
            pod("web", asks.clone(), json!({})),
            // Injected.
            pod(
                "shop",
                json!({ENDPOINTS_ANNOTATION: "chat", INJECTED_ENDPOINTS_ANNOTATION: "chat"}),
                json!({}),
            ),
            // Did not ask, opted out, or where the webhook never goes.
            pod("shop", json!({}), json!({})),
            pod("shop", asks.clone(), json!({INJECT_LABEL: INJECT_DISABLED})),
            pod("kube-system", asks.clone(), json!({})),
            pod("llmesh-system", asks, json!({})),
        ];
        assert_eq!(
            without_sidecar(&pods, "llmesh-system"),
            BTreeMap::from([("shop".to_string(), 2), ("web".to_string(), 1)])
        );
    }
}
