use std::path::Path;

use ipnet::IpNet;

use super::*;
use crate::{announce::*, dataplane::XdpMode, model::check::CheckKind};

const MINIMAL: &str = "
node:
  interfaces: [eth0]
services:
  - name: web
    vip: 198.18.100.10
    port: 80
    protocol: tcp
    backends:
      - address: 198.18.1.12
        port: 8080
      - address: 198.18.1.11
        port: 8080
        weight: 3
";

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text, "test.yaml") {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.problems().iter().map(ToString::to_string).collect(),
    }
}

/// `MINIMAL` with `from` replaced by `to` (which must occur).
fn edit(from: &str, to: &str) -> String {
    assert!(MINIMAL.contains(from), "{from:?} not in MINIMAL");
    MINIMAL.replacen(from, to, 1)
}

#[test]
fn embedded_default_config_is_valid() {
    let c = Config::default_config().expect("default config");
    assert_eq!(c.node.interfaces, ["eth-c"]);
    assert_eq!(c.admin.listen, "127.0.0.1:9300".parse().unwrap());
    assert_eq!(c.admin.metrics_listen, None);
    assert_eq!(c.desired.services.len(), 5);
    let sticky = c
        .desired
        .services
        .iter()
        .find(|s| s.name == "web-sticky")
        .unwrap();
    assert_eq!(sticky.affinity_timeout, Some(Duration::from_mins(10)));
    assert_eq!(sticky.table_size, 1021);
    assert_eq!(
        sticky.source_ranges,
        ["198.18.0.0/24".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn defaults_and_normalisation() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.node.xdp_mode, XdpMode::Auto);
    assert_eq!(c.maglev.table_size, 16381);
    assert_eq!(c.dataplane, DataplaneLimits::default());
    let s = &c.desired.services[0];
    assert_eq!(s.table_size, 16381);
    // Backends come out sorted by address, weight defaulting to 1.
    assert_eq!(s.backends[0].addr, "198.18.1.11:8080".parse().unwrap());
    assert_eq!(s.backends[0].weight, 3);
    assert_eq!(s.backends[1].weight, 1);
}

#[test]
fn unknown_field_is_named_with_its_path() {
    let p = problems(&edit("    port: 80\n", "    port: 80\n    colour: blue\n"));
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with("services[0].colour: unknown field `colour`, expected one of"),
        "{p:?}"
    );
}

#[test]
fn bad_values_are_named_with_their_paths() {
    let p = problems(&edit(
        "port: 8080\n      - address",
        "port: 0\n      - address",
    ));
    assert_eq!(
        p,
        ["services[0].backends[0].port: must be between 1 and 65535"]
    );

    let p = problems(&edit("address: 198.18.1.12", "address: fd00::12"));
    assert_eq!(
        p,
        ["services[0].backends[0].address: fd00::12 is IPv6 but the VIP 198.18.100.10 is IPv4"]
    );

    let p = problems(&edit("address: 198.18.1.12", "address: 198.18.1.300"));
    assert!(
        p[0].starts_with("services[0].backends[0].address: "),
        "{p:?}"
    );

    let p = problems(&edit("protocol: tcp", "protocol: icmp"));
    assert!(
        p[0].starts_with("services[0].protocol: unknown variant `icmp`"),
        "{p:?}"
    );

    let p = problems(&edit("weight: 3", "weight: 2000000"));
    assert_eq!(
        p,
        ["services[0].backends[1].weight: 2000000 is larger than 1000000"]
    );

    let p = problems(&edit("interfaces: [eth0]", "interfaces: []"));
    assert_eq!(p, ["node.interfaces: at least one interface is needed"]);

    let p = problems(&edit("interfaces: [eth0]", "interfaces: [eth0, \"a/b\"]"));
    assert_eq!(
        p,
        ["node.interfaces[1]: \"a/b\" is not a valid interface name"]
    );
}

