//! The BGP announcement lab: LB nodes, two backends and a router on one link (a bridge in the
//! router's namespace), a client behind the router. Each LB node runs the real agent with a
//! BGP session to the router, where a real routing daemon runs — GoBGP, FRR (with bfdd for
//! BFD) or BIRD — and installs (FRR, BIRD) the VIP routes the nodes advertise:
//!
//! ```text
//!  client 198.18.1.1 ── rt 198.18.1.254 │ br0 198.18.2.254 ──┬── lb1 198.18.2.11, lb2 .12, lb3 .13
//!     fd00:1::1           fd00:1::fe    │     fd00:2::fe     └── backends 198.18.2.50, .51
//! ```
//! Services `web4` at 198.18.100.10:80 and `web6` at [fd00:100::10]:80, each with both
//! backends (HTTP health checks every 100 ms), source-NATed to the node's own address so
//! that a reply returns through the node its request came in by (the router spreads flows
//! over the nodes with ECMP).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    agent::{Agent, wait_for},
    clients::{self, Response},
    lab::{HTTP_PORT, Proc, Scratch},
    netns::{Netns, veth},
    xdp::LabXdp,
};

pub const VIP4: &str = "198.18.100.10";
pub const VIP6: &str = "fd00:100::10";
pub const CLIENT4: &str = "198.18.1.1";
pub const CLIENT6: &str = "fd00:1::1";
pub const RT4: &str = "198.18.2.254";
pub const RT6: &str = "fd00:2::fe";
pub const LOCAL_AS: u32 = 64512;
pub const BACKENDS4: [&str; 2] = ["198.18.2.50", "198.18.2.51"];
pub const BACKENDS6: [&str; 2] = ["fd00:2::50", "fd00:2::51"];

pub fn lb4(i: usize) -> String {
    format!("198.18.2.{}", 11 + i)
}

pub fn lb6(i: usize) -> String {
    format!("fd00:2::{}", 11 + i)
}

/// How the LB nodes peer with the router.
#[derive(Clone, Debug)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent switches of the lab's peering"
)]
pub struct Peering {
    /// The router's AS (LOCAL_AS: internal peering).
    pub remote_as: u32,
    /// Peer over IPv6 too (IPv6 VIPs go over the IPv6 session).
    pub ipv6: bool,
    /// The router connects to the nodes.
    pub passive: bool,
    /// TCP MD5 password the nodes use (None: no MD5).
    pub password: Option<String>,
    pub bfd: bool,
    /// The router is a graceful-restart helper (RFC 4724): it keeps a restarting node's
    /// routes while the session is down.
    pub graceful_restart: bool,
}

impl Default for Peering {
    fn default() -> Self {
        Self {
            remote_as: 64513,
            ipv6: true,
            passive: false,
            password: None,
            bfd: false,
            graceful_restart: false,
        }
    }
}

