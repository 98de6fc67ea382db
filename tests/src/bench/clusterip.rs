//! ClusterIP from a client on the node: connections per second and their latency through
//! weir's socket hooks, against kube-proxy-like iptables and nftables rule sets, and against
//! the same client connecting to an endpoint directly (no Service: the floor).
//!
//! ```text
//!  uplink (u0) ──── eth-c [node] eth-s ──── s0 (pods: the endpoints)
//! ```
//! - The node: the client process (`weir-lab sockclient rate`, pinned to CPU 0) in a cgroup of
//!   the benchmark's own, and the Service machinery. Its default route is the uplink, as a
//!   node's is: a ClusterIP is no address of the node's and is routed out until something
//!   translates it.
//! - The pods: one namespace with the three endpoints' addresses behind a veth the node routes
//!   to, served by `weir-lab serve --http-pool` (four threads, pinned to CPU 1). The kernel's
//!   default offloads stay on.
//! - An exchange: `connect()`, `GET /whoami`, the whole answer, close — one at a time, so the
//!   latency is that of a new connection through the Service, and the rate its inverse.
//! - weir: the agent with `socket_lb` on the client's cgroup (and its XDP program on the uplink,
//!   where no packet of the benchmark passes). iptables: kube-proxy's `nat` OUTPUT chains (a
//!   rule per Service in `KUBE-SERVICES`, the measured one last, `statistic --mode random` per
//!   endpoint, `KUBE-MARK-MASQ`/`KUBE-POSTROUTING`), legacy iptables. nftables: kube-proxy's
//!   verdict map on (address, protocol, port) in an `output` nat chain and `numgen` per endpoint.
//! - Services: the measured one (three endpoints) plus fillers with one endpoint each.

use std::fmt::Write as _;

use super::throughput::{
    ENDPOINTS, filler_port, filler_vip, kube_endpoint_rules, load_iptables, load_nft, weir_config,
};

use crate::{
    agent::Agent,
    cgroup::TestCgroup,
    lab::{Proc, Scratch},
    netns::{Netns, veth},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Weir,
    Iptables,
    Nftables,
    /// No Service: the client connects to one endpoint's address.
    Direct,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Weir => "weir (socket hooks)",
            Self::Iptables => "iptables DNAT (kube-proxy-like)",
            Self::Nftables => "nftables DNAT map (kube-proxy-like)",
            Self::Direct => "no Service (to an endpoint)",
        }
    }
}

pub struct Row {
    pub mode: Mode,
    pub services: usize,
    /// Exchanges per second (the median run).
    pub rate: f64,
    /// Latency of one exchange in that run, in microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Exchanges that failed, over every run.
    pub errors: u64,
}

const CLUSTER_IP: &str = "198.18.100.10";
const PORT: u16 = 80;

struct Topo {
    node: Netns,
    pods: Netns,
    _uplink: Netns,
}

fn topo() -> Topo {
    let node = Netns::new("node");
    let pods = Netns::new("pods");
    let uplink = Netns::new("up");
    veth(&node, "eth-c", &uplink, "u0");
    veth(&node, "eth-s", &pods, "s0");
    node.ip("addr add 198.18.0.254/24 dev eth-c");
    uplink.ip("addr add 198.18.0.1/24 dev u0");
    node.ip("route add default via 198.18.0.1");
    node.ip("addr add 198.18.1.1/24 dev eth-s");
    node.sysctl("net.ipv4.ip_forward", "1");
    // A node opens many connections: the widest ephemeral range, as busy nodes are tuned.
    node.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    for ep in ENDPOINTS {
        pods.ip(&format!("addr add {ep}/24 dev s0"));
    }
    pods.ip("route add default via 198.18.1.1");
    pods.sysctl("net.core.somaxconn", "4096");
    Topo {
        node,
        pods,
        _uplink: uplink,
    }
}

fn iptables_rules(services: usize) -> String {
    let mut r = String::from(
        "*nat\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-SVC-MEASURED - [0:0]\n",
    );
    for i in 0..ENDPOINTS.len() {
        let _ = writeln!(r, ":KUBE-SEP-{i} - [0:0]");
    }
    r.push_str(
        "-A OUTPUT -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for i in 1..services {
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {}/32 -p tcp --dport {PORT} -j DNAT --to-destination 198.18.1.11:{}",
            filler_vip(i),
            filler_port(i)
        );
    }
    let _ = writeln!(
        r,
        "-A KUBE-SERVICES -d {CLUSTER_IP}/32 -p tcp --dport {PORT} -j KUBE-SVC-MEASURED"
    );
    r.push_str(&kube_endpoint_rules("KUBE-SVC-MEASURED", "tcp", true));
    r.push_str("COMMIT\n");
    r
}