#[test]
fn table_sizes_must_be_prime() {
    let p = problems(&format!("{MINIMAL}maglev:\n  table_size: 16384\n"));
    assert!(
        p[0].starts_with("maglev.table_size: 16384 is not a prime"),
        "{p:?}"
    );
    let p = problems(&edit("protocol: tcp", "protocol: tcp\n    table_size: 100"));
    assert!(
        p[0].starts_with("services[0].table_size: 100 is not a prime"),
        "{p:?}"
    );
    let three = format!("{MINIMAL}      - {{address: 198.18.1.13, port: 8080}}\n");
    let p = problems(&three.replacen("protocol: tcp", "protocol: tcp\n    table_size: 2", 1));
    assert!(
        p[0].starts_with("services[0].backends: 3 backends do not fit"),
        "{p:?}"
    );
}

#[test]
fn duplicates_are_refused() {
    let twice = format!(
        "{MINIMAL}  - name: web\n    vip: 198.18.100.10\n    port: 80\n    protocol: tcp\n"
    );
    let p = problems(&twice);
    assert_eq!(
        p,
        [
            "services[1].name: web is already the name of services[0]",
            "services[1].vip: 198.18.100.10:80/tcp is already used by services[0]",
        ]
    );
    let p = problems(&edit("address: 198.18.1.12", "address: 198.18.1.11"));
    assert_eq!(
        p,
        ["services[0].backends[1].address: 198.18.1.11:8080 is already services[0].backends[0]"]
    );
}

#[test]
fn affinity_and_source_ranges() {
    let c = Config::parse(
        &edit(
            "protocol: tcp",
            "protocol: tcp\n    session_affinity: {}\n    source_ranges: [198.18.0.7/16, 198.18.0.0/16]",
        ),
        "t",
    )
    .unwrap();
    let s = &c.desired.services[0];
    assert_eq!(s.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
    assert_eq!(s.source_ranges, ["198.18.0.0/16".parse::<IpNet>().unwrap()]);

    let p = problems(&edit(
        "protocol: tcp",
        "protocol: tcp\n    session_affinity: {timeout: 2d}",
    ));
    assert_eq!(
        p,
        ["services[0].session_affinity.timeout: 2days is outside 1s..24h"]
    );
    let p = problems(&edit(
        "protocol: tcp",
        "protocol: tcp\n    session_affinity: {timeout: soon}",
    ));
    assert!(
        p[0].starts_with("services[0].session_affinity.timeout: "),
        "{p:?}"
    );
    let p = problems(&edit(
        "protocol: tcp",
        "protocol: tcp\n    source_ranges: [\"fd00::/8\"]",
    ));
    assert_eq!(
        p,
        ["services[0].source_ranges[0]: fd00::/8 is IPv6 but the VIP 198.18.100.10 is IPv4"]
    );
}

#[test]
fn capacity_is_checked() {
    let p = problems(&format!("{MINIMAL}dataplane:\n  max_backends: 2\n"));
    assert_eq!(
        p,
        ["services: 2 backends do not fit dataplane.max_backends (2; id 0 is reserved)"]
    );
    // More source-range prefixes than the data plane holds: refused here, not at apply.
    let ranges: Vec<String> = (0..=lb_common::limits::MAX_SOURCE_RANGES)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0xC612_0000 + i);
            format!("{ip}/32")
        })
        .collect();
    let text = edit(
        "    protocol: tcp\n",
        &format!(
            "    protocol: tcp\n    source_ranges: [{}]\n",
            ranges.join(", ")
        ),
    );
    assert_eq!(
        problems(&text),
        [
            "services: 16385 source-range prefixes do not fit: the data plane holds 16384 over all services"
        ]
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = edit("port: 80\n", "port: 0\n")
        .replace("vip: 198.18.100.10", "vip: 0.0.0.0")
        .replace("port: 8080\n      - address", "port: 0\n      - address");
    assert_eq!(
        problems(&text),
        [
            "services[0].port: must be between 1 and 65535",
            "services[0].vip: 0.0.0.0 cannot be a VIP",
            "services[0].backends[0].port: must be between 1 and 65535",
        ]
    );
}

