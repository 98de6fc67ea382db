//! The standalone lab: a client namespace, an LB node and N backend namespaces, in one of three
//! topologies ([`Topology`]).
//!
//! ```text
//!  client (198.18.0.1, fd00:18::1)                   backend i (198.18.1.1<i>, fd00:1::1<i>)
//!    eth0 ──── eth-c  [LB node: weir's XDP in, TC out]
//!          198.18.0.254      │
//!                            ├─ Bridge (default): br-pods (198.18.1.1/24, fd00:1::1/64)
//!                            │     └ veth-b<i> ──── eth0          (as pods on a CNI bridge)
//!                            ├─ Routed: veth-b<i> (198.18.1.1/32, a /32 route) ── eth0
//!                            │                                    (as pods on routed veths)
//!                            └─ WeirPorts: eth-b<i>, one of weir's interfaces ── eth0
//! ```
//! The client routes the VIPs (198.18.100.0/24, fd00:100::/64) to the LB node; the LB node is
//! every backend's gateway. The addresses match `examples/standalone.yaml`, the agent's
//! embedded default, whose `node.interfaces` is `[eth-c]`: in the bridge and routed
//! topologies the backends are reached through the kernel, as pods are on a real node, with
//! every backend-side interface at the kernel's defaults (scatter-gather, TSO, GRO, checksum
//! offload), so replies reach weir's TC program as GSO super-packets with their payload in
//! page fragments and partial checksums. In `WeirPorts` the backends' veths run weir's XDP
//! too, which lets XDP redirect to them (and makes the kernel hand them linear skbs).
//!
//! Lab-only settings, because a veth is not a NIC:
//! - the client's veth computes checksums in software (`tx off`): it stands in for a NIC,
//!   which delivers complete checksums; a veth hands over the partial ones of a local stack,
//!   which no XDP program can fix up (and weir's XDP runs on the LB end of that link);
//! - the client's veth runs `lab_pass`: it stands in for a NIC's receive path, which picks up
//!   frames sent back with XDP_TX (ICMP echo replies); a veth does so only when it runs XDP;
//! - in `WeirPorts`, the backends' veths have GRO on: it stands in for a NIC driver's NAPI
//!   context, which a veth needs to receive XDP redirects.
//!
//! The backends send ICMP errors without rate limit, so that UDP health checks see every port
//! unreachable (health checks of a real node see them at the kernel's rate).

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::netns::{Netns, veth};

pub const CLIENT_V4: &str = "198.18.0.1";
pub const CLIENT_V6: &str = "fd00:18::1";
pub const LB_V4: &str = "198.18.0.254";
pub const LB_V6: &str = "fd00:18::fe";
pub const VIP_V4: &str = "198.18.100.10";
pub const VIP_V6: &str = "fd00:100::10";

pub const HTTP_PORT: u16 = 8080;
pub const HTTPS_PORT: u16 = 8443;
pub const UDP_PORT: u16 = 7007;
pub const SCTP_PORT: u16 = 3869;

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    /// Spawns `cmd` and waits for the `ready` line a `weir-lab serve` prints once its sockets
    /// are bound (`what` names it in the panic).
    pub fn spawn_ready(cmd: &mut std::process::Command, what: &str) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        assert_eq!(line.trim(), "ready", "{what} did not start");
        Self { child }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Backend {
    pub name: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
    pub server: Option<Proc>,
    pub ns: Netns,
}

impl Backend {
    pub fn http(&self) -> SocketAddr {
        SocketAddr::new(self.v4, HTTP_PORT)
    }
}

/// A scratch directory removed on drop (kept when `WEIR_LAB_KEEP` is set).
pub struct Scratch {
    pub path: PathBuf,
}

static SCRATCH: AtomicU32 = AtomicU32::new(0);

