//! Sidecar injection as a pure function: from a Pod, the names of the LlmEndpoints in its
//! namespace and the operator's injection settings to a decision and, when injecting, the
//! JSON Patch that the admission response carries. No API calls, so every rule is tested
//! here, against golden files in `operator/tests/golden/inject/`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, Pod, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecretProjection, SecurityContext, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use llmesh_sidecar::config::is_dns_label;

use crate::render::{
    CACHE_REDIS_PASSWORD_KEY, CONFIG_FILE, CREDENTIAL_KEY, CREDENTIAL_MOUNT_ROOT,
    REDIS_PASSWORD_KEY,
};

/// The pod annotation that asks for the sidecar: LlmEndpoint names, comma-separated, or `*`.
pub const ENDPOINTS_ANNOTATION: &str = "llmesh.io/endpoints";
/// On a namespace, `enabled` opts it in (the webhook's namespaceSelector); on a pod,
/// `disabled` opts the pod out.
pub const INJECT_LABEL: &str = "llmesh.io/inject";
pub const INJECT_ENABLED: &str = "enabled";
pub const INJECT_DISABLED: &str = "disabled";
/// Every LlmEndpoint of the pod's namespace, resolved when the pod is admitted.
pub const ALL_ENDPOINTS: &str = "*";
/// The injected container's name, which also marks a pod as already injected.
pub const SIDECAR_NAME: &str = "llmesh-sidecar";
pub const INJECTED_IMAGE_ANNOTATION: &str = "llmesh.io/injected-image";
pub const INJECTED_ENDPOINTS_ANNOTATION: &str = "llmesh.io/injected-endpoints";
pub const CPU_REQUEST_ANNOTATION: &str = "llmesh.io/sidecar-cpu-request";
pub const MEMORY_REQUEST_ANNOTATION: &str = "llmesh.io/sidecar-memory-request";
pub const CPU_LIMIT_ANNOTATION: &str = "llmesh.io/sidecar-cpu-limit";
pub const MEMORY_LIMIT_ANNOTATION: &str = "llmesh.io/sidecar-memory-limit";
/// The sidecar's `--config-dir`: one `<name>.yaml` per endpoint.
pub const CONFIG_DIR: &str = "/etc/llmesh/endpoints";
/// The admin port's name, for a PodMonitor's `port:`.
pub const ADMIN_PORT_NAME: &str = "llmesh-admin";
/// What the app's SDK sends as its key when the app sets none: the sidecar adds the real
/// one, and the SDKs refuse to start without some key.
pub const PLACEHOLDER_API_KEY: &str = "llmesh-placeholder";
pub const CONFIG_VOLUME: &str = "llmesh-config";
pub const CREDENTIALS_VOLUME: &str = "llmesh-credentials";
/// The distroless `nonroot` user, so the sidecar runs non-root whatever the image says.
const SIDECAR_USER: i64 = 65532;
/// A Job or a slow node may pull the image and load many endpoints: give the sidecar five
/// minutes to become ready before the kubelet restarts it.
const STARTUP_PROBE_FAILURES: i32 = 300;
/// Longer names make a warning line that kubectl truncates.
const MAX_ECHOED_NAME: usize = 70;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarResources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for SidecarResources {
    /// No CPU limit by default: throttling shows up as stalls in streamed tokens.
    fn default() -> Self {
        Self {
            cpu_request: Some("50m".into()),
            memory_request: Some("64Mi".into()),
            cpu_limit: None,
            memory_limit: Some("256Mi".into()),
        }
    }
}

/// What the operator's flags decide for every injected pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectionSettings {
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29 and later); a plain
    /// first container otherwise.
    pub native_sidecar: bool,
    /// The sidecar's app port, on 127.0.0.1.
    pub app_port: u16,
    /// The sidecar's admin port (`/readyz`, `/metrics`), on all interfaces.
    pub admin_port: u16,
    /// Defaults that the pod's annotations override one by one.
    pub resources: SidecarResources,
}