#[test]
fn error_message_names_the_file() {
    let e = Config::parse(
        "node: {interfaces: [eth0]}\nservices: 3\n",
        "/etc/weir.yaml",
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("/etc/weir.yaml: services: expected sequence start"),
        "{text}"
    );
    let e = Config::load(Path::new("/nonexistent/weir.yaml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/weir.yaml: cannot read: "),
        "{e}"
    );
}

#[test]
fn a_backend_may_serve_at_most_sixteen_frontends() {
    let mut text = String::from("node: {interfaces: [eth0]}\nservices:\n");
    for port in 1..=17 {
        text.push_str(&format!(
            "  - {{name: s{port}, vip: 198.18.100.10, port: {port}, protocol: tcp, backends: [{{address: 198.18.1.11, port: 80}}]}}\n"
        ));
    }
    let p = problems(&text);
    assert_eq!(
        p,
        [
            "services[16].backends[0].address: 198.18.1.11:80/tcp would serve more than 16 frontends (the most one backend endpoint may serve)"
        ]
    );
    // Sixteen is fine, and so is the same address under another protocol.
    let sixteen: String = text.lines().take(18).map(|l| format!("{l}\n")).collect();
    assert!(Config::parse(&sixteen, "t").is_ok());
    assert!(Config::parse(&text.replacen("protocol: tcp", "protocol: udp", 1), "t").is_ok());
}

#[test]
fn health_check_blocks_are_checked_with_their_path() {
    let c = Config::default_config().unwrap();
    let kinds: Vec<(String, Option<CheckKind>)> = c
        .desired
        .services
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.health_check.as_ref().map(|h| h.probe.kind),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("diameter".to_string(), Some(CheckKind::Sctp)),
            ("echo-udp".into(), Some(CheckKind::Udp)),
            ("web".into(), Some(CheckKind::Http)),
            ("web-sticky".into(), Some(CheckKind::Ping)),
            ("web6".into(), Some(CheckKind::Tcp)),
        ]
    );

    let with = |block: &str| {
        edit(
            "    protocol: tcp\n",
            &format!("    protocol: tcp\n    health_check: {block}\n"),
        )
    };
    let c = Config::parse(&with("{type: http, path: /healthz, interval: 100ms}"), "t").unwrap();
    let hc = c.desired.services[0].health_check.as_ref().unwrap();
    assert_eq!(hc.probe.path, "/healthz");
    assert_eq!(hc.probe.interval, Duration::from_millis(100));

    assert_eq!(
        problems(&with("{type: http, interval: 1s, timeout: 2s, rise: 0}")),
        [
            "services[0].health_check.timeout: 2s must be above 0 and at most the interval (1s)",
            "services[0].health_check.rise: 0 is outside 1..100",
        ]
    );
    assert_eq!(
        problems(&with("{type: udp}")),
        [
            "services[0].health_check.request: a udp check needs a request (silence cannot tell a live server from a dead one)"
        ]
    );
    let p = problems(&with("{type: gopher}"));
    assert!(
        p[0].starts_with("services[0].health_check.type: unknown variant `gopher`"),
        "{p:?}"
    );
    let p = problems(&with("{type: tcp, every: 1s}"));
    assert!(
        p[0].starts_with("services[0].health_check.every: unknown field `every`"),
        "{p:?}"
    );
    // A CA bundle must be there and hold a certificate when the config is loaded.
    let p = problems(&with("{type: https, ca_file: /nonexistent/ca.pem}"));
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with("services[0].health_check.ca_file: /nonexistent/ca.pem: "),
        "{p:?}"
    );
    let empty = std::env::temp_dir().join(format!("weir-empty-ca-{}", std::process::id()));
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let p = problems(&with(&format!(
        "{{type: https, ca_file: {}}}",
        empty.display()
    )));
    std::fs::remove_file(&empty).unwrap();
    assert!(p[0].ends_with("no PEM certificate in it"), "{p:?}");
}

