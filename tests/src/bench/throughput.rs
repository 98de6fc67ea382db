//! Packets per second through the LB node: weir against a kube-proxy-like iptables DNAT
//! ruleset and a kube-proxy-like nftables DNAT map, on one topology with one generator.
//!
//! ```text
//!  generator (g0) ──── eth-c [LB node] eth-s ──── s0 (sink)
//! ```
//! - The generator is `lab_tx` run by BPF_PROG_TEST_RUN in live-frames mode on `g0`: 64-byte
//!   UDP frames to the measured VIP, spread over 256 source ports (flows).
//! - The sink is `lab_sink` on `s0` (native XDP): it counts and drops. The three endpoints'
//!   addresses are the sink's; the LB node has static neighbour entries for them.
//! - The LB node's receive processing (NAPI) runs threaded and pinned to the other CPU than the
//!   generator, so the figure is the LB node's, not the generator's.
//! - weir: the agent attached natively to eth-c and eth-s. iptables/nftables: `lab_pass` on
//!   eth-c (a veth only receives XDP-sent frames when it runs XDP itself), the kernel forwards.
//! - Services: the measured one (3 endpoints) plus fillers with one endpoint each. In the
//!   iptables ruleset the measured service's rule comes last, as a linear match sees it at worst.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::{Ebpf, maps::Array, programs::Xdp};

use crate::{
    agent::Agent,
    lab::Scratch,
    netns::{Netns, veth},
    packets::Pkt,
    xdp::{LAB_OBJECT, LabXdp},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Weir,
    Iptables,
    Nftables,
    /// The ceiling: `lab_redirect` (new MACs and a redirect, no lookup, no rewrite) in
    /// weir's place.
    Redirect,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Weir => "weir (XDP)",
            Self::Iptables => "iptables DNAT (kube-proxy-like)",
            Self::Nftables => "nftables DNAT map (kube-proxy-like)",
            Self::Redirect => "bare XDP redirect (ceiling)",
        }
    }
}

pub struct Row {
    pub mode: Mode,
    pub services: usize,
    /// Frames per second the sink received (median of the runs).
    pub pps: f64,
    /// Frames per second the generator sent during those runs.
    pub offered_pps: f64,
}

const VIP: &str = "198.18.100.10";
const PORT: u16 = 5000;
pub(super) const ENDPOINTS: [&str; 3] = ["198.18.1.11", "198.18.1.12", "198.18.1.13"];
const FLOWS: u32 = 256;

pub(super) fn filler_vip(i: usize) -> Ipv4Addr {
    // 198.19.0.0/16: inside the benchmarking range, away from the lab's addresses.
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Filler endpoints use distinct ports: one backend endpoint serves at most 8 frontends.
pub(super) fn filler_port(i: usize) -> u16 {
    10000 + (i % 50000) as u16
}

pub(super) struct Topo {
    sink_xdp: LabXdp,
    generator: Netns,
    pub(super) lb: Netns,
    sink: Netns,
    g0: u32,
    frame: Vec<u8>,
}

/// The topology, with the generator's frames to `VIP:PORT`.
fn topo() -> Topo {
    topo_to(VIP, PORT)
}

/// The topology, with the generator's frames to `dst:port` (`ENDPOINTS` on the sink).
pub(super) fn topo_to(dst: &str, port: u16) -> Topo {
    let generator = Netns::new("gen");
    let lb = Netns::new("lbb");
    let sink = Netns::new("sink");
    veth(&generator, "g0", &lb, "eth-c");
    veth(&lb, "eth-s", &sink, "s0");
    generator.ip("addr add 198.18.0.1/24 dev g0");
    lb.ip("addr add 198.18.0.254/24 dev eth-c");
    lb.ip("addr add 198.18.1.1/24 dev eth-s");
    lb.sysctl("net.ipv4.ip_forward", "1");
    lb.sysctl("net.ipv4.conf.all.rp_filter", "0");
    lb.sysctl("net.ipv4.conf.default.rp_filter", "0");
    let s0_mac = sink.mac("s0").map(|b| format!("{b:02x}")).join(":");
    let g0_mac = generator.mac("g0").map(|b| format!("{b:02x}")).join(":");
    for ep in ENDPOINTS {
        sink.ip(&format!("addr add {ep}/24 dev s0"));
        lb.ip(&format!(
            "neigh add {ep} lladdr {s0_mac} dev eth-s nud permanent"
        ));
    }
    lb.ip(&format!(
        "neigh add 198.18.0.1 lladdr {g0_mac} dev eth-c nud permanent"
    ));
    let sink_xdp = LabXdp::attach(&sink, "s0", "lab_sink");
    // 64 bytes: 14 Ethernet + 20 IPv4 + 8 UDP + 22 payload.
    let mut p = Pkt::udp("198.18.0.1", 1024, dst, port, &[0u8; 22]);
    p.src_mac = generator.mac("g0");
    p.dst_mac = lb.mac("eth-c");
    // UDP over IPv4 without a checksum, so that the generator may change the source port.
    if let crate::packets::L4::Udp { no_checksum, .. } = &mut p.l4 {
        *no_checksum = true;
    }
    let frame = p.bytes();
    Topo {
        sink_xdp,
        g0: generator.ifindex("g0"),
        generator,
        lb,
        sink,
        frame,
    }
}

/// Runs the LB node's receive processing on its own thread, pinned to CPU 1.
/// Legacy iptables where the machine has both (kube-proxy's default on most distributions).
pub(super) fn iptables_restore() -> &'static str {
    if crate::netns::try_run("which", &["iptables-legacy-restore"]).is_ok() {
        "iptables-legacy-restore"
    } else {
        "iptables-restore"
    }
}

