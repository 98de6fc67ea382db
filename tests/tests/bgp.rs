//! BGP mode in the netns lab (`weir_lab::bgplab`) against real routing daemons from Debian's
//! packages in the router's namespace: GoBGP (routes and their attributes in its RIB, IPv4
//! and IPv6, withdrawal on health failure and on agent stop), FRR (TCP MD5 on, a wrong
//! password refused, ECMP over three LB nodes with a client reaching the service through
//! all of them, BFD taking the routes of a frozen node away before the hold time), BIRD
//! (internal peering with LOCAL_PREF, this node passive, routes installed and withdrawn).
//! Needs root; the namespaces are the test's own and are removed afterwards.

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;
use weir_lab::{
    agent::{sample, wait_for},
    bgplab::{self, BgpLab, LOCAL_AS, Peering, VIP4, VIP6},
};

fn server_bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_weir-lab").as_ref()
}

/// GoBGP's best path for `prefix` (None: not in its RIB).
fn gobgp_path(lab: &BgpLab, prefix: &str) -> Option<Value> {
    let family = if prefix.contains(':') { "ipv6" } else { "ipv4" };
    let out = lab.router().query(&format!("global rib -a {family} -j"));
    let rib: Value = serde_json::from_str(&out).ok()?;
    rib.get(prefix)?.as_array()?.first().cloned()
}

fn attr(path: &Value, kind: u64) -> Option<&Value> {
    path["attrs"].as_array()?.iter().find(|a| a["type"] == kind)
}

