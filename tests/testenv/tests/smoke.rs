//! Proves the test control plane behaves like a cluster where llmesh needs it to.

use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{watcher, WatchStreamExt};
use llmesh_testenv::ControlPlane;
use serde_json::json;

fn config_map(name: &str, data: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": data})).unwrap()
}

#[tokio::test]
async fn configmaps_are_created_applied_watched_and_deleted() {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace("smoke-cm").await.unwrap();
    let client = plane.client().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);

    let events = watcher(api.clone(), watcher::Config::default()).applied_objects();
    let mut events = Box::pin(events);

    api.create(
        &PostParams::default(),
        &config_map("plain", json!({"a": "1"})),
    )
    .await
    .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the watch saw the object")
        .unwrap()
        .unwrap();
    assert_eq!(seen.metadata.name.as_deref(), Some("plain"));

    // Server-side apply: two field managers own different keys; a conflict is refused.
    let apply = |manager: &str, force: bool| {
        let mut params = PatchParams::apply(manager);
        params.force = force;
        params
    };
    let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"owned-by-a": "x"}});
    api.patch("applied", &apply("manager-a", false), &Patch::Apply(&first))
        .await
        .unwrap();
    let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"owned-by-b": "y"}});
    let merged = api
        .patch(
            "applied",
            &apply("manager-b", false),
            &Patch::Apply(&second),
        )
        .await
        .unwrap();
    let data = merged.data.unwrap();
    assert_eq!(
        (data["owned-by-a"].as_str(), data["owned-by-b"].as_str()),
        ("x", "y")
    );
    let managers: Vec<_> = merged
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .filter_map(|f| f.manager)
        .collect();
    assert!(
        managers.contains(&"manager-a".to_string()) && managers.contains(&"manager-b".to_string())
    );
    let conflicting = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"owned-by-a": "z"}});
    let err = api
        .patch(
            "applied",
            &apply("manager-b", false),
            &Patch::Apply(&conflicting),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );

    api.delete("plain", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("plain").await.unwrap().is_none());
}

#[tokio::test]
async fn owned_objects_are_garbage_collected_with_their_owner() {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace("smoke-gc").await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(plane.client().await.unwrap(), &ns);
    let owner = api
        .create(&PostParams::default(), &config_map("owner", json!({})))
        .await
        .unwrap();
    let mut owned = config_map("owned", json!({}));
    owned.metadata.owner_references = Some(vec![serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid.unwrap(),
    }))
    .unwrap()]);
    api.create(&PostParams::default(), &owned).await.unwrap();

    api.delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    let gone = tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(api.clone(), "owned", conditions::is_deleted("")),
    )
    .await;
    assert!(
        gone.is_ok(),
        "the garbage collector did not delete the owned ConfigMap"
    );
}

#[tokio::test]
async fn a_deleted_namespace_is_emptied_and_removed() {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace("smoke-ns").await.unwrap();
    let client = plane.client().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.create(&PostParams::default(), &config_map("inside", json!({})))
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    let gone = tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(namespaces, &ns, conditions::is_deleted("")),
    )
    .await;
    assert!(
        gone.is_ok(),
        "the namespace controller did not finish deleting {ns}"
    );
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.llmesh.io
spec:
  group: smoke.llmesh.io
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1}
                max: {type: integer}
              x-kubernetes-validations:
                - rule: "!has(self.max) || self.size <= self.max"
                  message: size must not exceed max
"#;