impl Scratch {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "weir-lab-{}-{}",
            std::process::id(),
            SCRATCH.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { path }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("WEIR_LAB_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// `weir-lab serve` (`bin`) as backend `name` in `ns`, HTTP on port 8080 of each of `ips`,
/// once it is listening.
pub fn serve_http(ns: &Netns, bin: &Path, name: &str, ips: &[IpAddr]) -> Proc {
    let mut cmd = ns.command(bin.to_str().expect("utf-8 path"));
    cmd.args(["serve", "--name", name]);
    for ip in ips {
        cmd.args(["--http", &SocketAddr::new(*ip, HTTP_PORT).to_string()]);
    }
    Proc::spawn_ready(&mut cmd, &format!("server {name}"))
}

/// How the LB node reaches its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Behind a Linux bridge on the LB node (`br-pods`, ports `veth-b<i>`), as pods behind a
    /// CNI bridge: weir runs on `eth-c` only.
    Bridge,
    /// Each on a veth the LB node routes a /32 and /128 to (`veth-b<i>`), as pods of a
    /// routed CNI: weir runs on `eth-c` only.
    Routed,
    /// Each on a veth that is one of weir's interfaces (`eth-b<i>`), so XDP redirects to it.
    WeirPorts,
}

impl Topology {
    pub const ALL: [Topology; 3] = [Topology::Bridge, Topology::Routed, Topology::WeirPorts];
}

/// Fields drop in order: servers (inside `backends`) before the namespaces they run in.
pub struct Lab {
    /// `lab_pass` on the client's veth, so that it receives the frames weir sends back with
    /// XDP_TX (ICMP echo replies): a veth only picks those up when it runs XDP itself.
    pub client_xdp: crate::xdp::LabXdp,
    pub backends: Vec<Backend>,
    pub client: Netns,
    pub lb: Netns,
    pub dir: Scratch,
    pub topology: Topology,
}

impl Lab {
    /// The lab with `n` backends (1..=9) behind a bridge, no servers yet.
    pub fn new(n: usize) -> Self {
        Self::with_topology(n, Topology::Bridge)
    }

    /// The lab with `n` backends (1..=9) in `topology`, no servers yet.
    pub fn with_topology(n: usize, topology: Topology) -> Self {
        assert!((1..=9).contains(&n));
        let client = Netns::new("client");
        let lb = Netns::new("lb");
        veth(&client, "eth0", &lb, "eth-c");
        client.ip(&format!("addr add {CLIENT_V4}/24 dev eth0"));
        client.ip(&format!("addr add {CLIENT_V6}/64 dev eth0 nodad"));
        client.ip(&format!("route add 198.18.100.0/24 via {LB_V4}"));
        client.ip(&format!("route add fd00:100::/64 via {LB_V6}"));
        client.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
        // Tests bind fixed client ports below 50000 (to predict Maglev's choice); the kernel's
        // own choice of ports for other connections stays above them, or a long-lived
        // connection could hold a port a test waits for.
        client.sysctl("net.ipv4.ip_local_port_range", "50000 60999");
        lb.ip(&format!("addr add {LB_V4}/24 dev eth-c"));
        lb.ip(&format!("addr add {LB_V6}/64 dev eth-c nodad"));
        lb.sysctl("net.ipv4.ip_forward", "1");
        lb.sysctl("net.ipv6.conf.all.forwarding", "1");
        lb.sysctl("net.ipv4.conf.all.rp_filter", "0");

        if topology == Topology::Bridge {
            lb.ip("link add br-pods type bridge");
            lb.ip("link set br-pods up");
            lb.ip("addr add 198.18.1.1/24 dev br-pods");
            lb.ip("addr add fd00:1::1/64 dev br-pods nodad");
        }
        let mut backends = Vec::new();
        for i in 1..=n {
            let name = format!("b{i}");
            let ns = Netns::new(&name);
            let lb_if = Self::backend_port(topology, i);
            veth(&lb, &lb_if, &ns, "eth0");
            let v4 = format!("198.18.1.{}", 10 + i);
            let v6 = format!("fd00:1::{}", 10 + i);
            ns.ip(&format!("addr add {v4}/24 dev eth0"));
            ns.ip(&format!("addr add {v6}/64 dev eth0 nodad"));
            ns.ip("route add default via 198.18.1.1");
            ns.ip("-6 route add default via fd00:1::1");
            // No ICMP rate limit (by default one error a second per destination after a small
            // burst): health checks tell a closed UDP port by its port unreachable.
            ns.sysctl("net.ipv4.icmp_ratelimit", "0");
            ns.sysctl("net.ipv6.icmp.ratelimit", "0");
            match topology {
                Topology::Bridge => lb.ip(&format!("link set {lb_if} master br-pods")),
                Topology::Routed | Topology::WeirPorts => {
                    lb.ip(&format!("addr add 198.18.1.1/32 dev {lb_if}"));
                    lb.ip(&format!("addr add fd00:1::1/128 dev {lb_if} nodad"));
                    lb.ip(&format!("route add {v4}/32 dev {lb_if}"));
                    lb.ip(&format!("-6 route add {v6}/128 dev {lb_if}"))
                }
            };
            if topology == Topology::WeirPorts {
                // Stands in for a NIC driver's NAPI context, which a veth needs to receive
                // XDP redirects.
                ns.exec(&["ethtool", "-K", "eth0", "gro", "on"]);
            }
            backends.push(Backend {
                name,
                v4: v4.parse().expect("v4"),
                v6: v6.parse().expect("v6"),
                server: None,
                ns,
            });
        }
        Self {
            client_xdp: crate::xdp::LabXdp::attach(&client, "eth0", "lab_pass"),
            backends,
            client,
            lb,
            dir: Scratch::new(),
            topology,
        }
    }