/// Loads an `iptables-restore` rule set into `ns` (the file kept in `dir`).
pub(super) fn load_iptables(ns: &Netns, dir: &std::path::Path, rules: &str) {
    let file = dir.join("rules");
    std::fs::write(&file, rules).expect("rules");
    ns.exec(&[iptables_restore(), file.to_str().expect("path")]);
}

/// Loads an `nft -f` rule set into `ns` (the file kept in `dir`).
pub(super) fn load_nft(ns: &Netns, dir: &std::path::Path, rules: &str) {
    let file = dir.join("rules.nft");
    std::fs::write(&file, rules).expect("rules");
    ns.exec(&["nft", "-f", file.to_str().expect("path")]);
}

/// iptables or nftables (`mode`): loads the mode's rules into the LB node and attaches
/// `lab_pass` to its client side (a veth only receives XDP-sent frames when it runs XDP
/// itself); the kernel forwards. None for weir.
pub(super) fn kernel_rules(
    t: &Topo,
    dir: &std::path::Path,
    mode: Mode,
    iptables: impl FnOnce() -> String,
    nft: impl FnOnce() -> String,
) -> Option<LabXdp> {
    match mode {
        Mode::Weir | Mode::Redirect => return None,
        Mode::Iptables => load_iptables(&t.lb, dir, &iptables()),
        Mode::Nftables => load_nft(&t.lb, dir, &nft()),
    }
    Some(LabXdp::attach(&t.lb, "eth-c", "lab_pass"))
}

pub(super) fn pin_lb_napi(lb: &Netns) {
    pin_napi(lb, "eth-c", 1);
}

/// Lab-only: `iface`'s receive processing (threaded NAPI) on CPU `cpu`, as a NIC's receive
/// queue has its interrupt on a core of its own.
pub fn pin_napi(lb: &Netns, iface: &str, cpu: usize) {
    lb.exec(&[
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{iface}/threaded"),
    ]);
    let ps = crate::netns::run("ps", &["-eo", "pid,comm"]);
    for line in ps.lines() {
        let mut f = line.split_whitespace();
        if let (Some(pid), Some(comm)) = (f.next(), f.next())
            && comm.starts_with(&format!("napi/{iface}"))
        {
            let _ = crate::netns::try_run("taskset", &["-p", "-c", &cpu.to_string(), pid]);
        }
    }
}

