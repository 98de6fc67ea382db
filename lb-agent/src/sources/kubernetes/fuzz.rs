//! The Kubernetes side of `crate::fuzz`: Service annotations translated, custom resources
//! decoded and planned, as the agent does with what the API server holds.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use super::{
    announce::{self as k8s_announce, Inputs},
    crd::{
        BGPAdvertisement, BGPAdvertisementSpec, BGPPeer, BGPPeerSpec, IPPool, IPPoolSpec,
        L2Advertisement, L2AdvertisementSpec,
    },
    ipam::Pool,
    translate::{self, Options},
};
use crate::model::DesiredState;

/// A LoadBalancer Service's annotations (`key=value` lines), translated with one ready
/// endpoint on this node: the desired state (`crate::fuzz` checks its invariants).
pub fn annotations(data: &[u8]) -> DesiredState {
    let text = String::from_utf8_lossy(data);
    let annotations: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (svc, slice, node) = objects(annotations);
    translate::translate(&[svc], &[slice], &[node], &options()).desired
}

/// A custom resource's spec (JSON), as each of weir's kinds: decoded leniently as the agent
/// reads them, then planned (pools, BGP, L2) for a node.
pub fn crd(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let mut pools = Vec::new();
    if let Ok(spec) = serde_json::from_value::<IPPoolSpec>(value.clone()) {
        let _ = Pool::from_spec("fuzz", &spec);
        let _ = Pool::frozen("fuzz", &spec);
        pools.push(IPPool::new("fuzz", spec));
    }
    let peers: Vec<BGPPeer> = serde_json::from_value::<BGPPeerSpec>(value.clone())
        .map(|s| BGPPeer::new("fuzz", s))
        .into_iter()
        .collect();
    let advertisements: Vec<BGPAdvertisement> =
        serde_json::from_value::<BGPAdvertisementSpec>(value.clone())
            .map(|s| BGPAdvertisement::new("fuzz", s))
            .into_iter()
            .collect();
    let l2: Vec<L2Advertisement> = serde_json::from_value::<L2AdvertisementSpec>(value)
        .map(|s| L2Advertisement::new("fuzz", s))
        .into_iter()
        .collect();
    let (svc, _, node) = objects(BTreeMap::new());
    let nodes = [std::sync::Arc::new(node)];
    let services = [std::sync::Arc::new(svc)];
    let inputs = Inputs {
        node: NODE,
        nodes: &nodes,
        peers: &peers,
        advertisements: &advertisements,
        l2_advertisements: &l2,
        pools: &pools,
        services: &services,
        secrets: &[],
        default_class: true,
    };
    let _ = k8s_announce::config(&inputs);
    let _ = k8s_announce::l2(&inputs);
}

/// The translation of the fuzz targets' Service without annotations (for the seeds' test).
pub fn example() -> DesiredState {
    let (svc, slice, node) = objects(BTreeMap::new());
    translate::translate(&[svc], &[slice], &[node], &options()).desired
}

const NODE: &str = "node-a";

/// Translation options of a node with Kubernetes defaults.
fn options() -> Options {
    Options {
        node: NODE.into(),
        default_class: true,
        table_size: 251,
        max_services: 4096,
        max_backends: 65536,
        source_nat: Default::default(),
        all_types: true,
        internal: true,
        nodeport_addresses: Vec::new(),
        local_addresses: Vec::new(),
    }
}

/// A dual-stack LoadBalancer Service `default/web` (TCP 80, UDP 53) with `annotations`, an
/// EndpointSlice with one ready endpoint of each family on this node, and this node.
fn objects(annotations: BTreeMap<String, String>) -> (Service, EndpointSlice, Node) {
    let svc = serde_json::json!({
        "metadata": {"name": "web", "namespace": "default", "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "198.18.200.10",
            "clusterIPs": ["198.18.200.10", "fd00:200::10"],
            "ipFamilies": ["IPv4", "IPv6"],
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053}
            ]
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.100.10"}, {"ip": "fd00:100::10"}]}}
    });
    let slice = serde_json::json!({
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["198.18.1.11"], "conditions": {"ready": true}, "nodeName": NODE}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 5353, "protocol": "UDP"}]
    });
    let node = serde_json::json!({
        "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.2.11"}]}
    });
    (
        serde_json::from_value(svc).expect("a Service"),
        serde_json::from_value(slice).expect("an EndpointSlice"),
        serde_json::from_value(node).expect("a Node"),
    )
}