#[test]
fn source_nat_settings_and_services() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.node.source_nat, SourceNat::default());
    assert_eq!(c.node.source_nat.ports, (61000, 65535));
    assert_eq!(c.desired.source_nat, None, "no service asks for it");

    let text = edit(
        "  interfaces: [eth0]\n",
        "  interfaces: [eth0]\n  source_nat: {ports: 62000-62999, ipv4: 198.18.0.2}\n",
    )
    .replacen(
        "    protocol: tcp\n",
        "    protocol: tcp\n    source_nat: true\n",
        1,
    );
    let c = Config::parse(&text, "t").unwrap();
    let nat = c.desired.source_nat.expect("a service asks for it");
    assert_eq!(nat.ports, (62000, 62999));
    assert_eq!(nat.ipv4, Some("198.18.0.2".parse().unwrap()));
    assert!(c.desired.services[0].backends.iter().all(|b| b.snat));
}

#[test]
fn bad_source_nat_settings_are_named() {
    let with_node = |nat: &str| {
        edit(
            "  interfaces: [eth0]\n",
            &format!("  interfaces: [eth0]\n  source_nat: {nat}\n"),
        )
    };
    assert_eq!(
        problems(&with_node("{ports: 65000-64000}")),
        ["node.source_nat.ports: 65000-64000: the first port is above the last"]
    );
    assert_eq!(
        problems(&with_node("{ports: 80-90}")),
        ["node.source_nat.ports: 80-90: ports below 1024 are the node's own services'"]
    );
    assert_eq!(
        problems(&with_node("{ports: lots}")),
        ["node.source_nat.ports: \"lots\" is not a port range such as 61000-65535"]
    );
    assert_eq!(
        problems(&with_node("{ipv4: 0.0.0.0}")),
        ["node.source_nat.ipv4: 0.0.0.0 cannot be the node's source-NAT address"]
    );
    // A service asking for source NAT without a node address of its family.
    let text = with_node("{ipv6: 'fd00:18::2'}").replacen(
        "    protocol: tcp\n",
        "    protocol: tcp\n    source_nat: true\n",
        1,
    );
    assert_eq!(
        problems(&text),
        [
            "services[0].source_nat: needs node.source_nat.ipv4: the node address IPv4 flows leave with"
        ]
    );
}

#[test]
fn source_nat_ports_must_avoid_the_nodes_ephemeral_ports() {
    let linux = (32768, 60999);
    assert_eq!(ephemeral_overlap((61000, 65535), linux, ""), None);
    assert_eq!(ephemeral_overlap((60000, 65535), linux, ""), Some(60000));
    // Reserved ports are never picked by the kernel: fine to use.
    assert_eq!(
        ephemeral_overlap((60000, 65535), linux, "60000-60999\n"),
        None
    );
    assert_eq!(
        ephemeral_overlap((60000, 65535), linux, "60000-60500,60502-60999"),
        Some(60501)
    );
    assert_eq!(
        ephemeral_overlap((1024, 65535), (1024, 65535), "5000"),
        Some(1024)
    );
}

#[test]
fn announce_l2_interfaces_must_be_weirs() {
    let text = format!("{MINIMAL}announce:\n  l2:\n    interfaces: [eth0]\n");
    let c = Config::parse(&text, "t").unwrap();
    assert_eq!(c.announce.l2_interfaces, ["eth0"]);
    assert_eq!(c.announce.node_name, None);
    assert_eq!(
        problems(&format!(
            "{MINIMAL}announce:\n  l2:\n    interfaces: [eth1, eth0, eth0]\n"
        )),
        [
            "announce.l2.interfaces[0]: eth1 is not in node.interfaces (weir answers ARP and Neighbor Solicitations where its XDP program runs)",
            "announce.l2.interfaces[2]: eth0 is listed twice",
        ]
    );
    assert_eq!(
        problems(&format!("{MINIMAL}announce:\n  l2:\n    interfaces: []\n")),
        ["announce.l2.interfaces: at least one interface is needed"]
    );
    assert_eq!(
        problems(&format!("{MINIMAL}announce:\n  node_name: \"a b\"\n")),
        ["announce.node_name: \"a b\" is not a valid node name"]
    );
}

