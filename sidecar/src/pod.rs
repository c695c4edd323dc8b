//! The pod a sidecar serves, as the downward API tells it (`POD_NAMESPACE`,
//! `POD_SERVICE_ACCOUNT`): shown on `/readyz` and as `llmesh_pod_info`, so that what a
//! workload spends can be told apart from others before per-workload budgets exist.

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodIdentity {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
}

impl PodIdentity {
    /// An empty value (a downward-API variable set to nothing) counts as not given.
    pub fn new(namespace: Option<String>, service_account: Option<String>) -> Self {
        let given = |v: Option<String>| v.filter(|s| !s.is_empty());
        Self {
            namespace: given(namespace),
            service_account: given(service_account),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_values_are_not_given() {
        let pod = PodIdentity::new(Some(String::new()), Some("app".into()));
        assert_eq!(
            serde_json::to_value(&pod).unwrap(),
            serde_json::json!({"namespace": null, "serviceAccount": "app"})
        );
    }
}
