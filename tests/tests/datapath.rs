//! BPF_PROG_TEST_RUN tests of weir's XDP and TC programs on the running kernel.
//!
//! Each case gives an input frame, the expected verdict, the exact expected output frame and
//! the counters it must move. Expected frames are built with etherparse (and crc32c for SCTP),
//! whose checksum code is independent of the data plane's incremental updates. The maps are
//! programmed by the agent's own `Programmer`, and the expected backend of a flow comes from the
//! agent's mirror of the flow hash, so the kernel and user space must agree on it.
//!
//! Needs root. Every test runs in a network namespace of its own, whose routes and static
//! neighbours decide the FIB lookups: backends 198.18.1.11-13 / fd00:1::11-13 have neighbour
//! entries on `b0` (redirect), 198.18.1.14 has none (handed to the kernel).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_agent::dataplane::L2LeaseWriter as _;
use lb_agent::{
    dataplane::DataplaneLimits,
    dataplane::{Programmer, ebpf::Datapath, flow_hash_of, flow_slot, inspect::flow_key},
    model::{Backend, DesiredState, Frontend, Protocol, Scope, Service, SourceNat},
};
use lb_common::{datapath_stat, drop_reason};
use weir_lab::{
    packets::{L4, LB_MAC, Pkt, arp_request, sctp_crc_ok, sctp_init_chunk, sctp_packet},
    testbed::{Testbed, backend_mac},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;

const CLIENT4: &str = "198.18.0.1";
const CLIENT6: &str = "fd00:18::1";
const VIP4: &str = "198.18.100.10";
const VIP6: &str = "fd00:100::10";

fn service(name: &str, vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Service {
    Service {
        name: name.into(),
        frontend: Frontend {
            vip: vip.parse().unwrap(),
            port,
            protocol,
            scope: Scope::Both,
        },
        backends: {
            let mut b: Vec<Backend> = backends
                .iter()
                .map(|a| Backend::new(a.parse().unwrap(), 1))
                .collect();
            b.sort();
            b
        },
        source_ranges: vec![],
        affinity_timeout: None,
        table_size: 251,
        health_check: None,
        node_address: false,
    }
}

fn desired() -> DesiredState {
    use Protocol::*;
    let mut ranges = service("ranges", "198.18.100.11", 80, Tcp, &["198.18.1.11:8080"]);
    ranges.source_ranges = vec!["198.18.0.0/28".parse().unwrap()];
    let mut sticky = service(
        "sticky",
        "198.18.100.12",
        80,
        Tcp,
        &["198.18.1.11:8080", "198.18.1.12:8080", "198.18.1.13:8080"],
    );
    sticky.affinity_timeout = Some(Duration::from_mins(1));
    let mut services = vec![
        service(
            "tcp4",
            VIP4,
            80,
            Tcp,
            &["198.18.1.11:8080", "198.18.1.12:8080", "198.18.1.13:8080"],
        ),
        service(
            "udp4",
            VIP4,
            53,
            Udp,
            &["198.18.1.11:5353", "198.18.1.12:5353"],
        ),
        service("sctp4", VIP4, 3868, Sctp, &["198.18.1.11:3869"]),
        service("sctp4-same-port", VIP4, 3869, Sctp, &["198.18.1.12:3869"]),
        service(
            "tcp6",
            VIP6,
            80,
            Tcp,
            &["[fd00:1::11]:8080", "[fd00:1::12]:8080"],
        ),
        service("udp6", VIP6, 53, Udp, &["[fd00:1::11]:5353"]),
        service("sctp6", VIP6, 3868, Sctp, &["[fd00:1::12]:3869"]),
        ranges,
        sticky,
        service("empty", "198.18.100.13", 80, Tcp, &[]),
        // The same endpoints as tcp4 behind another port of the VIP, and a one-backend pair.
        service(
            TCP4_ALT,
            VIP4,
            ALT_PORT,
            Tcp,
            &["198.18.1.11:8080", "198.18.1.12:8080", "198.18.1.13:8080"],
        ),
        service("one4", ONE_VIP4, 80, Tcp, &["198.18.1.11:9090"]),
        service("one4-alt", ONE_VIP4, 81, Tcp, &["198.18.1.11:9090"]),
        service(
            "no-neighbour",
            "198.18.100.14",
            80,
            Tcp,
            &["198.18.1.14:8080"],
        ),
        remote(service(
            REMOTE4,
            REMOTE_VIP4,
            80,
            Tcp,
            &["198.18.1.12:8080"],
        )),
        remote(service(
            REMOTE4_UDP,
            REMOTE_VIP4,
            53,
            Udp,
            &["198.18.1.12:5353"],
        )),
        remote(service(
            REMOTE6,
            REMOTE_VIP6,
            80,
            Tcp,
            &["[fd00:1::12]:8080"],
        )),
        remote(service(
            "remote-no-neighbour",
            "198.18.100.21",
            80,
            Tcp,
            &["198.18.1.14:8080"],
        )),
    ];
    services.sort_by(|a, b| a.name.cmp(&b.name));
    DesiredState {
        services: std::sync::Arc::new(services.into_iter().map(std::sync::Arc::new).collect()),
        source_nat: Some(SourceNat {
            ipv4: Some(NODE4.parse().unwrap()),
            ipv6: Some(NODE6.parse().unwrap()),
            ports: SNAT_PORTS,
        }),
    }
}

const TCP4_ALT: &str = "tcp4-alt";
const ALT_PORT: u16 = 8081;
const ONE_VIP4: &str = "198.18.100.16";

/// Services whose backends are on another node: source-NATed to the node's address (the
/// testbed's backend-side address) and a port of `SNAT_PORTS`.
const REMOTE4: &str = "remote4";
const REMOTE4_UDP: &str = "remote4-udp";
const REMOTE6: &str = "remote6";
const REMOTE_VIP4: &str = "198.18.100.20";
const REMOTE_VIP6: &str = "fd00:100::20";
const NODE4: &str = "198.18.1.1";
const NODE6: &str = "fd00:1::1";
const SNAT_PORTS: (u16, u16) = (61000, 61009);

fn remote(mut s: Service) -> Service {
    s.backends = s.backends.into_iter().map(Backend::with_snat).collect();
    s
}

struct Env<'a> {
    dp: Datapath,
    prog: Programmer,
    bed: &'a Testbed,
    /// MAC of the backend-side interface: the source of redirected frames.
    b_mac: [u8; 6],
}

/// Runs `f` in a fresh testbed namespace with the data plane loaded and programmed.
fn with_env(f: impl FnOnce(&mut Env<'_>) + Send) {
    with_env_limits(DataplaneLimits::default(), f);
}

/// The same, with the data plane's maps sized by `limits`.
fn with_env_limits(limits: DataplaneLimits, f: impl FnOnce(&mut Env<'_>) + Send) {
    let bed = Testbed::new();
    bed.ns.run_in(|| {
        let mut dp = Datapath::load(&limits, None).expect("load the data plane");
        dp.add_redirect_port(bed.b_ifindex).expect("redirect port");
        let mut prog = Programmer::new(&limits, 0);
        prog.apply(&desired(), &mut dp.maps).expect("program");
        let mut env = Env {
            dp,
            prog,
            bed: &bed,
            b_mac: bed.b_mac,
        };
        f(&mut env);
    });
}

impl Env<'_> {
    fn xdp(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 512];
        let ctx = self.bed.xdp_ctx(frame.len());
        let r = self
            .dp
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })
            .expect("XDP test run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn tc(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 512];
        let r = self
            .dp
            .tc()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .expect("TC test run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn service(&self, name: &str) -> &lb_agent::dataplane::ProgrammedService {
        self.prog
            .services()
            .find(|s| s.spec.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The backend user space expects for a new flow (the agent's mirror of the hash).
    fn expected_backend(&self, name: &str, client: SocketAddr) -> SocketAddr {
        let s = self.service(name);
        let vip = SocketAddr::new(s.spec.frontend.vip, s.spec.frontend.port);
        let slot = flow_slot(
            client,
            vip,
            s.spec.frontend.protocol,
            s.spec.affinity_timeout.is_some(),
            s.spec.table_size,
        );
        let id = self.prog.table_of(s)[slot as usize];
        *s.backends
            .iter()
            .find(|(_, b)| b.id == id)
            .unwrap_or_else(|| panic!("slot {slot} of {name} has no backend"))
            .0
    }

    fn drops(&self, service: u32, reason: u32) -> u64 {
        self.dp.maps.service_stats(service).unwrap().drops[reason as usize]
    }

    fn datapath(&self, slot: usize) -> u64 {
        self.dp.maps.datapath_stats().unwrap().counters[slot]
    }
}

/// `p` as the data plane should send it to `backend`: destination rewritten and, when
/// redirected, MACs from the FIB and the TTL/hop limit decremented.
fn dnat(p: &Pkt, backend: SocketAddr, b_mac: [u8; 6], redirected: bool) -> Pkt {
    let mut q = p.clone();
    q.dst = backend.ip();
    match &mut q.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = backend.port(),
        L4::Sctp { dport, .. } => *dport = backend.port(),
        _ => {}
    }
    if redirected {
        q.dst_mac = backend_mac(backend.ip());
        q.src_mac = b_mac;
        q.ttl -= 1;
    }
    q
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

struct Case {
    name: &'static str,
    input: Pkt,
    verdict: u32,
    /// Expected output; None: the input unchanged.
    output: Option<Pkt>,
    /// Every counter the packet moves, by how much (every other counter stays).
    counters: Vec<(Counter, u64)>,
}

/// A counter of the data plane (service ids as programmed; 0: no service).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Counter {
    PacketsIn(u32),
    NewFlows(u32),
    Drop(u32, u32),
    Datapath(usize),
}

impl Env<'_> {
    /// Every service's packet, new-flow and drop counters, and the datapath's.
    fn counters(&self) -> BTreeMap<Counter, u64> {
        let mut all = BTreeMap::new();
        let ids = std::iter::once(0).chain(self.prog.services().map(|s| s.id));
        for id in ids {
            let s = self.dp.maps.service_stats(id).unwrap();
            all.insert(Counter::PacketsIn(id), s.packets_in);
            all.insert(Counter::NewFlows(id), s.new_flows);
            for (reason, n) in s.drops.iter().enumerate() {
                all.insert(Counter::Drop(id, reason as u32), *n);
            }
        }
        let d = self.dp.maps.datapath_stats().unwrap();
        for (slot, n) in d.counters.iter().enumerate() {
            all.insert(Counter::Datapath(slot), *n);
        }
        all
    }
}

fn check(env: &Env, cases: Vec<Case>) {
    for c in cases {
        let input = c.input.bytes();
        let before = env.counters();
        let (verdict, out) = env.xdp(&input);
        let after = env.counters();
        let moved: BTreeMap<Counter, u64> = after
            .iter()
            .filter(|(k, n)| before.get(*k) != Some(*n))
            .map(|(k, n)| (*k, n - before.get(k).copied().unwrap_or(0)))
            .collect();
        assert_eq!(
            moved,
            c.counters.iter().copied().collect::<BTreeMap<_, _>>(),
            "{}: counters moved (got, want)",
            c.name
        );
        let expected = c.output.as_ref().map_or(input.clone(), Pkt::bytes);
        assert_eq!(
            verdict,
            c.verdict,
            "{}: verdict; datapath counters {:?}\ngot:\n{}\nwant:\n{}",
            c.name,
            env.dp.maps.datapath_stats().map(|d| d.counters),
            hex(&out),
            hex(&expected)
        );
        assert_eq!(
            hex(&out),
            hex(&expected),
            "{}: output bytes (got, want)",
            c.name
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .chunks(16)
        .map(|c| c.join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn new_flows_are_dnated_and_redirected_with_correct_checksums() {
    with_env(|env| {
        let b_mac = env.b_mac;
        let mut cases = Vec::new();
        let mut add = |name, p: Pkt, service: &'static str, redirected: bool| {
            let client = SocketAddr::new(p.src, sport(&p));
            let backend = env.expected_backend(service, client);
            let output = dnat(&p, backend, b_mac, redirected);
            let id = env.service(service).id;
            let path = if redirected {
                datapath_stat::FWD_REDIRECT
            } else {
                datapath_stat::FWD_KERNEL
            };
            let mut counters = vec![
                (Counter::PacketsIn(id), 1),
                (Counter::NewFlows(id), 1),
                (Counter::Datapath(path), 1),
            ];
            // A SYN opens a handshake: its flow waits in the half-open table.
            if matches!(p.l4, L4::Tcp { syn: true, .. }) {
                counters.push((Counter::Datapath(datapath_stat::FLOW_HALF_OPEN), 1));
            }
            cases.push(Case {
                name,
                input: p,
                verdict: if redirected { XDP_REDIRECT } else { XDP_PASS },
                output: Some(output),
                counters,
            });
        };
        add("tcp4 syn", Pkt::tcp(CLIENT4, 40001, VIP4, 80), "tcp4", true);
        let mut data = Pkt::tcp(CLIENT4, 40002, VIP4, 80);
        data.l4 = L4::Tcp {
            sport: 40002,
            dport: 80,
            syn: false,
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        };
        add("tcp4 data, odd length", data, "tcp4", true);
        let mut opts = Pkt::tcp(CLIENT4, 40003, VIP4, 80);
        opts.ipv4_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
        add("tcp4 with IPv4 options", opts, "tcp4", true);
        add(
            "udp4",
            Pkt::udp(CLIENT4, 40004, VIP4, 53, b"query"),
            "udp4",
            true,
        );
        let mut nocsum = Pkt::udp(CLIENT4, 40005, VIP4, 53, b"query");
        nocsum.l4 = L4::Udp {
            sport: 40005,
            dport: 53,
            payload: b"query".to_vec(),
            no_checksum: true,
        };
        add("udp4 without checksum", nocsum, "udp4", true);
        add("tcp6 syn", Pkt::tcp(CLIENT6, 40006, VIP6, 80), "tcp6", true);
        let mut ext = Pkt::tcp(CLIENT6, 40007, VIP6, 80);
        ext.ipv6_ext_headers = true;
        add(
            "tcp6 after hop-by-hop, routing, dst-options",
            ext,
            "tcp6",
            true,
        );
        add(
            "udp6",
            Pkt::udp(CLIENT6, 40008, VIP6, 53, b"q6"),
            "udp6",
            true,
        );
        let mut vlan = Pkt::tcp(CLIENT4, 40009, VIP4, 80);
        vlan.vlans = vec![100];
        add(
            "tcp4 802.1Q: rewritten, left to the kernel",
            vlan,
            "tcp4",
            false,
        );
        let mut qinq = Pkt::udp(CLIENT6, 40010, VIP6, 53, b"qinq");
        qinq.vlans = vec![200, 100];
        add(
            "udp6 802.1ad+802.1Q: rewritten, left to the kernel",
            qinq,
            "udp6",
            false,
        );
        let mut ttl1 = Pkt::tcp(CLIENT4, 40011, VIP4, 80);
        ttl1.ttl = 1;
        add(
            "tcp4 TTL 1: the kernel answers time-exceeded",
            ttl1,
            "tcp4",
            false,
        );
        add(
            "tcp4 to a backend without a neighbour entry: the kernel resolves it",
            Pkt::tcp(CLIENT4, 40012, "198.18.100.14", 80),
            "no-neighbour",
            false,
        );
        let n = cases.len() as u64;
        let before_redirect = env.datapath(datapath_stat::FWD_REDIRECT);
        check(env, cases);
        assert_eq!(
            env.datapath(datapath_stat::FWD_REDIRECT) - before_redirect,
            n - 4
        );

        // Counters: tcp4 saw 4 new flows (syn, data, options, vlan) and 5 packets with ttl1.
        let tcp4 = env.service("tcp4").id;
        let s = env.dp.maps.service_stats(tcp4).unwrap();
        assert_eq!((s.packets_in, s.new_flows), (5, 5));
        assert_eq!(s.packets_out, 0);
        // bytes_in counts IP lengths: 40 (syn) + 58 (data) + 44 (options) + 40 (vlan) + 40.
        assert_eq!(s.bytes_in, 40 + 58 + 44 + 40 + 40);
        let backend_total: u64 = env
            .service("tcp4")
            .backends
            .values()
            .map(|b| env.dp.maps.backend_stats(b.id).unwrap().packets_in)
            .sum();
        assert_eq!(backend_total, 5);
    });
}

fn sport(p: &Pkt) -> u16 {
    match &p.l4 {
        L4::Tcp { sport, .. } | L4::Udp { sport, .. } | L4::Sctp { sport, .. } => *sport,
        _ => 0,
    }
}

#[test]
fn sctp_crc32c_is_recomputed_when_the_port_changes() {
    with_env(|env| {
        for (vip, name) in [(VIP4, "sctp4"), (VIP6, "sctp6")] {
            let client = if vip == VIP4 { CLIENT4 } else { CLIENT6 };
            let p = Pkt::new(
                client.parse().unwrap(),
                vip.parse().unwrap(),
                L4::Sctp {
                    sport: 5000,
                    dport: 3868,
                    vtag: 0,
                    chunks: sctp_init_chunk(0x1234_5678),
                },
            );
            let backend = env.expected_backend(name, sock(client, 5000));
            assert_eq!(backend.port(), 3869);
            let (verdict, out) = env.xdp(&p.bytes());
            assert_eq!(verdict, XDP_REDIRECT, "{name}");
            let want = dnat(&p, backend, env.b_mac, true).bytes();
            assert_eq!(hex(&out), hex(&want), "{name}: output");
            let l4 = out.len() - 32;
            assert!(sctp_crc_ok(&out[l4..]), "{name}: CRC32c of the output");
        }
        // Same port: the packet keeps its (valid) CRC untouched.
        let p = Pkt::new(
            CLIENT4.parse().unwrap(),
            VIP4.parse().unwrap(),
            L4::Sctp {
                sport: 5001,
                dport: 3869,
                vtag: 7,
                chunks: vec![4, 0, 0, 4], // HEARTBEAT, empty
            },
        );
        let (verdict, out) = env.xdp(&p.bytes());
        assert_eq!(verdict, XDP_REDIRECT);
        let want = dnat(&p, sock("198.18.1.12", 3869), env.b_mac, true).bytes();
        assert_eq!(hex(&out), hex(&want));
    });
}

#[test]
fn traffic_that_is_not_for_a_vip_passes_untouched() {
    with_env(|env| {
        let arp = {
            let mut f = vec![0xffu8; 6];
            f.extend_from_slice(&LB_MAC);
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&[0u8; 20]);
            f
        };
        let (v, out) = env.xdp(&arp);
        assert_eq!((v, out), (XDP_PASS, arp), "ARP");
        let cases = vec![
            Case {
                name: "tcp4 to the LB node itself",
                input: Pkt::tcp(CLIENT4, 40100, "198.18.0.254", 22),
                verdict: XDP_PASS,
                output: None,
                counters: vec![],
            },
            Case {
                name: "tcp6 to another host",
                input: Pkt::tcp(CLIENT6, 40101, "fd00:99::1", 443),
                verdict: XDP_PASS,
                output: None,
                counters: vec![],
            },
            Case {
                name: "ping to the LB node",
                input: Pkt::new(
                    CLIENT4.parse().unwrap(),
                    "198.18.0.254".parse().unwrap(),
                    L4::Echo {
                        id: 1,
                        seq: 1,
                        reply: false,
                        payload: b"ping".to_vec(),
                    },
                ),
                verdict: XDP_PASS,
                output: None,
                counters: vec![],
            },
            Case {
                name: "fragment of a non-VIP packet",
                input: {
                    let mut p = Pkt::udp(CLIENT4, 1, "198.18.0.254", 2, b"x");
                    p.l4 = L4::Raw {
                        proto: 17,
                        payload: vec![0; 8],
                    };
                    p
                },
                verdict: XDP_PASS,
                output: None,
                counters: vec![],
            },
        ];
        check(env, cases);
        // A frame too short to hold an IP header is not ours either.
        let short = Pkt::tcp(CLIENT4, 1, VIP4, 80).bytes()[..20].to_vec();
        assert_eq!(env.xdp(&short), (XDP_PASS, short.clone()));
        let s = env.dp.maps.service_stats(0).unwrap();
        assert_eq!(s.drops, [0; drop_reason::SLOTS], "nothing dropped");
    });
}

/// Sets the IPv4 flags/fragment-offset field of a frame (no VLAN) and fixes the checksum.
fn set_frag(frame: &mut [u8], value: u16) {
    frame[20..22].copy_from_slice(&value.to_be_bytes());
    fix_ipv4_checksum(frame);
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    frame[24] = 0;
    frame[25] = 0;
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    let h = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..14 + ihl.max(20)])
        .map(|h| h.to_header().calc_header_checksum());
    if let Ok(c) = h {
        frame[24..26].copy_from_slice(&c.to_be_bytes());
    }
}

#[test]
fn bad_packets_to_a_vip_are_dropped_and_counted() {
    with_env(|env| {
        let syn = Pkt::tcp(CLIENT4, 40200, VIP4, 80).bytes();
        let mut cases: Vec<(&str, Vec<u8>, u32, u32)> = Vec::new();

        // Truncated TCP header (IP total length says 30 bytes).
        let mut t = syn.clone();
        t[16..18].copy_from_slice(&30u16.to_be_bytes());
        fix_ipv4_checksum(&mut t);
        cases.push(("truncated tcp header", t, 0, drop_reason::MALFORMED));
        // IHL below 5.
        let mut t = syn.clone();
        t[14] = 0x44;
        cases.push(("ihl 4", t, 0, drop_reason::MALFORMED));
        // Total length beyond the frame.
        let mut t = syn.clone();
        t[16..18].copy_from_slice(&1500u16.to_be_bytes());
        fix_ipv4_checksum(&mut t);
        cases.push((
            "total length beyond the frame",
            t,
            0,
            drop_reason::MALFORMED,
        ));
        // Version 6 in an IPv4 frame.
        let mut t = syn.clone();
        t[14] = 0x65;
        cases.push(("wrong version", t, 0, drop_reason::MALFORMED));
        // First fragment (MF) and a later fragment.
        let mut t = syn.clone();
        set_frag(&mut t, 0x2000);
        cases.push(("first fragment", t, 0, drop_reason::FRAGMENT));
        let mut t = syn.clone();
        set_frag(&mut t, 0x0010);
        cases.push(("later fragment", t, 0, drop_reason::FRAGMENT));
        // IPv6 fragment header.
        let frag6 = {
            let mut p = Pkt::tcp(CLIENT6, 40201, VIP6, 80);
            p.l4 = L4::Raw {
                proto: 44,
                payload: vec![6, 0, 0, 1, 0, 0, 0, 1],
            };
            p.bytes()
        };
        cases.push(("ipv6 fragment", frag6, 0, drop_reason::FRAGMENT));
        // No service on that port / protocol.
        cases.push((
            "unknown port",
            Pkt::tcp(CLIENT4, 40202, VIP4, 81).bytes(),
            0,
            drop_reason::NO_SERVICE,
        ));
        cases.push((
            "unknown protocol",
            {
                let mut p = Pkt::tcp(CLIENT4, 1, VIP4, 1);
                p.l4 = L4::Raw {
                    proto: 47,
                    payload: vec![0; 8],
                };
                p.bytes()
            },
            0,
            drop_reason::NO_SERVICE,
        ));
        // Source outside the service's ranges (198.18.0.0/28).
        let ranges = env.service("ranges").id;
        cases.push((
            "source outside the ranges",
            Pkt::tcp("198.18.0.99", 40203, "198.18.100.11", 80).bytes(),
            ranges,
            drop_reason::SOURCE_NOT_ALLOWED,
        ));
        // Service without backends.
        let empty = env.service("empty").id;
        cases.push((
            "no backend",
            Pkt::tcp(CLIENT4, 40204, "198.18.100.13", 80).bytes(),
            empty,
            drop_reason::NO_BACKEND,
        ));
        // ICMP timestamp request to a VIP.
        cases.push((
            "icmp timestamp",
            {
                let mut p = Pkt::tcp(CLIENT4, 1, VIP4, 1);
                p.l4 = L4::Raw {
                    proto: 1,
                    payload: vec![13, 0, 0xf2, 0xff, 0, 0, 0, 0],
                };
                p.bytes()
            },
            0,
            drop_reason::ICMP_UNSUPPORTED,
        ));
        // Five IPv6 extension headers (more than the data plane skips).
        cases.push((
            "too many ipv6 extension headers",
            {
                let mut p = Pkt::tcp(CLIENT6, 1, VIP6, 80);
                let mut payload = Vec::new();
                for i in 0..5 {
                    let next = if i == 4 { 6 } else { 60 };
                    payload.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                }
                payload.extend_from_slice(&[0u8; 20]);
                p.l4 = L4::Raw { proto: 60, payload };
                p.bytes()
            },
            0,
            drop_reason::IPV6_EXT_HEADERS,
        ));

        for (name, frame, service, reason) in cases {
            let before = env.drops(service, reason);
            let (v, out) = env.xdp(&frame);
            assert_eq!(v, XDP_DROP, "{name}: verdict");
            assert_eq!(out, frame, "{name}: a dropped frame is not modified");
            assert_eq!(env.drops(service, reason) - before, 1, "{name}: counter");
        }
        // A source inside the ranges goes through.
        let (v, _) = env.xdp(&Pkt::tcp("198.18.0.9", 40205, "198.18.100.11", 80).bytes());
        assert_eq!(v, XDP_REDIRECT, "source inside the ranges");
    });
}

#[test]
fn icmp_echo_to_a_vip_is_answered() {
    with_env(|env| {
        for (client, vip) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
            let echo = |reply| L4::Echo {
                id: 7,
                seq: 3,
                reply,
                payload: b"are you there".to_vec(),
            };
            let p = Pkt::new(client.parse().unwrap(), vip.parse().unwrap(), echo(false));
            let mut want = Pkt::new(vip.parse().unwrap(), client.parse().unwrap(), echo(true));
            want.src_mac = p.dst_mac;
            want.dst_mac = p.src_mac;
            let before = env.datapath(datapath_stat::ICMP_ECHO_REPLY);
            let (v, out) = env.xdp(&p.bytes());
            assert_eq!(v, XDP_TX, "{vip}");
            assert_eq!(hex(&out), hex(&want.bytes()), "{vip}: reply");
            assert_eq!(env.datapath(datapath_stat::ICMP_ECHO_REPLY) - before, 1);
        }
    });
}

#[test]
fn icmp_errors_about_a_flow_go_to_its_backend() {
    with_env(|env| {
        for (client, vip, name) in [(CLIENT4, VIP4, "tcp4"), (CLIENT6, VIP6, "tcp6")] {
            // Open the flow, so that the error follows the connection table.
            let syn = Pkt::tcp(client, 41000, vip, 80);
            assert_eq!(env.xdp(&syn.bytes()).0, XDP_REDIRECT);
            let backend = env.expected_backend(name, sock(client, 41000));
            // A router on the way back says the reply (VIP:80 → client:41000) is too big.
            let reply = |src: &str, sport: u16| {
                let mut r = Pkt::tcp(src, sport, client, 41000);
                r.l4 = L4::Tcp {
                    sport,
                    dport: 41000,
                    syn: false,
                    payload: vec![0x55; 32],
                };
                r.ip_bytes()
            };
            let router: IpAddr = if vip == VIP4 {
                "198.18.0.77".parse().unwrap()
            } else {
                "fd00:18::77".parse().unwrap()
            };
            let err = Pkt::new(
                router,
                vip.parse().unwrap(),
                L4::TooBig {
                    mtu: 1280,
                    quoted: reply(vip, 80),
                },
            );
            let mut want = Pkt::new(
                router,
                backend.ip(),
                L4::TooBig {
                    mtu: 1280,
                    quoted: reply(&backend.ip().to_string(), backend.port()),
                },
            );
            want.src_mac = env.b_mac;
            want.dst_mac = backend_mac(backend.ip());
            want.ttl = 63;
            let before = env.datapath(datapath_stat::ICMP_ERROR_TO_BACKEND);
            let (v, out) = env.xdp(&err.bytes());
            assert_eq!(v, XDP_REDIRECT, "{name}");
            assert_eq!(
                hex(&out),
                hex(&want.bytes()),
                "{name}: error rewritten for the backend"
            );
            assert_eq!(
                env.datapath(datapath_stat::ICMP_ERROR_TO_BACKEND) - before,
                1
            );
        }
    });
}

#[test]
fn replies_get_the_vip_back_as_their_source() {
    with_env(|env| {
        // (service, client, vip, request, reply from the backend)
        let flows: Vec<(&str, Pkt)> = vec![
            ("tcp4", Pkt::tcp(CLIENT4, 42001, VIP4, 80)),
            ("udp4", Pkt::udp(CLIENT4, 42002, VIP4, 53, b"q")),
            ("tcp6", Pkt::tcp(CLIENT6, 42003, VIP6, 80)),
            ("udp6", Pkt::udp(CLIENT6, 42004, VIP6, 53, b"q")),
            (
                "sctp4",
                Pkt::new(
                    CLIENT4.parse().unwrap(),
                    VIP4.parse().unwrap(),
                    L4::Sctp {
                        sport: 42005,
                        dport: 3868,
                        vtag: 0,
                        chunks: sctp_init_chunk(9),
                    },
                ),
            ),
        ];
        for (name, req) in flows {
            assert_eq!(env.xdp(&req.bytes()).0, XDP_REDIRECT, "{name}: request");
            let client = SocketAddr::new(req.src, sport(&req));
            let backend = env.expected_backend(name, client);
            let vport = env.service(name).spec.frontend.port;
            let reply_l4 = |sport: u16| match &req.l4 {
                L4::Tcp { .. } => L4::Tcp {
                    sport,
                    dport: client.port(),
                    syn: false,
                    payload: b"HTTP/1.1 200 OK\r\n\r\nhello".to_vec(),
                },
                L4::Udp { .. } => L4::Udp {
                    sport,
                    dport: client.port(),
                    payload: b"answer".to_vec(),
                    no_checksum: false,
                },
                _ => L4::Sctp {
                    sport,
                    dport: client.port(),
                    vtag: 9,
                    chunks: vec![2, 0, 0, 20, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1],
                },
            };
            let mut reply = Pkt::new(backend.ip(), client.ip(), reply_l4(backend.port()));
            reply.src_mac = LB_MAC;
            reply.dst_mac = [0x02, 0, 0, 0, 0, 0x01];
            let mut want = reply.clone();
            want.src = req.dst;
            want.l4 = reply_l4(vport);
            let id = env.service(name).id;
            let before = env.dp.maps.service_stats(id).unwrap();
            let (v, out) = env.tc(&reply.bytes());
            assert_eq!(v, TC_ACT_OK, "{name}");
            assert_eq!(hex(&out), hex(&want.bytes()), "{name}: reply rewritten");
            if name == "sctp4" {
                assert!(sctp_crc_ok(&out[34..]), "sctp reply CRC");
            }
            let after = env.dp.maps.service_stats(id).unwrap();
            assert_eq!(
                after.packets_out - before.packets_out,
                1,
                "{name}: packets out"
            );
            let ip_len = want.ip_bytes().len() as u64;
            assert_eq!(
                after.bytes_out - before.bytes_out,
                ip_len,
                "{name}: bytes out"
            );
        }
        // A packet of no flow leaves as it is.
        let other = Pkt::tcp("198.18.1.11", 8080, CLIENT4, 49999).bytes();
        assert_eq!(env.tc(&other), (TC_ACT_OK, other.clone()));
        let frame = sctp_packet(1, 2, 3, &[]);
        assert!(sctp_crc_ok(&frame));
    });
}

#[test]
fn flows_stay_on_their_backend_and_move_only_when_it_goes() {
    with_env(|env| {
        // 200 flows to tcp4; remember where each went.
        let flows: Vec<Pkt> = (0..200)
            .map(|i| Pkt::tcp(CLIENT4, 43000 + i, VIP4, 80))
            .collect();
        let dest = |env: &Env, p: &Pkt| {
            let (v, out) = env.xdp(&p.bytes());
            assert_eq!(v, XDP_REDIRECT);
            let ip = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
            match (ip.net, ip.transport) {
                (Some(etherparse::NetSlice::Ipv4(h)), Some(etherparse::TransportSlice::Tcp(t))) => {
                    SocketAddr::new(
                        IpAddr::V4(h.header().destination_addr()),
                        t.destination_port(),
                    )
                }
                _ => panic!("not tcp4"),
            }
        };
        let first: Vec<SocketAddr> = flows.iter().map(|p| dest(env, p)).collect();
        for (p, d) in flows.iter().zip(&first) {
            assert_eq!(
                *d,
                env.expected_backend("tcp4", SocketAddr::new(p.src, sport(p)))
            );
        }
        // Established: same backend again, no new flow counted.
        let id = env.service("tcp4").id;
        let new_before = env.dp.maps.service_stats(id).unwrap().new_flows;
        for (p, d) in flows.iter().zip(&first) {
            assert_eq!(dest(env, p), *d);
        }
        assert_eq!(env.dp.maps.service_stats(id).unwrap().new_flows, new_before);

        // Remove 198.18.1.12: its flows are steered again (to the others), the others stay.
        let mut d = desired();
        let s = std::sync::Arc::make_mut(
            std::sync::Arc::make_mut(&mut d.services)
                .iter_mut()
                .find(|s| s.name == "tcp4")
                .unwrap(),
        );
        s.backends.retain(|b| b.addr != sock("198.18.1.12", 8080));
        env.prog.apply(&d, &mut env.dp.maps).unwrap();
        let gone = sock("198.18.1.12", 8080);
        let resteered_before = env.datapath(datapath_stat::FLOW_RESTEERED);
        let mut moved = 0;
        for (p, d) in flows.iter().zip(&first) {
            let now = dest(env, p);
            assert_ne!(now, gone);
            if *d == gone {
                moved += 1;
            } else {
                assert_eq!(now, *d, "a flow on a surviving backend stayed");
            }
        }
        assert!(
            moved > 30,
            "some flows were on the removed backend ({moved})"
        );
        assert_eq!(
            env.datapath(datapath_stat::FLOW_RESTEERED) - resteered_before,
            moved
        );

        // Drain (weight 0): existing flows stay on it, new ones avoid it.
        let mut d = desired();
        let s = std::sync::Arc::make_mut(
            std::sync::Arc::make_mut(&mut d.services)
                .iter_mut()
                .find(|s| s.name == "tcp4")
                .unwrap(),
        );
        for b in &mut s.backends {
            if b.addr == sock("198.18.1.13", 8080) {
                b.weight = 0;
            }
        }
        env.prog.apply(&d, &mut env.dp.maps).unwrap();
        let on13: Vec<&Pkt> = flows
            .iter()
            .zip(&first)
            .filter(|(_, d)| **d == sock("198.18.1.13", 8080))
            .map(|(p, _)| p)
            .collect();
        assert!(!on13.is_empty());
        for p in on13 {
            assert_eq!(
                dest(env, p),
                sock("198.18.1.13", 8080),
                "a draining backend keeps its flows"
            );
        }
        for i in 0..100 {
            let p = Pkt::tcp(CLIENT4, 44000 + i, VIP4, 80);
            assert_ne!(
                dest(env, &p),
                sock("198.18.1.13", 8080),
                "no new flow to a draining backend"
            );
        }
    });
}

/// Linux gives a client's connections to different destinations the same local port: two
/// Services with the same endpoints, reached from one client port, must not become one
/// 4-tuple at a backend (it would answer the second SYN as the first connection's).
#[test]
fn a_client_port_used_for_two_services_of_one_endpoint_meets_two_backends() {
    with_env(|env| {
        let avoided = || env.datapath(datapath_stat::TUPLE_CLASH_AVOIDED);
        let unavoidable = || env.datapath(datapath_stat::TUPLE_CLASH_UNAVOIDABLE);
        let alt = env.service(TCP4_ALT);
        let alt_vip = SocketAddr::new(alt.spec.frontend.vip, alt.spec.frontend.port);
        let table = env.prog.table_of(alt);
        let addr_of = |id: u32| {
            *alt.backends
                .iter()
                .find(|(_, b)| b.id == id)
                .expect("a backend of the table")
                .0
        };
        let mut clashes = 0;
        for port in 45000..45060u16 {
            let client = SocketAddr::new(CLIENT4.parse().unwrap(), port);
            let (v, out) = env.xdp(&Pkt::tcp(CLIENT4, port, VIP4, 80).bytes());
            assert_eq!(v, XDP_REDIRECT);
            let first = ends(&out).1;
            assert_eq!(first, env.expected_backend("tcp4", client));

            // The same client port to the other Service: Maglev's own choice unless it is the
            // first flow's backend, else the next slot's backend that is not.
            let own = env.expected_backend(TCP4_ALT, client);
            let want = if own == first {
                clashes += 1;
                let h = flow_hash_of(client, alt_vip, Protocol::Tcp, false);
                (1..=16)
                    .map(|step| {
                        addr_of(table[(h.wrapping_add(step) % table.len() as u32) as usize])
                    })
                    .find(|a| *a != first)
                    .expect("another backend within sixteen slots")
            } else {
                own
            };
            let before = avoided();
            let (v, out) = env.xdp(&Pkt::tcp(CLIENT4, port, VIP4, ALT_PORT).bytes());
            assert_eq!(v, XDP_REDIRECT);
            let second = ends(&out).1;
            assert_eq!(second, want, "port {port}: first flow on {first}");
            assert_eq!(avoided() - before, u64::from(own == first), "port {port}");
            // Its retransmitted SYN and its ACK stay there.
            let (_, out) = env.xdp(&Pkt::tcp(CLIENT4, port, VIP4, ALT_PORT).bytes());
            assert_eq!(ends(&out).1, second);
            let (_, out) = env.xdp(&Pkt::tcp_ack(CLIENT4, port, VIP4, ALT_PORT).bytes());
            assert_eq!(ends(&out).1, second);

            // Each backend's reply gets its own Service's address back.
            for (backend, vport) in [(first, 80), (second, ALT_PORT)] {
                let mut reply = Pkt::tcp_ack(&backend.ip().to_string(), 8080, CLIENT4, port);
                reply.src_mac = LB_MAC;
                let (v, out) = env.tc(&reply.bytes());
                assert_eq!(v, TC_ACT_OK);
                assert_eq!(
                    ends(&out).0,
                    sock(VIP4, vport),
                    "port {port}: reply of {backend}"
                );
            }
        }
        assert!(clashes >= 5, "about a third of 60 ports clash ({clashes})");
        assert_eq!(unavoidable(), 0);

        // A connection the client reset does not count: a port whose two flows Maglev sends
        // to the same backend, the first one established and reset.
        let port = (46000..47000u16)
            .find(|&p| {
                let c = SocketAddr::new(CLIENT4.parse().unwrap(), p);
                env.expected_backend("tcp4", c) == env.expected_backend(TCP4_ALT, c)
            })
            .expect("a port whose flows share a backend");
        let (_, out) = env.xdp(&Pkt::tcp(CLIENT4, port, VIP4, 80).bytes());
        let first = ends(&out).1;
        let ack = Pkt::tcp_ack(CLIENT4, port, VIP4, 80).bytes();
        assert_eq!(env.xdp(&ack).0, XDP_REDIRECT);
        assert_eq!(env.xdp(&tcp_flags(&ack, 0x14)).0, XDP_REDIRECT, "RST");
        let before = avoided();
        let (_, out) = env.xdp(&Pkt::tcp(CLIENT4, port, VIP4, ALT_PORT).bytes());
        assert_eq!(
            ends(&out).1,
            first,
            "a reset connection leaves its backend free"
        );
        assert_eq!(avoided(), before);

        // One backend: nowhere else to go; the flow goes there and is counted. The backend's
        // replies to the one 4-tuple go to the established flow, else to the one in its
        // handshake, else to one whose client has finished (FIN).
        let one = "198.18.1.11";
        let reply_to = |port: u16, flags: u8| {
            let mut reply = Pkt::tcp_ack(one, 9090, CLIENT4, port);
            reply.src_mac = LB_MAC;
            let (v, out) = env.tc(&tcp_flags(&reply.bytes(), flags));
            assert_eq!(v, TC_ACT_OK);
            ends(&out).0
        };
        let syn = |port: u16, vport: u16| {
            let (v, out) = env.xdp(&Pkt::tcp(CLIENT4, port, ONE_VIP4, vport).bytes());
            assert_eq!(v, XDP_REDIRECT);
            assert_eq!(ends(&out).1, sock(one, 9090));
        };
        let ack = |port: u16, vport: u16, flags: u8| {
            let p = Pkt::tcp_ack(CLIENT4, port, ONE_VIP4, vport).bytes();
            assert_eq!(env.xdp(&tcp_flags(&p, flags)).0, XDP_REDIRECT);
        };
        let (fin_ack, syn_ack, plain_ack) = (0x11, 0x12, 0x10);
        for (port, first, second) in [(45000, 80, 81), (45001, 81, 80)] {
            let before = unavoidable();
            // A connection through one frontend, over: the client sent its FIN.
            syn(port, first);
            ack(port, first, plain_ack);
            assert_eq!(reply_to(port, plain_ack), sock(ONE_VIP4, first));
            ack(port, first, fin_ack);
            assert_eq!(
                reply_to(port, fin_ack),
                sock(ONE_VIP4, first),
                "its last ACK"
            );
            // The client's next connection from that port, through the other frontend: its
            // handshake and all after it get the other frontend's address.
            syn(port, second);
            assert_eq!(unavoidable() - before, 1);
            assert_eq!(reply_to(port, syn_ack), sock(ONE_VIP4, second), "SYN-ACK");
            ack(port, second, plain_ack);
            assert_eq!(reply_to(port, plain_ack), sock(ONE_VIP4, second));
        }
        // The first connection still runs: the backend answers the second one's SYN for it
        // (a challenge ACK), which goes to the running connection.
        for (port, first, second) in [(45002, 81, 80), (45003, 80, 81)] {
            syn(port, first);
            ack(port, first, plain_ack);
            if port == 45003 {
                // Finished, then opened again with the same key: running again.
                ack(port, first, fin_ack);
                syn(port, first);
                ack(port, first, plain_ack);
            }
            syn(port, second);
            assert_eq!(
                reply_to(port, plain_ack),
                sock(ONE_VIP4, first),
                "port {port}"
            );
        }
    });
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    with_env(|env| {
        let first = env.xdp(&Pkt::tcp(CLIENT4, 45000, "198.18.100.12", 80).bytes());
        assert_eq!(first.0, XDP_REDIRECT);
        let hits_before = env.datapath(datapath_stat::AFFINITY_HIT);
        for port in 45001..45050 {
            let (v, out) = env.xdp(&Pkt::tcp(CLIENT4, port, "198.18.100.12", 80).bytes());
            assert_eq!(v, XDP_REDIRECT);
            // Same destination bytes (address and port) as the first flow.
            assert_eq!(out[30..34], first.1[30..34], "same backend address");
            assert_eq!(out[36..38], first.1[36..38], "same backend port");
        }
        assert_eq!(env.datapath(datapath_stat::AFFINITY_HIT) - hits_before, 49);
        // The first flow went where the client hash says.
        let want = env.expected_backend("sticky", sock(CLIENT4, 45000));
        let got = IpAddr::V4([first.1[30], first.1[31], first.1[32], first.1[33]].into());
        assert_eq!(got, want.ip());
        // Other clients spread over the backends.
        let mut seen = std::collections::BTreeSet::new();
        for c in 1..60u8 {
            let (_, out) =
                env.xdp(&Pkt::tcp(&format!("198.18.5.{c}"), 1000, "198.18.100.12", 80).bytes());
            seen.insert(out[33]);
        }
        assert_eq!(seen.len(), 3, "clients spread over all three backends");
    });
}

#[test]
fn ethernet_padding_is_kept_and_not_counted() {
    with_env(|env| {
        // A 42-byte UDP frame padded to the 60-byte Ethernet minimum.
        let p = Pkt::udp(CLIENT4, 46000, VIP4, 53, b"");
        let mut frame = p.bytes();
        assert_eq!(frame.len(), 42);
        frame.resize(60, 0);
        let backend = env.expected_backend("udp4", sock(CLIENT4, 46000));
        let mut want = dnat(&p, backend, env.b_mac, true).bytes();
        want.resize(60, 0);
        let id = env.service("udp4").id;
        let before = env.dp.maps.service_stats(id).unwrap().bytes_in;
        let (v, out) = env.xdp(&frame);
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(hex(&out), hex(&want));
        assert_eq!(env.dp.maps.service_stats(id).unwrap().bytes_in - before, 28);
    });
}

#[test]
fn every_program_stays_well_inside_the_verifier_budget() {
    with_env(|env| {
        for (name, n) in env.dp.verified_instructions() {
            let n = n.unwrap_or_else(|| panic!("{name}: the kernel reported no count"));
            eprintln!("{name}: {n} instructions verified");
            // The kernel refuses a program at 1,000,000; half leaves room to grow.
            assert!(n < 500_000, "{name}: {n} verified instructions");
        }
    });
}

/// The source port of a frame's TCP/UDP header and its IP source (after any VLAN-free
/// Ethernet header).
fn ends(frame: &[u8]) -> (SocketAddr, SocketAddr) {
    let p = etherparse::SlicedPacket::from_ethernet(frame).expect("parse");
    let (src, dst): (IpAddr, IpAddr) = match p.net {
        Some(etherparse::NetSlice::Ipv4(h)) => (
            h.header().source_addr().into(),
            h.header().destination_addr().into(),
        ),
        Some(etherparse::NetSlice::Ipv6(h)) => (
            h.header().source_addr().into(),
            h.header().destination_addr().into(),
        ),
        _ => panic!("not IP"),
    };
    let (sp, dp) = match p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(etherparse::TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => panic!("not TCP/UDP"),
    };
    (SocketAddr::new(src, sp), SocketAddr::new(dst, dp))
}

fn with_ports(mut p: Pkt, sport: u16, dport: u16) -> Pkt {
    match &mut p.l4 {
        L4::Tcp {
            sport: s, dport: d, ..
        }
        | L4::Udp {
            sport: s, dport: d, ..
        } => {
            *s = sport;
            *d = dport;
        }
        _ => panic!("TCP/UDP only"),
    }
    p
}

#[test]
fn flows_to_backends_on_other_nodes_are_source_natted_and_replies_translated_back() {
    with_env(|env| {
        let cases = [
            (REMOTE4, Pkt::tcp(CLIENT4, 47001, REMOTE_VIP4, 80), NODE4),
            (
                REMOTE4_UDP,
                Pkt::udp(CLIENT4, 47002, REMOTE_VIP4, 53, b"query"),
                NODE4,
            ),
            (REMOTE6, Pkt::tcp(CLIENT6, 47003, REMOTE_VIP6, 80), NODE6),
        ];
        for (name, req, node) in cases {
            let svc = env.service(name);
            let (id, backend) = (svc.id, *svc.backends.keys().next().unwrap());
            let before = env.dp.maps.service_stats(id).unwrap();
            let (v, out) = env.xdp(&req.bytes());
            assert_eq!(v, XDP_REDIRECT, "{name}: request");
            let (src, dst) = ends(&out);
            assert_eq!(dst, backend, "{name}: destination is the backend");
            assert_eq!(
                src.ip(),
                node.parse::<IpAddr>().unwrap(),
                "{name}: node address"
            );
            let port = src.port();
            assert!(
                (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port),
                "{name}: port {port} in the range"
            );
            // The whole frame, checksums included, as etherparse builds it.
            let mut want = dnat(&req, backend, env.b_mac, true);
            want.src = src.ip();
            want = with_ports(want, port, backend.port());
            assert_eq!(hex(&out), hex(&want.bytes()), "{name}: request rewritten");
            let after = env.dp.maps.service_stats(id).unwrap();
            assert_eq!(
                after.packets_in - before.packets_in,
                1,
                "{name}: counted in"
            );
            assert_eq!(
                after.new_flows - before.new_flows,
                1,
                "{name}: one new flow"
            );

            // The flow keeps its port.
            let (v, again) = env.xdp(&req.bytes());
            assert_eq!(v, XDP_REDIRECT);
            assert_eq!(ends(&again).0, src, "{name}: same port for the same flow");

            // The backend's reply, addressed to the node, leaves as VIP → client.
            let client = SocketAddr::new(req.src, sport(&req));
            let mut reply = with_ports(
                Pkt::new(backend.ip(), src.ip(), req.l4.clone()),
                backend.port(),
                port,
            );
            reply.src_mac = [0x02, 0, 0, 0, 0x01, 0x12];
            reply.dst_mac = env.b_mac;
            let replies_before = env.datapath(datapath_stat::SNAT_REPLY);
            let (v, out) = env.xdp(&reply.bytes());
            assert!(
                v == XDP_PASS || v == XDP_REDIRECT,
                "{name}: reply forwarded, got verdict {v}"
            );
            let mut want = with_ports(
                Pkt::new(req.dst, client.ip(), req.l4.clone()),
                svc.spec.frontend.port,
                client.port(),
            );
            want.src_mac = reply.src_mac;
            want.dst_mac = reply.dst_mac;
            assert_eq!(
                v, XDP_PASS,
                "{name}: no neighbour for the client: the kernel routes it"
            );
            assert_eq!(hex(&out), hex(&want.bytes()), "{name}: reply translated");
            assert_eq!(env.datapath(datapath_stat::SNAT_REPLY) - replies_before, 1);
            let after2 = env.dp.maps.service_stats(id).unwrap();
            assert_eq!(
                after2.packets_out - after.packets_out,
                1,
                "{name}: counted out"
            );

            // The flow's connection-table entry lost: the flow finds its own port again.
            let key = flow_key(
                client,
                SocketAddr::new(req.dst, svc.spec.frontend.port),
                svc.spec.frontend.protocol,
            );
            // A TCP SYN's flow is in the half-open table, a UDP flow's in the connection
            // table.
            let table = if svc.spec.frontend.protocol == Protocol::Tcp {
                &mut env.dp.maps.half_open
            } else {
                &mut env.dp.maps.conntrack
            };
            let ct = table.get(&key, 0).expect("flow in the table");
            assert_eq!(
                u16::from_be(ct.snat_port_be),
                port,
                "{name}: port remembered"
            );
            table.remove(&key).expect("forget the flow");
            let (_, again) = env.xdp(&req.bytes());
            assert_eq!(
                ends(&again).0,
                src,
                "{name}: same port after the entry was lost"
            );
        }

        // With the client's neighbour known, replies are redirected, and the flow's entry
        // keeps the next hop for the replies after it.
        env.bed
            .ns
            .ip("neigh add 198.18.0.1 lladdr 02:00:00:00:00:01 dev c0 nud permanent");
        env.dp.add_redirect_port(env.bed.c_ifindex).unwrap();
        let req = Pkt::tcp(CLIENT4, 47001, REMOTE_VIP4, 80);
        let (_, out) = env.xdp(&req.bytes());
        let port = ends(&out).0.port();
        let reply = Pkt::tcp("198.18.1.12", 8080, NODE4, port);
        // The reply's key: backend → node address and port.
        let key = flow_key(sock("198.18.1.12", 8080), sock(NODE4, port), Protocol::Tcp);
        for round in 0..2 {
            let (v, out) = env.xdp(&reply.bytes());
            assert_eq!(v, XDP_REDIRECT, "round {round}");
            let c_mac = env.bed.ns.mac("c0");
            let mut want = Pkt::tcp(REMOTE_VIP4, 80, CLIENT4, 47001);
            want.src_mac = c_mac;
            want.dst_mac = [0x02, 0, 0, 0, 0, 0x01];
            want.ttl -= 1;
            if let L4::Tcp { syn, .. } = &mut want.l4 {
                *syn = true;
            }
            assert_eq!(
                hex(&out),
                hex(&want.bytes()),
                "round {round}: reply redirected"
            );
            let entry = env.dp.maps.snat.get(&key, 0).unwrap();
            assert_eq!(entry.reply_hop.ifindex, env.bed.c_ifindex, "next hop kept");
        }
    });
}

#[test]
fn the_nodes_own_traffic_passes_and_ports_run_out_cleanly() {
    with_env(|env| {
        // To the node address but no flow's reply: untouched, whoever sends it.
        for p in [
            Pkt::tcp("198.18.1.12", 8080, NODE4, 61005),
            Pkt::tcp(CLIENT4, 22222, NODE4, 22),
            Pkt::udp("198.18.1.12", 5353, NODE4, 61001, b"x"),
            Pkt::tcp("fd00:1::12", 8080, NODE6, 61005),
        ] {
            let frame = p.bytes();
            assert_eq!(env.xdp(&frame), (XDP_PASS, frame.clone()));
        }
        // No neighbour known for the next hop: the kernel gets the packet destination-NATed
        // only (with the node's address as its source it would be a martian), and resolves
        // the neighbour on the way.
        let p = Pkt::tcp(CLIENT4, 47100, "198.18.100.21", 80);
        let want = dnat(&p, sock("198.18.1.14", 8080), env.b_mac, false);
        let (v, out) = env.xdp(&p.bytes());
        assert_eq!(v, XDP_PASS);
        assert_eq!(hex(&out), hex(&want.bytes()));
        // Ten ports for one backend endpoint: ten flows get ten different ports; once all
        // ten have completed their handshake (the client's ACK), the eleventh is dropped and
        // counted, and nothing else changes.
        let id = env.service(REMOTE4).id;
        let mut ports = std::collections::BTreeSet::new();
        let mut port_of = BTreeMap::new();
        for i in 0..10u16 {
            let syn = Pkt::tcp(CLIENT4, 48000 + i, REMOTE_VIP4, 80).bytes();
            let (v, out) = env.xdp(&syn);
            assert_eq!(v, XDP_REDIRECT, "flow {i}");
            ports.insert(ends(&out).0.port());
            port_of.insert(48000 + i, ends(&out).0.port());
            assert_eq!(
                env.xdp(&tcp_flags(&syn, 0x10)).0,
                XDP_REDIRECT,
                "flow {i}: ACK"
            );
        }
        assert_eq!(ports.len(), 10, "every flow its own port: {ports:?}");
        let drops = env.drops(id, drop_reason::SNAT_FAILED);
        let (v, _) = env.xdp(&Pkt::tcp(CLIENT4, 48100, REMOTE_VIP4, 80).bytes());
        assert_eq!(v, XDP_DROP, "no port left");
        assert_eq!(env.drops(id, drop_reason::SNAT_FAILED) - drops, 1);
        // A flow that has a port keeps working; another backend endpoint has its own ports.
        let (v, _) = env.xdp(&Pkt::tcp(CLIENT4, 48000, REMOTE_VIP4, 80).bytes());
        assert_eq!(v, XDP_REDIRECT);
        let (v, _) = env.xdp(&Pkt::udp(CLIENT4, 48100, REMOTE_VIP4, 53, b"q").bytes());
        assert_eq!(v, XDP_REDIRECT);

        // Closed connections give their ports back once idle for 10 s, and so do half-open
        // ones (only a SYN seen: a SYN flood must not hold ports for an hour); an
        // acknowledged one keeps its port for an hour. Flow 48003 closes with FIN both ways,
        // 48004 with a client RST, 48005 stays acknowledged, 48006 starts over with a SYN
        // (its client reused the port); then each entry is made 11 s older than it is.
        let fin = tcp_flags(&Pkt::tcp(CLIENT4, 48003, REMOTE_VIP4, 80).bytes(), 0x11);
        assert_eq!(env.xdp(&fin).0, XDP_REDIRECT);
        let reply = Pkt::tcp("198.18.1.12", 8080, NODE4, port_of[&48003]).bytes();
        assert_eq!(
            env.xdp(&tcp_flags(&reply, 0x11)).0,
            XDP_PASS,
            "reply FIN forwarded"
        );
        let rst = tcp_flags(&Pkt::tcp(CLIENT4, 48004, REMOTE_VIP4, 80).bytes(), 0x04);
        assert_eq!(env.xdp(&rst).0, XDP_REDIRECT);
        let again = Pkt::tcp(CLIENT4, 48006, REMOTE_VIP4, 80).bytes();
        assert_eq!(env.xdp(&again).0, XDP_REDIRECT);
        for client_port in [48003, 48004, 48005, 48006] {
            let key = flow_key(
                sock("198.18.1.12", 8080),
                sock(NODE4, port_of[&client_port]),
                Protocol::Tcp,
            );
            let mut v = env.dp.maps.snat.get(&key, 0).expect("the flow's entry");
            let closed = lb_common::snat_tcp::closed(v.tcp_state);
            let half_open = lb_common::snat_tcp::half_open(v.tcp_state);
            assert_eq!(
                closed,
                [48003, 48004].contains(&client_port),
                "{client_port}: {v:?}"
            );
            assert_eq!(half_open, client_port == 48006, "{client_port}: {v:?}");
            v.last_ns -= 11_000_000_000;
            env.dp.maps.snat.insert(key, v, 0).unwrap();
        }
        let mut reused = std::collections::BTreeSet::new();
        for client_port in [48200, 48201, 48202] {
            let (v, out) = env.xdp(&Pkt::tcp(CLIENT4, client_port, REMOTE_VIP4, 80).bytes());
            assert_eq!(v, XDP_REDIRECT, "{client_port} gets an idle flow's port");
            reused.insert(ends(&out).0.port());
        }
        assert_eq!(
            reused,
            std::collections::BTreeSet::from([port_of[&48003], port_of[&48004], port_of[&48006]])
        );
        // No port free or idle: a new SYN takes a half-open flow's port (one of the three just
        // given out), never an acknowledged flow's.
        let taken = env.datapath(datapath_stat::SNAT_PORT_HALF_OPEN);
        let (v, out) = env.xdp(&Pkt::tcp(CLIENT4, 48203, REMOTE_VIP4, 80).bytes());
        assert_eq!(v, XDP_REDIRECT, "a half-open flow's port");
        assert!(reused.contains(&ends(&out).0.port()), "{out:?}");
        assert_eq!(env.datapath(datapath_stat::SNAT_PORT_HALF_OPEN) - taken, 1);
    });
}

#[test]
fn a_new_flow_finds_the_last_free_source_port_and_a_syn_flood_cannot_hold_them() {
    with_env(|env| {
        // A hundred ports: more than the first tries (`SNAT_TRIES`), so that the search of
        // the whole range is what finds the last ones.
        let range = (62000u16, 62099u16);
        let mut d = desired();
        d.source_nat.as_mut().unwrap().ports = range;
        env.prog
            .apply(&d, &mut env.dp.maps)
            .expect("program the range");
        let id = env.service(REMOTE4).id;
        let syn = |port: u16| Pkt::tcp(CLIENT4, port, REMOTE_VIP4, 80).bytes();
        // Every one of a hundred flows gets a port of its own while one is free.
        let mut port_of = BTreeMap::new();
        for client in 49000..49100u16 {
            let (v, out) = env.xdp(&syn(client));
            assert_eq!(v, XDP_REDIRECT, "flow {client}");
            port_of.insert(client, ends(&out).0.port());
        }
        let distinct: std::collections::BTreeSet<_> = port_of.values().collect();
        assert_eq!(distinct.len(), 100, "{port_of:?}");
        assert!(distinct.iter().all(|p| (range.0..=range.1).contains(p)));
        assert!(
            env.datapath(datapath_stat::SNAT_RANGE_SEARCH) > 0,
            "the last ports were found by searching the range"
        );
        // 99 complete their handshake; 49099 stays a SYN. A new SYN takes that one's port
        // (wherever it is in the range), never an acknowledged flow's.
        for client in 49000..49099u16 {
            assert_eq!(env.xdp(&tcp_flags(&syn(client), 0x10)).0, XDP_REDIRECT);
        }
        let taken = env.datapath(datapath_stat::SNAT_PORT_HALF_OPEN);
        let (v, out) = env.xdp(&syn(49100));
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(
            ends(&out).0.port(),
            port_of[&49099],
            "the half-open flow's port"
        );
        assert_eq!(env.datapath(datapath_stat::SNAT_PORT_HALF_OPEN) - taken, 1);
        // All a hundred held by acknowledged flows: the next SYN is dropped and counted.
        assert_eq!(env.xdp(&tcp_flags(&syn(49100), 0x10)).0, XDP_REDIRECT);
        let drops = env.drops(id, drop_reason::SNAT_FAILED);
        assert_eq!(env.xdp(&syn(49101)).0, XDP_DROP);
        assert_eq!(env.drops(id, drop_reason::SNAT_FAILED) - drops, 1);
        // The flows that have their port keep it.
        let (v, out) = env.xdp(&tcp_flags(&syn(49050), 0x10));
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(ends(&out).0.port(), port_of[&49050]);
    });
}

/// `frame` (IPv4, TCP without options) with TCP flags `flags`, its checksum updated.
fn tcp_flags(frame: &[u8], flags: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    let at = 14 + 20 + 12;
    let old = u16::from_be_bytes([f[at], f[at + 1]]);
    f[at + 1] = flags;
    let new = u16::from_be_bytes([f[at], f[at + 1]]);
    let csum = u16::from_be_bytes([f[at + 4], f[at + 5]]);
    // RFC 1624: HC' = ~(~HC + ~m + m').
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[at + 4..at + 6].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f
}

/// A Neighbor Solicitation for `target` from `src` (`::` for duplicate address detection) to
/// `dst` (the solicited-node group, or the target itself), with a source link-layer option
/// unless it is DAD.
fn neighbor_solicitation(src: &str, dst: &str, target: &str) -> Vec<u8> {
    let ip6 = |a: &str| a.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let (src, dst, target) = (ip6(src), ip6(dst), ip6(target));
    let mut body = vec![0u8; 4];
    body.extend_from_slice(&target);
    if src != [0; 16] {
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&weir_lab::packets::CLIENT_MAC);
    }
    let ty = etherparse::Icmpv6Type::Unknown {
        type_u8: 135,
        code_u8: 0,
        bytes5to8: [0; 4],
    };
    let csum = ty.calc_checksum(src, dst, &body[4..]).unwrap();
    let mut icmp = vec![135, 0];
    icmp.extend_from_slice(&csum.to_be_bytes());
    icmp.extend_from_slice(&body);
    let eth_dst = if dst[0] == 0xff {
        [0x33, 0x33, dst[12], dst[13], dst[14], dst[15]]
    } else {
        LB_MAC
    };
    let mut f = Vec::new();
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&weir_lab::packets::CLIENT_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&icmp);
    f
}

