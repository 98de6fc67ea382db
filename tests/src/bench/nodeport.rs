//! Packets per second to a NodePort through the LB node: weir in Kubernetes mode as kube-proxy's
//! replacement (the fake API server serves the Services: no kube-apiserver runs here) against
//! kube-proxy-like iptables and nftables NodePort rules, on the throughput benchmark's topology
//! and generator (see `throughput`), with the frames to the LB node's own address and the
//! measured Service's node port.
//!
//! - Every Service is of type NodePort with `externalTrafficPolicy: Local` and its endpoints
//!   on this node (no source NAT in any of the three), TCP/UDP as the measured one is UDP.
//! - iptables: kube-proxy's order — the ClusterIP rule of every Service in `KUBE-SERVICES`,
//!   then `-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`, a rule per node port there (the
//!   measured one last), `KUBE-EXT` → `KUBE-SVL` → `statistic` per endpoint → DNAT.
//! - nftables: kube-proxy's `service-ips` map, then `fib daddr type local` and the
//!   `service-nodeports` verdict map on (protocol, port).

use std::{fmt::Write as _, net::SocketAddr, process::Stdio, time::Duration};

use serde_json::{Value, json};

use super::throughput::{ENDPOINTS, Mode, Row, kernel_rules, kube_endpoint_rules, pps, topo_to};
use crate::{
    agent::{Agent, wait_for},
    cgroup::TestCgroup,
    lab::{Proc, Scratch},
};

/// The LB node's address on the generator's side: its NodePort address.
const NODE_IP: &str = "198.18.0.254";
const NODE_PORT: u16 = 30000;
const API: &str = "127.0.0.1:6443";

fn cluster_ip(i: usize) -> String {
    // 198.19.0.0/16: inside the benchmarking range, away from the lab's addresses.
    format!("198.19.{}.{}", i / 250, i % 250 + 1)
}

/// Service `i` (0: the measured one, three endpoints; the others one each on its own port).
fn objects(i: usize) -> (Value, Value) {
    let name = format!("s{i}");
    let (endpoints, port): (Vec<&str>, u16) = if i == 0 {
        (ENDPOINTS.to_vec(), 8080)
    } else {
        (vec![ENDPOINTS[0]], 10000 + i as u16)
    };
    let service = json!({"metadata": {"name": name}, "spec": {
        "type": "NodePort", "clusterIP": cluster_ip(i), "clusterIPs": [cluster_ip(i)],
        "ipFamilies": ["IPv4"], "externalTrafficPolicy": "Local",
        "ports": [{"name": "p", "port": 5000, "protocol": "UDP", "targetPort": port,
                   "nodePort": NODE_PORT + i as u16}],
    }});
    let slice = json!({
        "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": port, "protocol": "UDP"}],
        "endpoints": endpoints.iter().map(|a| json!({
            "addresses": [a], "nodeName": "lb-node", "conditions": {"ready": true}
        })).collect::<Vec<_>>(),
    });
    (service, slice)
}

fn iptables_rules(services: usize) -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-EXT-MEASURED - [0:0]\n:KUBE-SVL-MEASURED - [0:0]\n",
    );
    for i in 0..ENDPOINTS.len() {
        let _ = writeln!(r, ":KUBE-SEP-{i} - [0:0]");
    }
    r.push_str("-A PREROUTING -j KUBE-SERVICES\n");
    for i in 0..services {
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {}/32 -p udp --dport 5000 -j DNAT --to-destination {}:{}",
            cluster_ip(i),
            ENDPOINTS[0],
            10000 + i
        );
    }
    r.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for i in 1..services {
        let _ = writeln!(
            r,
            "-A KUBE-NODEPORTS -p udp --dport {} -j DNAT --to-destination {}:{}",
            NODE_PORT as usize + i,
            ENDPOINTS[0],
            10000 + i
        );
    }
    let _ = writeln!(
        r,
        "-A KUBE-NODEPORTS -p udp --dport {NODE_PORT} -j KUBE-EXT-MEASURED\n\
         -A KUBE-EXT-MEASURED -j KUBE-SVL-MEASURED"
    );
    r.push_str(&kube_endpoint_rules("KUBE-SVL-MEASURED", "udp", false));
    r.push_str("COMMIT\n");
    r
}

