//! Per-packet cost of weir's XDP program under BPF_PROG_TEST_RUN.
//!
//! repeat=N runs a program N times on the same buffer, so weir would time itself on its own
//! rewritten output. Each iteration therefore runs `lab_bench`, which restores the pristine
//! frame (and, for new flows, writes a fresh source port and address) and tail-calls weir's
//! program. The floor is the same harness tail-calling `lab_pass`, measured the same way in the
//! same run; the kernel reports the mean time per iteration.
//!
//! For profiling (`perf record -C 1` beside it): `WEIR_PACKET_CASE=<part of a case's name>`
//! runs only the matching cases, `WEIR_PACKET_ROUNDS=<n>` that many rounds.
//!
//! Pairing with another XDP load balancer: `WEIR_PACKET_PAIR=<pinned XDP program>` (on a bpf
//! filesystem, set up by its own tools with the IPv4 VIP 198.18.100.10:80/TCP) adds its
//! established and new-flow IPv4 cases, with the same frames, the same harness and the same
//! paired floors, in the same rounds (`WEIR_PACKET_PAIR_NAME` names it in the table). The
//! harness moves back a start an encapsulating program moved; the case "frame start moved
//! and back" shows what that costs.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{Array, ProgramArray},
    programs::{ProgramFd, TestRun as _, TestRunOptions, Xdp},
};
use lb_agent::{
    dataplane::DataplaneLimits,
    dataplane::{Programmer, ebpf::Datapath},
    model::{Backend, DesiredState, Frontend, Protocol, Scope, Service},
};

use crate::{packets::Pkt, testbed::Testbed, xdp::LAB_OBJECT};

const FRAME: usize = 128;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
/// An expected verdict: any forward (XDP_TX or XDP_REDIRECT), for a paired program.
const ANY_FORWARD: u32 = u32::MAX;

pub struct Case {
    pub name: String,
    /// Median over the rounds of the mean ns per packet.
    pub ns: f64,
    /// Median over the rounds of (this case − the floor measured just before it).
    pub over_floor_ns: f64,
}

pub struct Report {
    /// Median of every floor measurement.
    pub floor_ns: f64,
    pub cases: Vec<Case>,
    pub repeat: u32,
    pub rounds: usize,
}

fn service(name: &str, vip: &str, backends: &[&str]) -> Service {
    Service {
        name: name.into(),
        frontend: Frontend {
            vip: vip.parse().expect("vip"),
            port: 80,
            protocol: Protocol::Tcp,
            scope: Scope::Both,
        },
        backends: backends
            .iter()
            .map(|a| Backend::new(a.parse().expect("backend"), 1))
            .collect(),
        source_ranges: vec![],
        affinity_timeout: None,
        table_size: 16381,
        health_check: None,
        node_address: false,
    }
}

fn padded(p: &Pkt) -> Vec<u8> {
    let mut f = p.bytes();
    assert!(f.len() <= FRAME);
    f.resize(FRAME, 0);
    f
}

/// Offsets of the TCP source port and of the low half of the source address in a frame.
fn mutation_offsets(p: &Pkt) -> [u32; 2] {
    match p.src {
        IpAddr::V4(_) => [14 + 20, 14 + 12 + 2],
        IpAddr::V6(_) => [14 + 40, 14 + 8 + 14],
    }
}

struct Harness<'a> {
    lab: Ebpf,
    bed: &'a Testbed,
}

impl Harness<'_> {
    fn set_target(&mut self, fd: &ProgramFd) {
        let mut t: ProgramArray<_> =
            ProgramArray::try_from(self.lab.map_mut("TARGET").expect("TARGET"))
                .expect("prog array");
        t.set(0, fd, 0).expect("set TARGET[0]");
    }

    fn set_frame(&mut self, frame: &[u8], mutate: Option<[u32; 2]>) {
        let mut p: Array<_, [u8; FRAME]> =
            Array::try_from(self.lab.map_mut("PRISTINE").expect("PRISTINE")).expect("array");
        p.set(0, <[u8; FRAME]>::try_from(frame).expect("frame size"), 0)
            .expect("set PRISTINE");
        let mut b: Array<_, [u32; 2]> =
            Array::try_from(self.lab.map_mut("BENCH").expect("BENCH")).expect("array");
        b.set(0, mutate.unwrap_or([0, 0]), 0).expect("set BENCH");
    }

    /// (verdict, mean ns per run) of `repeat` runs.
    fn run(&self, frame: &[u8], repeat: u32) -> (u32, f64) {
        let prog: &Xdp = self
            .lab
            .program("lab_bench")
            .expect("lab_bench")
            .try_into()
            .expect("xdp");
        let ctx = self.bed.xdp_ctx(frame.len());
        let mut out = vec![0u8; FRAME + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::new()
            })
            .expect("test run");
        (r.return_value, r.duration.as_nanos() as f64)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub use crate::netns::pin_to_cpu;