#[test]
fn gobgp_gets_the_vips_with_attributes_and_loses_them_on_failure_and_stop() {
    weir_lab::netns::require_root();
    let mut lab = BgpLab::new(1, server_bin(), Peering::default());
    lab.start_gobgp();
    lab.start_agent(0);
    lab.wait_established(0);

    // IPv4 over the IPv4 session, next hop the node, our AS, communities and large ones.
    let p = wait_for(
        Duration::from_secs(10),
        "the IPv4 VIP in GoBGP's RIB",
        || gobgp_path(&lab, &format!("{VIP4}/32")),
    );
    let text = p.to_string();
    assert_eq!(
        attr(&p, 3).map(|a| a["nexthop"].clone()),
        Some(Value::from(bgplab::lb4(0))),
        "{text}"
    );
    assert_eq!(
        attr(&p, 2).map(|a| a["as_paths"][0]["asns"].clone()),
        Some(serde_json::json!([LOCAL_AS])),
        "{text}"
    );
    let communities = attr(&p, 8).map(|a| a["communities"].clone());
    assert_eq!(
        communities,
        Some(serde_json::json!([64512u32 * 65536 + 100, 0xFFFF_FF01u32])),
        "{text}"
    );
    let large = attr(&p, 32).map(|a| a["value"].clone());
    assert_eq!(
        large,
        Some(serde_json::json!([{"ASN": 64512, "LocalData1": 1, "LocalData2": 2}])),
        "{text}"
    );
    assert!(
        attr(&p, 5).is_none(),
        "LOCAL_PREF is not sent to external peers: {text}"
    );
    // IPv6 over the IPv6 session (MP-BGP), next hop the node's IPv6 address.
    let p6 = wait_for(
        Duration::from_secs(10),
        "the IPv6 VIP in GoBGP's RIB",
        || gobgp_path(&lab, &format!("{VIP6}/128")),
    );
    assert!(p6.to_string().contains(&bgplab::lb6(0)), "{p6}");
    // The API and the metrics say what was advertised to whom.
    let peers = lab.bgp(0);
    assert_eq!(peers.len(), 2);
    assert_eq!(peers[0]["advertised"], serde_json::json!([VIP4]));
    assert_eq!(peers[1]["advertised"], serde_json::json!([VIP6]));
    assert_eq!(peers[0]["hold_time"], 9);
    let metrics = lab.agents[0].as_ref().unwrap().metrics(&lab.lbs[0]);
    assert_eq!(
        sample(
            &metrics,
            &format!("weir_bgp_session_up{{peer=\"{}\"}}", bgplab::RT4)
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("weir_bgp_routes_advertised{{peer=\"{}\"}}", bgplab::RT6)
        ),
        Some(1.0)
    );

    // A reload with other communities and without the IPv6 peer: the IPv4 route is
    // announced again with them, the IPv6 session closes (its route withdrawn).
    let config = bgplab::config(0, &lab.peering, None).replace(
        "communities: [\"64512:100\", no-export]",
        "communities: [\"64512:999\"]",
    );
    let v6_peer = format!(
        "      - address: \"{}\"\n        remote_as: 64513\n        hold_time: 9s\n        connect_retry: 500ms\n",
        bgplab::RT6
    );
    assert!(config.contains(&v6_peer), "{config}");
    let config = config.replace(&v6_peer, "");
    lab.agents[0]
        .as_ref()
        .unwrap()
        .reload(&lab.lbs[0], &config)
        .expect("reload");
    wait_for(
        Duration::from_secs(10),
        "the new community at GoBGP",
        || {
            let p = gobgp_path(&lab, &format!("{VIP4}/32"))?;
            (attr(&p, 8)?["communities"] == serde_json::json!([64512u32 * 65536 + 999]))
                .then_some(())
        },
    );
    wait_for(Duration::from_secs(10), "the IPv6 route withdrawn", || {
        gobgp_path(&lab, &format!("{VIP6}/128"))
            .is_none()
            .then_some(())
    });
    let peers = lab.bgp(0);
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0]["state"], "established");
    let neighbor = lab.router().query(&format!("neighbor {}", bgplab::lb4(0)));
    assert!(
        neighbor.contains("BGP state = ESTABLISHED") && neighbor.contains("Flops = 0"),
        "the IPv4 session was left alone: {neighbor}"
    );

    // Both backends fail their checks: the node cannot serve the VIPs, the routes go.
    lab.set_backend(0, false);
    lab.set_backend(1, false);
    wait_for(
        Duration::from_secs(10),
        "the VIPs withdrawn at GoBGP",
        || {
            (gobgp_path(&lab, &format!("{VIP4}/32")).is_none()
                && gobgp_path(&lab, &format!("{VIP6}/128")).is_none())
            .then_some(())
        },
    );
    assert!(
        lab.bgp(0).iter().all(|p| p["state"] == "established"),
        "the sessions stay up"
    );
    // One backend back: the routes come back.
    lab.set_backend(1, true);
    wait_for(Duration::from_secs(10), "the VIP advertised again", || {
        gobgp_path(&lab, &format!("{VIP4}/32"))
    });

    // The agent stops: routes withdrawn and the sessions closed with a Cease.
    let status = lab.agents[0].take().unwrap().stop();
    assert!(status.success(), "{status:?}");
    wait_for(
        Duration::from_secs(5),
        "the VIPs withdrawn after the stop",
        || {
            (gobgp_path(&lab, &format!("{VIP4}/32")).is_none()
                && gobgp_path(&lab, &format!("{VIP6}/128")).is_none())
            .then_some(())
        },
    );
    let neighbor = lab.router().query(&format!("neighbor {}", bgplab::lb4(0)));
    assert!(!neighbor.contains("BGP state = ESTABLISHED"), "{neighbor}");
    assert!(
        neighbor.to_lowercase().contains("shutdown")
            || neighbor.to_lowercase().contains("cease")
            || neighbor.contains("Notification"),
        "GoBGP saw the Cease: {neighbor}"
    );
}

/// One LB node peering with FRR, its sessions established.
fn one_node_with_frr(peering: Peering) -> BgpLab {
    let mut lab = BgpLab::new(1, server_bin(), peering);
    lab.start_frr();
    lab.start_agent(0);
    lab.wait_established(0);
    lab
}

/// FRR's BGP state of neighbor `n` ("Established", "Active", ...).
fn frr_state(lab: &BgpLab, n: &str) -> String {
    let out = lab.router().query(&format!("show bgp neighbors {n} json"));
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    v[n]["bgpState"].as_str().unwrap_or("").to_string()
}

