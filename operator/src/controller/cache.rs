//! What a reconcile reads, kept in memory by the same watches that trigger reconciles: the
//! namespaces' labels, the ConfigMaps the operator owns and the Secrets in its scope. A
//! reconcile then costs no read round trip, and a restarted operator compares every
//! endpoint against a full cache instead of fetching its objects one at a time.

use futures::Stream;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Resource, ResourceExt};

use super::MANAGED_BY;

/// `kubectl apply` keeps a full copy of the object here; nothing in the operator reads it.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Helm keeps each release, often hundreds of kilobytes, in a Secret of this type; no
/// endpoint takes its key from one, so they stay out of the cache.
const HELM_RELEASE_TYPE: &str = "helm.sh/release.v1";

#[derive(Clone)]
pub struct Caches {
    /// Labels only: the environment label is all a reconcile reads from a namespace.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// The ConfigMaps the operator owns (labelled managed-by).
    pub config_maps: Store<ConfigMap>,
    /// Every Secret in scope: the keys endpoints reference and the copies the operator owns.
    pub secrets: Store<Secret>,
}

/// The event streams that fill the caches; the controller consumes them as triggers.
pub struct Feeds<N, C, S> {
    pub namespaces: N,
    pub config_maps: C,
    pub secrets: S,
}

impl Caches {
    /// Resolves once every cache holds its initial list, so that a restarted operator never
    /// takes an object missing from an empty cache for one missing from the cluster.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.namespaces.wait_until_ready().await?;
        self.config_maps.wait_until_ready().await?;
        self.secrets.wait_until_ready().await
    }

    pub fn namespace(&self, name: &str) -> Option<std::sync::Arc<PartialObjectMeta<Namespace>>> {
        self.namespaces.get(&ObjectRef::new(name))
    }

    pub fn config_map(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<ConfigMap>> {
        self.config_maps
            .get(&ObjectRef::new(name).within(namespace))
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<Secret>> {
        self.secrets.get(&ObjectRef::new(name).within(namespace))
    }
}

/// Opens the watches behind the caches: namespaces cluster-wide (or the one watched
/// namespace), ConfigMaps and Secrets in `namespace` or everywhere.
#[allow(clippy::type_complexity)]
pub fn open(
    client: &kube::Client,
    namespace: Option<&str>,
) -> (
    Caches,
    Feeds<
        impl Stream<Item = Result<PartialObjectMeta<Namespace>, watcher::Error>> + Send + 'static,
        impl Stream<Item = Result<ConfigMap, watcher::Error>> + Send + 'static,
        impl Stream<Item = Result<Secret, watcher::Error>> + Send + 'static,
    >,
) {
    let (config_maps, secrets): (Api<ConfigMap>, Api<Secret>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let namespace_config = match namespace {
        Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
        None => watcher::Config::default(),
    };
    let owned = watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    let in_scope = watcher::Config::default().fields(&format!("type!={HELM_RELEASE_TYPE}"));

    let (namespaces_store, namespaces_writer) = reflector::store();
    let (config_maps_store, config_maps_writer) = reflector::store();
    let (secrets_store, secrets_writer) = reflector::store();
    let feeds = Feeds {
        namespaces: cached(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            namespace_config,
            namespaces_writer,
        ),
        config_maps: cached(config_maps, owned, config_maps_writer),
        secrets: cached(secrets, in_scope, secrets_writer),
    };
    let caches = Caches {
        namespaces: namespaces_store,
        config_maps: config_maps_store,
        secrets: secrets_store,
    };
    (caches, feeds)
}

/// A watch that keeps `writer`'s store current and yields every object it touched
/// (deletions included, so that an owner recreates what was deleted).
fn cached<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource
        + ResourceExt
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    watcher(api, config)
        .modify(slim)
        .reflect(writer)
        .touched_objects()
}

/// Drops what the operator never reads but every stored object would otherwise carry:
/// the server-side apply bookkeeping (often larger than the object) and kubectl's copy.
pub fn slim<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
    object.annotations_mut().remove(LAST_APPLIED);
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;

    #[test]
    fn slimming_keeps_labels_and_annotations_the_operator_reads() {
        let mut config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some("llmesh-chat".into()),
                labels: Some(BTreeMap::from([("a".to_string(), "b".to_string())])),
                annotations: Some(BTreeMap::from([
                    (LAST_APPLIED.to_string(), "{...}".to_string()),
                    ("llmesh.io/config-hash".to_string(), "abc".to_string()),
                ])),
                managed_fields: Some(vec![ManagedFieldsEntry::default()]),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        slim(&mut config_map);
        assert!(config_map.managed_fields().is_empty());
        assert_eq!(
            config_map.annotations().keys().collect::<Vec<_>>(),
            ["llmesh.io/config-hash"]
        );
        assert_eq!(config_map.labels().len(), 1);
    }
}