/// Runs every case; `quick` shortens the runs (for a smoke check).
pub fn run(quick: bool) -> Report {
    let (repeat, rounds) = if quick { (20_000, 3) } else { (300_000, 15) };
    let rounds = std::env::var("WEIR_PACKET_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(rounds);
    let bed = Testbed::new();
    bed.ns.run_in(|| {
        pin_to_cpu(1);
        let limits = DataplaneLimits::default();
        let mut dp = Datapath::load(&limits, None).expect("load weir");
        dp.add_redirect_port(bed.b_ifindex).expect("redirect port");
        // The client's neighbour, so that translated replies are redirected too.
        bed.ns
            .ip("neigh add 198.18.0.1 lladdr 02:00:00:00:00:01 dev c0 nud permanent");
        dp.add_redirect_port(bed.c_ifindex).expect("redirect port");
        // Its own endpoint (port): the other Services' endpoints stay unshared.
        let mut remote = service("v4-remote", "198.18.100.11", &["198.18.1.11:9090"]);
        remote.backends = remote
            .backends
            .into_iter()
            .map(Backend::with_snat)
            .collect();
        let desired = DesiredState {
            source_nat: Some(lb_agent::model::SourceNat {
                ipv4: Some("198.18.1.1".parse().expect("node")),
                ipv6: None,
                ports: (61000, 65535),
            }),
            services: vec![
                remote,
                service(
                    "v4",
                    "198.18.100.10",
                    &["198.18.1.11:8080", "198.18.1.12:8080", "198.18.1.13:8080"],
                ),
                // Two Services with the same endpoints: their new flows are checked for a
                // client port already connected to the endpoint through the other one.
                service(
                    "v4-shared",
                    "198.18.100.12",
                    &["198.18.1.11:8081", "198.18.1.12:8081", "198.18.1.13:8081"],
                ),
                service(
                    "v4-shared-too",
                    "198.18.100.13",
                    &["198.18.1.11:8081", "198.18.1.12:8081", "198.18.1.13:8081"],
                ),
                service(
                    "v6",
                    "fd00:100::10",
                    &[
                        "[fd00:1::11]:8080",
                        "[fd00:1::12]:8080",
                        "[fd00:1::13]:8080",
                    ],
                ),
            ]
            .into_iter()
            .map(std::sync::Arc::new)
            .collect::<Vec<_>>()
            .into(),
        };
        Programmer::new(&limits, 0)
            .apply(&desired, &mut dp.maps)
            .expect("program");
        let mut lab = Ebpf::load(LAB_OBJECT).expect("lab object");
        for p in ["lab_bench", "lab_pass", "lab_head_pass"] {
            let x: &mut Xdp = lab.program_mut(p).expect(p).try_into().expect("xdp");
            x.load().expect("load");
        }
        let mut h = Harness { lab, bed: &bed };

        // Established flows send ACKs (their entries are in the connection table); new flows
        // open with a SYN (their entries go to the half-open table).
        let ack = |src: &str, dst: &str| Pkt::tcp_ack(src, 40000, dst, 80);
        let syn = |src: &str, dst: &str| Pkt::tcp(src, 40000, dst, 80);
        let v4 = ack("198.18.0.1", "198.18.100.10");
        let v6 = ack("fd00:18::1", "fd00:100::10");
        let (syn4, syn6) = (
            syn("198.18.0.1", "198.18.100.10"),
            syn("fd00:18::1", "fd00:100::10"),
        );
        let syn_shared = syn("198.18.0.1", "198.18.100.12");
        let other = ack("198.18.0.1", "198.18.50.50");
        let snat = ack("198.18.0.1", "198.18.100.11");
        // The reply of that flow: its source-NAT port read from the rewritten request.
        let snat_reply = {
            let frame = padded(&snat);
            let ctx = bed.xdp_ctx(frame.len());
            let mut out = vec![0u8; FRAME + 256];
            let r = dp
                .xdp()
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::new()
                })
                .expect("test run");
            assert_eq!(r.return_value, XDP_REDIRECT, "source-NATed request");
            let port = u16::from_be_bytes([out[34], out[35]]);
            Pkt::tcp_ack("198.18.1.11", 9090, "198.18.1.1", port)
        };
        let mut bad = padded(&v4);
        bad[16..18].copy_from_slice(&30u16.to_be_bytes()); // total length shorter than TCP

        // Floor: the harness and a tail call into an empty program. Every round measures the
        // floor and then the case, back to back, and keeps their difference.
        let lab_fd = |name: &str| {
            let p: &Xdp = h.lab.program(name).expect(name).try_into().expect("xdp");
            p.fd().expect("fd").try_clone().expect("clone fd")
        };
        let pass_fd = lab_fd("lab_pass");
        let weir_fd = dp.xdp().fd().expect("fd").try_clone().expect("clone fd");
        // (name, frame, new-flow mutation offsets, expected verdict)
        type CaseSpec = (String, Vec<u8>, Option<[u32; 2]>, u32);
        let mut cases: Vec<CaseSpec> = vec![
            (
                "established TCP flow, IPv4",
                padded(&v4),
                None,
                XDP_REDIRECT,
            ),
            (
                "established TCP flow, IPv6",
                padded(&v6),
                None,
                XDP_REDIRECT,
            ),
            (
                "new TCP flow, IPv4",
                padded(&syn4),
                Some(mutation_offsets(&syn4)),
                XDP_REDIRECT,
            ),
            (
                "new TCP flow, IPv6",
                padded(&syn6),
                Some(mutation_offsets(&syn6)),
                XDP_REDIRECT,
            ),
            (
                "new TCP flow to an endpoint of two Services, IPv4",
                padded(&syn_shared),
                Some(mutation_offsets(&syn_shared)),
                XDP_REDIRECT,
            ),
            (
                "source-NATed flow to another node, IPv4",
                padded(&snat),
                None,
                XDP_REDIRECT,
            ),
            (
                "source-NATed reply, IPv4",
                padded(&snat_reply),
                None,
                XDP_REDIRECT,
            ),
            ("non-VIP packet (pass)", padded(&other), None, XDP_PASS),
            ("malformed packet to a VIP (drop)", bad, None, XDP_DROP),
        ]
        .into_iter()
        .map(|(name, frame, mutate, want)| (name.to_string(), frame, mutate, want))
        .collect();
        // The paired program's cases (each case runs against its own target).
        let mut targets: Vec<ProgramFd> = (0..cases.len())
            .map(|_| weir_fd.try_clone().expect("clone fd"))
            .collect();
        if let Ok(pin) = std::env::var("WEIR_PACKET_PAIR") {
            let other = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface)
                .unwrap_or_else(|e| panic!("WEIR_PACKET_PAIR={pin}: {e}"));
            let other_fd = other.fd().expect("fd").try_clone().expect("clone fd");
            let name = std::env::var("WEIR_PACKET_PAIR_NAME").unwrap_or_else(|_| pin.clone());
            for (case, frame, mutate) in [
                ("established TCP flow, IPv4", padded(&v4), None),
                (
                    "new TCP flow, IPv4",
                    padded(&syn4),
                    Some(mutation_offsets(&syn4)),
                ),
            ] {
                cases.push((format!("{name}: {case}"), frame, mutate, ANY_FORWARD));
                targets.push(other_fd.try_clone().expect("clone fd"));
            }
            cases.push((
                "frame start moved and back (harness)".into(),
                padded(&v4),
                None,
                XDP_PASS,
            ));
            targets.push(lab_fd("lab_head_pass"));
        }
        let mut floors = Vec::new();
        let only = std::env::var("WEIR_PACKET_CASE").ok();
        let cases = cases
            .into_iter()
            .zip(targets)
            .filter(|(c, _)| only.as_ref().is_none_or(|o| c.0.contains(o.as_str())))
            .map(|((name, frame, mutate, want), target)| {
                h.set_frame(&frame, mutate);
                h.set_target(&target);
                let verdict = h.run(&frame, 1000).0;
                if want == ANY_FORWARD {
                    assert!(
                        matches!(verdict, XDP_TX | XDP_REDIRECT),
                        "{name}: verdict {verdict}, not a forward: is it set up with the VIP?"
                    );
                } else {
                    assert_eq!(verdict, want, "{name}: verdict");
                }
                let mut case = Vec::new();
                let mut diff = Vec::new();
                for _ in 0..rounds {
                    h.set_target(&pass_fd);
                    let f = h.run(&frame, repeat).1;
                    h.set_target(&target);
                    let c = h.run(&frame, repeat).1;
                    floors.push(f);
                    case.push(c);
                    diff.push(c - f);
                }
                Case {
                    name,
                    ns: median(case),
                    over_floor_ns: median(diff),
                }
            })
            .collect();
        let floor_ns = median(floors);
        Report {
            floor_ns,
            cases,
            repeat,
            rounds,
        }
    })
}
