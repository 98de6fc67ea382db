use super::*;
use crate::{
    dataplane::{Programmer, fake::FakeMaps},
    sources::kubernetes::fixtures::*,
};

fn opts() -> Options {
    Options {
        node: "node-a".into(),
        default_class: false,
        table_size: 13,
        max_services: 4096,
        max_backends: 65536,
        source_nat: SourceNat::default(),
        all_types: false,
        internal: false,
        nodeport_addresses: Vec::new(),
        local_addresses: Vec::new(),
    }
}

fn nodes() -> Vec<Node> {
    vec![
        node_at("node-a", &["198.18.0.2", "fd00:18::2"]),
        node_at("node-b", &["198.18.0.3", "fd00:18::3"]),
    ]
}

/// `vip:port/proto → backends` for each model service, one line each.
fn lines(t: &Translation) -> Vec<String> {
    t.desired
        .services
        .iter()
        .map(|s| {
            let b: Vec<String> = s
                .backends
                .iter()
                .map(|b| format!("{}{}", b.addr, if b.snat { "(snat)" } else { "" }))
                .collect();
            let node = if s.node_address { " node" } else { "" };
            format!("{} {}{node} -> {}", s.name, s.frontend, b.join(" "))
        })
        .collect()
}

fn web_slice() -> EndpointSlice {
    Slice::of("shop", "web", "web-abc", "IPv4")
        .port("http", 8080, "TCP")
        .endpoint("198.18.1.11", "node-a", READY)
        .endpoint("198.18.1.12", "node-b", UNSET)
        .build()
}

#[test]
fn only_load_balancers_of_weirs_class_are_served() {
    let services = vec![
        Svc::lb("shop", "web")
            .port("http", 80, "TCP")
            .ingress("198.18.100.10")
            .build(),
        Svc::lb("shop", "other")
            .class(Some("example.com/lb"))
            .port("http", 80, "TCP")
            .ingress("198.18.100.11")
            .build(),
        Svc::lb("shop", "noclass")
            .class(None)
            .port("http", 80, "TCP")
            .ingress("198.18.100.12")
            .build(),
        Svc::lb("shop", "cluster-ip")
            .type_("ClusterIP")
            .port("http", 80, "TCP")
            .ingress("198.18.100.13")
            .build(),
        // Not allocated yet: nothing to serve, nothing wrong.
        Svc::lb("shop", "pending").port("http", 80, "TCP").build(),
    ];
    let t = translate(&services, &[] as &[EndpointSlice], &nodes(), &opts());
    let names: Vec<&str> = t.desired.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["shop/web"]);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    let mut o = opts();
    o.default_class = true;
    let t = translate(&services, &[] as &[EndpointSlice], &nodes(), &o);
    let names: Vec<&str> = t.desired.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["shop/noclass", "shop/web"]);
}

#[test]
fn every_port_and_family_is_a_frontend_with_its_resolved_target_port() {
    let svc = Svc::lb("shop", "web")
        .port("http", 80, "TCP")
        .port("metrics", 9090, "TCP")
        .port("dns", 53, "UDP")
        .ingress("198.18.100.10")
        .ingress("fd00:100::10")
        .build();
    let slices = vec![
        // The endpoints controller resolved the named target ports: http → 8080, metrics → 9100.
        Slice::of("shop", "web", "web-v4", "IPv4")
            .port("http", 8080, "TCP")
            .port("metrics", 9100, "TCP")
            .port("dns", 5353, "UDP")
            .endpoint("198.18.1.11", "node-a", READY)
            .build(),
        Slice::of("shop", "web", "web-v6", "IPv6")
            .port("http", 8080, "TCP")
            .port("metrics", 9100, "TCP")
            .port("dns", 5353, "UDP")
            .endpoint("fd00:1::11", "node-a", READY)
            .build(),
        // Another Service's slice with the same port names is ignored.
        Slice::of("shop", "api", "api-v4", "IPv4")
            .port("http", 7000, "TCP")
            .endpoint("198.18.1.99", "node-a", READY)
            .build(),
    ];
    let t = translate(&[svc], &slices, &nodes(), &opts());
    assert_eq!(
        lines(&t),
        [
            "shop/web 198.18.100.10:53/udp (external) -> 198.18.1.11:5353",
            "shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080",
            "shop/web 198.18.100.10:9090/tcp (external) -> 198.18.1.11:9100",
            "shop/web [fd00:100::10]:53/udp (external) -> [fd00:1::11]:5353",
            "shop/web [fd00:100::10]:80/tcp (external) -> [fd00:1::11]:8080",
            "shop/web [fd00:100::10]:9090/tcp (external) -> [fd00:1::11]:9100",
        ]
    );
}

#[test]
fn ready_endpoints_else_serving_terminating_ones() {
    let svc = Svc::lb("shop", "web")
        .port("http", 80, "TCP")
        .ingress("198.18.100.10")
        .build();
    let slice = |endpoints: &[(&str, Cond)]| {
        let mut s = Slice::of("shop", "web", "web-abc", "IPv4").port("http", 8080, "TCP");
        for (a, c) in endpoints {
            s = s.endpoint(a, "node-a", *c);
        }
        s.build()
    };
    let backends = |eps: &[(&str, Cond)]| {
        lines(&translate(
            std::slice::from_ref(&svc),
            &[slice(eps)],
            &nodes(),
            &opts(),
        ))
    };
    assert_eq!(
        backends(&[
            ("198.18.1.11", READY),
            ("198.18.1.12", UNSET),
            ("198.18.1.13", TERMINATING)
        ]),
        ["shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080 198.18.1.12:8080"]
    );
    // None ready: the terminating endpoints that still serve take the flows (kube-proxy).
    assert_eq!(
        backends(&[("198.18.1.13", TERMINATING), ("198.18.1.14", GONE)]),
        ["shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.13:8080"]
    );
    assert_eq!(
        backends(&[("198.18.1.14", GONE)]),
        ["shop/web 198.18.100.10:80/tcp (external) -> "]
    );
}

