//! The kubelet's configuration: a node named `localhost`, served on loopback, pods on the node's
//! own bridge and cgroup root, and the knobs this kind of machine needs.

use std::net::Ipv4Addr;
use std::path::Path;

use super::footprint::CGROUP_ROOT;

/// The node's name, and the host name the API server reaches its kubelet by.
pub const NODE_NAME: &str = "localhost";

pub(crate) struct Ports {
    pub(crate) server: u16,
    pub(crate) healthz: u16,
}

pub(crate) fn config(
    dir: &Path,
    ca_file: &Path,
    containerd_socket: &Path,
    ports: &Ports,
) -> String {
    let dir = dir.display();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {server}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
tlsCertFile: {dir}/kubelet-serving.crt
tlsPrivateKeyFile: {dir}/kubelet-serving.key
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
# Only clients with a certificate of the test CA reach it, on loopback.
authorization: {{mode: AlwaysAllow}}
containerRuntimeEndpoint: unix://{socket}
cgroupDriver: cgroupfs
cgroupRoot: /{CGROUP_ROOT}
# cgroup v1 machines: kubelet 1.37 refuses them unless told otherwise.
failCgroupV1: false
failSwapOn: false
podLogsDir: {dir}/pod-logs
volumePluginDir: {dir}/volume-plugins
resolvConf: ""
makeIPTablesUtilChains: false
# Small disks: never evict, never collect the locally built images (they cannot be pulled again).
evictionHard: {{memory.available: "0%", nodefs.available: "0%", nodefs.inodesFree: "0%", imagefs.available: "0%", imagefs.inodesFree: "0%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# ConfigMap and Secret changes reach mounted volumes in seconds rather than about a minute.
syncFrequency: 10s
configMapAndSecretChangeDetectionStrategy: Watch
"#,
        server = ports.server,
        healthz = ports.healthz,
        ca = ca_file.display(),
        socket = containerd_socket.display(),
    )
}

pub(crate) fn args(dir: &Path, config: &Path, kubeconfig: &Path, node_ip: Ipv4Addr) -> Vec<String> {
    vec![
        format!("--config={}", config.display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--root-dir={}", dir.join("root").display()),
        format!("--hostname-override={NODE_NAME}"),
        // The host's address on the pod bridge: a pod's status.hostIP is where it reaches
        // servers that tests run on the host.
        format!("--node-ip={node_ip}"),
        "--v=1".into(),
    ]
}