#[tokio::test]
async fn a_crd_installs_and_its_schema_and_cel_rules_are_enforced() {
    let plane = ControlPlane::shared().await;
    let client = plane.client().await.unwrap();
    let crd: CustomResourceDefinition = serde_yaml_ng::from_str(WIDGET_CRD).unwrap();
    plane.install_crd(&crd).await.unwrap();

    let ns = plane.namespace("smoke-crd").await.unwrap();
    let resource = kube::api::ApiResource {
        group: "smoke.llmesh.io".into(),
        version: "v1".into(),
        api_version: "smoke.llmesh.io/v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
    };
    let widgets: Api<kube::api::DynamicObject> = Api::namespaced_with(client, &ns, &resource);
    let widget = |name: &str, spec: serde_json::Value| {
        serde_json::from_value::<kube::api::DynamicObject>(json!({
            "apiVersion": "smoke.llmesh.io/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    };
    // A valid object is stored, one the CEL rule rejects is not, and neither is one the schema rejects.
    widgets
        .create(
            &PostParams::default(),
            &widget("ok", json!({"size": 2, "max": 3})),
        )
        .await
        .unwrap();
    let err = widgets
        .create(
            &PostParams::default(),
            &widget("too-big", json!({"size": 5, "max": 3})),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("size must not exceed max"),
        "{err}"
    );
    let err = widgets
        .create(&PostParams::default(), &widget("zero", json!({"size": 0})))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("should be greater than or equal to 1"),
        "{err}"
    );
}

#[tokio::test]
async fn kubectl_talks_to_the_control_plane() {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace("smoke-kubectl").await.unwrap();
    let out = Command::new(llmesh_testenv::tool("kubectl"))
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig)
        .args(["get", "namespace", &ns, "-o", "jsonpath={.metadata.name}"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), ns);
}

#[test]
fn helm_lints_and_renders_a_chart() {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("smoke");
    std::fs::create_dir_all(chart.join("templates")).unwrap();
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: smoke\nversion: 0.1.0\n",
    )
    .unwrap();
    std::fs::write(chart.join("values.yaml"), "greeting: hello\n").unwrap();
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-smoke\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
    )
    .unwrap();
    let lint = Command::new(llmesh_testenv::tool("helm"))
        .arg("lint")
        .arg(&chart)
        .output()
        .expect("run helm");
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );
    let out = Command::new(llmesh_testenv::tool("helm"))
        .args(["template", "demo"])
        .arg(&chart)
        .args(["--set", "greeting=hi"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(
        rendered.contains("name: demo-smoke") && rendered.contains("greeting: \"hi\""),
        "{rendered}"
    );
}

/// An HTTPS admission webhook on 127.0.0.1 that labels every Pod it sees.
async fn start_labelling_webhook(plane: &ControlPlane) -> u16 {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;

    let cert = plane.issue_serving_cert("smoke-webhook").unwrap();
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt;
                    let body = req.into_body().collect().await?.to_bytes();
                    let review: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    let patch = json!([{"op": "add", "path": "/metadata/labels", "value": {"llmesh.io/mutated": "yes"}}]);
                    let response = json!({
                        "apiVersion": "admission.k8s.io/v1",
                        "kind": "AdmissionReview",
                        "response": {
                            "uid": review["request"]["uid"],
                            "allowed": true,
                            "patchType": "JSONPatch",
                            "patch": base64(patch.to_string().as_bytes()),
                        }
                    });
                    Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(response.to_string()),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    port
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn a_mutating_webhook_on_loopback_mutates_stored_pods() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let plane = ControlPlane::shared().await;
    let port = start_labelling_webhook(plane).await;
    let ns = plane.namespace("smoke-webhook").await.unwrap();
    let client = plane.client().await.unwrap();
    let name = format!("smoke-{ns}");
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "label.smoke.llmesh.io",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{port}/mutate"),
                "caBundle": base64(plane.ca_pem().as_bytes()),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            // Only this test's namespace, so other tests' pods are never sent here.
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
        }]
    }))
    .unwrap();
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    webhooks
        .create(&PostParams::default(), &config)
        .await
        .unwrap();

    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
    }))
    .unwrap();
    // The webhook configuration takes a moment to reach the API server's admission chain.
    let mut stored = None;
    for _ in 0..50 {
        let created = pods.create(&PostParams::default(), &pod).await.unwrap();
        if created
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("llmesh.io/mutated"))
            .is_some()
        {
            stored = Some(created);
            break;
        }
        pods.delete("app", &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = stored.expect("the webhook mutated the pod");
    assert_eq!(stored.metadata.labels.unwrap()["llmesh.io/mutated"], "yes");
    let fetched = pods.get("app").await.unwrap();
    assert_eq!(fetched.metadata.labels.unwrap()["llmesh.io/mutated"], "yes");
    webhooks
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
}