#[test]
fn local_policy_keeps_this_nodes_endpoints() {
    let svc = Svc::lb("shop", "web")
        .port("http", 80, "TCP")
        .ingress("198.18.100.10")
        .local()
        .build();
    let t = translate(
        std::slice::from_ref(&svc),
        &[web_slice()],
        &nodes(),
        &opts(),
    );
    assert_eq!(
        lines(&t),
        ["shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080"]
    );
    let mut b = opts();
    b.node = "node-b".into();
    let t = translate(&[svc], &[web_slice()], &nodes(), &b);
    assert_eq!(
        lines(&t),
        ["shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.12:8080"]
    );
}

#[test]
fn cluster_policy_uses_every_endpoint_and_source_nats_other_nodes() {
    let svc = Svc::lb("shop", "web")
        .port("http", 80, "TCP")
        .ingress("198.18.100.10")
        .build();
    let mut slice = web_slice();
    slice.endpoints.extend(
        Slice::of("shop", "web", "x", "IPv4")
            .endpoint_nowhere("198.18.1.13")
            .build()
            .endpoints,
    );
    let t = translate(
        std::slice::from_ref(&svc),
        &[slice.clone()],
        &nodes(),
        &opts(),
    );
    assert_eq!(
        lines(&t),
        [
            "shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080 198.18.1.12:8080(snat) 198.18.1.13:8080(snat)"
        ]
    );
    let nat = t.desired.source_nat.expect("source NAT settings");
    assert_eq!(
        nat.ipv4,
        Some("198.18.0.2".parse().unwrap()),
        "node-a's InternalIP"
    );
    assert_eq!(nat.ipv6, Some("fd00:18::2".parse().unwrap()));
    assert_eq!(nat.ports, model::DEFAULT_SOURCE_NAT_PORTS);

    // Configured addresses and ports win over the Node's.
    let mut o = opts();
    o.source_nat = SourceNat {
        ipv4: Some("198.18.7.7".parse().unwrap()),
        ipv6: None,
        ports: (62000, 62999),
    };
    let t = translate(std::slice::from_ref(&svc), &[slice.clone()], &nodes(), &o);
    let nat = t.desired.source_nat.unwrap();
    assert_eq!(nat.ipv4, Some("198.18.7.7".parse().unwrap()));
    assert_eq!(nat.ipv6, Some("fd00:18::2".parse().unwrap()));
    assert_eq!(nat.ports, (62000, 62999));

    // Local policy: this node's endpoints, nothing source-NATed, no settings needed.
    let local = Svc::lb("shop", "web")
        .port("http", 80, "TCP")
        .ingress("198.18.100.10")
        .local()
        .build();
    let t = translate(&[local], &[slice], &nodes(), &opts());
    assert_eq!(
        lines(&t),
        ["shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080"]
    );
    assert_eq!(t.desired.source_nat, None);
}

#[test]
fn without_a_source_nat_address_cluster_policy_prefers_this_nodes_endpoints() {
    let svc = Svc::lb("shop", "web")
        .port("http", 80, "TCP")
        .ingress("198.18.100.10")
        .build();
    let bare = vec![node("node-a", false), node("node-b", false)];
    // node-a has 198.18.1.11: only it (replies from node-b's endpoint would not come back).
    let t = translate(std::slice::from_ref(&svc), &[web_slice()], &bare, &opts());
    assert_eq!(
        lines(&t),
        ["shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080"]
    );
    assert_eq!(t.desired.source_nat, None);
    // node-c has none: every endpoint.
    let mut c = opts();
    c.node = "node-c".into();
    let t = translate(std::slice::from_ref(&svc), &[web_slice()], &bare, &c);
    assert_eq!(
        lines(&t),
        ["shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080 198.18.1.12:8080"]
    );
    // An IPv6 VIP on a node with only an IPv4 address: the same for that family.
    let v6 = Svc::lb("shop", "web6")
        .port("http", 80, "TCP")
        .ingress("fd00:100::10")
        .build();
    let slice6 = Slice::of("shop", "web6", "web6-abc", "IPv6")
        .port("http", 8080, "TCP")
        .endpoint("fd00:1::11", "node-a", READY)
        .endpoint("fd00:1::12", "node-b", READY)
        .build();
    let v4only = vec![node_at("node-a", &["198.18.0.2"])];
    let t = translate(&[v6], &[slice6], &v4only, &opts());
    assert_eq!(
        lines(&t),
        ["shop/web6 [fd00:100::10]:80/tcp (external) -> [fd00:1::11]:8080"]
    );
    // SCTP is never source-NATed: local endpoints first, as without an address.
    let sctp = Svc::lb("tel", "diameter")
        .port("diameter", 3868, "SCTP")
        .ingress("198.18.100.30")
        .build();
    let slice = Slice::of("tel", "diameter", "d-abc", "IPv4")
        .port("diameter", 3868, "SCTP")
        .endpoint("198.18.1.31", "node-a", READY)
        .endpoint("198.18.1.32", "node-b", READY)
        .build();
    let t = translate(&[sctp], &[slice], &nodes(), &opts());
    assert_eq!(
        lines(&t),
        ["tel/diameter 198.18.100.30:3868/sctp (external) -> 198.18.1.31:3868"]
    );
}

