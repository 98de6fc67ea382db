use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{Node, Secret, Service},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};

use super::{Inputs, L2Plan, config, l2, router_id};
use crate::{
    announce::bgp::routes,
    announce::{RouteAttrs, Secret as Password},
    sources::kubernetes::{
        crd::{
            BGPAdvertisement, BGPAdvertisementSpec, BGPPeer, BGPPeerSpec, IPPool, IPPoolSpec,
            L2Advertisement, L2AdvertisementSpec, SecretKeyRef, Selection,
        },
        fixtures::{Svc, node_at},
    },
};

fn labelled(name: &str, ip: &str, labels: &[(&str, &str)]) -> Node {
    let mut n = node_at(name, &[ip]);
    n.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
    );
    n
}

fn selector(labels: &[(&str, &str)]) -> Option<LabelSelector> {
    Some(LabelSelector {
        match_labels: Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        ),
        match_expressions: None,
    })
}

fn peer(name: &str, spec: BGPPeerSpec) -> BGPPeer {
    BGPPeer::new(name, spec)
}

fn spec(address: &str, remote_as: u32) -> BGPPeerSpec {
    BGPPeerSpec {
        address: address.into(),
        remote_as,
        local_as: 64512,
        ..BGPPeerSpec::default()
    }
}

fn advert(name: &str, spec: BGPAdvertisementSpec) -> BGPAdvertisement {
    BGPAdvertisement::new(name, spec)
}

fn pool(name: &str, addresses: &[&str]) -> IPPool {
    IPPool::new(
        name,
        IPPoolSpec {
            addresses: addresses.iter().map(|a| (*a).to_string()).collect(),
            auto_assign: true,
            ..IPPoolSpec::default()
        },
    )
}