/// What the webhook does with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No `llmesh.io/endpoints` annotation.
    NotRequested,
    /// Labelled `llmesh.io/inject: disabled`.
    OptedOut,
    /// Already has a container or init container named `llmesh-sidecar` (a reinvocation,
    /// or a pod injected by hand): injection happens at most once.
    AlreadyInjected,
    /// Asked for the sidecar but cannot get one; the warnings say why.
    Skipped {
        warnings: Vec<String>,
    },
    Inject(Box<Injection>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// The pod as it is stored once the patch is applied.
    pub pod: Pod,
    pub patch: json_patch::Patch,
    /// The endpoints the sidecar is given, `*` resolved.
    pub endpoints: Vec<String>,
    /// For the admission response, which `kubectl` prints.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("cannot serialize the pod: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// Decides what to do with `pod`, given the names of the LlmEndpoints in its namespace.
pub fn decide(
    pod: &Pod,
    namespace_endpoints: &[String],
    settings: &InjectionSettings,
) -> Result<Decision, InjectError> {
    let Some(annotations) = pod.metadata.annotations.as_ref() else {
        return Ok(Decision::NotRequested);
    };
    let Some(requested) = annotations.get(ENDPOINTS_ANNOTATION) else {
        return Ok(Decision::NotRequested);
    };
    let opt_out = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL));
    if opt_out.map(String::as_str) == Some(INJECT_DISABLED) {
        return Ok(Decision::OptedOut);
    }
    // Borrowed until the pod is known to be injected: the one copy is the mutated pod.
    let no_spec = PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&no_spec);
    if spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR_NAME)
    {
        return Ok(Decision::AlreadyInjected);
    }

    let mut warnings = Vec::new();
    let endpoints = requested_endpoints(requested, namespace_endpoints, &mut warnings);
    if endpoints.is_empty() {
        warnings.push(format!(
            "llmesh: no sidecar injected: {ENDPOINTS_ANNOTATION} names no LlmEndpoint of this namespace"
        ));
        return Ok(Decision::Skipped { warnings });
    }
    if let Some(taken) = taken_name(spec) {
        warnings.push(format!(
            "llmesh: no sidecar injected: the pod already has a volume named {taken}"
        ));
        return Ok(Decision::Skipped { warnings });
    }

    let resources = resources(annotations, &settings.resources, &mut warnings);
    let mut mutated = pod.clone();
    let spec = mutated.spec.get_or_insert_with(PodSpec::default);
    let sidecar = sidecar_container(settings, &endpoints, resources);
    if settings.native_sidecar {
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, sidecar);
    } else {
        spec.containers.insert(0, sidecar);
    }
    let base_url = format!("http://127.0.0.1:{}/v1", settings.app_port);
    // Anthropic's SDKs take the API root and add `/v1` themselves.
    let anthropic_base_url = format!("http://127.0.0.1:{}", settings.app_port);
    for app in spec
        .containers
        .iter_mut()
        .filter(|c| c.name != SIDECAR_NAME)
    {
        set_env_unless_present(app, "OPENAI_BASE_URL", &base_url);
        set_env_unless_present(app, "OPENAI_API_KEY", PLACEHOLDER_API_KEY);
        set_env_unless_present(app, "ANTHROPIC_BASE_URL", &anthropic_base_url);
        set_env_unless_present(app, "ANTHROPIC_API_KEY", PLACEHOLDER_API_KEY);
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(config_volume(&endpoints));
    volumes.push(credentials_volume(&endpoints));
    let recorded = mutated
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    recorded.insert(INJECTED_IMAGE_ANNOTATION.into(), settings.image.clone());
    recorded.insert(INJECTED_ENDPOINTS_ANNOTATION.into(), endpoints.join(","));

    let patch = json_patch::diff(
        &serde_json::to_value(pod)?,
        &serde_json::to_value(&mutated)?,
    );
    Ok(Decision::Inject(Box::new(Injection {
        pod: mutated,
        patch,
        endpoints,
        warnings,
    })))
}