/// Checks a Neighbor Advertisement frame: addresses, flags, target, option and checksum.
fn check_advert(out: &[u8], eth_dst: [u8; 6], ip_dst: &str, flags: u8) {
    assert_eq!(out.len(), 86, "{}", hex(out));
    assert_eq!(out[0..6], eth_dst, "Ethernet destination");
    assert_eq!(out[6..12], LB_MAC, "Ethernet source: the interface's MAC");
    let p = etherparse::SlicedPacket::from_ethernet(out).expect("parse");
    let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else {
        panic!("not IPv6")
    };
    let h = ip.header();
    assert_eq!(h.hop_limit(), 255);
    assert_eq!(h.source_addr(), VIP6.parse::<std::net::Ipv6Addr>().unwrap());
    assert_eq!(
        h.destination_addr(),
        ip_dst.parse::<std::net::Ipv6Addr>().unwrap()
    );
    let Some(etherparse::TransportSlice::Icmpv6(icmp)) = p.transport else {
        panic!("not ICMPv6")
    };
    assert!(
        icmp.is_checksum_valid(h.source_addr().octets(), h.destination_addr().octets()),
        "ICMPv6 checksum"
    );
    let b = icmp.slice();
    assert_eq!(b[0], 136, "a Neighbor Advertisement");
    assert_eq!(b[4], flags, "flags (Solicited, Override)");
    assert_eq!(
        b[8..24],
        VIP6.parse::<std::net::Ipv6Addr>().unwrap().octets(),
        "target"
    );
    assert_eq!(b[24..26], [2, 1], "target link-layer address option");
    assert_eq!(b[26..32], LB_MAC);
}

