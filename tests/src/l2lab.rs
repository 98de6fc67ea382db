//! The L2 announcement lab: LB nodes, a client and a backend on one link (a bridge in a
//! namespace of its own), each LB node running the real agent with gossip to the others:
//!
//! ```text
//!                    [sw: br0]
//!   client 198.18.0.1 ──┤├── lb1 198.18.0.11, lb2 198.18.0.12, ... (XDP on eth0)
//!  backend 198.18.0.50 ──┘
//! ```
//! One service, `web` at 198.18.0.100:80, whose backend is on the same link, so the LB nodes
//! source-NAT to their own address (one-arm). The client has the VIP on its link: it resolves
//! it by ARP, which only the owner answers.

use std::{
    io,
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    agent::{Agent, wait_for},
    clients::{self, Response},
    lab::{HTTP_PORT, Proc, Scratch},
    netns::{Netns, parse_mac, veth},
    xdp::LabXdp,
};

pub const VIP: &str = "198.18.0.100";
pub const CLIENT: &str = "198.18.0.1";
pub const BACKEND: &str = "198.18.0.50";

pub fn lb_addr(i: usize) -> String {
    format!("198.18.0.{}", 11 + i)
}

/// Node `i`'s config among `n`, with the gossip key in `key`.
pub fn config(i: usize, n: usize, key: &Path) -> String {
    let peers: Vec<String> = (0..n)
        .filter(|j| *j != i)
        .map(|j| format!("{}:7946", lb_addr(j)))
        .collect();
    format!(
        "node:
  interfaces: [eth0]
  source_nat: {{ipv4: {me}}}
admin:
  listen: 127.0.0.1:9300
services:
  - name: web
    vip: {VIP}
    port: 80
    protocol: tcp
    source_nat: true
    backends: [{{address: {BACKEND}, port: {HTTP_PORT}}}]
announce:
  node_name: lb{n1}
  l2:
    interfaces: [eth0]
  gossip:
    listen: {me}:7946
    peers: [{peers}]
    interval: 100ms
    dead_after: 400ms
    key_file: {key}
",
        me = lb_addr(i),
        n1 = i + 1,
        peers = peers.join(", "),
        key = key.display(),
    )
}

/// Node `i`'s node config in Kubernetes mode: the services come from the API, the gossip
/// peers from the Nodes the L2Advertisements select.
pub fn kube_config(i: usize, key: &Path) -> String {
    format!(
        "node:
  interfaces: [eth0]
admin:
  listen: 127.0.0.1:9300
announce:
  l2:
    interfaces: [eth0]
  gossip:
    listen: {me}:7946
    interval: 100ms
    dead_after: 400ms
    key_file: {key}
",
        me = lb_addr(i),
        key = key.display(),
    )
}

/// Where the fake Kubernetes API listens in Kubernetes mode (on the switch's bridge).
pub const API: &str = "198.18.0.254:6443";

/// Fields drop in order: agents and processes before the namespaces they run in.
pub struct L2Lab {
    pub agents: Vec<Option<Agent>>,
    /// Kubernetes mode: the fake API server.
    pub apiserver: Option<Proc>,
    _server: Proc,
    _ports: Vec<LabXdp>,
    dirs: Vec<Scratch>,
    /// Holds the gossip key every node shares (as the chart's Secret does).
    keys: Scratch,
    /// The LB nodes' MACs on the link.
    pub macs: Vec<[u8; 6]>,
    pub lbs: Vec<Netns>,
    pub client: Netns,
    pub backend: Netns,
    pub sw: Netns,
}

impl L2Lab {
    /// `n` LB nodes with their agents ready; `bin` is the `weir-lab` binary (the backend's
    /// server).
    pub fn new(n: usize, bin: &Path) -> Self {
        let mut lab = Self::without_agents(n, bin);
        for i in 0..n {
            lab.start_agent(i);
        }
        lab
    }