/// The annotation's names in order, without duplicates; `*` stands for every endpoint of
/// the namespace. Names that cannot be an LlmEndpoint are dropped, names of endpoints that
/// do not exist (yet) are kept: the sidecar serves them once their ConfigMap appears.
fn requested_endpoints(
    annotation: &str,
    namespace_endpoints: &[String],
    warnings: &mut Vec<String>,
) -> Vec<String> {
    let mut all_in_namespace: Vec<&String> = namespace_endpoints
        .iter()
        .filter(|n| is_dns_label(n))
        .collect();
    all_in_namespace.sort();
    let mut endpoints: Vec<String> = Vec::new();
    for entry in annotation
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        if entry == ALL_ENDPOINTS {
            if all_in_namespace.is_empty() {
                warnings.push(format!(
                    "llmesh: {ENDPOINTS_ANNOTATION} is {ALL_ENDPOINTS:?} but this namespace has no LlmEndpoint yet"
                ));
            }
            for name in &all_in_namespace {
                if !endpoints.contains(name) {
                    endpoints.push((*name).clone());
                }
            }
        } else if !is_dns_label(entry) {
            warnings.push(format!(
                "llmesh: {ENDPOINTS_ANNOTATION}: {:?} is not an LlmEndpoint name; skipped",
                truncated(entry)
            ));
        } else if !endpoints.iter().any(|n| n == entry) {
            if !namespace_endpoints.iter().any(|n| n == entry) {
                warnings.push(format!(
                    "llmesh: LlmEndpoint {entry} does not exist in this namespace; the sidecar serves it once it does"
                ));
            }
            endpoints.push(entry.to_string());
        }
    }
    endpoints
}

fn truncated(text: &str) -> String {
    text.chars().take(MAX_ECHOED_NAME).collect()
}

/// A volume name the injection adds that the pod already uses: the API server would refuse
/// the patched pod, so the pod is admitted as it is instead.
fn taken_name(spec: &PodSpec) -> Option<&'static str> {
    [CONFIG_VOLUME, CREDENTIALS_VOLUME]
        .into_iter()
        .find(|ours| {
            spec.volumes
                .iter()
                .flatten()
                .any(|volume| volume.name == *ours)
        })
}

fn sidecar_container(
    settings: &InjectionSettings,
    endpoints: &[String],
    resources: ResourceRequirements,
) -> Container {
    let readyz = Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/readyz".into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(1),
        ..Probe::default()
    };
    let from_field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(vec![
            "--config-dir".into(),
            CONFIG_DIR.into(),
            "--expect-endpoints".into(),
            endpoints.join(","),
            "--listen".into(),
            format!("127.0.0.1:{}", settings.app_port),
            "--admin-listen".into(),
            format!("0.0.0.0:{}", settings.admin_port),
        ]),
        env: Some(vec![
            from_field("POD_NAMESPACE", "metadata.namespace"),
            from_field("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.into()),
            container_port: i32::from(settings.admin_port),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        restart_policy: settings.native_sidecar.then(|| "Always".to_string()),
        startup_probe: Some(Probe {
            failure_threshold: Some(STARTUP_PROBE_FAILURES),
            ..readyz.clone()
        }),
        readiness_probe: Some(readyz),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_USER),
            run_as_group: Some(SIDECAR_USER),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount(CONFIG_VOLUME, CONFIG_DIR),
            mount(CREDENTIALS_VOLUME, CREDENTIAL_MOUNT_ROOT),
        ]),
        ..Container::default()
    }
}

/// Each endpoint's ConfigMap as `<name>.yaml`, optional so that a pod naming an endpoint
/// not rendered yet still starts; the kubelet adds the file when the ConfigMap appears.
fn config_volume(endpoints: &[String]) -> Volume {
    let sources = endpoints
        .iter()
        .map(|name| VolumeProjection {
            config_map: Some(ConfigMapProjection {
                name: format!("llmesh-{name}"),
                items: Some(vec![KeyToPath {
                    key: CONFIG_FILE.into(),
                    path: format!("{name}.yaml"),
                    ..KeyToPath::default()
                }]),
                optional: Some(true),
            }),
            ..VolumeProjection::default()
        })
        .collect();
    projected(CONFIG_VOLUME, sources)
}

/// Each endpoint's Secret under `<name>/`, in one volume mounted in the sidecar alone:
/// the keys are listed because every endpoint's Secret has the same key names. Optional,
/// as an endpoint on the mock provider has no Secret at all.
fn credentials_volume(endpoints: &[String]) -> Volume {
    let sources = endpoints
        .iter()
        .map(|name| VolumeProjection {
            secret: Some(SecretProjection {
                name: format!("llmesh-{name}"),
                items: Some(
                    [CREDENTIAL_KEY, REDIS_PASSWORD_KEY, CACHE_REDIS_PASSWORD_KEY]
                        .into_iter()
                        .map(|key| KeyToPath {
                            key: key.into(),
                            path: format!("{name}/{key}"),
                            ..KeyToPath::default()
                        })
                        .collect(),
                ),
                optional: Some(true),
            }),
            ..VolumeProjection::default()
        })
        .collect();
    projected(CREDENTIALS_VOLUME, sources)
}