#[test]
fn announced_vips_get_arp_replies_and_neighbor_advertisements() {
    with_env(|env| {
        let announced = [VIP4, VIP6]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect::<std::collections::BTreeSet<IpAddr>>();
        env.prog
            .set_announced(announced, &mut env.dp.maps)
            .expect("announce");
        // No L2 interface yet: nothing answered.
        let request = arp_request(CLIENT4, VIP4);
        assert_eq!(env.xdp(&request), (XDP_PASS, request.clone()));
        env.dp.add_l2_port(env.bed.c_ifindex, LB_MAC).unwrap();
        // No lease (the agent's liveness) yet: nothing answered either.
        assert_eq!(env.xdp(&request), (XDP_PASS, request.clone()));
        let mut lease = env.dp.l2_lease().unwrap();
        lease.extend(Duration::from_mins(1)).unwrap();

        let arps = env.datapath(datapath_stat::ARP_REPLY);
        let (v, out) = env.xdp(&request);
        assert_eq!(v, XDP_TX);
        let mut want = Vec::new();
        want.extend_from_slice(&weir_lab::packets::CLIENT_MAC);
        want.extend_from_slice(&LB_MAC);
        want.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
        want.extend_from_slice(&LB_MAC);
        want.extend_from_slice(&[198, 18, 100, 10]);
        want.extend_from_slice(&weir_lab::packets::CLIENT_MAC);
        want.extend_from_slice(&[198, 18, 0, 1]);
        want.resize(60, 0);
        assert_eq!(hex(&out), hex(&want), "ARP reply");
        assert_eq!(env.datapath(datapath_stat::ARP_REPLY) - arps, 1);
        // Not announced (a VIP of another service), or a gratuitous ARP: the kernel's.
        for f in [
            arp_request(CLIENT4, "198.18.100.11"),
            arp_request(CLIENT4, "198.18.0.77"),
            arp_request(VIP4, VIP4),
        ] {
            assert_eq!(env.xdp(&f), (XDP_PASS, f.clone()));
        }

        let nas = env.datapath(datapath_stat::NEIGHBOR_ADVERT);
        // To the solicited-node group, from the client: solicited advertisement back to it.
        let ns = neighbor_solicitation(CLIENT6, "ff02::1:ff00:10", VIP6);
        let (v, out) = env.xdp(&ns);
        assert_eq!(v, XDP_TX, "{}", hex(&out));
        check_advert(&out, weir_lab::packets::CLIENT_MAC, CLIENT6, 0x60);
        // Unicast to the VIP (neighbour unreachability detection): the same.
        let ns = neighbor_solicitation(CLIENT6, VIP6, VIP6);
        let (v, out) = env.xdp(&ns);
        assert_eq!(v, XDP_TX);
        check_advert(&out, weir_lab::packets::CLIENT_MAC, CLIENT6, 0x60);
        // Duplicate address detection: an unsolicited advertisement to all nodes defends it.
        let ns = neighbor_solicitation("::", "ff02::1:ff00:10", VIP6);
        let (v, out) = env.xdp(&ns);
        assert_eq!(v, XDP_TX);
        check_advert(&out, [0x33, 0x33, 0, 0, 0, 1], "ff02::1", 0x20);
        assert_eq!(env.datapath(datapath_stat::NEIGHBOR_ADVERT) - nas, 3);
        // Not announced: the kernel's.
        let ns = neighbor_solicitation(CLIENT6, "ff02::1:ff00:99", "fd00:100::99");
        assert_eq!(env.xdp(&ns), (XDP_PASS, ns.clone()));

        // The lease runs out (the agent died): no more answers, though the VIPs are still
        // marked; renewed, answers resume.
        lease.extend(Duration::ZERO).unwrap();
        assert_eq!(env.xdp(&request), (XDP_PASS, request.clone()));
        lease.extend(Duration::from_mins(1)).unwrap();
        assert_eq!(env.xdp(&request).0, XDP_TX);
        // Handing the VIPs over (another node owns them now): no more answers.
        env.prog
            .set_announced(Default::default(), &mut env.dp.maps)
            .unwrap();
        assert_eq!(env.xdp(&request), (XDP_PASS, request.clone()));
        let ns = neighbor_solicitation(CLIENT6, "ff02::1:ff00:10", VIP6);
        assert_eq!(env.xdp(&ns), (XDP_PASS, ns.clone()));
    });
}