fn secret(name: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("weir".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

fn service(name: &str, ip: &str, labels: &[(&str, &str)]) -> Service {
    let mut s = Svc::lb("shop", name)
        .port("http", 80, "TCP")
        .ingress(ip)
        .build();
    s.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
    );
    s
}

struct World {
    nodes: Vec<Arc<Node>>,
    peers: Vec<BGPPeer>,
    adverts: Vec<BGPAdvertisement>,
    l2: Vec<L2Advertisement>,
    pools: Vec<IPPool>,
    services: Vec<Arc<Service>>,
    secrets: Vec<Secret>,
}

impl World {
    fn new() -> Self {
        Self {
            nodes: vec![
                Arc::new(labelled("n1", "198.18.2.11", &[("rack", "a")])),
                Arc::new(labelled("n2", "198.18.2.12", &[("rack", "b")])),
            ],
            peers: Vec::new(),
            adverts: Vec::new(),
            l2: Vec::new(),
            pools: vec![
                pool("public", &["198.18.100.0/28"]),
                pool("internal", &["198.18.101.0/28", "fd00:100::/120"]),
            ],
            services: vec![
                Arc::new(service("web", "198.18.100.1", &[("tier", "front")])),
                Arc::new(service("db", "198.18.101.1", &[("tier", "back")])),
                Arc::new(service("web6", "fd00:100::1", &[("tier", "front")])),
            ],
            secrets: vec![secret("bgp", "password", "s3cret\n")],
        }
    }

    fn inputs<'a>(&'a self, node: &'a str) -> Inputs<'a> {
        Inputs {
            node,
            nodes: &self.nodes,
            peers: &self.peers,
            advertisements: &self.adverts,
            l2_advertisements: &self.l2,
            pools: &self.pools,
            services: &self.services,
            secrets: &self.secrets,
            default_class: false,
        }
    }

    fn on(&self, node: &str) -> (Option<crate::announce::BgpConfig>, Vec<String>) {
        config(&self.inputs(node))
    }

    fn l2_on(&self, node: &str) -> (L2Plan, Vec<String>) {
        l2(&self.inputs(node))
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn all_vips() -> BTreeSet<IpAddr> {
    ["198.18.100.1", "198.18.101.1", "fd00:100::1"]
        .into_iter()
        .map(ip)
        .collect()
}

#[test]
fn no_peer_no_speaker_and_peers_without_advertisements_advertise_nothing() {
    let mut w = World::new();
    assert_eq!(w.on("n1"), (None, Vec::new()));
    w.peers.push(peer("tor", spec("198.18.2.254", 64513)));
    let (c, problems) = w.on("n1");
    assert!(problems.is_empty(), "{problems:?}");
    let c = c.expect("a speaker");
    assert_eq!(c.local_as, 64512);
    assert_eq!(c.router_id, Ipv4Addr::new(198, 18, 2, 11));
    assert_eq!(c.listen_port, 179);
    assert_eq!(c.peers.len(), 1);
    let p = &c.peers[0];
    assert_eq!(
        (p.address, p.remote_as, p.local_as, p.port),
        (ip("198.18.2.254"), 64513, Some(64512), 179)
    );
    assert_eq!(
        (p.hold_time, p.connect_retry, p.bfd, p.passive, p.multihop),
        (
            Duration::from_secs(9),
            Duration::from_secs(2),
            false,
            false,
            None
        )
    );
    // The session comes up; without an advertisement nothing is sent.
    let r = routes(&c, &all_vips());
    assert_eq!(r[&ip("198.18.2.254")], BTreeMap::new());
}

#[test]
fn node_selectors_choose_the_peers_and_the_advertisements_of_each_node() {
    let mut w = World::new();
    w.peers.push(peer(
        "tor-a",
        BGPPeerSpec {
            node_selector: selector(&[("rack", "a")]),
            ..spec("198.18.2.254", 64513)
        },
    ));
    w.peers.push(peer(
        "tor-b",
        BGPPeerSpec {
            node_selector: selector(&[("rack", "b")]),
            ..spec("198.18.2.253", 64513)
        },
    ));
    w.adverts.push(advert(
        "rack-a-only",
        BGPAdvertisementSpec {
            selection: Selection {
                node_selector: selector(&[("rack", "a")]),
                ..Selection::default()
            },
            communities: vec!["64512:1".into()],
            ..BGPAdvertisementSpec::default()
        },
    ));
    let (c1, p1) = w.on("n1");
    let (c2, p2) = w.on("n2");
    assert!(p1.is_empty() && p2.is_empty(), "{p1:?} {p2:?}");
    let (c1, c2) = (c1.unwrap(), c2.unwrap());
    assert_eq!(c1.peers[0].address, ip("198.18.2.254"));
    assert_eq!(c1.peers.len(), 1);
    assert_eq!(c2.peers[0].address, ip("198.18.2.253"));
    assert_eq!(c2.router_id, Ipv4Addr::new(198, 18, 2, 12));
    assert_eq!(c1.advertisements.len(), 1);
    assert!(c2.advertisements.is_empty(), "n2 is not in rack a");
    // A node the API does not know yet: no labels, so only unselective resources apply.
    assert_eq!(w.on("n3").0, None);
}

#[test]
fn pools_services_and_peers_narrow_an_advertisement_and_attributes_merge() {
    let mut w = World::new();
    w.peers.push(peer("tor", spec("198.18.2.254", 64512)));
    w.peers.push(peer("tor6", spec("fd00:2::fe", 64513)));
    w.adverts.push(advert(
        "public",
        BGPAdvertisementSpec {
            selection: Selection {
                ip_pools: vec!["public".into()],
                ..Selection::default()
            },
            communities: vec!["64512:100".into(), "no-export".into()],
            local_pref: Some(150),
            ..BGPAdvertisementSpec::default()
        },
    ));
    w.adverts.push(advert(
        "front",
        BGPAdvertisementSpec {
            selection: Selection {
                service_selector: selector(&[("tier", "front")]),
                ..Selection::default()
            },
            peers: vec!["tor".into(), "tor6".into()],
            communities: vec!["64512:200".into()],
            large_communities: vec!["64512:1:2".into()],
            local_pref: Some(120),
        },
    ));
    w.adverts.push(advert(
        "internal-to-tor6",
        BGPAdvertisementSpec {
            selection: Selection {
                ip_pools: vec!["internal".into()],
                ..Selection::default()
            },
            peers: vec!["tor6".into()],
            ..BGPAdvertisementSpec::default()
        },
    ));
    let (c, problems) = w.on("n1");
    assert!(problems.is_empty(), "{problems:?}");
    let c = c.unwrap();
    let r = routes(&c, &all_vips());
    let tor = &r[&ip("198.18.2.254")];
    // web (public pool, front): both advertisements, merged.
    assert_eq!(
        tor[&ip("198.18.100.1")],
        RouteAttrs {
            communities: vec![(64512 << 16) | 100, (64512 << 16) | 200, 0xFFFF_FF01],
            large_communities: vec![(64512, 1, 2)],
            local_pref: Some(150),
        }
    );
    // db is in the internal pool, which only goes to tor6; web6 is front.
    assert!(!tor.contains_key(&ip("198.18.101.1")));
    assert_eq!(tor[&ip("fd00:100::1")].communities, [(64512 << 16) | 200]);
    let tor6 = &r[&ip("fd00:2::fe")];
    assert_eq!(tor6[&ip("198.18.101.1")], RouteAttrs::default());
    assert_eq!(tor6[&ip("fd00:100::1")].local_pref, Some(120));
    // Only what this node can serve is advertised.
    let r = routes(&c, &BTreeSet::from([ip("198.18.101.1")]));
    assert!(r[&ip("198.18.2.254")].is_empty());
    assert_eq!(r[&ip("fd00:2::fe")].len(), 1);
}

#[test]
fn passwords_come_from_a_secret_in_the_agents_namespace() {
    let mut w = World::new();
    w.peers.push(peer(
        "tor",
        BGPPeerSpec {
            password_secret: Some(SecretKeyRef {
                name: "bgp".into(),
                key: None,
            }),
            hold_time: Some("30s".into()),
            connect_retry: Some("500ms".into()),
            passive: true,
            bfd: true,
            ..spec("198.18.2.254", 64513)
        },
    ));
    let (c, problems) = w.on("n1");
    assert!(problems.is_empty(), "{problems:?}");
    let p = &c.unwrap().peers[0];
    assert_eq!(
        p.password,
        Some(Password("s3cret".into())),
        "newline trimmed"
    );
    assert_eq!(p.hold_time, Duration::from_secs(30));
    assert_eq!(p.connect_retry, Duration::from_millis(500));
    assert!(p.passive && p.bfd);
}

#[test]
fn a_bad_resource_is_left_out_whole_with_a_message_and_the_rest_applies() {
    let mut w = World::new();
    w.peers.push(peer("good", spec("198.18.2.254", 64513)));
    w.peers.push(peer("bad-address", spec("not-an-ip", 64513)));
    w.peers.push(peer(
        "bad-timers",
        BGPPeerSpec {
            hold_time: Some("2s".into()),
            multihop: Some(0),
            ..spec("198.18.2.250", 0)
        },
    ));
    w.peers.push(peer(
        "no-secret",
        BGPPeerSpec {
            password_secret: Some(SecretKeyRef {
                name: "missing".into(),
                key: None,
            }),
            ..spec("198.18.2.251", 64513)
        },
    ));
    w.peers.push(peer(
        "no-key",
        BGPPeerSpec {
            password_secret: Some(SecretKeyRef {
                name: "bgp".into(),
                key: Some("md5".into()),
            }),
            ..spec("198.18.2.252", 64513)
        },
    ));
    w.peers.push(peer("twin", spec("198.18.2.254", 64513)));
    w.peers.push(peer(
        "bad-duration",
        BGPPeerSpec {
            connect_retry: Some("soon".into()),
            ..spec("198.18.2.249", 64513)
        },
    ));
    w.adverts.push(advert(
        "bad",
        BGPAdvertisementSpec {
            selection: Selection {
                ip_pools: vec!["nope".into()],
                ..Selection::default()
            },
            communities: vec!["70000:1".into()],
            large_communities: vec!["1:2".into()],
            ..BGPAdvertisementSpec::default()
        },
    ));
    w.adverts
        .push(advert("good", BGPAdvertisementSpec::default()));
    let (c, problems) = w.on("n1");
    let c = c.unwrap();
    assert_eq!(
        c.peers.iter().map(|p| p.address).collect::<Vec<_>>(),
        [ip("198.18.2.254")]
    );
    assert_eq!(c.advertisements.len(), 1, "the good one");
    let want = [
        "BGPAdvertisement bad: spec.communities[0]: \"70000:1\" is not a community",
        "spec.largeCommunities[0]: \"1:2\" is not a large community",
        "spec.ipPools[0]: no valid IPPool \"nope\"",
        "BGPPeer bad-address: spec.address: \"not-an-ip\" is not an IP address",
        "BGPPeer bad-duration: spec.connectRetry: \"soon\" is not a duration",
        "BGPPeer bad-timers: spec.remoteAS: 0 is not a usable AS number",
        "spec.holdTime: must be 0",
        "spec.multihop: is a TTL",
        "BGPPeer no-key: spec.passwordSecret: Secret \"bgp\" has no key \"md5\"",
        "BGPPeer no-secret: spec.passwordSecret: no Secret \"missing\" in the agents' namespace",
        "BGPPeer twin: spec.address: 198.18.2.254 is BGPPeer good's too",
    ];
    let all = problems.join("\n");
    for w in want {
        assert!(all.contains(w), "missing {w:?} in\n{all}");
    }
    assert_eq!(problems.len(), 7, "one line per resource: {problems:#?}");
}

#[test]
fn the_router_id_is_the_nodes_ipv4_address_or_a_number_from_its_name() {
    assert_eq!(
        router_id(Some(&node_at("n", &["fd00::1", "198.18.2.9"])), "n"),
        Ipv4Addr::new(198, 18, 2, 9)
    );
    let v6 = node_at("n", &["fd00::1"]);
    let a = router_id(Some(&v6), "node-a");
    let b = router_id(None, "node-b");
    assert!(!a.is_unspecified() && !b.is_unspecified() && a != b);
    assert_eq!(a, router_id(None, "node-a"), "stable");
}

#[test]
fn l2_advertisements_give_each_selected_node_its_addresses_and_its_gossip_peers() {
    let mut w = World::new();
    w.nodes
        .push(Arc::new(labelled("n3", "198.18.2.13", &[("rack", "a")])));
    // Nothing without an L2Advertisement.
    assert_eq!(
        w.l2_on("n1"),
        (
            L2Plan {
                vips: Some(BTreeSet::new()),
                peers: Vec::new()
            },
            Vec::new()
        )
    );
    w.l2.push(L2Advertisement::new(
        "rack-a-public",
        L2AdvertisementSpec {
            selection: Selection {
                ip_pools: vec!["public".into()],
                node_selector: selector(&[("rack", "a")]),
                ..Selection::default()
            },
        },
    ));
    let (p1, problems) = w.l2_on("n1");
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(p1.vips, Some(BTreeSet::from([ip("198.18.100.1")])));
    assert_eq!(p1.peers, [ip("198.18.2.13")], "the other rack-a node");
    // n2 is not selected: it answers for nothing, and does not gossip with anyone.
    let (p2, _) = w.l2_on("n2");
    assert_eq!(p2.vips, Some(BTreeSet::new()));
    assert_eq!(p2.peers, [ip("198.18.2.11"), ip("198.18.2.13")]);
    // An unselective one adds every address, on every node.
    w.l2.push(L2Advertisement::new("all", L2AdvertisementSpec::default()));
    let (p1, _) = w.l2_on("n1");
    assert_eq!(p1.vips, None, "every address");
    assert_eq!(p1.peers, [ip("198.18.2.12"), ip("198.18.2.13")]);
    // Services by label, and bad ones left out with their name.
    w.l2.clear();
    w.l2.push(L2Advertisement::new(
        "front",
        L2AdvertisementSpec {
            selection: Selection {
                service_selector: selector(&[("tier", "front")]),
                ..Selection::default()
            },
        },
    ));
    w.l2.push(L2Advertisement::new(
        "typo",
        L2AdvertisementSpec {
            selection: Selection {
                ip_pools: vec!["publik".into()],
                ..Selection::default()
            },
        },
    ));
    let (p2, problems) = w.l2_on("n2");
    assert_eq!(
        p2.vips,
        Some(BTreeSet::from([ip("198.18.100.1"), ip("fd00:100::1")]))
    );
    assert_eq!(
        problems,
        ["L2Advertisement typo: spec.ipPools[0]: no valid IPPool \"publik\""]
    );
}