#[test]
fn announce_gossip_settings_are_checked() {
    let base = format!("{MINIMAL}announce:\n  node_name: lb1\n  l2:\n    interfaces: [eth0]\n");
    let c = Config::parse(
        &format!("{base}  gossip:\n    listen: 198.18.0.2:7946\n    peers: [198.18.0.3:7946]\n"),
        "t",
    )
    .unwrap();
    let g = c.announce.gossip.expect("gossip");
    assert_eq!(g.peers, Some(vec!["198.18.0.3:7946".parse().unwrap()]));
    assert_eq!(g.interval, Duration::from_millis(100));
    // Without peers (Kubernetes mode finds them; standalone `run` refuses it) and with none.
    let c = Config::parse(&format!("{base}  gossip:\n    listen: 0.0.0.0:7946\n"), "t").unwrap();
    assert_eq!(c.announce.gossip.expect("gossip").peers, None);
    assert_eq!(
        problems(&format!(
            "{base}  gossip:\n    listen: 0.0.0.0:7946\n    peers: []\n"
        )),
        ["announce.gossip.peers: at least one peer is needed"]
    );
    assert_eq!(g.dead_after, Duration::from_millis(400));
    assert_eq!(
        problems(&format!(
            "{base}  gossip:\n    listen: 198.18.0.2:7946\n    peers: [198.18.0.2:7946]\n    interval: 1ms\n    dead_after: 1ms\n"
        )),
        [
            "announce.gossip.peers[0]: 198.18.0.2:7946 is this node's own listen address",
            "announce.gossip.interval: must be between 10ms and 10s",
            "announce.gossip.dead_after: must be at least twice the interval (one lost heartbeat must not kill a node)",
        ]
    );
    assert_eq!(
        problems(&format!(
            "{MINIMAL}announce:\n  gossip:\n    listen: 198.18.0.2:7946\n    peers: [198.18.0.3:7946]\n"
        )),
        ["announce.gossip: decides who answers on L2: it needs announce.l2"]
    );
    assert_eq!(g.key, None, "no key_file: unauthenticated");
}

#[test]
fn the_metrics_listener_needs_a_port_of_its_own() {
    let c = Config::parse(
        &format!("{MINIMAL}admin:\n  listen: 127.0.0.1:9300\n  metrics_listen: 0.0.0.0:9301\n"),
        "t",
    )
    .unwrap();
    assert_eq!(
        c.admin.metrics_listen,
        Some("0.0.0.0:9301".parse().unwrap())
    );
    for m in ["0.0.0.0:9300", "127.0.0.1:9300"] {
        assert_eq!(
            problems(&format!(
                "{MINIMAL}admin:\n  listen: 127.0.0.1:9300\n  metrics_listen: {m}\n"
            )),
            [format!(
                "admin.metrics_listen: {m} overlaps admin.listen 127.0.0.1:9300: give the metrics a port of their own"
            )]
        );
    }
    // Another address on the same port is fine.
    assert!(
        Config::parse(
            &format!(
                "{MINIMAL}admin:\n  listen: 127.0.0.1:9300\n  metrics_listen: 198.18.0.2:9300\n"
            ),
            "t",
        )
        .is_ok()
    );
}