    /// Kubernetes mode: the fake API server (`crate::fakeapi`) on the switch at [`API`] and `n`
    /// LB nodes without agents (the test fills the API first, then
    /// [`L2Lab::start_agent`]).
    pub fn kubernetes(n: usize, bin: &Path) -> Self {
        let mut lab = Self::without_agents(n, bin);
        lab.sw.ip("addr add 198.18.0.254/24 dev br0");
        lab.apiserver = Some(Proc {
            child: lab
                .sw
                .command(bin.to_str().expect("utf-8"))
                .args(["fake-apiserver", API])
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("the fake API server"),
        });
        for d in &lab.dirs {
            std::fs::write(
                d.path.join("kubeconfig"),
                crate::fakeapi::kubeconfig(API.parse().expect("addr")),
            )
            .expect("kubeconfig");
        }
        lab
    }

    fn without_agents(n: usize, bin: &Path) -> Self {
        let sw = Netns::new("sw");
        sw.ip("link add br0 type bridge");
        sw.ip("link set br0 up");
        let client = Netns::new("client");
        let backend = Netns::new("backend");
        let lbs: Vec<Netns> = (0..n)
            .map(|i| Netns::new(&format!("lb{}", i + 1)))
            .collect();
        let mut ports = Vec::new();
        let mut attach = |ns: &Netns, port: &str| {
            veth(ns, "eth0", &sw, port);
            sw.ip(&format!("link set {port} master br0"));
            // Frames a node sends back with XDP_TX reach the bridge only through a peer that
            // runs XDP itself (see `crate::lab`).
            ports.push(LabXdp::attach(&sw, port, "lab_pass"));
        };
        attach(&client, "p-c");
        attach(&backend, "p-b");
        for (i, lb) in lbs.iter().enumerate() {
            attach(lb, &format!("p-{}", i + 1));
        }
        client.ip(&format!("addr add {CLIENT}/24 dev eth0"));
        backend.ip(&format!("addr add {BACKEND}/24 dev eth0"));
        // Complete checksums from the stacks whose packets XDP rewrites.
        for ns in [&client, &backend] {
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
        }
        let macs = lbs
            .iter()
            .enumerate()
            .map(|(i, lb)| {
                lb.ip(&format!("addr add {}/24 dev eth0", lb_addr(i)));
                lb.sysctl("net.ipv4.ip_forward", "1");
                lb.sysctl("net.ipv4.conf.all.rp_filter", "0");
                lb.exec(&["ethtool", "-K", "eth0", "gro", "on"]);
                // The backend's neighbour entry, so that the first flow is sent by XDP itself.
                lb.exec(&["ping", "-c", "1", "-W", "2", BACKEND]);
                lb.mac("eth0")
            })
            .collect();
        let server = crate::lab::serve_http(&backend, bin, "b1", &[BACKEND.parse().expect("ip")]);
        let keys = Scratch::new();
        std::fs::write(
            keys.path.join("gossip.key"),
            "lab gossip key, shared by every LB node\n",
        )
        .expect("gossip key");
        Self {
            agents: (0..n).map(|_| None).collect(),
            apiserver: None,
            _server: server,
            _ports: ports,
            dirs: (0..n).map(|_| Scratch::new()).collect(),
            keys,
            macs,
            lbs,
            client,
            backend,
            sw,
        }
    }

    /// Starts node `i`'s agent and waits until it is ready (in Kubernetes mode as node
    /// `lb{i+1}`, with only the chart's capabilities).
    pub fn start_agent(&mut self, i: usize) {
        let n = self.lbs.len();
        let dir = &self.dirs[i].path;
        let mut a = if self.apiserver.is_some() {
            let name = format!("lb{}", i + 1);
            let kubeconfig = dir.join("kubeconfig");
            Agent::start_with_chart_caps(
                &self.lbs[i],
                dir,
                Some(&kube_config(i, &self.gossip_key())),
                &[
                    "--kubernetes",
                    "--kubeconfig",
                    kubeconfig.to_str().expect("utf-8"),
                ],
                &[
                    ("NODE_NAME", &name),
                    ("POD_NAMESPACE", "weir-system"),
                    ("POD_NAME", &format!("agent-{name}")),
                ],
            )
        } else {
            Agent::start(&self.lbs[i], dir, Some(&config(i, n, &self.gossip_key())))
        };
        a.wait_ready(&self.lbs[i]);
        self.agents[i] = Some(a);
    }

