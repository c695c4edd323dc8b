//! The pod network: a bridge the node creates for itself, with no gateway, no masquerade and no
//! forwarding, so pods reach each other and the host's address on that bridge, and nothing else.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Context as _};

use super::command::run;

pub(crate) const BRIDGE: &str = "llmesh0";
/// The CNI network's name (containerd's cache files and netns bookkeeping carry it).
pub(crate) const NETWORK_NAME: &str = "llmesh-test";
/// The host's address on the bridge: the node's IP, where pods reach servers a test runs.
pub(crate) const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 244, 77, 1);
const PREFIX_LEN: u8 = 24;
/// The `kubernetes` Service's ClusterIP (the first of the API server's
/// `--service-cluster-ip-range`), put on the bridge so that the API server can listen there and
/// pods reach it through the one route they have besides their own subnet.
pub(crate) const API_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const SUBNET: &str = "10.244.77.0/24";
/// The first address pods get; `ip route get` on it must go through the bridge.
const FIRST_POD_ADDRESS: &str = "10.244.77.10";

/// Creates the bridge with the host's address, and checks that pod addresses are routed through
/// it before anything starts (a machine that already routes this subnet elsewhere is refused).
pub(crate) fn create() -> anyhow::Result<()> {
    let addresses = run("ip", &["-4", "-o", "addr", "show"])?;
    for taken in ["10.244.77.", "10.96.0."] {
        if addresses.contains(taken) {
            bail!("an interface already has an address in {taken}0/24; the node's network would overlap it:\n{addresses}");
        }
    }
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    let result = configure();
    if result.is_err() {
        delete();
    }
    result
}

fn configure() -> anyhow::Result<()> {
    let address = format!("{HOST_ADDRESS}/{PREFIX_LEN}");
    run("ip", &["addr", "add", &address, "dev", BRIDGE])?;
    run(
        "ip",
        &["addr", "add", &format!("{API_ADDRESS}/32"), "dev", BRIDGE],
    )?;
    // Nothing that arrives on the bridge may be forwarded elsewhere, whatever the host's
    // global setting.
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{BRIDGE}/forwarding"), "0")
        .context("turn off forwarding on the bridge")?;
    run("ip", &["link", "set", BRIDGE, "up"])?;
    let route = run("ip", &["-4", "route", "get", FIRST_POD_ADDRESS])?;
    if !route.split_whitespace().any(|word| word == BRIDGE) || route.contains(" via ") {
        bail!("pod addresses are not routed through {BRIDGE} (ip route get {FIRST_POD_ADDRESS}: {route})");
    }
    Ok(())
}

pub(crate) fn exists() -> bool {
    Path::new("/sys/class/net").join(BRIDGE).exists()
}

pub(crate) fn delete() {
    if exists() {
        let _ = run("ip", &["link", "del", BRIDGE]);
    }
}

/// The CNI configuration: the `bridge` plugin on our bridge, `isGateway: false` (pods get no
/// default route) and `ipMasq: false`; host-local addresses kept under `ipam_dir`. Besides their
/// subnet, pods get one route: to the API server's address, which is the host's own.
pub(crate) fn cni_config(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": NETWORK_NAME,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": false,
            "isDefaultGateway": false,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": SUBNET, "rangeStart": FIRST_POD_ADDRESS}]],
                "routes": [{"dst": format!("{API_ADDRESS}/32"), "gw": HOST_ADDRESS.to_string()}],
                "dataDir": ipam_dir,
            },
        }],
    })
    .to_string()
}