#[test]
fn affinity_and_source_ranges() {
    let svc = Svc::lb("shop", "web")
        .port("http", 80, "TCP")
        .ingress("198.18.100.10")
        .ingress("fd00:100::10")
        .affinity(None)
        .source_ranges(&["198.18.0.7/24", "fd00:18::/64"])
        .build();
    let t = translate(&[svc], &[] as &[EndpointSlice], &nodes(), &opts());
    let v4 = &t.desired.services[0];
    assert_eq!(v4.affinity_timeout, Some(DEFAULT_AFFINITY));
    assert_eq!(
        v4.source_ranges,
        ["198.18.0.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    let v6 = &t.desired.services[1];
    assert_eq!(
        v6.source_ranges,
        ["fd00:18::/64".parse::<ipnet::IpNet>().unwrap()]
    );

    let timed = Svc::lb("shop", "web")
        .port("http", 80, "TCP")
        .ingress("198.18.100.10")
        .affinity(Some(60))
        .build();
    let t = translate(&[timed], &[] as &[EndpointSlice], &nodes(), &opts());
    assert_eq!(
        t.desired.services[0].affinity_timeout,
        Some(Duration::from_mins(1))
    );
}

#[test]
fn a_bad_service_is_reported_and_leaves_the_others_alone() {
    let services = vec![
        Svc::lb("shop", "bad-ranges")
            .port("http", 80, "TCP")
            .ingress("198.18.100.10")
            .source_ranges(&["everyone"])
            .build(),
        Svc::lb("shop", "bad-check")
            .port("http", 80, "TCP")
            .ingress("198.18.100.11")
            .annotation("weir.dev/health-check", "http")
            .annotation("weir.dev/health-check-interval", "often")
            .build(),
        Svc::lb("shop", "good")
            .port("http", 80, "TCP")
            .ingress("198.18.100.12")
            .annotation("weir.dev/health-check", "tcp")
            .build(),
        // Same VIP and port as `good`, later by name: refused.
        Svc::lb("shop", "late")
            .port("http", 80, "TCP")
            .ingress("198.18.100.12")
            .build(),
    ];
    let t = translate(&services, &[] as &[EndpointSlice], &nodes(), &opts());
    let served: Vec<(&str, bool)> = t
        .desired
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.health_check.is_some()))
        .collect();
    assert_eq!(served, [("shop/bad-check", false), ("shop/good", true)]);
    let p = |k: &str| t.problems[k].join("; ");
    assert!(
        p("shop/bad-ranges")
            .contains("spec.loadBalancerSourceRanges[0]: \"everyone\" is not a CIDR"),
        "{}",
        p("shop/bad-ranges")
    );
    assert!(
        p("shop/bad-check").contains("weir.dev/health-check-interval"),
        "{}",
        p("shop/bad-check")
    );
    assert!(p("shop/bad-check").contains("served without a health check"));
    assert!(
        p("shop/late").contains("198.18.100.12:80/tcp (external) is already served by shop/good"),
        "{}",
        p("shop/late")
    );
    assert!(!t.problems.contains_key("shop/good"));
}

#[test]
fn an_excluded_node_serves_nothing() {
    let svc = Svc::lb("shop", "web")
        .port("http", 80, "TCP")
        .ingress("198.18.100.10")
        .build();
    let t = translate(&[svc], &[web_slice()], &[node("node-a", true)], &opts());
    assert!(t.excluded);
    assert!(t.desired.services.is_empty());
}

/// The whole pipeline: objects → translation → programmer → the fake data plane's dump.
#[test]
fn the_pipeline_programs_the_fake_data_plane() {
    let services = vec![
        Svc::lb("shop", "web")
            .port("http", 80, "TCP")
            .ingress("198.18.100.10")
            .build(),
        Svc::lb("shop", "dns")
            .port("dns", 53, "UDP")
            .ingress("198.18.100.20")
            .local()
            .build(),
    ];
    let slices = vec![
        web_slice(),
        Slice::of("shop", "dns", "dns-abc", "IPv4")
            .port("dns", 5353, "UDP")
            .endpoint("198.18.1.21", "node-a", READY)
            .endpoint("198.18.1.22", "node-b", READY)
            .build(),
    ];
    let t = translate(&services, &slices, &nodes(), &opts());
    let limits = crate::dataplane::DataplaneLimits::default();
    let mut programmer = Programmer::new(&limits, 0);
    let mut maps = FakeMaps::default();
    programmer.apply(&t.desired, &mut maps).unwrap();
    // On node-a: web (Cluster) gets both endpoints, node-b's (198.18.1.12) source-NATed
    // (flags=3: present + snat) to node-a's InternalIPs; dns (Local) only its local one.
    assert_eq!(
        maps.dump(),
        "\
service 198.18.100.10:80 external proto=6 id=1 size=13 flags=0 affinity=0s table 1:7 2:6
service 198.18.100.20:53 external proto=17 id=2 size=13 flags=0 affinity=0s table 3:13
backend 1 198.18.1.11:8080 gen=1 flags=1
backend 2 198.18.1.12:8080 gen=1 flags=3
backend 3 198.18.1.21:5353 gen=1 flags=1
vip 198.18.100.10
vip 198.18.100.20
endpoint 198.18.1.11:8080 proto=6 -> 198.18.100.10:80 service=1 backend=1
endpoint 198.18.1.12:8080 proto=6 -> 198.18.100.10:80 service=1 backend=2
endpoint 198.18.1.21:5353 proto=17 -> 198.18.100.20:53 service=2 backend=3
snat 198.18.0.2 fd00:18::2 ports=61000-65535
vip_filter[22227]=1
vip_filter[22689]=1
vip_filter[27077]=1
vip_filter[28321]=1
"
    );
}