    /// The gossip key file every node's config names.
    pub fn gossip_key(&self) -> std::path::PathBuf {
        self.keys.path.join("gossip.key")
    }

    /// SIGKILLs node `i`'s agent (its data plane stays attached).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(a) = self.agents[i].take() {
            a.signal(libc::SIGKILL);
        }
    }

    /// Whether node `i`'s agent says (in `/api/v1/services`) it answers for the VIP now.
    pub fn announcing(&self, i: usize) -> bool {
        self.agents[i].as_ref().is_some_and(|a| {
            a.services(&self.lbs[i])["services"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["vip"] == VIP && s["announced"] == true)
        })
    }

    /// The one node whose agent announces the VIP, once there is exactly one and the client,
    /// resolving the VIP afresh, reaches the service through it (a hand-over may be under
    /// way when the agents are asked).
    pub fn owner(&self) -> usize {
        wait_for(
            Duration::from_secs(10),
            "one node announcing the VIP",
            || {
                let on: Vec<usize> = (0..self.lbs.len())
                    .filter(|i| self.announcing(*i))
                    .collect();
                let [o] = on[..] else {
                    return None;
                };
                self.client.ip(&format!("neigh flush {VIP}"));
                self.get(Duration::from_secs(1)).ok()?;
                (self.vip_mac() == Some(self.macs[o])).then_some(o)
            },
        )
    }

    /// GET http://VIP/ from the client.
    pub fn get(&self, timeout: Duration) -> io::Result<Response> {
        let vip = format!("{VIP}:80").parse().expect("vip");
        self.client
            .run_in(|| clients::http_get(None, vip, "/", timeout))
    }

    /// The MAC the client's neighbour table has for the VIP.
    pub fn vip_mac(&self) -> Option<[u8; 6]> {
        let neigh = self.client.ip(&format!("neigh show {VIP}"));
        neigh.split("lladdr ").nth(1).map(|m| parse_mac(&m[..17]))
    }

    /// The node with MAC `mac`.
    pub fn node_of(&self, mac: [u8; 6]) -> Option<usize> {
        self.macs.iter().position(|m| *m == mac)
    }

    /// Node `i`'s ARP answers so far (`weir_dataplane_packets_total{path="arp_reply"}`).
    pub fn arp_replies(&self, i: usize) -> f64 {
        let a = self.agents[i].as_ref().expect("a running agent");
        crate::agent::sample(
            &a.metrics(&self.lbs[i]),
            "weir_dataplane_packets_total{path=\"arp_reply\"}",
        )
        .unwrap_or(0.0)
    }

    /// Kills the owner's agent (`link_down` false) or takes its link down, and measures the
    /// time to the client's first success through another node: (old owner, new owner, time).
    pub fn failover(&mut self) -> (usize, usize, Duration) {
        self.fail_owner(false)
    }

    pub fn fail_owner(&mut self, link_down: bool) -> (usize, usize, Duration) {
        // The client's neighbour entry on the owner, as the clients of a steady VIP have it.
        let owner = self.owner();
        let owner_mac = self.macs[owner];
        if link_down {
            self.lbs[owner].ip("link set eth0 down");
        } else {
            self.kill_agent(owner);
        }
        let killed = Instant::now();
        let new_mac = wait_for(
            Duration::from_secs(10),
            "the client moved to another node",
            || {
                let mac = self.vip_mac().filter(|m| *m != owner_mac)?;
                self.get(Duration::from_millis(200)).ok().map(|_| mac)
            },
        );
        let took = killed.elapsed();
        let new_owner = self.node_of(new_mac).expect("an LB node's MAC");
        (owner, new_owner, took)
    }
}