/// Node `i`'s agent config; `password_file` where the password was written.
pub fn config(i: usize, p: &Peering, password_file: Option<&Path>) -> String {
    let b4: Vec<String> = BACKENDS4
        .iter()
        .map(|b| format!("{{address: {b}, port: {HTTP_PORT}}}"))
        .collect();
    let b6: Vec<String> = BACKENDS6
        .iter()
        .map(|b| format!("{{address: \"{b}\", port: {HTTP_PORT}}}"))
        .collect();
    let mut peers = vec![RT4];
    if p.ipv6 {
        peers.push(RT6);
    }
    let peers: String = peers
        .iter()
        .map(|a| {
            let mut s = format!(
                "      - address: \"{a}\"\n        remote_as: {}\n        hold_time: 9s\n        connect_retry: 500ms\n",
                p.remote_as
            );
            if p.passive {
                s.push_str("        passive: true\n");
            }
            if p.bfd {
                s.push_str("        bfd: true\n");
            }
            if let Some(f) = password_file {
                s.push_str(&format!("        password_file: {}\n", f.display()));
            }
            s
        })
        .collect();
    let check =
        "health_check: {type: http, path: /, interval: 200ms, timeout: 200ms, rise: 1, fall: 2}";
    format!(
        "node:
  interfaces: [eth0]
  source_nat: {{ipv4: {me4}, ipv6: \"{me6}\"}}
admin:
  listen: 127.0.0.1:9300
services:
  - name: web4
    vip: {VIP4}
    port: 80
    protocol: tcp
    source_nat: true
    {check}
    backends: [{b4}]
  - name: web6
    vip: \"{VIP6}\"
    port: 80
    protocol: tcp
    source_nat: true
    {check}
    backends: [{b6}]
announce:
  node_name: lb{n1}
  bgp:
    local_as: {LOCAL_AS}
    router_id: {me4}
    communities: [\"64512:100\", no-export]
    large_communities: [\"64512:1:2\"]
    local_pref: 200
    bfd: {{interval: 100ms, multiplier: 3}}
    peers:
{peers}",
        me4 = lb4(i),
        me6 = lb6(i),
        n1 = i + 1,
        b4 = b4.join(", "),
        b6 = b6.join(", "),
    )
}

/// A routing daemon in the router's namespace (killed when dropped).
pub enum Router {
    Gobgp {
        _proc: Proc,
        sock: PathBuf,
    },
    Frr {
        bgpd: Proc,
        _zebra: Proc,
        _bfdd: Option<Proc>,
        vty: PathBuf,
    },
    Bird {
        _proc: Proc,
        ctl: PathBuf,
    },
}

impl Router {
    /// A query against the daemon: `gobgp` arguments, a vtysh command or a birdc command.
    pub fn query(&self, q: &str) -> String {
        let out = match self {
            Self::Gobgp { sock, .. } => {
                let target = format!("unix://{}", sock.display());
                let mut args = vec!["--target", target.as_str()];
                args.extend(q.split_whitespace());
                Command::new("gobgp").args(&args).output()
            }
            Self::Frr { vty, .. } => Command::new("vtysh")
                .args(["--vty_socket", vty.to_str().expect("utf-8"), "-c", q])
                .output(),
            Self::Bird { ctl, .. } => Command::new("birdc")
                .args(["-s", ctl.to_str().expect("utf-8")])
                .args(q.split_whitespace())
                .output(),
        }
        .expect("running the router's client");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// FRR's bgpd, to stop it (and so drop every session) in a test.
    pub fn frr_bgpd(&mut self) -> Option<&mut Proc> {
        match self {
            Self::Frr { bgpd, .. } => Some(bgpd),
            _ => None,
        }
    }
}

/// Fields drop in order: agents and daemons before the namespaces they run in.
pub struct BgpLab {
    pub agents: Vec<Option<Agent>>,
    pub router: Option<Router>,
    pub servers: Vec<Option<Proc>>,
    _ports: Vec<LabXdp>,
    pub dirs: Vec<Scratch>,
    pub rt_dir: Scratch,
    pub peering: Peering,
    pub lbs: Vec<Netns>,
    pub backend: Netns,
    pub client: Netns,
    pub rt: Netns,
    bin: PathBuf,
}

impl BgpLab {
    /// The namespaces, links, addresses and backends of `n` LB nodes; no daemon, no agent.
    pub fn new(n: usize, bin: &Path, peering: Peering) -> Self {
        let rt = Netns::new("rt");
        let client = Netns::new("client");
        let backend = Netns::new("backend");
        let lbs: Vec<Netns> = (0..n)
            .map(|i| Netns::new(&format!("lb{}", i + 1)))
            .collect();
        rt.ip("link add br0 type bridge");
        rt.ip("link set br0 up");
        rt.ip(&format!("addr add {RT4}/24 dev br0"));
        rt.ip(&format!("addr add {RT6}/64 dev br0 nodad"));
        rt.sysctl("net.ipv4.ip_forward", "1");
        rt.sysctl("net.ipv6.conf.all.forwarding", "1");
        rt.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
        rt.sysctl("net.ipv6.fib_multipath_hash_policy", "1");
        veth(&client, "eth0", &rt, "eth-c");
        rt.ip("addr add 198.18.1.254/24 dev eth-c");
        rt.ip("addr add fd00:1::fe/64 dev eth-c nodad");
        client.ip(&format!("addr add {CLIENT4}/24 dev eth0"));
        client.ip(&format!("addr add {CLIENT6}/64 dev eth0 nodad"));
        client.ip("route add default via 198.18.1.254");
        client.ip("-6 route add default via fd00:1::fe");
        let mut ports = Vec::new();
        let mut attach = |ns: &Netns, port: &str| {
            veth(ns, "eth0", &rt, port);
            rt.ip(&format!("link set {port} master br0"));
            // Frames a node sends back with XDP_TX reach the bridge only through a peer that
            // runs XDP itself (see `crate::lab`).
            ports.push(LabXdp::attach(&rt, port, "lab_pass"));
        };
        attach(&backend, "p-b");
        for (i, lb) in lbs.iter().enumerate() {
            attach(lb, &format!("p-{}", i + 1));
        }
        for (a4, a6) in BACKENDS4.iter().zip(BACKENDS6) {
            backend.ip(&format!("addr add {a4}/24 dev eth0"));
            backend.ip(&format!("addr add {a6}/64 dev eth0 nodad"));
        }
        for ns in [&client, &backend] {
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
        }
        for (i, lb) in lbs.iter().enumerate() {
            lb.ip(&format!("addr add {}/24 dev eth0", lb4(i)));
            lb.ip(&format!("addr add {}/64 dev eth0 nodad", lb6(i)));
            lb.ip(&format!("route add default via {RT4}"));
            lb.ip(&format!("-6 route add default via {RT6}"));
            lb.sysctl("net.ipv4.ip_forward", "1");
            lb.sysctl("net.ipv6.conf.all.forwarding", "1");
            lb.sysctl("net.ipv4.conf.all.rp_filter", "0");
            lb.exec(&["ethtool", "-K", "eth0", "gro", "on"]);
            // Neighbour entries of the backends and the router, so that XDP sends the first
            // packets itself.
            for b in BACKENDS4.iter().chain(&[RT4]) {
                lb.exec(&["ping", "-c", "1", "-W", "2", b]);
            }
            for b in BACKENDS6.iter().chain(&[RT6]) {
                lb.exec(&["ping", "-6", "-c", "1", "-W", "2", b]);
            }
        }
        let servers = (0..2)
            .map(|i| {
                Some(crate::lab::serve_http(
                    &backend,
                    bin,
                    &format!("b{}", i + 1),
                    &[
                        BACKENDS4[i].parse().expect("ip"),
                        BACKENDS6[i].parse().expect("ip"),
                    ],
                ))
            })
            .collect();
        Self {
            agents: (0..n).map(|_| None).collect(),
            router: None,
            servers,
            _ports: ports,
            dirs: (0..n).map(|_| Scratch::new()).collect(),
            rt_dir: Scratch::new(),
            peering,
            lbs,
            backend,
            client,
            rt,
            bin: bin.to_path_buf(),
        }
    }

    /// Starts node `i`'s agent with `password` (overriding the lab's) and waits until ready.
    pub fn start_agent_with(&mut self, i: usize, password: Option<&str>) {
        let file = password.map(|p| {
            let f = self.dirs[i].path.join("bgp-password");
            std::fs::write(&f, format!("{p}\n")).expect("password file");
            f
        });
        let mut a = Agent::start(
            &self.lbs[i],
            &self.dirs[i].path,
            Some(&config(i, &self.peering, file.as_deref())),
        );
        a.wait_ready(&self.lbs[i]);
        self.agents[i] = Some(a);
    }

    pub fn start_agent(&mut self, i: usize) {
        let p = self.peering.password.clone();
        self.start_agent_with(i, p.as_deref());
    }

    /// Node `i`'s `/api/v1/bgp` peers.
    pub fn bgp(&self, i: usize) -> Vec<serde_json::Value> {
        let a = self.agents[i].as_ref().expect("a running agent");
        let (_, body) = a.get(&self.lbs[i], "/api/v1/bgp").expect("/api/v1/bgp");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["peers"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until node `i` has every session Established.
    pub fn wait_established(&self, i: usize) {
        wait_for(Duration::from_secs(20), "BGP sessions Established", || {
            let peers = self.bgp(i);
            (!peers.is_empty() && peers.iter().all(|p| p["state"] == "established")).then_some(())
        });
    }

    /// Whether BFD between node `i` and the router (FRR) is up on both sides.
    pub fn bfd_up(&self, i: usize) -> bool {
        let ours = self.bgp(i).first().is_some_and(|p| p["bfd"] == "up");
        let theirs = self
            .router()
            .query(&format!("show bfd peer {} json", lb4(i)))
            .contains("\"status\":\"up\"");
        ours && theirs
    }

    /// Stops (SIGKILL) backend `b`'s server, or starts it again.
    pub fn set_backend(&mut self, b: usize, up: bool) {
        if up {
            self.servers[b] = Some(crate::lab::serve_http(
                &self.backend,
                &self.bin,
                &format!("b{}", b + 1),
                &[
                    BACKENDS4[b].parse().expect("ip"),
                    BACKENDS6[b].parse().expect("ip"),
                ],
            ));
        } else if let Some(mut s) = self.servers[b].take() {
            s.kill();
        }
    }

    fn daemon(&self, cmd: &mut Command, log: &str) -> Proc {
        let log = std::fs::File::create(self.rt_dir.path.join(log)).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting the routing daemon");
        Proc { child }
    }

    /// The LB nodes' addresses the router peers with.
    fn neighbors(&self) -> Vec<String> {
        let mut v: Vec<String> = (0..self.lbs.len()).map(lb4).collect();
        if self.peering.ipv6 {
            v.extend((0..self.lbs.len()).map(lb6));
        }
        v
    }

    /// GoBGP as the router (AS `peering.remote_as`), API on a unix socket.
    pub fn start_gobgp(&mut self) {
        let mut conf = format!(
            "[global.config]\n  as = {}\n  router-id = \"{RT4}\"\n",
            self.peering.remote_as
        );
        for n in self.neighbors() {
            let family = if n.contains(':') {
                "ipv6-unicast"
            } else {
                "ipv4-unicast"
            };
            conf.push_str(&format!(
                "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{n}\"\n    peer-as = {LOCAL_AS}\n"
            ));
            if let Some(p) = &self.peering.password {
                conf.push_str(&format!("    auth-password = \"{p}\"\n"));
            }
            conf.push_str(&format!(
                "  [neighbors.timers.config]\n    connect-retry = 5\n    hold-time = 9\n    keepalive-interval = 3\n  [neighbors.transport.config]\n    passive-mode = {}\n",
                !self.peering.passive
            ));
            if self.peering.graceful_restart {
                conf.push_str("  [neighbors.graceful-restart.config]\n    enabled = true\n    restart-time = 120\n");
            }
            conf.push_str(&format!(
                "  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"{family}\"\n"
            ));
            if self.peering.graceful_restart {
                conf.push_str(
                    "    [neighbors.afi-safis.mp-graceful-restart.config]\n      enabled = true\n",
                );
            }
        }
        let file = self.rt_dir.path.join("gobgpd.toml");
        std::fs::write(&file, conf).expect("gobgpd.toml");
        let sock = self.rt_dir.path.join("gobgp.sock");
        let mut cmd = self.rt.command("gobgpd");
        cmd.args(["-f", file.to_str().expect("utf-8"), "-p", "--pprof-disable"])
            .arg(format!("--api-hosts=unix://{}", sock.display()));
        let proc = self.daemon(&mut cmd, "gobgpd.log");
        wait_for(Duration::from_secs(10), "gobgpd's API socket", || {
            sock.exists().then_some(())
        });
        self.router = Some(Router::Gobgp { _proc: proc, sock });
    }

    /// FRR (zebra, bgpd, and bfdd when the peering has BFD) as the router, installing the VIP
    /// routes with ECMP.
    pub fn start_frr(&mut self) {
        let dir = self.rt_dir.path.join("frr");
        let run = dir.join("run");
        std::fs::create_dir_all(&run).expect("frr dir");
        let p = &self.peering;
        let mut bgpd = format!(
            "frr defaults traditional\nhostname rt\n!\nrouter bgp {}\n bgp router-id {RT4}\n no bgp ebgp-requires-policy\n bgp bestpath as-path multipath-relax\n timers bgp 3 9\n",
            p.remote_as
        );
        if p.graceful_restart {
            bgpd.push_str(" bgp graceful-restart\n");
        }
        for n in self.neighbors() {
            bgpd.push_str(&format!(
                " neighbor {n} remote-as {LOCAL_AS}\n neighbor {n} timers connect 1\n"
            ));
            if let Some(pw) = &p.password {
                bgpd.push_str(&format!(" neighbor {n} password {pw}\n"));
            }
            if p.bfd {
                bgpd.push_str(&format!(" neighbor {n} bfd profile fast\n"));
            }
            if !p.passive {
                bgpd.push_str(&format!(" neighbor {n} passive\n"));
            }
        }
        bgpd.push_str(" address-family ipv4 unicast\n  maximum-paths 8\n  maximum-paths ibgp 8\n exit-address-family\n");
        bgpd.push_str(" address-family ipv6 unicast\n  maximum-paths 8\n  maximum-paths ibgp 8\n");
        for n in self.neighbors().iter().filter(|n| n.contains(':')) {
            bgpd.push_str(&format!("  neighbor {n} activate\n"));
        }
        bgpd.push_str(" exit-address-family\n");
        for n in self.neighbors().iter().filter(|n| n.contains(':')) {
            bgpd.push_str(&format!(
                " address-family ipv4 unicast\n  no neighbor {n} activate\n exit-address-family\n"
            ));
        }
        bgpd.push_str("!\n");
        let bfdd = "bfd\n profile fast\n  receive-interval 100\n  transmit-interval 100\n  detect-multiplier 3\n !\n!\n";
        std::fs::write(dir.join("zebra.conf"), "hostname rt-zebra\n").expect("zebra.conf");
        std::fs::write(dir.join("bgpd.conf"), &bgpd).expect("bgpd.conf");
        std::fs::write(dir.join("bfdd.conf"), bfdd).expect("bfdd.conf");
        crate::netns::run("chown", &["-R", "frr:frr", dir.to_str().expect("utf-8")]);
        let start = |name: &str| {
            let mut cmd = self.rt.command(&format!("/usr/lib/frr/{name}"));
            cmd.args([
                "-f",
                dir.join(format!("{name}.conf")).to_str().expect("utf-8"),
            ])
            .args([
                "-i",
                run.join(format!("{name}.pid")).to_str().expect("utf-8"),
            ])
            .args(["-z", run.join("zserv.api").to_str().expect("utf-8")])
            .args([
                "--vty_socket",
                run.to_str().expect("utf-8"),
                "-A",
                "127.0.0.1",
                "-u",
                "frr",
                "-g",
                "frr",
            ])
            .args([
                "--log",
                &format!("file:{}", dir.join(format!("{name}.log")).display()),
            ]);
            self.daemon(&mut cmd, &format!("{name}.out"))
        };
        let zebra = start("zebra");
        wait_for(Duration::from_secs(10), "zebra's socket", || {
            run.join("zserv.api").exists().then_some(())
        });
        let bfdd = p.bfd.then(|| start("bfdd"));
        let bgpd_proc = start("bgpd");
        let vty = run.clone();
        wait_for(Duration::from_secs(10), "bgpd's vty", || {
            run.join("bgpd.vty").exists().then_some(())
        });
        self.router = Some(Router::Frr {
            bgpd: bgpd_proc,
            _zebra: zebra,
            _bfdd: bfdd,
            vty,
        });
    }

    /// BIRD 2 as the router, installing the VIP routes into its namespace's table.
    pub fn start_bird(&mut self) {
        let p = &self.peering;
        let mut conf = format!(
            "router id {RT4};\nlog stderr all;\nprotocol device {{ }}\nprotocol kernel {{ ipv4 {{ import none; export all; }}; }}\nprotocol kernel {{ ipv6 {{ import none; export all; }}; }}\n"
        );
        for (k, n) in self.neighbors().iter().enumerate() {
            let (family, local) = if n.contains(':') {
                ("ipv6", RT6)
            } else {
                ("ipv4", RT4)
            };
            conf.push_str(&format!(
                "protocol bgp lb{k} {{\n  local {local} as {};\n  neighbor {n} as {LOCAL_AS};\n  hold time 9; keepalive time 3; connect delay time 1; connect retry time 1;\n",
                p.remote_as
            ));
            if !p.passive {
                conf.push_str("  passive on;\n");
            }
            if let Some(pw) = &p.password {
                conf.push_str(&format!("  password \"{pw}\";\n"));
            }
            if p.remote_as == LOCAL_AS {
                conf.push_str("  direct;\n");
            }
            conf.push_str(&format!("  {family} {{ import all; export none; }};\n}}\n"));
        }
        let file = self.rt_dir.path.join("bird.conf");
        std::fs::write(&file, conf).expect("bird.conf");
        let ctl = self.rt_dir.path.join("bird.ctl");
        let mut cmd = self.rt.command("bird");
        cmd.args([
            "-f",
            "-c",
            file.to_str().expect("utf-8"),
            "-s",
            ctl.to_str().expect("utf-8"),
        ])
        .args([
            "-P",
            self.rt_dir.path.join("bird.pid").to_str().expect("utf-8"),
        ]);
        let proc = self.daemon(&mut cmd, "bird.log");
        wait_for(Duration::from_secs(10), "BIRD's control socket", || {
            ctl.exists().then_some(())
        });
        self.router = Some(Router::Bird { _proc: proc, ctl });
    }

    pub fn router(&self) -> &Router {
        self.router.as_ref().expect("a router daemon")
    }

    /// The router's kernel route to `vip`: its next hops (empty: no route).
    pub fn fib(&self, vip: &str) -> Vec<String> {
        let v6 = vip.contains(':');
        let out = self.rt.ip(&format!(
            "{} route show {vip}",
            if v6 { "-6" } else { "-4" }
        ));
        out.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect()
    }

    /// GET http://`vip`/ from the client, from `port` when given.
    pub fn get(&self, vip: &str, port: Option<u16>, timeout: Duration) -> io::Result<Response> {
        let ip: IpAddr = vip.parse().expect("vip");
        let local = port.map(|p| {
            let c: IpAddr = if ip.is_ipv4() { CLIENT4 } else { CLIENT6 }
                .parse()
                .expect("client");
            SocketAddr::new(c, p)
        });
        self.client
            .run_in(|| clients::http_get(local, SocketAddr::new(ip, 80), "/", timeout))
    }
}