    /// The LB node's interface towards backend `i` (1-based) in `topology`.
    pub fn backend_port(topology: Topology, i: usize) -> String {
        match topology {
            Topology::WeirPorts => format!("eth-b{i}"),
            Topology::Bridge | Topology::Routed => format!("veth-b{i}"),
        }
    }

    /// Starts `weir-lab serve` (HTTP 8080, HTTPS 8443, UDP echo 7007, SCTP 3869, IPv4 and IPv6) in every
    /// backend and waits until each has bound its sockets. `bin` is the `weir-lab` binary.
    pub fn start_servers(&mut self, bin: &Path) {
        for i in 0..self.backends.len() {
            self.start_server(bin, i);
        }
    }

    pub fn start_server(&mut self, bin: &Path, i: usize) {
        let b = &mut self.backends[i];
        let bin = bin.to_str().expect("utf-8 path");
        let mut cmd = b.ns.command(bin);
        cmd.arg("serve").args(["--name", &b.name]);
        for ip in [b.v4, b.v6] {
            cmd.args(["--http", &SocketAddr::new(ip, HTTP_PORT).to_string()]);
            cmd.args(["--https", &SocketAddr::new(ip, HTTPS_PORT).to_string()]);
            cmd.args(["--udp", &SocketAddr::new(ip, UDP_PORT).to_string()]);
            cmd.args(["--sctp", &SocketAddr::new(ip, SCTP_PORT).to_string()]);
        }
        b.server = Some(Proc::spawn_ready(&mut cmd, &format!("server {}", b.name)));
    }

    /// Sends `GET /_control/<command>` to backend `i`'s server, from inside its namespace.
    pub fn control(&self, i: usize, command: &str) {
        let b = &self.backends[i];
        let addr = b.http();
        let r =
            b.ns.run_in(|| {
                crate::clients::http_get(
                    None,
                    addr,
                    &format!("/_control/{command}"),
                    std::time::Duration::from_secs(3),
                )
            })
            .unwrap_or_else(|e| panic!("control {command} on {}: {e}", b.name));
        assert_eq!(r.status, 200, "control {command} on {}", b.name);
    }

    /// Backend `i`'s server counters (`/_stats`), by name.
    pub fn stats(&self, i: usize) -> std::collections::BTreeMap<String, u64> {
        let b = &self.backends[i];
        let addr = b.http();
        let r =
            b.ns.run_in(|| {
                crate::clients::http_get(None, addr, "/_stats", std::time::Duration::from_secs(3))
            })
            .unwrap_or_else(|e| panic!("stats of {}: {e}", b.name));
        String::from_utf8_lossy(&r.body)
            .split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// SIGKILLs backend `i`'s server.
    pub fn kill_server(&mut self, i: usize) {
        if let Some(mut p) = self.backends[i].server.take() {
            p.kill();
        }
    }

    /// The backend called `name`.
    pub fn backend(&self, name: &str) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// The LB interfaces weir runs on, as `node.interfaces` lists them.
    pub fn interfaces(&self) -> Vec<String> {
        let mut v = vec!["eth-c".to_string()];
        if self.topology == Topology::WeirPorts {
            v.extend((1..=self.backends.len()).map(|i| Self::backend_port(self.topology, i)));
        }
        v
    }

    /// `config` (a standalone config with `node.interfaces: [eth-c]`, as the embedded
    /// default) with the interfaces of this lab's topology.
    pub fn config_for(&self, config: &str) -> String {
        let line = "interfaces: [eth-c]";
        assert!(config.contains(line), "a config with `{line}`");
        config.replacen(
            line,
            &format!("interfaces: [{}]", self.interfaces().join(", ")),
            1,
        )
    }
}