fn nft_rules(services: usize) -> String {
    let mut r = String::from("table ip weir_bench {\n");
    r.push_str("  chain filler { meta l4proto tcp dnat to 198.18.1.11:9999; }\n");
    for (i, ep) in ENDPOINTS.iter().enumerate() {
        let _ = writeln!(
            r,
            "  chain sep-{i} {{ meta l4proto tcp dnat to {ep}:8080; }}"
        );
    }
    r.push_str("  chain svc-measured { numgen random mod 3 vmap { 0 : goto sep-0, 1 : goto sep-1, 2 : goto sep-2 }; }\n");
    r.push_str("  map services {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {\n");
    let _ = writeln!(r, "      {CLUSTER_IP} . tcp . {PORT} : goto svc-measured,");
    for i in 1..services {
        let _ = writeln!(r, "      {} . tcp . {PORT} : goto filler,", filler_vip(i));
    }
    r.push_str("    }\n  }\n");
    r.push_str("  chain output {\n    type nat hook output priority -100; policy accept;\n    ip daddr . meta l4proto . th dport vmap @services\n  }\n}\n");
    r
}

/// One run of the client: (exchanges, errors, p50 ns, p99 ns).
fn client(t: &Topo, cg: &TestCgroup, to: &str, secs: u64) -> (u64, u64, u64, u64) {
    let bin = std::env::current_exe().expect("own path");
    let out = cg
        .command(
            &t.node,
            &bin,
            &["sockclient", "rate", to, &secs.to_string()],
        )
        .output()
        .expect("sockclient");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "sockclient rate {to}: no {k} in {text:?} ({})",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    };
    (
        field("count"),
        field("errors"),
        field("p50_ns"),
        field("p99_ns"),
    )
}

fn measure(mode: Mode, services: usize, quick: bool) -> Row {
    let t = topo();
    let dir = Scratch::new();
    let cg = TestCgroup::new();
    let bin = std::env::current_exe().expect("own path");
    let mut server = t.pods.command("taskset");
    server.args([
        "-c",
        "1",
        bin.to_str().expect("utf-8 path"),
        "serve",
        "--name",
        "pod",
        "--http-pool",
        "0.0.0.0:8080",
    ]);
    let _server = Proc::spawn_ready(&mut server, "endpoint server");
    let mut agent = None;
    match mode {
        Mode::Weir => {
            let node = format!(
                "  interfaces: [eth-c]\n  socket_lb: {{enabled: true, cgroup: {}}}\n",
                cg.path().display()
            );
            let config = weir_config(&node, CLUSTER_IP, PORT, "tcp", services);
            let mut a = Agent::start(&t.node, &dir.path, Some(&config));
            a.wait_ready(&t.node);
            agent = Some(a);
        }
        Mode::Iptables => {
            load_iptables(&t.node, &dir.path, &iptables_rules(services));
        }
        Mode::Nftables => {
            load_nft(&t.node, &dir.path, &nft_rules(services));
        }
        Mode::Direct => {}
    }
    let to = if mode == Mode::Direct {
        format!("{}:8080", ENDPOINTS[0])
    } else {
        format!("{CLUSTER_IP}:{PORT}")
    };
    // Warm up: caches, the server's threads, the first connections.
    let (warm, _, _, _) = client(&t, &cg, &to, 1);
    assert!(warm > 0, "{}: no exchange succeeded", mode.name());
    let (runs, secs) = if quick { (1, 1) } else { (3, 3) };
    let mut errors = 0;
    let mut got: Vec<(f64, u64, u64)> = (0..runs)
        .map(|_| {
            let (n, e, p50, p99) = client(&t, &cg, &to, secs);
            errors += e;
            (n as f64 / secs as f64, p50, p99)
        })
        .collect();
    got.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (rate, p50, p99) = got[got.len() / 2];
    drop(agent);
    Row {
        mode,
        services,
        rate,
        p50_us: p50 as f64 / 1e3,
        p99_us: p99 as f64 / 1e3,
        errors,
    }
}

pub fn run(quick: bool) -> Vec<Row> {
    let counts: &[usize] = if quick { &[1, 1000] } else { &[1, 1000, 10000] };
    let mut rows = vec![measure(Mode::Direct, 0, quick)];
    for &services in counts {
        for mode in [Mode::Weir, Mode::Iptables, Mode::Nftables] {
            eprintln!("clusterip: {} with {services} services", mode.name());
            rows.push(measure(mode, services, quick));
        }
    }
    rows
}
