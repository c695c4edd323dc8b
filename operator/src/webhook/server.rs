//! The webhook's HTTPS server: `POST /mutate` answers the API server's AdmissionReviews
//! for pods. It reads LlmEndpoint names from an in-memory index kept by a watch, so an
//! answer never waits on the API: `*` and the missing-endpoint warnings cost a scan of a
//! local list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, PartialObjectMeta};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::crd::LlmEndpoint;
use crate::metrics::Metrics;
use crate::webhook::inject::{decide, Decision, InjectionSettings};

/// The path the MutatingWebhookConfiguration points at.
pub const MUTATE_PATH: &str = "/mutate";
/// The API server sends at most 3 MiB of object; the review around it adds little.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// A client that has not finished its TLS handshake or request headers by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// In bytes: the API server refuses an Event whose note is over 1 KiB.
const MAX_EVENT_NOTE: usize = 1000;
/// The API server sends a review at once; its own timeout for the call is at most 30 s.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections still open at shutdown get this long to finish their answer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncated(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The names of the LlmEndpoints the operator watches, metadata only.
pub type EndpointIndex = Store<PartialObjectMeta<LlmEndpoint>>;

/// Starts the index of every namespace, or of `namespace` alone for an install limited to
/// one: the store, and the watch that fills it (to be spawned; it retries with backoff for
/// as long as it runs).
pub fn endpoint_index(
    client: kube::Client,
    namespace: Option<&str>,
) -> (EndpointIndex, impl std::future::Future<Output = ()> + Send) {
    let (reader, writer) = reflector::store();
    // Metadata only: the webhook needs names, not specs.
    let api: Api<PartialObjectMeta<LlmEndpoint>> = match namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    };
    let watch = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .for_each(|event| async move {
            if let Err(error) = event {
                tracing::warn!(%error, "watching LlmEndpoints for the webhook; retrying");
            }
        });
    (reader, watch)
}

/// Everything one admission needs.
pub struct Webhook {
    pub settings: InjectionSettings,
    pub endpoints: EndpointIndex,
    /// Never injected, whatever its label says: the operator's own namespace, so that a
    /// broken webhook cannot stop the operator's pods.
    pub operator_namespace: String,
    pub metrics: Arc<Metrics>,
    /// Publishes the admission warnings as Events too (absent in unit tests).
    pub events: Option<Recorder>,
}

impl Webhook {
    /// The answer to one AdmissionRequest: always allowed (the webhook only adds), with the
    /// patch when it injects and warnings for `kubectl` to print.
    pub fn admit(&self, request: &AdmissionRequest<Pod>) -> AdmissionResponse {
        let mut response = AdmissionResponse::from(request);
        let namespace = request.namespace.clone().unwrap_or_default();
        let outcome = match &request.object {
            _ if request.operation != Operation::Create => "not_requested",
            None => "not_requested",
            Some(_) if namespace == self.operator_namespace => "excluded_namespace",
            Some(pod) => {
                let names = self.endpoint_names(&namespace);
                match decide(pod, &names, &self.settings) {
                    Ok(Decision::NotRequested) => "not_requested",
                    Ok(Decision::OptedOut) => "opted_out",
                    Ok(Decision::AlreadyInjected) => "already_injected",
                    Ok(Decision::Skipped { warnings }) => {
                        tracing::info!(namespace, pod = %pod_name(pod), ?warnings, "sidecar not injected");
                        self.publish(request, pod, &namespace, &warnings);
                        response.warnings = Some(warnings);
                        "skipped"
                    }
                    Ok(Decision::Inject(injection)) => {
                        let warnings = injection.warnings;
                        match response.clone().with_patch(injection.patch) {
                            Ok(patched) => {
                                response = patched;
                                tracing::info!(
                                    namespace,
                                    pod = %pod_name(pod),
                                    endpoints = %injection.endpoints.join(","),
                                    ?warnings,
                                    "sidecar injected"
                                );
                                if !warnings.is_empty() {
                                    self.publish(request, pod, &namespace, &warnings);
                                    response.warnings = Some(warnings);
                                }
                                "injected"
                            }
                            Err(error) => self.failed(&mut response, &namespace, pod, &error),
                        }
                    }
                    Err(error) => self.failed(&mut response, &namespace, pod, &error),
                }
            }
        };
        self.metrics.admissions.with_label_values(&[outcome]).inc();
        response
    }