#[test]
fn what_does_not_fit_the_data_plane_is_reported_and_the_rest_is_served() {
    let services: Vec<Service> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            Svc::lb("shop", n)
                .port("http", 80, "TCP")
                .port("https", 443, "TCP")
                .ingress(&format!("198.18.100.{}", 10 + i))
                .build()
        })
        .collect();
    // Room for 5 frontends (ids 1..5): a and b (2 each) fit, c does not.
    let mut o = opts();
    o.max_services = 6;
    let t = translate(&services, &[] as &[EndpointSlice], &nodes(), &o);
    let names: BTreeSet<&str> = t.desired.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["shop/a", "shop/b"]));
    assert!(
        t.problems["shop/c"][0].contains("data plane is full"),
        "{:?}",
        t.problems
    );
}

/// kube-proxy replacement on node-a (zone z1; node-b is in z2), the socket hooks attached.
fn kpr() -> Options {
    Options {
        all_types: true,
        internal: true,
        ..opts()
    }
}

fn zoned_nodes() -> Vec<Node> {
    vec![
        node_in("node-a", &["198.18.0.2", "fd00:18::2"], "z1"),
        node_in("node-b", &["198.18.0.3", "fd00:18::3"], "z2"),
    ]
}

/// Every Service type and policy, as kube-proxy serves it (its `CategorizeEndpoints` and the
/// iptables proxier's chains): a cluster IP for in-cluster clients only, by
/// internalTrafficPolicy; external addresses (LoadBalancer ingress, externalIPs, NodePorts on
/// the node's addresses) by externalTrafficPolicy for outside clients and by every endpoint
/// for in-cluster ones (kube-proxy's short-circuit of pod and node traffic). One frontend of
/// both scopes when both get the same endpoints.
#[test]
fn every_service_type_and_policy_like_kube_proxy() {
    type Build = fn() -> Svc;
    fn web() -> Svc {
        Svc::of_type("shop", "web", "ClusterIP", &["198.18.200.1"])
    }
    fn np() -> Svc {
        Svc::of_type("shop", "web", "NodePort", &["198.18.200.1"])
    }
    fn lb() -> Svc {
        Svc::of_type("shop", "web", "LoadBalancer", &["198.18.200.1"])
    }
    const CIP: &str =
        "shop/web 198.18.200.1:80/tcp (internal) -> 198.18.1.11:8080 198.18.1.12:8080";
    const CIP_LOCAL: &str = "shop/web 198.18.200.1:80/tcp (internal) -> 198.18.1.11:8080";
    let table: Vec<(&str, Build, Vec<&str>)> = vec![
        ("ClusterIP", || web().port("http", 80, "TCP"), vec![CIP]),
        (
            "ClusterIP, internalTrafficPolicy Local",
            || web().port("http", 80, "TCP").internal_local(),
            vec![CIP_LOCAL],
        ),
        (
            "NodePort, externalTrafficPolicy Cluster: other nodes' endpoints source-NATed",
            || np().port("http", 80, "TCP").node_port(30080),
            vec![
                CIP,
                "shop/web 198.18.0.2:30080/tcp node -> 198.18.1.11:8080 198.18.1.12:8080(snat)",
            ],
        ),
        (
            "NodePort, externalTrafficPolicy Local: outside clients this node's endpoints, \
             in-cluster clients every endpoint",
            || np().port("http", 80, "TCP").node_port(30080).local(),
            vec![
                CIP,
                "shop/web 198.18.0.2:30080/tcp (external) node -> 198.18.1.11:8080",
                "shop/web 198.18.0.2:30080/tcp (internal) node -> 198.18.1.11:8080 198.18.1.12:8080",
            ],
        ),
        (
            "LoadBalancer of another class: its address, cluster IP and NodePort",
            || {
                lb().port("http", 80, "TCP")
                    .node_port(30080)
                    .class(Some("example.com/lb"))
                    .ingress("198.18.100.10")
            },
            vec![
                "shop/web 198.18.0.2:30080/tcp node -> 198.18.1.11:8080 198.18.1.12:8080(snat)",
                "shop/web 198.18.100.10:80/tcp -> 198.18.1.11:8080 198.18.1.12:8080(snat)",
                CIP,
            ],
        ),
        (
            "LoadBalancer without node ports (allocateLoadBalancerNodePorts: false)",
            || {
                lb().port("http", 80, "TCP")
                    .ingress("198.18.100.10")
                    .local()
            },
            vec![
                "shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080",
                "shop/web 198.18.100.10:80/tcp (internal) -> 198.18.1.11:8080 198.18.1.12:8080",
                CIP,
            ],
        ),
        (
            "LoadBalancer, both policies Local",
            || {
                lb().port("http", 80, "TCP")
                    .ingress("198.18.100.10")
                    .local()
                    .internal_local()
            },
            vec![
                "shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080",
                "shop/web 198.18.100.10:80/tcp (internal) -> 198.18.1.11:8080 198.18.1.12:8080",
                CIP_LOCAL,
            ],
        ),
        (
            "an address whose load balancer proxies (ipMode: Proxy) is left alone",
            || {
                lb().port("http", 80, "TCP")
                    .ingress_mode("198.18.100.10", "Proxy")
                    .node_port(30080)
            },
            vec![
                "shop/web 198.18.0.2:30080/tcp node -> 198.18.1.11:8080 198.18.1.12:8080(snat)",
                CIP,
            ],
        ),
        (
            "externalIPs, externalTrafficPolicy Local",
            || {
                web()
                    .port("http", 80, "TCP")
                    .external_ips(&["198.18.100.20"])
                    .local()
            },
            vec![
                "shop/web 198.18.100.20:80/tcp (external) -> 198.18.1.11:8080",
                "shop/web 198.18.100.20:80/tcp (internal) -> 198.18.1.11:8080 198.18.1.12:8080",
                CIP,
            ],
        ),
        (
            "ExternalName: DNS only",
            || Svc::of_type("shop", "web", "ExternalName", &[]).port("http", 80, "TCP"),
            vec![],
        ),
        (
            "headless: DNS only",
            || Svc::of_type("shop", "web", "ClusterIP", &["None"]).port("http", 80, "TCP"),
            vec![],
        ),
        (
            "a port without endpoints: refused, not sent elsewhere",
            || web().port("metrics", 9090, "TCP"),
            vec!["shop/web 198.18.200.1:9090/tcp (internal) -> "],
        ),
    ];
    let slices = [web_slice()];
    for (what, build, mut want) in table {
        let t = translate(&[build().build()], &slices, &zoned_nodes(), &kpr());
        // In the translation's order: by frontend.
        want.sort_unstable();
        let mut got = lines(&t);
        got.sort();
        assert_eq!(got, want, "{what}");
        assert!(t.problems.is_empty(), "{what}: {:?}", t.problems);
    }
}