/// A standalone config: the `node` block's lines, the measured service at `vip:port` with the
/// three `ENDPOINTS` (port 8080), and `services - 1` fillers with one endpoint each, with map
/// capacities to fit.
pub(super) fn weir_config(
    node: &str,
    vip: &str,
    port: u16,
    protocol: &str,
    services: usize,
) -> String {
    let mut c = format!("node:\n{node}admin:\n  listen: 127.0.0.1:9300\n");
    let max = (services + 2).next_power_of_two().max(4096);
    let _ = writeln!(
        c,
        "dataplane:\n  max_services: {max}\n  max_backends: {}",
        max + 8
    );
    c.push_str("services:\n");
    let _ = writeln!(
        c,
        "  - {{name: measured, vip: {vip}, port: {port}, protocol: {protocol}, backends: [{}]}}",
        ENDPOINTS
            .iter()
            .map(|e| format!("{{address: {e}, port: 8080}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for i in 1..services {
        let _ = writeln!(
            c,
            "  - {{name: f{i}, vip: {}, port: {port}, protocol: {protocol}, table_size: 7, backends: [{{address: {}, port: {}}}]}}",
            filler_vip(i),
            ENDPOINTS[0],
            filler_port(i)
        );
    }
    c
}

/// kube-proxy's endpoint choice in chain `chain`: each rule takes its share of what the
/// earlier ones left, to `KUBE-SEP-<i>`, which DNATs to `ENDPOINTS[i]:8080` (after marking
/// hairpin traffic for masquerade with `masq`, as kube-proxy does for cluster IPs).
pub(super) fn kube_endpoint_rules(chain: &str, proto: &str, masq: bool) -> String {
    let mut r = String::new();
    let n = ENDPOINTS.len();
    for (i, ep) in ENDPOINTS.iter().enumerate() {
        if i + 1 < n {
            let _ = writeln!(
                r,
                "-A {chain} -m statistic --mode random --probability {:.5} -j KUBE-SEP-{i}",
                1.0 / (n - i) as f64
            );
        } else {
            let _ = writeln!(r, "-A {chain} -j KUBE-SEP-{i}");
        }
        if masq {
            let _ = writeln!(r, "-A KUBE-SEP-{i} -s {ep}/32 -j KUBE-MARK-MASQ");
        }
        let _ = writeln!(
            r,
            "-A KUBE-SEP-{i} -p {proto} -j DNAT --to-destination {ep}:8080"
        );
    }
    r
}

fn iptables_rules(services: usize) -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-MEASURED - [0:0]\n",
    );
    for i in 0..ENDPOINTS.len() {
        let _ = writeln!(r, ":KUBE-SEP-{i} - [0:0]");
    }
    r.push_str("-A PREROUTING -j KUBE-SERVICES\n");
    for i in 1..services {
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {}/32 -p udp --dport {PORT} -j DNAT --to-destination 198.18.1.11:{}",
            filler_vip(i),
            filler_port(i)
        );
    }
    let _ = writeln!(
        r,
        "-A KUBE-SERVICES -d {VIP}/32 -p udp --dport {PORT} -j KUBE-SVC-MEASURED"
    );
    r.push_str(&kube_endpoint_rules("KUBE-SVC-MEASURED", "udp", false));
    r.push_str("COMMIT\n");
    r
}

fn nft_rules(services: usize) -> String {
    let mut r = String::from("table ip weir_bench {\n");
    r.push_str("  chain filler { meta l4proto udp dnat to 198.18.1.11:9999; }\n");
    for (i, ep) in ENDPOINTS.iter().enumerate() {
        let _ = writeln!(
            r,
            "  chain sep-{i} {{ meta l4proto udp dnat to {ep}:8080; }}"
        );
    }
    r.push_str("  chain svc-measured { numgen random mod 3 vmap { 0 : goto sep-0, 1 : goto sep-1, 2 : goto sep-2 }; }\n");
    r.push_str("  map services {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {\n");
    let _ = writeln!(r, "      {VIP} . udp . {PORT} : goto svc-measured,");
    for i in 1..services {
        let _ = writeln!(r, "      {} . udp . {PORT} : goto filler,", filler_vip(i));
    }
    r.push_str("    }\n  }\n");
    r.push_str("  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr . meta l4proto . th dport vmap @services\n  }\n}\n");
    r
}