    fn failed(
        &self,
        response: &mut AdmissionResponse,
        namespace: &str,
        pod: &Pod,
        error: &dyn std::error::Error,
    ) -> &'static str {
        tracing::error!(namespace, pod = %pod_name(pod), %error, "cannot inject the sidecar; admitting the pod without it");
        response.warnings = Some(vec![
            "llmesh: no sidecar injected: the webhook failed; see the operator's log".into(),
        ]);
        "error"
    }

    /// The warnings as a Warning Event about the pod's owner (a ReplicaSet, a Job: the pod
    /// has no name yet when generated), else the pod, in the background so that the answer
    /// never waits on the API. Dry runs publish nothing.
    fn publish(
        &self,
        request: &AdmissionRequest<Pod>,
        pod: &Pod,
        namespace: &str,
        warnings: &[String],
    ) {
        if request.dry_run {
            return;
        }
        let Some(recorder) = self.events.clone() else {
            return;
        };
        let Some(regarding) = regarding(pod, namespace) else {
            return;
        };
        let note = truncated(&warnings.join("; "), MAX_EVENT_NOTE);
        let event = Event {
            type_: EventType::Warning,
            reason: "SidecarInjectionWarning".into(),
            note: Some(note),
            action: "Inject".into(),
            secondary: None,
        };
        self.metrics.count_write("Event");
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &regarding).await {
                tracing::warn!(%error, "cannot publish the injection warning as an Event");
            }
        });
    }

    fn endpoint_names(&self, namespace: &str) -> Vec<String> {
        self.endpoints
            .state()
            .iter()
            .filter(|e| e.namespace().as_deref() == Some(namespace))
            .map(|e| e.name_any())
            .collect()
    }
}

fn regarding(pod: &Pod, namespace: &str) -> Option<ObjectReference> {
    if let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    {
        return Some(ObjectReference {
            api_version: Some(owner.api_version.clone()),
            kind: Some(owner.kind.clone()),
            name: Some(owner.name.clone()),
            namespace: Some(namespace.to_string()),
            uid: Some(owner.uid.clone()),
            ..ObjectReference::default()
        });
    }
    Some(ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.metadata.name.clone()?),
        namespace: Some(namespace.to_string()),
        ..ObjectReference::default()
    })
}

/// `metadata.name`, or the `generateName` prefix of a Deployment's or Job's pod, whose
/// name is not set yet when it is admitted.
fn pod_name(pod: &Pod) -> String {
    pod.metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default()
}

/// Serves `webhook` over TLS until `shutdown` changes: the sidecar's accept loop, each
/// connection's TLS handshake bounded like its request headers.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    webhook: Arc<Webhook>,
    shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let handshake = move |stream| {
        let accept = acceptor.accept(stream);
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(stream)) => Some(stream),
                Ok(Err(error)) => {
                    tracing::debug!(%error, "webhook TLS handshake failed");
                    None
                }
                Err(_) => None,
            }
        }
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    let handler = move |request| {
        let webhook = Arc::clone(&webhook);
        async move { handle(&webhook, request).await }
    };
    llmesh_sidecar::server::serve_wrapped(
        listener,
        builder,
        shutdown,
        SHUTDOWN_GRACE,
        "webhook",
        handshake,
        handler,
    )
    .await;
}

