//! weir's custom resources (group `weir.dev`). The CRD manifests in `charts/` are generated
//! from these types (`lb-agent crds`), so the two cannot drift.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of addresses for Services of type LoadBalancer.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    shortname = "wip",
    status = "IPPoolStatus",
    printcolumn = r#"{"name":"Auto","type":"boolean","jsonPath":".spec.autoAssign"}"#,
    printcolumn = r#"{"name":"Assigned","type":"integer","jsonPath":".status.assigned"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.available"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// CIDRs (`198.18.100.0/28`, `fd00:100::/120`) and ranges (`198.18.100.10-198.18.100.20`),
    /// IPv4 and IPv6.
    pub addresses: Vec<String>,
    /// Hand addresses from this pool to Services that did not ask for a pool or an address.
    #[serde(default = "yes")]
    pub auto_assign: bool,
    /// Skip IPv4 addresses ending in .0 and .255, which some old clients and routers drop.
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,
    /// Which Services may take addresses from this pool (all, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Namespaces by name (any, when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Services by label (any, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// Addresses handed out.
    #[schemars(range(max = 9_007_199_254_740_991u64))]
    pub assigned: u64,
    /// Addresses left ("2^64 or more" for large IPv6 pools).
    pub available: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A BGP router that nodes peer with (BGP mode in Kubernetes). Each node whose labels match
/// `nodeSelector` runs a session with it and advertises what the BGPAdvertisements give it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "BGPPeer",
    plural = "bgppeers",
    shortname = "wbgp",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"Remote AS","type":"integer","jsonPath":".spec.remoteAS"}"#,
    printcolumn = r#"{"name":"Local AS","type":"integer","jsonPath":".spec.localAS"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    /// The peer's address, IPv4 or IPv6 (a peer carries the VIPs of its own family).
    pub address: String,
    /// The peer's AS number.
    #[serde(rename = "remoteAS")]
    #[schemars(range(min = 1, max = 4_294_967_295u32))]
    pub remote_as: u32,
    /// The nodes' AS number towards this peer (equal to `remoteAS`: internal BGP).
    #[serde(rename = "localAS")]
    #[schemars(range(min = 1, max = 4_294_967_295u32))]
    pub local_as: u32,
    /// The peer's TCP port (default 179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65_535))]
    pub port: Option<u16>,
    /// Proposed hold time: `0s` (no keepalives) or whole seconds from `3s` to `65535s`
    /// (default `9s`; the lower of both sides applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<String>,
    /// Wait between connection attempts, `100ms` to `10m` (default `2s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_retry: Option<String>,
    /// Run BFD (RFC 5880/5881, single hop, 100 ms × 3) beside the session.
    #[serde(default)]
    pub bfd: bool,
    /// eBGP multihop: the TTL of the session's packets, 1–255.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub multihop: Option<u8>,
    /// Wait for the peer to connect (to port 179 on the node) instead of connecting to it.
    #[serde(default)]
    pub passive: bool,
    /// TCP MD5 password (RFC 2385): a key of a Secret in the agents' namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
    /// The nodes that peer (every node, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key in its data (default `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Which addresses the nodes advertise over BGP, to which peers, with which attributes.
/// Without any BGPAdvertisement the sessions come up and nothing is advertised.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "BGPAdvertisement",
    plural = "bgpadvertisements",
    shortname = "wbgpa"
)]
#[serde(rename_all = "camelCase")]
pub struct BGPAdvertisementSpec {
    /// The addresses, and the nodes that advertise them.
    #[serde(flatten)]
    pub selection: Selection,
    /// The BGPPeers, by name, that get the routes (every peer of the node, when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// RFC 1997 communities: `AS:VALUE`, `no-export`, `no-advertise`, `no-export-subconfed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// RFC 8092 large communities: `A:B:C`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
    /// LOCAL_PREF towards internal peers (default 100; the highest wins where
    /// advertisements overlap, communities add up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 4_294_967_295u32))]
    pub local_pref: Option<u32>,
}

/// Which addresses the nodes announce on their L2 links (ARP, Neighbor Discovery): one node
/// at a time answers for each address, chosen among the selected nodes through the agents'
/// gossip. Without any L2Advertisement nothing is announced on L2.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "L2Advertisement",
    plural = "l2advertisements",
    shortname = "wl2a"
)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    /// The addresses, and the nodes that may answer for them.
    #[serde(flatten)]
    pub selection: Selection,
}

/// Which addresses an advertisement gives, and to which nodes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selection {
    /// The IPPools whose addresses are given (every address, when empty).
    #[serde(default, rename = "ipPools", skip_serializing_if = "Vec::is_empty")]
    pub ip_pools: Vec<String>,
    /// The Services whose addresses are given, by label (every Service, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    /// The nodes the advertisement applies to (every node, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// The CustomResourceDefinitions of weir, as YAML documents (`lb-agent crds`; the chart's
/// `crds/` holds this output, and a test fails when they differ).
pub fn crds_yaml() -> String {
    let docs = [
        serde_saphyr::to_string(&IPPool::crd()),
        serde_saphyr::to_string(&BGPPeer::crd()),
        serde_saphyr::to_string(&BGPAdvertisement::crd()),
        serde_saphyr::to_string(&L2Advertisement::crd()),
    ];
    let mut out = String::from("# Generated by `lb-agent crds`: do not edit.\n");
    for d in docs {
        out.push_str("---\n");
        out.push_str(&d.unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_charts_crds_are_the_generated_ones() {
        let committed = include_str!("../../../../charts/weir/crds/weir.dev.yaml");
        assert!(
            committed == super::crds_yaml(),
            "charts/weir/crds/weir.dev.yaml is stale: run `lb-agent crds > charts/weir/crds/weir.dev.yaml`"
        );
    }

    /// Every integer in the schemas has both bounds (or is an int64), so that the API server refuses a value
    /// the agent could not decode (one such object would otherwise fail its whole list).
    #[test]
    fn every_integer_is_bounded() {
        fn walk(v: &serde_json::Value, path: &str, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    // int64 is the API server's own integer: it refuses what does not fit.
                    if m.get("type").and_then(|t| t.as_str()) == Some("integer")
                        && m.get("format").and_then(|t| t.as_str()) != Some("int64")
                        && !(m.contains_key("minimum") && m.contains_key("maximum"))
                    {
                        out.push(path.to_string());
                    }
                    for (k, x) in m {
                        walk(x, &format!("{path}.{k}"), out);
                    }
                }
                serde_json::Value::Array(a) => {
                    for (i, x) in a.iter().enumerate() {
                        walk(x, &format!("{path}[{i}]"), out);
                    }
                }
                _ => {}
            }
        }
        use kube::CustomResourceExt as _;
        let mut unbounded = Vec::new();
        for crd in [
            super::IPPool::crd(),
            super::BGPPeer::crd(),
            super::BGPAdvertisement::crd(),
            super::L2Advertisement::crd(),
        ] {
            let v = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            walk(&v, &crd.spec.names.kind, &mut unbounded);
        }
        assert!(
            unbounded.is_empty(),
            "integers without bounds: {unbounded:?}"
        );
    }
}