fn projected(name: &str, sources: Vec<VolumeProjection>) -> Volume {
    Volume {
        name: name.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(sources),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn set_env_unless_present(container: &mut Container, name: &str, value: &str) {
    let env = container.env.get_or_insert_with(Vec::new);
    if !env.iter().any(|e| e.name == name) {
        env.push(EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..EnvVar::default()
        });
    }
}

/// The settings' defaults, each overridden by its annotation when that holds a valid
/// quantity. A value the API server would refuse is replaced, never passed on: a refused
/// patch would refuse the pod.
fn resources(
    annotations: &BTreeMap<String, String>,
    defaults: &SidecarResources,
    warnings: &mut Vec<String>,
) -> ResourceRequirements {
    let mut pick = |annotation: &str, default: &Option<String>| -> Option<String> {
        match annotations.get(annotation) {
            Some(value) if quantity_value(value.trim()).is_some() => Some(value.trim().into()),
            Some(_) => {
                warnings.push(format!(
                    "llmesh: {annotation} is not a Kubernetes quantity; using {}",
                    default.as_deref().unwrap_or("none")
                ));
                default.clone()
            }
            None => default.clone(),
        }
    };
    let cpu_request = pick(CPU_REQUEST_ANNOTATION, &defaults.cpu_request);
    let memory_request = pick(MEMORY_REQUEST_ANNOTATION, &defaults.memory_request);
    let mut cpu_limit = pick(CPU_LIMIT_ANNOTATION, &defaults.cpu_limit);
    let mut memory_limit = pick(MEMORY_LIMIT_ANNOTATION, &defaults.memory_limit);
    let mut raise = |resource: &str, request: &Option<String>, limit: &mut Option<String>| {
        let values = request
            .as_deref()
            .and_then(quantity_value)
            .zip(limit.as_deref().and_then(quantity_value));
        if values.is_some_and(|(request, limit)| request > limit) {
            warnings.push(format!(
                "llmesh: the sidecar's {resource} request is above its limit; the limit is raised to the request"
            ));
            limit.clone_from(request);
        }
    };
    raise("cpu", &cpu_request, &mut cpu_limit);
    raise("memory", &memory_request, &mut memory_limit);
    let list = |cpu: Option<String>, memory: Option<String>| {
        let list: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(resource, value)| Some((resource.to_string(), Quantity(value?))))
            .collect();
        (!list.is_empty()).then_some(list)
    };
    ResourceRequirements {
        requests: list(cpu_request, memory_request),
        limits: list(cpu_limit, memory_limit),
        ..ResourceRequirements::default()
    }
}

/// Whether the API server accepts `text` as a resource quantity (the operator's flags).
pub fn is_quantity(text: &str) -> bool {
    quantity_value(text).is_some()
}