async fn handle(webhook: &Webhook, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != MUTATE_PATH {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n");
    }
    // Bounded in time too: a caller dripping its body would otherwise hold a task for good.
    let read = Limited::new(request.into_body(), MAX_REVIEW_BYTES).collect();
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(_)) => return plain(StatusCode::BAD_REQUEST, "cannot read the body\n"),
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "the body took too long\n"),
    };
    // From the whole body read to the answer encoded: parsing the review is most of it.
    let started = Instant::now();
    let review = match serde_json::from_slice::<AdmissionReview<Pod>>(&body)
        .ok()
        .and_then(|review| TryInto::<AdmissionRequest<Pod>>::try_into(review).ok())
    {
        Some(request) => webhook.admit(&request).into_review(),
        // No request to copy a uid from: the API server treats this as a webhook failure,
        // which failurePolicy Ignore lets through.
        None => {
            webhook
                .metrics
                .admissions
                .with_label_values(&["error"])
                .inc();
            AdmissionResponse::invalid("not an AdmissionReview of a Pod").into_review()
        }
    };
    let encoded = serde_json::to_vec(&review);
    webhook
        .metrics
        .admission_duration
        .observe(started.elapsed().as_secs_f64());
    match encoded {
        Ok(json) => {
            let mut response = Response::new(Full::new(Bytes::from(json)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(_) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the review\n",
        ),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_notes_are_cut_in_bytes_on_a_character_boundary() {
        let text = "é".repeat(600);
        let cut = super::truncated(&text, super::MAX_EVENT_NOTE);
        assert!(cut.len() <= super::MAX_EVENT_NOTE);
        assert_eq!(cut.len(), 1000);
        assert_eq!(super::truncated("short", 1000), "short");
    }

    use super::*;
    use crate::webhook::inject::SidecarResources;
    use serde_json::{json, Value};

    fn webhook(endpoints: &[(&str, &str)]) -> Webhook {
        let (reader, mut writer) = reflector::store();
        for (namespace, name) in endpoints {
            let meta: PartialObjectMeta<LlmEndpoint> = serde_json::from_value(json!({
                "apiVersion": "llmesh.io/v1alpha1",
                "kind": "LlmEndpoint",
                "metadata": {"name": name, "namespace": namespace},
            }))
            .unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(meta));
        }
        Webhook {
            settings: InjectionSettings {
                image: "sidecar:test".into(),
                image_pull_policy: None,
                native_sidecar: true,
                app_port: 4000,
                admin_port: 4001,
                resources: SidecarResources::default(),
            },
            endpoints: reader,
            operator_namespace: "llmesh-system".into(),
            metrics: Arc::new(Metrics::new().unwrap()),
            events: None,
        }
    }

    fn request(namespace: &str, operation: &str, annotations: Value) -> AdmissionRequest<Pod> {
        let review: AdmissionReview<Pod> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "8d2b6e3c-1111-2222-3333-444455556666",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": operation,
                "userInfo": {"username": "test"},
                "object": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"generateName": "app-", "namespace": namespace, "annotations": annotations},
                    "spec": {"containers": [{"name": "app", "image": "app:1"}]},
                },
                "oldObject": null,
            },
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    fn answer(response: &AdmissionResponse) -> Value {
        serde_json::to_value(response.clone().into_review()).unwrap()["response"].clone()
    }

    #[test]
    fn an_injected_pod_gets_a_patch_and_warnings_for_missing_endpoints() {
        let webhook = webhook(&[("shop", "chat"), ("other", "embed")]);
        let answer = answer(&webhook.admit(&request(
            "shop",
            "CREATE",
            json!({"llmesh.io/endpoints": "chat,embed"}),
        )));
        assert_eq!(answer["uid"], "8d2b6e3c-1111-2222-3333-444455556666");
        assert_eq!(answer["allowed"], true);
        assert_eq!(answer["patchType"], "JSONPatch");
        assert_eq!(
            answer["warnings"],
            json!(["llmesh: LlmEndpoint embed does not exist in this namespace; the sidecar serves it once it does"])
        );
        // kube serialises the patch bytes as a JSON array of numbers, which the API server's
        // decoder accepts as well as base64.
        let patch: Vec<u8> = serde_json::from_value(answer["patch"].clone()).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        assert!(!patch.0.is_empty());
        let injected = webhook
            .metrics
            .admissions
            .with_label_values(&["injected"])
            .get();
        assert_eq!(injected, 1);
    }

    #[test]
    fn updates_and_the_operator_namespace_are_left_alone() {
        let webhook = webhook(&[("llmesh-system", "chat")]);
        let asks = json!({"llmesh.io/endpoints": "*"});
        for (namespace, operation) in [("shop", "UPDATE"), ("llmesh-system", "CREATE")] {
            let answer = answer(&webhook.admit(&request(namespace, operation, asks.clone())));
            assert_eq!(answer["allowed"], true);
            assert_eq!(answer.get("patch"), None, "{namespace} {operation}");
        }
        // "*" in a namespace with no endpoint: admitted without a sidecar, with the reason.
        let answer = answer(&webhook.admit(&request("shop", "CREATE", asks)));
        assert_eq!(answer.get("patch"), None);
        assert_eq!(answer["warnings"].as_array().unwrap().len(), 2);
    }
}