#[test]
fn the_gossip_key_is_read_from_its_file() {
    let dir = std::env::temp_dir().join(format!("weir-gossip-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (good, short) = (dir.join("key"), dir.join("short"));
    std::fs::write(&good, "c2VjcmV0IHNlY3JldCBzZWNyZXQgc2VjcmV0\n").unwrap();
    std::fs::write(&short, "tiny\n").unwrap();
    let config = |path: &Path| {
        format!(
            "{MINIMAL}announce:\n  l2:\n    interfaces: [eth0]\n  gossip:\n    listen: 198.18.0.2:7946\n    peers: [198.18.0.3:7946]\n    key_file: {}\n",
            path.display()
        )
    };
    let c = Config::parse(&config(&good), "t").unwrap();
    assert_eq!(
        c.announce.gossip.unwrap().key.unwrap().0,
        b"c2VjcmV0IHNlY3JldCBzZWNyZXQgc2VjcmV0",
        "the trailing newline is no part of the key"
    );
    let p = problems(&config(&short));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("announce.gossip.key_file: ")
            && p[0].contains("4 bytes; the key needs at least 16"),
        "{p:?}"
    );
    let missing = dir.join("missing");
    let p = problems(&config(&missing));
    assert!(
        p.len() == 1 && p[0].contains("missing") && p[0].contains("No such file"),
        "{p:?}"
    );
    // The key is never printed.
    let c = Config::parse(&config(&good), "t").unwrap();
    assert!(!format!("{c:?}").contains("c2VjcmV0"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn announce_bgp_is_checked_and_reads_the_password_file() {
    let dir = std::env::temp_dir().join(format!("weir-bgp-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pw = dir.join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let text = format!(
        "{MINIMAL}announce:\n  bgp:\n    local_as: 4200000001\n    router_id: 198.18.0.2\n    communities: [\"64512:100\", no-export]\n    large_communities: [\"64512:1:2\"]\n    peers:\n      - address: 198.18.0.254\n        remote_as: 64513\n        password_file: {}\n        bfd: true\n      - address: fd00::fe\n        remote_as: 64513\n        passive: true\n        multihop: 3\n        hold_time: 0s\n",
        pw.display()
    );
    let c = Config::parse(&text, "test.yaml").unwrap();
    let b = c.announce.bgp.expect("bgp");
    assert_eq!(b.local_as, 4_200_000_001);
    // One advertisement: every VIP to every peer, with the configured attributes.
    let [a] = b.advertisements.as_slice() else {
        panic!("{:?}", b.advertisements)
    };
    assert_eq!((a.vips.as_ref(), a.peers.as_ref()), (None, None));
    assert_eq!(a.attrs.communities, [(64512 << 16) | 100, 0xFFFF_FF01]);
    assert_eq!(a.attrs.large_communities, [(64512, 1, 2)]);
    assert_eq!(a.attrs.local_pref, None);
    assert_eq!(b.listen_port, 179);
    assert_eq!(b.peers[0].password, Some(Secret("s3cret".into())));
    assert_eq!(
        format!("{:?}", b.peers[0].password),
        "Some(Secret(..))",
        "never printed"
    );
    assert_eq!(b.peers[0].hold_time, Duration::from_secs(9));
    assert!(b.peers[1].passive && b.peers[1].hold_time.is_zero());

    let bad = format!(
        "{MINIMAL}announce:\n  bgp:\n    local_as: 23456\n    router_id: 0.0.0.0\n    communities: [\"70000:1\"]\n    large_communities: [\"1:2\"]\n    bfd: {{interval: 1ms, multiplier: 1}}\n    peers:\n      - address: 198.18.0.254\n        remote_as: 0\n        local_as: 0\n        password_file: {}\n        hold_time: 2s\n        multihop: 0\n      - address: 198.18.0.254\n        remote_as: 64513\n        bfd: true\n        multihop: 2\n        connect_retry: 1ms\n",
        dir.join("missing").display()
    );
    let p = problems(&bad);
    let want = [
        "announce.bgp.local_as: 23456 is not a usable AS number",
        "announce.bgp.router_id: 0.0.0.0 is not a router id",
        "announce.bgp.communities[0]: \"70000:1\" is not a community",
        "announce.bgp.large_communities[0]: \"1:2\" is not a large community",
        "announce.bgp.bfd.interval: must be between 10ms and 10s",
        "announce.bgp.bfd.multiplier: must be between 2 and 50",
        "announce.bgp.peers[0].remote_as: 0 is not a usable AS number",
        "announce.bgp.peers[0].local_as: 0 is not a usable AS number",
        "announce.bgp.peers[0].hold_time: must be 0",
        "announce.bgp.peers[0].multihop: is a TTL",
        "announce.bgp.peers[0].password_file:",
        "announce.bgp.peers[1].address: 198.18.0.254 is listed twice",
        "announce.bgp.peers[1].connect_retry: must be between 100ms and 10m",
        "announce.bgp.peers[1].bfd: BFD here is single-hop",
    ];
    for w in want {
        assert!(
            p.iter().any(|x| x.starts_with(w)),
            "missing {w:?} in {p:#?}"
        );
    }
    assert_eq!(p.len(), want.len(), "{p:#?}");
    assert_eq!(
        problems(&format!(
            "{MINIMAL}announce:\n  bgp:\n    local_as: 64512\n    router_id: 198.18.0.2\n    peers: []\n"
        )),
        ["announce.bgp.peers: at least one peer is needed"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kube_proxy_replacement_settings() {
    // Off by default: no socket hooks, no health endpoint.
    let c = Config::parse(MINIMAL, "test.yaml").unwrap();
    assert!(!c.node.kube_proxy_replacement);
    assert_eq!(c.node.socket_lb, None);
    assert_eq!(c.node.healthz_listen, None);
    assert!(c.node.nodeport_addresses.is_empty());
    // On: the hooks at the node's root cgroup, kube-proxy's health endpoint on :10256.
    let c = Config::parse(
        &edit(
            "  interfaces: [eth0]\n",
            "  interfaces: [eth0]\n  kube_proxy_replacement: true\n  nodeport_addresses: [198.18.0.1/24, 'fd00:18::/64']\n",
        ),
        "test.yaml",
    )
    .unwrap();
    assert_eq!(c.node.socket_lb, Some(DEFAULT_CGROUP.into()));
    assert_eq!(
        c.node.healthz_listen,
        Some("0.0.0.0:10256".parse().unwrap())
    );
    assert_eq!(
        c.node.nodeport_addresses,
        [
            "198.18.0.0/24".parse::<IpNet>().unwrap(),
            "fd00:18::/64".parse().unwrap()
        ]
    );
    // Bad values are named; the health endpoint beside kube-proxy would take its port.
    let p = problems(&edit(
        "  interfaces: [eth0]\n",
        "  interfaces: [eth0]\n  nodeport_addresses: [everywhere]\n  healthz_listen: 127.0.0.1:10256\n",
    ));
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("node.nodeport_addresses[0]: \"everywhere\" is not a prefix"),
        "{p:?}"
    );
    assert!(p[1].starts_with("node.healthz_listen: set, but"), "{p:?}");
    let p = problems(&edit(
        "  interfaces: [eth0]\n",
        "  interfaces: [eth0]\n  kube_proxy_replacement: true\n  socket_lb: {enabled: false}\n",
    ));
    assert!(
        p[0].starts_with("node.socket_lb.enabled: false, but"),
        "{p:?}"
    );
}

/// A file of 30 000 services (the throughput benchmark's largest) is read: the YAML parser's
/// default budget (250 000 nodes) refused it.
#[test]
fn a_file_of_thirty_thousand_services_is_read() {
    let mut text =
        String::from("node:\n  interfaces: [eth0]\ndataplane:\n  max_services: 40000\nservices:\n");
    for i in 0..30_000u32 {
        text.push_str(&format!(
            "  - name: s{i}\n    vip: 198.19.{}.{}\n    port: {}\n    protocol: udp\n    backends:\n      - {{ address: 198.18.1.11, port: {} }}\n      - {{ address: 198.18.1.12, port: {} }}\n",
            i / 250,
            i % 250 + 1,
            10000 + i,
            10000 + i,
            10000 + i
        ));
    }
    let c = Config::parse(&text, "big.yaml").expect("30 000 services");
    assert_eq!(c.desired.services.len(), 30_000);
}