#[test]
fn frr_spreads_the_vips_over_three_nodes_with_md5_and_refuses_a_wrong_password() {
    weir_lab::netns::require_root();
    const N: usize = 3;
    let peering = Peering {
        password: Some("s3cret-weir".into()),
        ..Peering::default()
    };
    let mut lab = BgpLab::new(N, server_bin(), peering);
    lab.start_frr();
    // Node 3 first with a wrong password: FRR never establishes its session.
    lab.start_agent_with(2, Some("wrong"));
    lab.start_agent(0);
    lab.start_agent(1);
    lab.wait_established(0);
    lab.wait_established(1);
    wait_for(
        Duration::from_secs(10),
        "two next hops for each VIP",
        || (lab.fib(VIP4).len() == 2 && lab.fib(VIP6).len() == 2).then_some(()),
    );
    assert_ne!(frr_state(&lab, &bgplab::lb4(2)), "Established");
    assert!(
        lab.bgp(2).iter().all(|p| p["state"] != "established"),
        "{:?}",
        lab.bgp(2)
    );
    // The right password: all three.
    lab.agents[2].take().unwrap().stop();
    lab.start_agent(2);
    lab.wait_established(2);
    let hops = wait_for(
        Duration::from_secs(10),
        "three next hops for each VIP",
        || {
            let (h4, h6) = (lab.fib(VIP4), lab.fib(VIP6));
            (h4.len() == 3 && h6.len() == 3).then_some((h4, h6))
        },
    );
    let mut want4: Vec<String> = (0..N).map(bgplab::lb4).collect();
    let mut got4 = hops.0.clone();
    want4.sort();
    got4.sort();
    assert_eq!(got4, want4);

    // Flows from many client ports spread over the nodes; each flow gets the same backend
    // whichever node it reaches (Maglev with the same table everywhere).
    let base: Vec<f64> = (0..N).map(|i| connections(&lab, i)).collect();
    for port in 21000..21060u16 {
        for vip in [VIP4, VIP6] {
            let r = lab
                .get(vip, Some(port), Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("GET {vip} from port {port}: {e}"));
            assert_eq!(r.status, 200);
            let client = if vip == VIP4 {
                bgplab::CLIENT4
            } else {
                bgplab::CLIENT6
            };
            let vip_ep = if vip == VIP4 {
                format!("{VIP4}:80")
            } else {
                format!("[{VIP6}]:80")
            };
            let client_ep = if vip == VIP4 {
                format!("{client}:{port}")
            } else {
                format!("[{client}]:{port}")
            };
            let picks: Vec<String> = (0..N)
                .map(|i| {
                    let a = lab.agents[i].as_ref().unwrap();
                    let (_, body) = a
                        .get(
                            &lab.lbs[i],
                            &format!("/api/v1/lookup?client={client_ep}&vip={vip_ep}&protocol=tcp"),
                        )
                        .expect("lookup");
                    let v: Value = serde_json::from_str(&body).expect("json");
                    v["backend"].to_string()
                })
                .collect();
            assert!(
                picks.iter().all(|p| *p == picks[0]),
                "flow {client_ep} → {vip_ep}: {picks:?}"
            );
            let served = if vip == VIP4 {
                bgplab::BACKENDS4
            } else {
                bgplab::BACKENDS6
            };
            let b = served
                .iter()
                .position(|b| picks[0].contains(b))
                .expect("a backend");
            assert_eq!(
                r.backend,
                format!("b{}", b + 1),
                "flow {client_ep} answered by its Maglev backend"
            );
        }
    }
    // The traffic counters are sampled: wait until all 120 flows are counted.
    let took = wait_for(
        Duration::from_secs(10),
        "120 flows counted on the nodes",
        || {
            let took: Vec<f64> = (0..N).map(|i| connections(&lab, i) - base[i]).collect();
            (took.iter().sum::<f64>() >= 120.0).then_some(took)
        },
    );
    assert_eq!(took.iter().sum::<f64>(), 120.0, "{took:?}");
    assert!(
        took.iter().all(|c| *c >= 1.0),
        "every node took flows: {took:?}"
    );
}