#[test]
fn node_ports_on_each_allowed_address_of_the_services_families() {
    let svc = Svc::of_type("shop", "web", "NodePort", &["198.18.200.1", "fd00:200::1"])
        .port("http", 80, "TCP")
        .node_port(30080)
        .build();
    let slices = [
        web_slice(),
        Slice::of("shop", "web", "web-v6", "IPv6")
            .port("http", 8080, "TCP")
            .endpoint("fd00:1::11", "node-a", READY)
            .build(),
    ];
    let nodes = vec![node_in("node-a", &["198.18.0.2", "fd00:18::2"], "z1")];
    let mut o = kpr();
    let node_lines = |o: &Options| -> Vec<String> {
        let t = translate(std::slice::from_ref(&svc), &slices, &nodes, o);
        t.desired
            .services
            .iter()
            .filter(|s| s.node_address)
            .map(|s| s.frontend.to_string())
            .collect()
    };
    // Default: the Node's InternalIPs (kube-proxy's `primary`).
    assert_eq!(
        node_lines(&o),
        ["198.18.0.2:30080/tcp", "[fd00:18::2]:30080/tcp"]
    );
    // node.nodeport_addresses: the node's own addresses inside the prefixes.
    o.nodeport_addresses = vec!["198.18.0.0/24".parse().unwrap()];
    o.local_addresses = vec![
        "198.18.0.9".parse().unwrap(),
        "198.19.0.1".parse().unwrap(),
        "fd00:18::2".parse().unwrap(),
    ];
    assert_eq!(
        node_lines(&o),
        ["198.18.0.2:30080/tcp", "198.18.0.9:30080/tcp"]
    );
    // A single-stack Service: its family only.
    let v4 = Svc::of_type("shop", "web", "NodePort", &["198.18.200.1"])
        .port("http", 80, "TCP")
        .node_port(30080)
        .build();
    let t = translate(&[v4], &slices, &nodes, &kpr());
    assert!(
        t.desired.services.iter().all(|s| s.frontend.vip.is_ipv4()),
        "{:?}",
        lines(&t)
    );
}

