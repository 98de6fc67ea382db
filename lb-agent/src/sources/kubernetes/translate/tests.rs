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
            format!("{} {} -> {}", s.name, s.frontend, b.join(" "))
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
    let t = translate(&services, &[], &nodes(), &opts());
    let names: Vec<&str> = t.desired.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["shop/web"]);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    let mut o = opts();
    o.default_class = true;
    let t = translate(&services, &[], &nodes(), &o);
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
            "shop/web 198.18.100.10:53/udp -> 198.18.1.11:5353",
            "shop/web 198.18.100.10:80/tcp -> 198.18.1.11:8080",
            "shop/web 198.18.100.10:9090/tcp -> 198.18.1.11:9100",
            "shop/web [fd00:100::10]:53/udp -> [fd00:1::11]:5353",
            "shop/web [fd00:100::10]:80/tcp -> [fd00:1::11]:8080",
            "shop/web [fd00:100::10]:9090/tcp -> [fd00:1::11]:9100",
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
        ["shop/web 198.18.100.10:80/tcp -> 198.18.1.11:8080 198.18.1.12:8080"]
    );
    // None ready: the terminating endpoints that still serve take the flows (kube-proxy).
    assert_eq!(
        backends(&[("198.18.1.13", TERMINATING), ("198.18.1.14", GONE)]),
        ["shop/web 198.18.100.10:80/tcp -> 198.18.1.13:8080"]
    );
    assert_eq!(
        backends(&[("198.18.1.14", GONE)]),
        ["shop/web 198.18.100.10:80/tcp -> "]
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
        ["shop/web 198.18.100.10:80/tcp -> 198.18.1.11:8080"]
    );
    let mut b = opts();
    b.node = "node-b".into();
    let t = translate(&[svc], &[web_slice()], &nodes(), &b);
    assert_eq!(
        lines(&t),
        ["shop/web 198.18.100.10:80/tcp -> 198.18.1.12:8080"]
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
            "shop/web 198.18.100.10:80/tcp -> 198.18.1.11:8080 198.18.1.12:8080(snat) 198.18.1.13:8080(snat)"
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
        ["shop/web 198.18.100.10:80/tcp -> 198.18.1.11:8080"]
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
        ["shop/web 198.18.100.10:80/tcp -> 198.18.1.11:8080"]
    );
    assert_eq!(t.desired.source_nat, None);
    // node-c has none: every endpoint.
    let mut c = opts();
    c.node = "node-c".into();
    let t = translate(std::slice::from_ref(&svc), &[web_slice()], &bare, &c);
    assert_eq!(
        lines(&t),
        ["shop/web 198.18.100.10:80/tcp -> 198.18.1.11:8080 198.18.1.12:8080"]
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
        ["shop/web6 [fd00:100::10]:80/tcp -> [fd00:1::11]:8080"]
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
        ["tel/diameter 198.18.100.30:3868/sctp -> 198.18.1.31:3868"]
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
    let t = translate(&[svc], &[], &nodes(), &opts());
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
    let t = translate(&[timed], &[], &nodes(), &opts());
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
    let t = translate(&services, &[], &nodes(), &opts());
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
        p("shop/late").contains("198.18.100.12:80/tcp is already served by shop/good"),
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
service 198.18.100.10:80 internal proto=6 id=1 size=13 flags=0 affinity=0s table 1:7 2:6
service 198.18.100.20:53 external proto=17 id=2 size=13 flags=0 affinity=0s table 3:13
service 198.18.100.20:53 internal proto=17 id=2 size=13 flags=0 affinity=0s table 3:13
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
    let t = translate(&services, &[], &nodes(), &o);
    let names: BTreeSet<&str> = t.desired.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["shop/a", "shop/b"]));
    assert!(
        t.problems["shop/c"][0].contains("data plane is full"),
        "{:?}",
        t.problems
    );
}