/// New flows node `i` took over both services.
fn connections(lab: &BgpLab, i: usize) -> f64 {
    let m = lab.agents[i].as_ref().unwrap().metrics(&lab.lbs[i]);
    m.lines()
        .filter(|l| l.starts_with("weir_service_connections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn frr_with_bfd_drops_a_frozen_node_before_the_hold_time() {
    weir_lab::netns::require_root();
    let peering = Peering {
        bfd: true,
        ipv6: false,
        ..Peering::default()
    };
    let lab = one_node_with_frr(peering);
    wait_for(Duration::from_secs(10), "BFD up on both sides", || {
        lab.bfd_up(0).then_some(())
    });
    wait_for(Duration::from_secs(10), "the VIP route", || {
        (lab.fib(VIP4).len() == 1).then_some(())
    });
    // Freeze the agent: its TCP session stays open (the kernel still acknowledges), only
    // BFD stops. FRR must drop the route because BFD says so, not by the 9 s hold time.
    let pid = lab.agents[0].as_ref().unwrap().pid();
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    wait_for(Duration::from_secs(5), "the route withdrawn", || {
        lab.fib(VIP4).is_empty().then_some(())
    });
    let n = lab
        .router()
        .query(&format!("show bgp neighbors {} json", bgplab::lb4(0)));
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    // FRR closed the session with a Cease "BFD Down" NOTIFICATION.
    assert!(n.contains("BFD Down"), "the session was reset by BFD: {n}");
    // Thawed: BFD and the session come back, and so does the route.
    wait_for(Duration::from_secs(20), "the route back", || {
        (lab.fib(VIP4).len() == 1).then_some(())
    });
}

#[test]
fn bird_internal_peer_connects_to_passive_nodes_and_gets_local_pref() {
    weir_lab::netns::require_root();
    let peering = Peering {
        remote_as: LOCAL_AS,
        passive: true,
        ..Peering::default()
    };
    let mut lab = BgpLab::new(1, server_bin(), peering);
    lab.start_agent(0);
    lab.start_bird();
    lab.wait_established(0);
    let all = wait_for(Duration::from_secs(10), "the VIPs in BIRD", || {
        let r = lab.router().query("show route all");
        (r.contains(&format!("{VIP4}/32")) && r.contains(&format!("{VIP6}/128"))).then_some(r)
    });
    assert!(all.contains("BGP.local_pref: 200"), "{all}");
    assert!(
        all.contains(&format!("BGP.next_hop: {}", bgplab::lb4(0))),
        "{all}"
    );
    assert!(
        all.contains("(64512,100)") && all.contains("(65535,65281)"),
        "communities: {all}"
    );
    assert!(all.contains("(64512, 1, 2)"), "large communities: {all}");
    // Installed: the client reaches both VIPs through the node.
    wait_for(Duration::from_secs(10), "the routes in the kernel", || {
        (lab.fib(VIP4).len() == 1 && lab.fib(VIP6).len() == 1).then_some(())
    });
    for vip in [VIP4, VIP6] {
        let r = lab
            .get(vip, None, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("GET {vip}: {e}"));
        assert_eq!(r.status, 200);
    }
    // SIGTERM with the data plane staying (keep_on_exit, the default): BIRD, a
    // graceful-restart peer, keeps the routes and the VIPs keep answering.
    assert!(lab.agents[0].take().unwrap().stop().success());
    wait_for(
        Duration::from_secs(10),
        "BIRD to see the session go",
        || {
            let r = lab.router().query("show protocols");
            (!r.contains("Established")).then_some(())
        },
    );
    assert!(lab.fib(VIP4).len() == 1 && lab.fib(VIP6).len() == 1);
    for vip in [VIP4, VIP6] {
        lab.get(vip, None, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("GET {vip} with the agent stopped: {e}"));
    }
    // An agent that takes the data plane with it (keep_on_exit: false) withdraws first:
    // gone from BIRD and the kernel at SIGTERM.
    let config = format!(
        "{}dataplane:\n  keep_on_exit: false\n",
        bgplab::config(0, &lab.peering, None)
    );
    let mut a = weir_lab::agent::Agent::start(&lab.lbs[0], &lab.dirs[0].path, Some(&config));
    a.wait_ready(&lab.lbs[0]);
    lab.agents[0] = Some(a);
    lab.wait_established(0);
    wait_for(Duration::from_secs(10), "the routes fresh again", || {
        let r = lab.router().query("show route all");
        (r.contains(&format!("{VIP4}/32")) && !r.contains("stale")).then_some(())
    });
    assert!(lab.agents[0].take().unwrap().stop().success());
    wait_for(Duration::from_secs(5), "the routes withdrawn", || {
        (lab.fib(VIP4).is_empty() && lab.fib(VIP6).is_empty()).then_some(())
    });
}

/// A request to the fake Kubernetes API (in the router's namespace) from node 1's.
fn kube(lab: &BgpLab, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    try_kube(lab, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn try_kube(
    lab: &BgpLab,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> std::io::Result<(u16, Value)> {
    let api = format!("{}:6443", bgplab::RT4).parse().unwrap();
    weir_lab::fakeapi::request(&lab.lbs[0], api, method, path, body.as_ref())
}

fn kube_create(lab: &BgpLab, path: &str, body: Value) {
    let (code, v) = kube(lab, "POST", path, Some(body));
    assert_eq!(code, 201, "POST {path}: {v}");
}

/// FRR's paths to `prefix`: (next hop, communities as FRR prints them).
fn frr_paths(lab: &BgpLab, prefix: &str) -> Vec<(String, String)> {
    let out = lab
        .router()
        .query(&format!("show bgp ipv4 unicast {prefix} json"));
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let mut paths: Vec<(String, String)> = v["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["nexthops"][0]["ip"].as_str().unwrap_or("").to_string(),
                p["community"]["string"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    paths.sort();
    paths
}

/// How many times FRR's session with neighbor `n` reached Established.
fn frr_established(lab: &BgpLab, n: &str) -> u64 {
    let out = lab.router().query(&format!("show bgp neighbors {n} json"));
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    v[n]["connectionsEstablished"].as_u64().unwrap_or(0)
}

const PEERS: &str = "/apis/weir.dev/v1alpha1/bgppeers";
const ADVERTS: &str = "/apis/weir.dev/v1alpha1/bgpadvertisements";

/// Kubernetes mode: the peers, passwords and advertisements come from BGPPeer,
/// BGPAdvertisement and Secret objects in the fake API server (`weir_lab::fakeapi`, the one
/// mock: no kube-apiserver runs here) served to the real agents; FRR is the real router.
#[test]
fn kubernetes_resources_choose_peers_and_advertisements_per_node_without_flapping_sessions() {
    weir_lab::netns::require_root();
    let peering = Peering {
        ipv6: false,
        password: Some("k8s-md5-key".into()),
        ..Peering::default()
    };
    let mut lab = BgpLab::new(2, server_bin(), peering);
    lab.start_frr();
    let _apiserver = weir_lab::lab::Proc {
        child: lab
            .rt
            .command(server_bin().to_str().unwrap())
            .args(["fake-apiserver", "0.0.0.0:6443"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    };
    wait_for(Duration::from_secs(10), "the fake API server", || {
        let (code, _) = try_kube(&lab, "GET", "/api/v1/nodes", None).ok()?;
        (code == 200).then_some(())
    });
    for (i, rack) in ["a", "b"].iter().enumerate() {
        kube_create(
            &lab,
            "/api/v1/nodes",
            serde_json::json!({
                "metadata": {"name": format!("lb{}", i + 1), "labels": {"rack": rack}},
                "status": {"addresses": [{"type": "InternalIP", "address": bgplab::lb4(i)}]},
            }),
        );
    }
    for (name, cidr) in [
        ("public", "198.18.100.10/32"),
        ("other", "198.18.100.20/32"),
    ] {
        kube_create(
            &lab,
            "/apis/weir.dev/v1alpha1/ippools",
            serde_json::json!({"metadata": {"name": name}, "spec": {"addresses": [cidr]}}),
        );
    }
    for (name, ip) in [("web", VIP4), ("db", "198.18.100.20")] {
        kube_create(
            &lab,
            "/api/v1/namespaces/shop/services",
            serde_json::json!({
                "metadata": {"name": name},
                "spec": {
                    "type": "LoadBalancer", "loadBalancerClass": "weir.dev/lb",
                    "loadBalancerIP": ip, "ipFamilies": ["IPv4"],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}],
                },
            }),
        );
        kube_create(
            &lab,
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
            serde_json::json!({
                "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": weir_lab::lab::HTTP_PORT, "protocol": "TCP"}],
                "endpoints": bgplab::BACKENDS4.iter().map(|a| serde_json::json!({
                    "addresses": [a], "nodeName": "elsewhere", "conditions": {"ready": true}
                })).collect::<Vec<_>>(),
            }),
        );
    }
    // The password as a Secret in the agents' namespace ("k8s-md5-key", base64), beside
    // one no BGPPeer names.
    kube_create(
        &lab,
        "/api/v1/namespaces/weir-system/secrets",
        serde_json::json!({"metadata": {"name": "bgp"}, "data": {"password": "azhzLW1kNS1rZXk="}}),
    );
    kube_create(
        &lab,
        "/api/v1/namespaces/weir-system/secrets",
        serde_json::json!({"metadata": {"name": "unrelated"}, "data": {"token": "c2VjcmV0"}}),
    );
    // Rack a peers with the router; rack b not yet.
    let peer = |selector: Value| {
        serde_json::json!({
            "metadata": {"name": "rt"},
            "spec": {
                "address": bgplab::RT4, "remoteAS": 64513, "localAS": LOCAL_AS,
                "connectRetry": "500ms", "passwordSecret": {"name": "bgp"},
                "nodeSelector": selector,
            },
        })
    };
    kube_create(
        &lab,
        PEERS,
        peer(serde_json::json!({"matchLabels": {"rack": "a"}})),
    );
    kube_create(
        &lab,
        ADVERTS,
        serde_json::json!({"metadata": {"name": "public"}, "spec": {"ipPools": ["public"], "communities": ["64512:300"]}}),
    );

    let dirs = [weir_lab::lab::Scratch::new(), weir_lab::lab::Scratch::new()];
    let start = |lab: &mut BgpLab, i: usize| {
        let kubeconfig = dirs[i].path.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            weir_lab::fakeapi::kubeconfig(format!("{}:6443", bgplab::RT4).parse().unwrap()),
        )
        .unwrap();
        let name = format!("lb{}", i + 1);
        let mut agent = weir_lab::agent::Agent::start_with_chart_caps(
            &lab.lbs[i],
            &dirs[i].path,
            Some("node:\n  interfaces: [eth0]\nadmin:\n  listen: 127.0.0.1:9300\n"),
            &["--kubernetes", "--kubeconfig", kubeconfig.to_str().unwrap()],
            &[
                ("NODE_NAME", &name),
                ("POD_NAMESPACE", "weir-system"),
                ("POD_NAME", &format!("agent-{name}")),
            ],
        );
        agent.wait_ready(&lab.lbs[i]);
        lab.agents[i] = Some(agent);
    };
    start(&mut lab, 0);
    start(&mut lab, 1);
    lab.wait_established(0);
    // The agents read the one Secret a BGPPeer names, by name: they never list or watch the
    // namespace's Secrets (the chart's Role grants `get` only).
    let (_, requests) = kube(&lab, "GET", "/_requests", None);
    let secrets: BTreeSet<&str> = requests
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|r| r.starts_with("GET ") && r.contains("/secrets"))
        .collect();
    assert_eq!(
        secrets,
        BTreeSet::from(["GET /api/v1/namespaces/weir-system/secrets/bgp"]),
        "{requests}"
    );
    assert!(
        lab.bgp(1).is_empty(),
        "rack b has no peer: {:?}",
        lab.bgp(1)
    );

    // Only the public pool is advertised, with the advertisement's community, by rack a.
    let web = format!("{VIP4}/32");
    wait_for(Duration::from_secs(10), "web's route at FRR", || {
        (frr_paths(&lab, &web) == [(bgplab::lb4(0), "64512:300".to_string())]).then_some(())
    });
    assert!(frr_paths(&lab, "198.18.100.20/32").is_empty());
    assert_eq!(lab.fib(VIP4), [bgplab::lb4(0)]);
    let r = lab
        .get(VIP4, None, Duration::from_secs(3))
        .expect("GET web");
    assert_eq!(r.status, 200);

    // Every node peers now: rack b's session comes up; rack a's is left alone.
    let (_, current) = kube(&lab, "GET", &format!("{PEERS}/rt"), None);
    let mut replaced = peer(Value::Null);
    replaced["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    let (code, v) = kube(&lab, "PUT", &format!("{PEERS}/rt"), Some(replaced));
    assert_eq!(code, 200, "{v}");
    lab.wait_established(1);
    wait_for(Duration::from_secs(10), "two next hops for web", || {
        (lab.fib(VIP4).len() == 2).then_some(())
    });
    // A second advertisement for the other pool, with its own community: added beside the
    // first without touching the sessions.
    let created = std::time::Instant::now();
    kube_create(
        &lab,
        ADVERTS,
        serde_json::json!({"metadata": {"name": "other"}, "spec": {"ipPools": ["other"], "communities": ["64512:400"]}}),
    );
    wait_for(Duration::from_secs(10), "db's routes at FRR", || {
        (frr_paths(&lab, "198.18.100.20/32")
            == [
                (bgplab::lb4(0), "64512:400".to_string()),
                (bgplab::lb4(1), "64512:400".to_string()),
            ])
        .then_some(())
    });
    wait_for(Duration::from_secs(10), "db's route in the kernel", || {
        (lab.fib("198.18.100.20").len() == 2).then_some(())
    });
    eprintln!(
        "BGPAdvertisement created → both nodes' routes in the router's kernel: {} ms",
        created.elapsed().as_millis()
    );
    assert_eq!(
        frr_established(&lab, &bgplab::lb4(0)),
        1,
        "rack a's session never restarted"
    );
    let r = lab
        .get("198.18.100.20", None, Duration::from_secs(3))
        .expect("GET db");
    assert_eq!(r.status, 200);

    // A bad BGPPeer is left out with a message naming it and its field; the rest runs on.
    kube_create(
        &lab,
        PEERS,
        serde_json::json!({"metadata": {"name": "broken"}, "spec": {"address": "not-an-ip", "remoteAS": 64513, "localAS": LOCAL_AS}}),
    );
    let agent = lab.agents[0].as_ref().unwrap();
    let problems = wait_for(Duration::from_secs(10), "the problem reported", || {
        let (_, body) = agent.get(&lab.lbs[0], "/api/v1/bgp")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (!v["problems"].as_array()?.is_empty()).then_some(v["problems"].clone())
    });
    assert_eq!(
        problems,
        serde_json::json!(["BGPPeer broken: spec.address: \"not-an-ip\" is not an IP address"])
    );
    let metrics = agent.metrics(&lab.lbs[0]);
    assert_eq!(
        sample(&metrics, "weir_announce_resource_problems"),
        Some(1.0)
    );
    assert_eq!(lab.bgp(0).len(), 1);
    assert_eq!(frr_established(&lab, &bgplab::lb4(0)), 1);

    // The peer deleted: both nodes withdraw and close; the router's table empties.
    let (code, v) = kube(&lab, "DELETE", &format!("{PEERS}/rt"), None);
    assert_eq!(code, 200, "{v}");
    wait_for(Duration::from_secs(10), "the routes gone from FRR", || {
        (frr_paths(&lab, &web).is_empty() && lab.fib(VIP4).is_empty()).then_some(())
    });
    wait_for(
        Duration::from_secs(10),
        "no peer left on either node",
        || (lab.bgp(0).is_empty() && lab.bgp(1).is_empty()).then_some(()),
    );
    assert_ne!(frr_state(&lab, &bgplab::lb4(0)), "Established");
}

/// Graceful restart with FRR: the agent is SIGKILLed and started again 3 s later; FRR keeps
/// the route in its FIB meanwhile (stale, the session down), the pinned data plane keeps
/// serving, and requests through the VIP never fail; the new agent's session comes back with
/// the R bit and its End-of-RIB, and the route is fresh again.
#[test]
fn frr_keeps_the_routes_and_the_traffic_through_an_agent_restart() {
    weir_lab::netns::require_root();
    let peering = Peering {
        graceful_restart: true,
        ipv6: false,
        ..Peering::default()
    };
    let mut lab = one_node_with_frr(peering);
    wait_for(Duration::from_secs(10), "the VIP route", || {
        (lab.fib(VIP4).len() == 1).then_some(())
    });
    let neighbor = bgplab::lb4(0);
    let n = lab
        .router()
        .query(&format!("show bgp neighbors {neighbor} json"));
    assert!(n.contains("gracefulRestart"), "{n}");

    assert!(!lab.agents[0].take().unwrap().kill().success());
    wait_for(Duration::from_secs(10), "FRR to see the session go", || {
        (frr_state(&lab, &neighbor) != "Established").then_some(())
    });
    // Away for 3 s: the route stays (stale) and the VIP keeps answering.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut requests = 0;
    while std::time::Instant::now() < until {
        assert_eq!(
            lab.fib(VIP4).len(),
            1,
            "the route went while the agent was away"
        );
        lab.get(VIP4, None, Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("request {requests} while the agent was away: {e}"));
        requests += 1;
    }
    assert!(requests > 10, "{requests}");
    let stale = lab
        .router()
        .query(&format!("show bgp ipv4 unicast {VIP4}/32 json"));
    assert!(
        stale.to_lowercase().contains("stale"),
        "the route is kept as stale: {stale}"
    );

    lab.start_agent(0);
    lab.wait_established(0);
    wait_for(Duration::from_secs(10), "the route fresh again", || {
        let r = lab
            .router()
            .query(&format!("show bgp ipv4 unicast {VIP4}/32 json"));
        (!r.to_lowercase().contains("stale") && lab.fib(VIP4).len() == 1).then_some(())
    });
    lab.get(VIP4, None, Duration::from_secs(1))
        .expect("a request after the restart");
}

/// Graceful restart with GoBGP (IPv4 and IPv6 sessions): the routes stay in its RIB while the
/// agent is away (SIGKILL), and after the restart they are there, not stale. (GoBGP installs
/// no kernel routes: the traffic through a restart is FRR's test.)
#[test]
fn gobgp_keeps_the_routes_through_an_agent_restart() {
    weir_lab::netns::require_root();
    let peering = Peering {
        graceful_restart: true,
        ..Peering::default()
    };
    let mut lab = BgpLab::new(1, server_bin(), peering);
    lab.start_gobgp();
    lab.start_agent(0);
    lab.wait_established(0);
    for prefix in [format!("{VIP4}/32"), format!("{VIP6}/128")] {
        wait_for(Duration::from_secs(10), "the VIPs in GoBGP's RIB", || {
            gobgp_path(&lab, &prefix)
        });
    }
    assert!(!lab.agents[0].take().unwrap().kill().success());
    wait_for(
        Duration::from_secs(10),
        "GoBGP to see the session go",
        || {
            let n = lab.router().query(&format!("neighbor {}", bgplab::lb4(0)));
            (!n.contains("BGP state = ESTABLISHED")).then_some(())
        },
    );
    for prefix in [format!("{VIP4}/32"), format!("{VIP6}/128")] {
        let p = gobgp_path(&lab, &prefix).unwrap_or_else(|| panic!("{prefix} dropped"));
        assert_eq!(p["stale"], true, "{prefix} kept as stale: {p}");
    }
    lab.start_agent(0);
    lab.wait_established(0);
    for prefix in [format!("{VIP4}/32"), format!("{VIP6}/128")] {
        wait_for(Duration::from_secs(10), "the routes fresh again", || {
            gobgp_path(&lab, &prefix).filter(|p| p["stale"] != true)
        });
    }
}