/// The IPv4 packet of `frame` (Ethernet, no tags, no options) cut into fragments at `at`
/// (a multiple of 8 bytes of IP payload), with identification `id`: each fragment a frame.
fn ipv4_fragments(frame: &[u8], id: u16, at: usize) -> Vec<Vec<u8>> {
    let (eth, ip) = frame.split_at(14);
    let (header, data) = ip.split_at(20);
    assert_eq!(at % 8, 0);
    let mut out = Vec::new();
    for (i, part) in data.chunks(at).enumerate() {
        let mut h = header.to_vec();
        h[2..4].copy_from_slice(&((20 + part.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        let more = if (i + 1) * at < data.len() { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&(more | (i * at / 8) as u16).to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let sum = h
            .chunks(2)
            .fold(0u32, |s, w| s + u32::from(u16::from_be_bytes([w[0], w[1]])));
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        out.push([eth, &h, part].concat());
    }
    out
}

/// What a linear skb can show of replies that the kernel hands over in other shapes (the
/// lab shows non-linear and GSO ones): a UDP reply the backend's stack fragmented gets the
/// VIP and port in its first fragment (checksum updated for the whole datagram) and the VIP
/// in the later one, from the entry the first left; a later fragment of a datagram whose
/// first fragment was no flow's leaves as it is; an SCTP reply whose CRC32c is left to the
/// device (field 0) gets its port and keeps the 0; nothing is counted as untranslated.
#[test]
fn fragmented_replies_and_pending_sctp_checksums_are_translated() {
    with_env(|env| {
        let req = Pkt::udp(CLIENT4, 42101, VIP4, 53, b"q");
        assert_eq!(env.xdp(&req.bytes()).0, XDP_REDIRECT, "request");
        let client = SocketAddr::new(req.src, 42101);
        let backend = env.expected_backend("udp4", client);
        let payload: Vec<u8> = (0..3000).map(weir_lab::servers::pattern).collect();
        let udp = |sport| L4::Udp {
            sport,
            dport: 42101,
            payload: payload.clone(),
            no_checksum: false,
        };
        let mut reply = Pkt::new(backend.ip(), client.ip(), udp(backend.port()));
        reply.src_mac = LB_MAC;
        reply.dst_mac = [0x02, 0, 0, 0, 0, 0x01];
        let mut want = reply.clone();
        want.src = req.dst;
        want.l4 = udp(53);
        let frags = ipv4_fragments(&reply.bytes(), 0x4242, 1480);
        let wanted = ipv4_fragments(&want.bytes(), 0x4242, 1480);
        assert_eq!(frags.len(), 3);
        let before = env.datapath(datapath_stat::REVNAT_FRAGMENT);
        for (i, (f, w)) in frags.iter().zip(&wanted).enumerate() {
            let (v, out) = env.tc(f);
            assert_eq!(v, TC_ACT_OK, "fragment {i}");
            assert_eq!(hex(&out), hex(w), "fragment {i} rewritten");
        }
        assert_eq!(env.datapath(datapath_stat::REVNAT_FRAGMENT) - before, 3);
        // A later fragment of a datagram whose first fragment was nobody's flow.
        let stray = ipv4_fragments(&reply.bytes(), 0x4343, 1480).remove(1);
        assert_eq!(env.tc(&stray), (TC_ACT_OK, stray.clone()));

        // SCTP with its CRC32c pending (CHECKSUM_PARTIAL): the port changes, the field stays 0.
        let req = Pkt::new(
            CLIENT4.parse().unwrap(),
            VIP4.parse().unwrap(),
            L4::Sctp {
                sport: 42102,
                dport: 3868,
                vtag: 0,
                chunks: sctp_init_chunk(9),
            },
        );
        assert_eq!(env.xdp(&req.bytes()).0, XDP_REDIRECT, "SCTP request");
        let client = SocketAddr::new(req.src, 42102);
        let backend = env.expected_backend("sctp4", client);
        let sctp = |sport| L4::Sctp {
            sport,
            dport: 42102,
            vtag: 9,
            chunks: vec![2, 0, 0, 20, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1],
        };
        let mut reply = Pkt::new(backend.ip(), client.ip(), sctp(backend.port()));
        reply.src_mac = LB_MAC;
        reply.dst_mac = [0x02, 0, 0, 0, 0, 0x01];
        let mut want = reply.clone();
        want.src = req.dst;
        want.l4 = sctp(3868);
        let (mut frame, mut wanted) = (reply.bytes(), want.bytes());
        frame[14 + 20 + 8..14 + 20 + 12].fill(0);
        wanted[14 + 20 + 8..14 + 20 + 12].fill(0);
        let (v, out) = env.tc(&frame);
        assert_eq!(v, TC_ACT_OK);
        assert_eq!(
            hex(&out),
            hex(&wanted),
            "SCTP reply: port rewritten, CRC32c left at 0"
        );
        for (slot, reason) in datapath_stat::UNTRANSLATED {
            assert_eq!(env.datapath(slot), 0, "untranslated ({reason})");
        }
    });
}

/// A SYN flood churns the half-open table only: established connections keep their entries in
/// the connection table (and so their backends and their replies' reverse NAT). Before, 5000
/// spoofed SYNs pushed about half of 700 idle established connections (345 when measured)
/// out of a 2048-entry table
/// (the kernel's LRU demotes entries not used since its last scan once they outnumber the
/// rest). A handshake moves its flow to
/// the connection table with the client's ACK; a client's RST moves it back out, for good.
#[test]
fn a_syn_flood_never_pushes_an_established_connection_out() {
    weir_lab::netns::require_root();
    let limits = DataplaneLimits {
        conntrack_size: 2048,
        ..DataplaneLimits::default()
    };
    with_env_limits(limits, |env| {
        // The tables keep an LRU list per CPU: every packet of the test runs on one CPU, as
        // one flow's packets arrive on one receive queue.
        weir_lab::netns::pin_to_cpu(0);
        let key = flow_key(sock(CLIENT4, 41500), sock(VIP4, 80), Protocol::Tcp);
        let in_table = |env: &Env<'_>| {
            (
                env.dp.maps.conntrack.get(&key, 0).is_ok(),
                env.dp.maps.half_open.get(&key, 0).ok(),
            )
        };
        let syn = Pkt::tcp(CLIENT4, 41500, VIP4, 80);
        assert_eq!(env.xdp(&syn.bytes()).0, XDP_REDIRECT);
        let (established, half_open) = in_table(env);
        assert!(!established && half_open.is_some(), "a SYN waits half-open");
        let mut ack = syn.clone();
        ack.l4 = L4::Tcp {
            sport: 41500,
            dport: 80,
            syn: false,
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        };
        let promoted = env.datapath(datapath_stat::FLOW_PROMOTED);
        let (v, first) = env.xdp(&ack.bytes());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(
            in_table(env),
            (true, None),
            "the client's ACK establishes it"
        );
        assert_eq!(env.datapath(datapath_stat::FLOW_PROMOTED) - promoted, 1);

        // 700 more established connections (most of a CPU's share of the table: the busy
        // node the flood meets), then 5000 SYNs from spoofed sources, each a new flow.
        let conn = |i: u16| {
            let mut p = Pkt::tcp(CLIENT4, 30_000 + i, VIP4, 80);
            p.l4 = L4::Tcp {
                sport: 30_000 + i,
                dport: 80,
                syn: false,
                payload: Vec::new(),
            };
            p
        };
        for i in 0..700u16 {
            assert_eq!(
                env.xdp(&Pkt::tcp(CLIENT4, 30_000 + i, VIP4, 80).bytes()).0,
                XDP_REDIRECT
            );
            assert_eq!(env.xdp(&conn(i).bytes()).0, XDP_REDIRECT);
        }
        let half_opens = env.datapath(datapath_stat::FLOW_HALF_OPEN);
        for i in 0..5000u32 {
            let src = std::net::Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8);
            let p = Pkt::tcp(&src.to_string(), 1024 + (i % 50_000) as u16, VIP4, 80);
            assert_eq!(env.xdp(&p.bytes()).0, XDP_REDIRECT);
        }
        assert_eq!(
            env.datapath(datapath_stat::FLOW_HALF_OPEN) - half_opens,
            5000
        );
        assert!(
            in_table(env).0,
            "the established connection is still in the table"
        );
        let lost = (0..700u16)
            .filter(|i| {
                let k = flow_key(sock(CLIENT4, 30_000 + i), sock(VIP4, 80), Protocol::Tcp);
                env.dp.maps.conntrack.get(&k, 0).is_err()
            })
            .count();
        assert_eq!(lost, 0, "established connections pushed out by the flood");
        let (_, again) = env.xdp(&ack.bytes());
        assert_eq!(hex(&again), hex(&first), "same backend, same rewrite");

        // The client resets: its entry leaves the connection table and does not come back
        // with a later ACK.
        let rst = tcp_flags(&syn.bytes(), 0x04);
        assert_eq!(env.xdp(&rst).0, XDP_REDIRECT, "the RST reaches the backend");
        let (established, half_open) = in_table(env);
        assert!(
            !established,
            "a reset connection leaves the connection table"
        );
        assert_eq!(
            half_open.map(|v| v.flags & lb_common::flow_flags::CLOSING),
            Some(lb_common::flow_flags::CLOSING)
        );
        env.xdp(&ack.bytes());
        assert!(!in_table(env).0, "a closing flow is not established again");
    });
}

/// 10^5 random and mutated frames (`weir_lab::framefuzz`; `scripts/bench --only fuzz` runs
/// 10^6): every verdict pass, drop, tx or redirect; every rewritten frame with valid checksums
/// (when it came in with them) and to a backend, a known client or its sender; every drop,
/// tx and redirect counted. The seed is fixed; `WEIR_FUZZ_SEED` and `WEIR_FUZZ_FRAMES` replay
/// another run (a benchmark's, say).
#[test]
fn random_and_mutated_frames_keep_every_invariant() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let r = weir_lab::framefuzz::run(env("WEIR_FUZZ_FRAMES", 100_000), env("WEIR_FUZZ_SEED", 1));
    eprintln!("{r:?}");
    assert!(
        r.failures.is_empty(),
        "{} failures: {:#?}",
        r.failed,
        r.failures
    );
    // The frames reach every verdict, and many are rewritten and checked.
    let [_, drop, pass, tx, redirect] = r.verdicts;
    assert!(drop > 0 && pass > 0 && tx > 0 && redirect > 0, "{r:?}");
    assert!(r.checked > 10_000, "{r:?}");
}
