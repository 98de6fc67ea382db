//! Entry points for fuzzing: each takes arbitrary bytes and feeds them to one of the agent's
//! decoders of outside input, as the agent does, and panics only when an invariant breaks.
//! `fuzz/` runs them under `cargo fuzz` (`scripts/fuzz`); the unit tests replay the corpus
//! kept in `fuzz/corpus/<target>/` through them, so every input that once found a bug stays a
//! test.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    announce::{BgpPeerConfig, Secret, bfd, gossip},
    model::{DesiredState, Scope},
    sources::kubernetes::{
        announce::{self as k8s_announce, Inputs},
        crd::{
            BGPAdvertisement, BGPAdvertisementSpec, BGPPeer, BGPPeerSpec, IPPool, IPPoolSpec,
            L2Advertisement, L2AdvertisementSpec,
        },
        ipam::Pool,
        translate::{self, Options},
    },
};

/// A target: an input in, a panic only on a broken invariant.
pub type Target = fn(&[u8]);

/// The targets, by the name of their corpus folder.
pub const TARGETS: [(&str, Target); 7] = [
    ("config", config),
    ("annotations", annotations),
    ("crd", crd),
    ("gossip", gossip),
    ("bfd", bfd),
    ("bgp", bgp),
    ("http_probe", http_probe),
];

/// A standalone config file.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = crate::config::Config::parse(&text, "fuzz") {
        // What loads is what the data plane is given: its invariants hold.
        check_desired(&c.desired);
    }
}

/// A LoadBalancer Service's annotations (`key=value` lines), translated with one ready
/// endpoint on this node.
pub fn annotations(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let annotations: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (svc, slice, node) = objects(annotations);
    let t = translate::translate(&[svc], &[slice], &[node], &options());
    check_desired(&t.desired);
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
    let nodes = [node];
    let services = [svc];
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

/// A gossip datagram, authenticated with a key.
pub fn gossip(data: &[u8]) {
    let key = gossip::wire::Key::new(Some(b"fuzz-key"));
    if let Ok(hb) = gossip::decode(&key, data) {
        // Only what the key sealed opens.
        let sealed = key.seal(&serde_json::to_vec(&hb).expect("a heartbeat encodes"));
        assert_eq!(gossip::decode(&key, &sealed).ok(), Some(hb));
    }
}

/// A BFD control packet.
pub fn bfd(data: &[u8]) {
    if let Ok(p) = bfd::Packet::decode(data) {
        assert_eq!(
            bfd::Packet::decode(&p.encode()).ok(),
            Some(p),
            "a decoded packet encodes to itself"
        );
    }
}

/// Bytes from a BGP peer: split into messages as the session reads them, and an OPEN
/// negotiated.
pub fn bgp(data: &[u8]) {
    use rustbgpd_wire::{MAX_MESSAGE_LEN, Message};
    let mut buf = bytes::BytesMut::from(data);
    let ctx = crate::announce::bgp::session::Context {
        local_as: 64512,
        router_id: std::net::Ipv4Addr::new(198, 18, 2, 11),
        peer: BgpPeerConfig {
            address: "198.18.2.254".parse().expect("address"),
            remote_as: 64513,
            local_as: None,
            port: 179,
            password: Some(Secret("x".into())),
            hold_time: std::time::Duration::from_secs(9),
            connect_retry: std::time::Duration::from_secs(2),
            bfd: false,
            multihop: None,
            passive: false,
        },
        graceful: None,
        keep_routes: std::sync::Arc::default(),
    };
    while let Ok(Some(len)) = rustbgpd_wire::peek_message_length(&buf, MAX_MESSAGE_LEN) {
        if buf.len() < usize::from(len) || len == 0 {
            return;
        }
        let mut frame = buf.split_to(usize::from(len)).freeze();
        match rustbgpd_wire::decode_message(&mut frame, MAX_MESSAGE_LEN) {
            Ok(Message::Open(open)) => {
                let _ = crate::announce::bgp::session::negotiate(&ctx, &open);
            }
            Ok(_) => {}
            Err(e) => {
                let _ = e.to_notification();
                return;
            }
        }
    }
}

/// The first bytes of an HTTP health check's response.
pub fn http_probe(data: &[u8]) {
    if let Ok(Some(code)) = crate::health::probe::http_status(data) {
        assert!((100..=999).contains(&code), "status {code}");
    }
}

/// The data plane's invariants of a desired state: every frontend once, every backend of
/// its frontend's address family and listed once, source ranges of that family.
pub fn check_desired(d: &DesiredState) {
    let mut frontends = BTreeSet::new();
    for s in &d.services {
        let f = &s.frontend;
        assert!(
            frontends.insert((f.vip, f.port, f.protocol, f.scope)),
            "frontend {f:?} twice"
        );
        let mut addrs = BTreeSet::new();
        for b in &s.backends {
            assert_eq!(
                b.addr.is_ipv4(),
                f.vip.is_ipv4(),
                "{}: backend {} of another family than {}",
                s.name,
                b.addr,
                f.vip
            );
            assert!(addrs.insert(b.addr), "{}: backend {} twice", s.name, b.addr);
        }
        for r in &s.source_ranges {
            assert_eq!(r.addr().is_ipv4(), f.vip.is_ipv4(), "{}: range {r}", s.name);
        }
    }
    // A frontend of both scopes is one key per scope: `Both` never sits beside a scoped one.
    for s in &d.services {
        let f = &s.frontend;
        if f.scope == Scope::Both {
            assert!(
                !d.services.iter().any(|o| o.frontend.vip == f.vip
                    && o.frontend.port == f.port
                    && o.frontend.protocol == f.protocol
                    && o.frontend.scope != Scope::Both),
                "{f:?} beside a scoped frontend"
            );
        }
    }
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

#[cfg(test)]
mod tests;