/// Sends `count` frames from the generator; (frames the sink got, seconds).
fn generate(t: &Topo, generator: &Ebpf, count: u32) -> (u64, f64) {
    let before = t.sink_xdp.sink_counts().0;
    let start = Instant::now();
    t.generator
        .run_in(|| crate::xdp::transmit(generator, &t.frame, t.g0, count));
    let secs = start.elapsed().as_secs_f64();
    // Frames still in flight land within a moment.
    std::thread::sleep(Duration::from_millis(50));
    (t.sink_xdp.sink_counts().0 - before, secs)
}

fn measure(mode: Mode, services: usize, quick: bool) -> Row {
    let t = topo();
    let dir = Scratch::new();
    let mut agent = None;
    let _pass = match mode {
        Mode::Weir => {
            let mut a = Agent::start(
                &t.lb,
                &dir.path,
                Some(&weir_config(
                    "  interfaces: [eth-c, eth-s]\n  xdp_mode: native\n",
                    VIP,
                    PORT,
                    "udp",
                    services,
                )),
            );
            a.wait_ready(&t.lb);
            agent = Some(a);
            None
        }
        Mode::Redirect => {
            let mut x = LabXdp::attach(&t.lb, "eth-c", "lab_redirect");
            x.redirect_to(t.lb.ifindex("eth-s"), t.sink.mac("s0"), t.lb.mac("eth-s"));
            Some(x)
        }
        kernel => kernel_rules(
            &t,
            &dir.path,
            kernel,
            || iptables_rules(services),
            || nft_rules(services),
        ),
    };
    let (pps, offered_pps) = pps(&t, quick, mode.name());
    drop(agent);
    Row {
        mode,
        services,
        pps,
        offered_pps,
    }
}

/// Frames per second the sink receives and the generator offers (the median run), with the
/// LB node's receive processing on CPU 1 and the generator on CPU 0.
pub(super) fn pps(t: &Topo, quick: bool, what: &str) -> (f64, f64) {
    pin_lb_napi(&t.lb);
    // The generator runs on CPU 0.
    let generator = t.generator.run_in(|| {
        let mut generator = Ebpf::load(LAB_OBJECT).expect("lab object");
        let p: &mut Xdp = generator
            .program_mut("lab_tx")
            .expect("lab_tx")
            .try_into()
            .expect("xdp");
        p.load().expect("load lab_tx");
        let mut cfg: Array<_, [u32; 4]> =
            Array::try_from(generator.map_mut("GEN").expect("GEN")).expect("array");
        cfg.set(0, [34, FLOWS, 0, 0], 0).expect("GEN");
        let mut frame: Array<_, [u8; 64]> =
            Array::try_from(generator.map_mut("GEN_FRAME").expect("GEN_FRAME")).expect("array");
        frame
            .set(
                0,
                <[u8; 64]>::try_from(&t.frame[..]).expect("a 64-byte frame"),
                0,
            )
            .expect("GEN_FRAME");
        generator
    });
    super::packet::pin_to_cpu(0);
    let count = if quick { 200_000 } else { 3_000_000 };
    // Warm up: flows into the connection tables, neighbours resolved.
    let (warm, _) = generate(t, &generator, 20_000);
    assert!(warm > 0, "{what}: nothing reached the sink");
    let runs = if quick { 1 } else { 5 };
    let mut got: Vec<(f64, f64)> = (0..runs)
        .map(|_| {
            let (n, secs) = generate(t, &generator, count);
            (n as f64 / secs, f64::from(count) / secs)
        })
        .collect();
    got.sort_by(|a, b| a.0.total_cmp(&b.0));
    got[got.len() / 2]
}

pub fn run(quick: bool) -> Vec<Row> {
    let counts: &[usize] = if quick { &[1, 1000] } else { &[1, 1000, 30000] };
    // The ceiling does no lookup: measured once, beside weir with one service.
    eprintln!("throughput: {}", Mode::Redirect.name());
    let mut rows = vec![measure(Mode::Redirect, 0, quick)];
    for &services in counts {
        for mode in [Mode::Weir, Mode::Iptables, Mode::Nftables] {
            eprintln!("throughput: {} with {services} services", mode.name());
            rows.push(measure(mode, services, quick));
        }
    }
    rows
}