/// The value of a Kubernetes quantity (`250m`, `1.5`, `64Mi`, `1e3`), or `None` when the
/// API server would refuse it. Negative values are refused too: no resource can be.
fn quantity_value(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, scale) = match SUFFIXES
        .iter()
        .find_map(|(suffix, scale)| Some((text.strip_suffix(suffix)?, *scale)))
    {
        Some(found) => found,
        None => match text.split_once(['e', 'E']) {
            Some((mantissa, exponent)) => {
                let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
                if digits.is_empty()
                    || digits.len() > 3
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return None;
                }
                (mantissa, 10f64.powi(exponent.parse::<i32>().ok()?))
            }
            None => (text, 1.0),
        },
    };
    let digits = number.bytes().filter(u8::is_ascii_digit).count();
    let dots = number.bytes().filter(|b| *b == b'.').count();
    if digits == 0 || dots > 1 || digits.saturating_add(dots) != number.len() {
        return None;
    }
    Some(number.parse::<f64>().ok()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn settings() -> InjectionSettings {
        InjectionSettings {
            image: "ghcr.io/llmesh/sidecar:0.1.0".into(),
            image_pull_policy: Some("IfNotPresent".into()),
            native_sidecar: true,
            app_port: 4000,
            admin_port: 4001,
            resources: SidecarResources::default(),
        }
    }

    fn pod(annotations: Value, labels: Value, containers: Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "app",
                "namespace": "shop",
                "annotations": annotations,
                "labels": labels,
            },
            "spec": {"containers": containers},
        }))
        .unwrap()
    }

    fn app(name: &str) -> Value {
        json!({"name": name, "image": "example.com/app:1"})
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Compares the injected pod and the warnings with
    /// `operator/tests/golden/inject/<case>.json`; `LLMESH_UPDATE_GOLDEN=1` rewrites it.
    fn check_golden(case: &str, original: &Pod, decision: &Decision) {
        let Decision::Inject(injection) = decision else {
            panic!("{case}: expected an injection, got {decision:?}");
        };
        // The patch is what the API server applies: it must give exactly the injected pod.
        let mut patched = serde_json::to_value(original).unwrap();
        json_patch::patch(&mut patched, &injection.patch).unwrap();
        assert_eq!(
            patched,
            serde_json::to_value(&injection.pod).unwrap(),
            "{case}"
        );
        let actual = json!({
            "endpoints": injection.endpoints,
            "warnings": injection.warnings,
            "pod": injection.pod,
        });
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/inject")
            .join(format!("{case}.json"));
        if std::env::var_os("LLMESH_UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let text = serde_json::to_string_pretty(&actual).unwrap();
            std::fs::write(&path, text + "\n").unwrap();
        }
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (LLMESH_UPDATE_GOLDEN=1 writes it)", path.display())
            }))
            .unwrap();
        assert_eq!(actual, expected, "{case}: differs from {}", path.display());
    }

    #[test]
    fn one_endpoint() {
        let original = pod(
            json!({ENDPOINTS_ANNOTATION: "chat"}),
            json!({}),
            json!([app("app")]),
        );
        let decision = decide(&original, &names(&["chat", "embed"]), &settings()).unwrap();
        check_golden("one-endpoint", &original, &decision);
    }

    #[test]
    fn several_endpoints_keep_their_order_once_each() {
        let original = pod(
            json!({ENDPOINTS_ANNOTATION: " embed, chat ,embed,"}),
            json!({}),
            json!([app("app"), app("worker")]),
        );
        let decision = decide(&original, &names(&["chat", "embed"]), &settings()).unwrap();
        check_golden("several-endpoints", &original, &decision);
    }

    #[test]
    fn all_endpoints_of_the_namespace() {
        let original = pod(
            json!({ENDPOINTS_ANNOTATION: "*"}),
            json!({}),
            json!([app("app")]),
        );
        let decision = decide(
            &original,
            &names(&["embed", "chat", "Bad_Name"]),
            &settings(),
        )
        .unwrap();
        check_golden("all-endpoints", &original, &decision);
    }

    #[test]
    fn resources_from_annotations() {
        let original = pod(
            json!({
                ENDPOINTS_ANNOTATION: "chat",
                CPU_REQUEST_ANNOTATION: "200m",
                MEMORY_REQUEST_ANNOTATION: "512Mi",
                CPU_LIMIT_ANNOTATION: "1",
                MEMORY_LIMIT_ANNOTATION: "lots",
            }),
            json!({}),
            json!([app("app")]),
        );
        let decision = decide(&original, &names(&["chat"]), &settings()).unwrap();
        // 512Mi over the default 256Mi limit (the annotation's "lots" is refused) raises it.
        check_golden("custom-resources", &original, &decision);
    }

    #[test]
    fn an_app_that_sets_its_own_base_url_keeps_it() {
        let original = pod(
            json!({ENDPOINTS_ANNOTATION: "chat"}),
            json!({}),
            json!([{
                "name": "app",
                "image": "example.com/app:1",
                "env": [{"name": "OPENAI_BASE_URL", "value": "http://proxy.internal/v1"}]
            }]),
        );
        let decision = decide(&original, &names(&["chat"]), &settings()).unwrap();
        check_golden("own-base-url", &original, &decision);
    }

    #[test]
    fn a_missing_endpoint_is_injected_with_a_warning() {
        let original = pod(
            json!({ENDPOINTS_ANNOTATION: "chat,ghost,Not_A_Name"}),
            json!({}),
            json!([app("app")]),
        );
        let decision = decide(&original, &names(&["chat"]), &settings()).unwrap();
        check_golden("missing-endpoint", &original, &decision);
    }

    #[test]
    fn without_native_sidecars_the_sidecar_is_the_first_container() {
        let original = pod(
            json!({ENDPOINTS_ANNOTATION: "chat"}),
            json!({}),
            json!([app("app")]),
        );
        let settings = InjectionSettings {
            native_sidecar: false,
            image_pull_policy: None,
            ..settings()
        };
        let decision = decide(&original, &names(&["chat"]), &settings).unwrap();
        check_golden("plain-container", &original, &decision);
    }

    #[test]
    fn the_native_sidecar_goes_before_existing_init_containers() {
        let mut original = pod(
            json!({ENDPOINTS_ANNOTATION: "chat"}),
            json!({}),
            json!([app("app")]),
        );
        original.spec.as_mut().unwrap().init_containers =
            Some(vec![serde_json::from_value(app("migrate")).unwrap()]);
        let Decision::Inject(injection) =
            decide(&original, &names(&["chat"]), &settings()).unwrap()
        else {
            panic!("not injected");
        };
        let init: Vec<_> = injection.pod.spec.unwrap().init_containers.unwrap();
        assert_eq!(
            init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            [SIDECAR_NAME, "migrate"]
        );
        assert_eq!(init[1].env, None, "init containers are left as they are");
    }

    #[test]
    fn pods_that_are_not_injected() {
        let chat = names(&["chat"]);
        let no_annotation = pod(json!({}), json!({}), json!([app("app")]));
        assert_eq!(
            decide(&no_annotation, &chat, &settings()).unwrap(),
            Decision::NotRequested
        );
        let opted_out = pod(
            json!({ENDPOINTS_ANNOTATION: "chat"}),
            json!({INJECT_LABEL: INJECT_DISABLED}),
            json!([app("app")]),
        );
        assert_eq!(
            decide(&opted_out, &chat, &settings()).unwrap(),
            Decision::OptedOut
        );
        let plain = pod(
            json!({ENDPOINTS_ANNOTATION: "chat"}),
            json!({}),
            json!([app("app"), {"name": SIDECAR_NAME, "image": "x"}]),
        );
        assert_eq!(
            decide(&plain, &chat, &settings()).unwrap(),
            Decision::AlreadyInjected
        );
        // Reinvocation: the pod this webhook produced is left as it is.
        let Decision::Inject(injected) =
            decide(&opted_out_removed(&opted_out), &chat, &settings()).unwrap()
        else {
            panic!("not injected");
        };
        assert_eq!(
            decide(&injected.pod, &chat, &settings()).unwrap(),
            Decision::AlreadyInjected
        );
    }

    fn opted_out_removed(pod: &Pod) -> Pod {
        let mut pod = pod.clone();
        pod.metadata.labels = None;
        pod
    }

    #[test]
    fn a_pod_that_names_no_usable_endpoint_is_skipped_with_a_warning() {
        let star = pod(
            json!({ENDPOINTS_ANNOTATION: "*"}),
            json!({}),
            json!([app("app")]),
        );
        let Decision::Skipped { warnings } = decide(&star, &[], &settings()).unwrap() else {
            panic!("not skipped");
        };
        assert_eq!(
            warnings,
            [
                "llmesh: llmesh.io/endpoints is \"*\" but this namespace has no LlmEndpoint yet",
                "llmesh: no sidecar injected: llmesh.io/endpoints names no LlmEndpoint of this namespace",
            ]
        );
        let mut taken = pod(
            json!({ENDPOINTS_ANNOTATION: "chat"}),
            json!({}),
            json!([app("app")]),
        );
        taken.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: CONFIG_VOLUME.into(),
            ..Volume::default()
        }]);
        let Decision::Skipped { warnings } =
            decide(&taken, &names(&["chat"]), &settings()).unwrap()
        else {
            panic!("not skipped");
        };
        assert_eq!(
            warnings,
            ["llmesh: no sidecar injected: the pod already has a volume named llmesh-config"]
        );
    }

    #[test]
    fn quantities_are_checked_as_the_api_server_does() {
        for (text, value) in [
            ("250m", 0.25),
            ("1", 1.0),
            ("1.5", 1.5),
            ("64Mi", 67_108_864.0),
            ("1k", 1000.0),
            ("2e3", 2000.0),
            ("1E", 1e18),
            (".5", 0.5),
        ] {
            assert_eq!(quantity_value(text), Some(value), "{text}");
        }
        for text in [
            "", "lots", "-1", "1..2", "Mi", "1e", "1e99999", "1 Mi", "inf", "NaN", "1mi",
        ] {
            assert_eq!(quantity_value(text), None, "{text}");
        }
    }
}