/// kube-proxy's topology rules: hints are used when every ready endpoint has one and one is
/// for this node's zone (or this node); otherwise every endpoint. Traffic to this node's
/// endpoints only (Local policies) ignores them.
#[test]
fn topology_hints_and_when_they_are_ignored() {
    let svc = Svc::of_type("shop", "web", "NodePort", &["198.18.200.1"])
        .port("http", 80, "TCP")
        .node_port(30080)
        .build();
    let slice = |eps: &[(&str, &str, &[&str], &[&str])]| {
        let mut s = Slice::of("shop", "web", "web-abc", "IPv4").port("http", 8080, "TCP");
        for (addr, node, zones, nodes) in eps {
            s = s.endpoint_hinted(addr, node, zones, nodes);
        }
        vec![s.build()]
    };
    let cluster_ip = |slices: &[EndpointSlice], nodes: &[Node]| -> String {
        let t = translate(std::slice::from_ref(&svc), slices, nodes, &kpr());
        let s = t
            .desired
            .services
            .iter()
            .find(|s| s.frontend.vip.to_string() == "198.18.200.1")
            .unwrap();
        s.backends
            .iter()
            .map(|b| b.addr.ip().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let hinted = slice(&[
        ("198.18.1.11", "node-b", &["z1"], &[]),
        ("198.18.1.12", "node-b", &["z2"], &[]),
        ("198.18.1.13", "node-c", &["z1"], &[]),
    ]);
    assert_eq!(
        cluster_ip(&hinted, &zoned_nodes()),
        "198.18.1.11 198.18.1.13",
        "same zone"
    );
    let one_unhinted = slice(&[
        ("198.18.1.11", "node-b", &["z1"], &[]),
        ("198.18.1.12", "node-b", &[], &[]),
    ]);
    assert_eq!(
        cluster_ip(&one_unhinted, &zoned_nodes()),
        "198.18.1.11 198.18.1.12",
        "an endpoint without a hint"
    );
    let no_zone = vec![node_at("node-a", &["198.18.0.2"])];
    assert_eq!(
        cluster_ip(&hinted, &no_zone),
        "198.18.1.11 198.18.1.12 198.18.1.13",
        "a node without a zone label"
    );
    let other_zones = slice(&[
        ("198.18.1.11", "node-b", &["z2"], &[]),
        ("198.18.1.12", "node-b", &["z3"], &[]),
    ]);
    assert_eq!(
        cluster_ip(&other_zones, &zoned_nodes()),
        "198.18.1.11 198.18.1.12",
        "no endpoint for this zone"
    );
    let same_node = slice(&[
        ("198.18.1.11", "node-a", &["z1"], &["node-a"]),
        ("198.18.1.12", "node-b", &["z1"], &["node-b"]),
    ]);
    assert_eq!(
        cluster_ip(&same_node, &zoned_nodes()),
        "198.18.1.11",
        "node hints (PreferSameNode)"
    );
    // Hinted endpoints that are not ready: the serving, terminating ones anywhere.
    let mut terminating = Slice::of("shop", "web", "web-abc", "IPv4").port("http", 8080, "TCP");
    terminating = terminating
        .endpoint("198.18.1.11", "node-b", TERMINATING)
        .endpoint("198.18.1.12", "node-b", TERMINATING);
    assert_eq!(
        cluster_ip(&[terminating.build()], &zoned_nodes()),
        "198.18.1.11 198.18.1.12",
        "terminating fallback"
    );
    // externalTrafficPolicy Local: this node's endpoints whatever their hints.
    let local = Svc::of_type("shop", "web", "NodePort", &["198.18.200.1"])
        .port("http", 80, "TCP")
        .node_port(30080)
        .local()
        .build();
    let hinted_away = slice(&[
        ("198.18.1.11", "node-a", &["z2"], &[]),
        ("198.18.1.12", "node-b", &["z1"], &[]),
    ]);
    let t = translate(&[local], &hinted_away, &zoned_nodes(), &kpr());
    assert!(
        lines(&t).contains(
            &"shop/web 198.18.0.2:30080/tcp (external) node -> 198.18.1.11:8080".to_string()
        ),
        "{:?}",
        lines(&t)
    );
}

/// Beside kube-proxy (`kube_proxy_replacement: false`) only weir's LoadBalancer addresses;
/// with the socket hooks, in-cluster clients of those addresses too.
#[test]
fn beside_kube_proxy_only_weirs_load_balancer_addresses() {
    let services = vec![
        Svc::of_type("shop", "web", "LoadBalancer", &["198.18.200.1"])
            .class(Some(CLASS))
            .port("http", 80, "TCP")
            .node_port(30080)
            .ingress("198.18.100.10")
            .external_ips(&["198.18.100.20"])
            .local()
            .health_check_node_port(30123)
            .build(),
        Svc::of_type("shop", "api", "ClusterIP", &["198.18.200.2"])
            .port("http", 80, "TCP")
            .build(),
    ];
    let slices = [web_slice()];
    let t = translate(&services, &slices, &zoned_nodes(), &opts());
    assert_eq!(
        lines(&t),
        ["shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080"]
    );
    // kube-proxy binds the health-check node ports: weir leaves them to it.
    assert!(t.health_node_ports.is_empty());
    let mut o = opts();
    o.internal = true;
    let t = translate(&services, &slices, &zoned_nodes(), &o);
    assert_eq!(
        lines(&t),
        [
            "shop/web 198.18.100.10:80/tcp (external) -> 198.18.1.11:8080",
            "shop/web 198.18.100.10:80/tcp (internal) -> 198.18.1.11:8080 198.18.1.12:8080",
        ]
    );
    let t = translate(&services, &slices, &zoned_nodes(), &kpr());
    assert_eq!(
        t.health_node_ports,
        [(30123, "shop/web".to_string())].into()
    );
}

/// A node out of external load balancing keeps serving its in-cluster clients.
#[test]
fn an_excluded_node_keeps_its_cluster_ips() {
    let svc = Svc::of_type("shop", "web", "LoadBalancer", &["198.18.200.1"])
        .port("http", 80, "TCP")
        .node_port(30080)
        .ingress("198.18.100.10")
        .build();
    let mut nodes = zoned_nodes();
    nodes[0] = node("node-a", true);
    let t = translate(&[svc], &[web_slice()], &nodes, &kpr());
    assert!(t.excluded);
    assert_eq!(
        lines(&t),
        ["shop/web 198.18.200.1:80/tcp (internal) -> 198.18.1.11:8080 198.18.1.12:8080"]
    );
}

/// Source ranges guard a LoadBalancer address from outside clients; NodePorts, external IPs
/// and in-cluster clients are not theirs (as with kube-proxy).
#[test]
fn source_ranges_apply_to_load_balancer_addresses_from_outside() {
    let svc = Svc::of_type("shop", "web", "LoadBalancer", &["198.18.200.1"])
        .port("http", 80, "TCP")
        .node_port(30080)
        .ingress("198.18.100.10")
        .external_ips(&["198.18.100.20"])
        .local()
        .source_ranges(&["198.18.50.0/24"])
        .build();
    let t = translate(&[svc], &[web_slice()], &zoned_nodes(), &kpr());
    let ranged: Vec<String> = t
        .desired
        .services
        .iter()
        .filter(|s| !s.source_ranges.is_empty())
        .map(|s| s.frontend.to_string())
        .collect();
    assert_eq!(ranged, ["198.18.100.10:80/tcp (external)"]);
}

/// Two Services on one address and port: the first by name keeps it, per scope.
#[test]
fn an_address_taken_by_another_service_is_reported() {
    let a = Svc::of_type("shop", "a", "ClusterIP", &["198.18.200.1"])
        .port("http", 80, "TCP")
        .external_ips(&["198.18.100.20"])
        .local()
        .build();
    let b = Svc::of_type("shop", "b", "ClusterIP", &["198.18.200.2"])
        .port("http", 80, "TCP")
        .external_ips(&["198.18.100.20"])
        .build();
    let t = translate(&[b, a], &[] as &[EndpointSlice], &zoned_nodes(), &kpr());
    assert!(
        t.problems["shop/b"]
            .join("; ")
            .contains("198.18.100.20:80/tcp is already served by shop/a"),
        "{:?}",
        t.problems
    );
    assert!(
        lines(&t)
            .iter()
            .any(|l| l.starts_with("shop/b 198.18.200.2:80/tcp (internal)")),
        "the rest of shop/b is served: {:?}",
        lines(&t)
    );
}

/// Translation invariants over random clusters (`crate::fuzz::check_desired`): every
/// frontend once, every backend of its frontend's family and once, whatever mix of Service
/// types, shared addresses, families, ports, policies, endpoints (of either family, on this
/// node or another, ready or not) and source ranges the API holds.
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// One Service: (type, ingress addresses, ports (port, protocol), local policy,
    /// endpoints (address index, family, this node, ready), source ranges, node port base).
    type Spec = (
        u8,
        Vec<u8>,
        Vec<(u16, u8)>,
        bool,
        Vec<(u8, bool, bool, bool)>,
        Vec<u8>,
        bool,
    );

    const INGRESS: [&str; 6] = [
        "198.18.100.10",
        "198.18.100.11",
        "fd00:100::10",
        "fd00:100::11",
        "198.18.0.2",
        "not-an-ip",
    ];
    const RANGES: [&str; 5] = [
        "198.18.0.0/16",
        "fd00::/8",
        "198.18.0.1/32",
        "0.0.0.0/0",
        "garbage",
    ];
    const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

    fn spec() -> impl Strategy<Value = Spec> {
        (
            0u8..4,
            proptest::collection::vec(0u8..6, 0..3),
            proptest::collection::vec(
                (prop_oneof![Just(80u16), Just(53), Just(443)], 0u8..3),
                1..3,
            ),
            any::<bool>(),
            proptest::collection::vec((0u8..4, any::<bool>(), any::<bool>(), any::<bool>()), 0..5),
            proptest::collection::vec(0u8..5, 0..3),
            any::<bool>(),
        )
    }

    fn build(i: usize, s: &Spec) -> (Service, Vec<EndpointSlice>) {
        let (kind, ingress, ports, local, endpoints, ranges, node_port) = s;
        let name = format!("svc{i}");
        let cluster = [
            format!("198.18.200.{}", 10 + i),
            format!("fd00:200::{:x}", 10 + i),
        ];
        let mut svc = match kind {
            0 => Svc::lb("default", &name),
            1 => Svc::of_type("default", &name, "ClusterIP", &[&cluster[0], &cluster[1]]),
            2 => Svc::of_type("default", &name, "NodePort", &[&cluster[0]]),
            _ => Svc::of_type("default", &name, "LoadBalancer", &[&cluster[1]]),
        };
        for (j, (port, proto)) in ports.iter().enumerate() {
            svc = svc.port(
                &format!("p{j}"),
                i32::from(*port),
                PROTOCOLS[usize::from(*proto)],
            );
            if *node_port {
                svc = svc.node_port(30000 + i32::try_from(i * 4 + j).unwrap());
            }
        }
        for a in ingress {
            svc = svc.ingress(INGRESS[usize::from(*a)]);
        }
        if *local {
            svc = svc.local();
        }
        let r: Vec<&str> = ranges.iter().map(|r| RANGES[usize::from(*r)]).collect();
        if !r.is_empty() {
            svc = svc.source_ranges(&r);
        }
        let mut slices = Vec::new();
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let mut slice = Slice::of("default", &name, &format!("{name}-{family}"), family);
            for (j, (port, proto)) in ports.iter().enumerate() {
                slice = slice.port(
                    &format!("p{j}"),
                    i32::from(*port) + 8000,
                    PROTOCOLS[usize::from(*proto)],
                );
            }
            for (addr, in_v6, here, ready) in endpoints {
                // An endpoint of the other family in this slice, now and then: the API
                // allows nothing of the kind, but a translation must not trust it.
                let addr = if *in_v6 == v6 || *addr == 3 {
                    if *in_v6 {
                        format!("fd00:1::{}", 10 + addr)
                    } else {
                        format!("198.18.1.{}", 10 + addr)
                    }
                } else {
                    continue;
                };
                let node = if *here { "node-a" } else { "node-b" };
                slice = slice.endpoint(&addr, node, if *ready { READY } else { TERMINATING });
            }
            slices.push(slice.build());
        }
        (svc.build(), slices)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn every_frontend_once_and_backends_of_its_family(
            specs in proptest::collection::vec(spec(), 1..6),
            all_types in any::<bool>(),
        ) {
            let mut services = Vec::new();
            let mut slices = Vec::new();
            for (i, s) in specs.iter().enumerate() {
                let (svc, sl) = build(i, s);
                services.push(svc);
                slices.extend(sl);
            }
            let mut o = opts();
            o.default_class = true;
            o.all_types = all_types;
            o.internal = all_types;
            let t = translate(&services, &slices, &nodes(), &o);
            crate::fuzz::check_desired(&t.desired);
        }

        /// A translation that reuses the one before (objects kept, replaced, added and
        /// removed between the two) is the translation from scratch, and a Service whose
        /// objects were kept gives the very services it gave before.
        #[test]
        fn a_memo_gives_what_a_translation_from_scratch_gives(
            before in proptest::collection::vec(spec(), 1..6),
            after in proptest::collection::vec(spec(), 1..6),
            keep in proptest::collection::vec(any::<bool>(), 6),
            all_types in any::<bool>(),
        ) {
            let arcs = |(svc, slices): (Service, Vec<EndpointSlice>)| {
                (Arc::new(svc), slices.into_iter().map(Arc::new).collect::<Vec<_>>())
            };
            let first: Vec<_> = before.iter().enumerate().map(|(i, s)| arcs(build(i, s))).collect();
            let second: Vec<_> = after
                .iter()
                .enumerate()
                .map(|(i, s)| match first.get(i) {
                    Some(kept) if keep[i] => kept.clone(),
                    _ => arcs(build(i, s)),
                })
                .collect();
            let flat = |objects: &[(Arc<Service>, Vec<Arc<EndpointSlice>>)]| {
                let services: Vec<Arc<Service>> = objects.iter().map(|o| o.0.clone()).collect();
                let slices: Vec<Arc<EndpointSlice>> =
                    objects.iter().flat_map(|o| o.1.iter().cloned()).collect();
                (services, slices)
            };
            let mut o = opts();
            o.default_class = true;
            o.all_types = all_types;
            o.internal = all_types;
            let nodes: Vec<Arc<Node>> = nodes().into_iter().map(Arc::new).collect();
            let mut memo = Memo::default();
            let (services, slices) = flat(&first);
            let t1 = translate_with(&mut memo, &services, &slices, &nodes, &o);
            let (services, slices) = flat(&second);
            let t2 = translate_with(&mut memo, &services, &slices, &nodes, &o);
            let scratch = translate_with(&mut Memo::default(), &services, &slices, &nodes, &o);
            prop_assert_eq!(&t2, &scratch);
            // Then twice only endpoints move (each Service's object kept, some of its slices
            // new, with an endpoint less): a result that can be patched in place.
            let mut now = second.clone();
            for round in 0..2 {
                for (i, (_, sl)) in now.iter_mut().enumerate() {
                    if keep[(i + round) % keep.len()] {
                        continue;
                    }
                    let mut spec = after[i].clone();
                    spec.4.truncate(spec.4.len().saturating_sub(1 + round));
                    *sl = build(i, &spec).1.into_iter().map(Arc::new).collect();
                }
                let (services, slices) = flat(&now);
                let t = translate_with(&mut memo, &services, &slices, &nodes, &o);
                let scratch =
                    translate_with(&mut Memo::default(), &services, &slices, &nodes, &o);
                prop_assert_eq!(&t, &scratch, "endpoints moved, round {}", round);
            }
            // Then slices only come: some Services gain a slice and lose none.
            for (i, (_, sl)) in now.iter_mut().enumerate() {
                if keep[i] {
                    continue;
                }
                let mut spec = after[i].clone();
                spec.4.push((1, false, true, true));
                for mut extra in build(i, &spec).1 {
                    extra.metadata.name = extra.metadata.name.map(|n| format!("{n}-more"));
                    sl.push(Arc::new(extra));
                }
            }
            let (services, slices) = flat(&now);
            let t = translate_with(&mut memo, &services, &slices, &nodes, &o);
            let scratch = translate_with(&mut Memo::default(), &services, &slices, &nodes, &o);
            prop_assert_eq!(&t, &scratch, "slices added");
            for (i, (svc, _)) in second.iter().enumerate() {
                if !first.get(i).is_some_and(|f| Arc::ptr_eq(&f.0, svc)) {
                    continue;
                }
                for s in t2.desired.services.iter().filter(|s| s.name == key(svc)) {
                    if let Some(p) = t1.desired.services.iter().find(|p| p.frontend == s.frontend && p.name == s.name) {
                        prop_assert!(Arc::ptr_eq(p, s), "{} was translated again", s.frontend);
                    }
                }
            }
        }
    }
}