fn nft_rules(services: usize) -> String {
    let mut r = String::from("table ip weir_bench {\n");
    let _ = writeln!(
        r,
        "  chain filler {{ meta l4proto udp dnat to {}:9999; }}",
        ENDPOINTS[0]
    );
    for (i, ep) in ENDPOINTS.iter().enumerate() {
        let _ = writeln!(
            r,
            "  chain sep-{i} {{ meta l4proto udp dnat to {ep}:8080; }}"
        );
    }
    r.push_str("  chain svc-measured { numgen random mod 3 vmap { 0 : goto sep-0, 1 : goto sep-1, 2 : goto sep-2 }; }\n");
    r.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {\n");
    for i in 0..services {
        let _ = writeln!(r, "      {} . udp . 5000 : goto filler,", cluster_ip(i));
    }
    r.push_str("    }\n  }\n");
    r.push_str("  map service-nodeports {\n    type inet_proto . inet_service : verdict\n    elements = {\n");
    let _ = writeln!(r, "      udp . {NODE_PORT} : goto svc-measured,");
    for i in 1..services {
        let _ = writeln!(r, "      udp . {} : goto filler,", NODE_PORT as usize + i);
    }
    r.push_str("    }\n  }\n");
    r.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n\
         \x20   ip daddr . meta l4proto . th dport vmap @service-ips\n\
         \x20   fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n  }\n}\n",
    );
    r
}

/// The fake API server in the LB node's namespace with the node and `services` NodePort
/// Services, and the agent in Kubernetes mode as kube-proxy's replacement, once every
/// Service's node port is programmed.
fn start_weir(
    lb: &crate::netns::Netns,
    dir: &Scratch,
    cg: &TestCgroup,
    services: usize,
) -> (Proc, Agent) {
    let bin = std::env::current_exe().expect("own path");
    let api: SocketAddr = API.parse().expect("literal");
    let apiserver = Proc {
        child: lb
            .command(bin.to_str().expect("utf-8 path"))
            .args(["fake-apiserver", API])
            .stdin(Stdio::null())
            .spawn()
            .expect("fake API server"),
    };
    let post = |path: &str, body: &Value| {
        let (code, v) = wait_for(Duration::from_secs(10), "the fake API server", || {
            crate::fakeapi::request(lb, api, "POST", path, Some(body)).ok()
        });
        assert_eq!(code, 201, "POST {path}: {v}");
    };
    post(
        "/api/v1/nodes",
        &json!({"metadata": {"name": "lb-node"},
                "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}),
    );
    for i in 0..services {
        let (service, slice) = objects(i);
        post(
            "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices",
            &slice,
        );
        post("/api/v1/namespaces/bench/services", &service);
    }
    let kubeconfig = dir.path.join("kubeconfig");
    std::fs::write(&kubeconfig, crate::fakeapi::kubeconfig(api)).expect("kubeconfig");
    let max = (2 * services + 2).next_power_of_two().max(4096);
    let config = format!(
        "node:\n  interfaces: [eth-c, eth-s]\n  xdp_mode: native\n  kube_proxy_replacement: true\n  \
         socket_lb: {{cgroup: {}}}\nadmin:\n  listen: 127.0.0.1:9300\n\
         dataplane:\n  max_services: {max}\n  max_backends: {}\n",
        cg.path().display(),
        max + 8
    );
    let mut agent = Agent::start_kubernetes(lb, &dir.path, &config, &kubeconfig);
    agent.wait_ready(lb);
    let last = NODE_PORT as usize + services - 1;
    wait_for(Duration::from_mins(2), "every node port programmed", || {
        let s = agent.services(lb);
        s["services"]
            .as_array()?
            .iter()
            .any(|f| f["vip"] == NODE_IP && f["port"] == last)
            .then_some(())
    });
    (apiserver, agent)
}

fn measure(mode: Mode, services: usize, quick: bool) -> Row {
    let t = topo_to(NODE_IP, NODE_PORT);
    let dir = Scratch::new();
    let cg = TestCgroup::new();
    let mut weir = None;
    if mode == Mode::Weir {
        weir = Some(start_weir(&t.lb, &dir, &cg, services));
    }
    let _pass = kernel_rules(
        &t,
        &dir.path,
        mode,
        || iptables_rules(services),
        || nft_rules(services),
    );
    let (pps, offered_pps) = pps(&t, quick, mode.name());
    drop(weir);
    Row {
        mode,
        services,
        pps,
        offered_pps,
    }
}

pub fn run(quick: bool) -> Vec<Row> {
    let counts: &[usize] = if quick { &[1, 100] } else { &[1, 1000] };
    let mut rows = Vec::new();
    for &services in counts {
        for mode in [Mode::Weir, Mode::Iptables, Mode::Nftables] {
            eprintln!("nodeport: {} with {services} services", mode.name());
            rows.push(measure(mode, services, quick));
        }
    }
    rows
}
