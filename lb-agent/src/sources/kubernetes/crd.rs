//! weir's custom resources (group `weir.dev`). The CRD manifests in `charts/` are generated
//! from these types (`lb-agent crds`), so the two cannot drift.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
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
    pub assigned: u64,
    /// Addresses left ("2^64 or more" for large IPv6 pools).
    pub available: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
