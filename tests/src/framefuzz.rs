//! Random and mutated frames through weir's XDP program (BPF_PROG_TEST_RUN on the real
//! kernel), with what must hold for every one of them:
//! - the verdict is pass, drop, tx or redirect (never aborted or anything else);
//! - a frame the program rewrote carries valid checksums (IPv4 header, TCP, UDP, ICMP,
//!   ICMPv6, SCTP) whenever the frame it got did, and goes to a programmed backend, to the
//!   client of a known source-NAT flow, or (tx) back to its sender;
//! - the counters add up: every drop is counted under a reason, every redirect and every tx
//!   under its path.
//!
//! The frames: well-formed ones to every frontend of a small desired state (TCP, UDP, SCTP,
//! ICMP, both families, source ranges, affinity, source NAT), source-NAT replies, ARP,
//! VLAN-tagged, with IPv4 options or IPv6 extension headers, from random clients and ports;
//! then a third of them with bytes flipped, a sixth cut or padded, a twelfth random bytes.
//! A seeded generator: a run is reproducible from its seed.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_agent::{
    dataplane::{DataplaneLimits, Programmer, ebpf::Datapath, inspect::flow_key},
    model::{Backend, DesiredState, Frontend, Protocol, Scope, Service, SourceNat},
};
use lb_common::{FlowKey, datapath_stat, drop_reason};

use crate::{
    packets::{L4, Pkt, arp_request, sctp_crc_ok, sctp_init_chunk, sctp_packet},
    testbed::Testbed,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// What a run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub frames: u64,
    pub seed: u64,
    /// Verdicts: [aborted, drop, pass, tx, redirect].
    pub verdicts: [u64; 5],
    /// Frames the program rewrote, and of those, how many had valid checksums going in (and
    /// so were checked coming out).
    pub rewritten: u64,
    pub checked: u64,
    /// What broke (the first few of each kind), and how many in all.
    pub failures: Vec<String>,
    pub failed: u64,
    pub seconds: f64,
}

impl Report {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }
}

/// SplitMix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const NODE4: &str = "198.18.1.1";
const NODE6: &str = "fd00:1::1";
const SNAT_PORTS: (u16, u16) = (61000, 61063);

fn service(name: &str, vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Service {
    let mut b: Vec<Backend> = backends
        .iter()
        .map(|a| Backend::new(a.parse().expect("backend"), 1))
        .collect();
    b.sort();
    Service {
        name: name.into(),
        frontend: Frontend {
            vip: vip.parse().expect("vip"),
            port,
            protocol,
            scope: Scope::Both,
        },
        backends: b,
        source_ranges: vec![],
        affinity_timeout: None,
        table_size: 251,
        health_check: None,
        node_address: false,
    }
}

/// The fuzzed data plane's services.
pub fn desired() -> DesiredState {
    use Protocol::{Sctp, Tcp, Udp};
    let three = ["198.18.1.11:8080", "198.18.1.12:8080", "198.18.1.13:8080"];
    let mut ranged = service("ranged", "198.18.100.11", 80, Tcp, &three);
    ranged.source_ranges = vec!["198.18.0.0/28".parse().expect("range")];
    let mut sticky = service("sticky", "198.18.100.12", 80, Tcp, &three);
    sticky.affinity_timeout = Some(Duration::from_mins(1));
    let snat = |mut s: Service| {
        s.backends = s.backends.into_iter().map(Backend::with_snat).collect();
        s
    };
    let mut services = vec![
        service("tcp4", "198.18.100.10", 80, Tcp, &three),
        service(
            "udp4",
            "198.18.100.10",
            53,
            Udp,
            &["198.18.1.11:5353", "198.18.1.12:5353"],
        ),
        service("sctp4", "198.18.100.10", 3868, Sctp, &["198.18.1.11:3869"]),
        service(
            "tcp6",
            "fd00:100::10",
            80,
            Tcp,
            &["[fd00:1::11]:8080", "[fd00:1::12]:8080"],
        ),
        service("udp6", "fd00:100::10", 53, Udp, &["[fd00:1::11]:5353"]),
        ranged,
        sticky,
        snat(service(
            "remote4",
            "198.18.100.20",
            80,
            Tcp,
            &["198.18.1.12:8080"],
        )),
        snat(service(
            "remote4-udp",
            "198.18.100.20",
            53,
            Udp,
            &["198.18.1.13:5353"],
        )),
        snat(service(
            "remote6",
            "fd00:100::20",
            80,
            Tcp,
            &["[fd00:1::12]:8080"],
        )),
    ];
    services.sort_by(|a, b| a.name.cmp(&b.name));
    DesiredState {
        services: std::sync::Arc::new(services.into_iter().map(std::sync::Arc::new).collect()),
        source_nat: Some(SourceNat {
            ipv4: Some(NODE4.parse().expect("node")),
            ipv6: Some(NODE6.parse().expect("node")),
            ports: SNAT_PORTS,
        }),
    }
}

/// A well-formed frame: to a frontend, a source-NAT reply, an ICMP echo or an ARP request.
fn template(rng: &mut Rng, d: &DesiredState) -> Vec<u8> {
    let v6 = rng.below(3) == 0;
    let client: IpAddr = if v6 {
        format!("fd00:18::{:x}", 1 + rng.below(0xffff)).parse()
    } else {
        format!("198.18.0.{}", 1 + rng.below(250)).parse()
    }
    .expect("client");
    let sport = 1024 + rng.below(64000) as u16;
    let fronts: Vec<&Service> = d
        .services
        .iter()
        .filter(|s| s.frontend.vip.is_ipv6() == v6)
        .map(|s| &**s)
        .collect();
    let s = fronts[rng.below(fronts.len() as u64) as usize];
    let (vip, port) = (s.frontend.vip, s.frontend.port);
    let flag = |rng: &mut Rng| rng.below(2) == 0;
    let mut p = match rng.below(8) {
        // Source-NAT replies: a backend to the node address and a port of the range.
        0 => {
            let b = if v6 { "fd00:1::12" } else { "198.18.1.12" };
            let node = if v6 { NODE6 } else { NODE4 };
            let nport = SNAT_PORTS.0 + rng.below(u64::from(SNAT_PORTS.1 - SNAT_PORTS.0 + 1)) as u16;
            let mut p = Pkt::tcp(b, 8080, node, nport);
            if let L4::Tcp { syn, .. } = &mut p.l4 {
                *syn = flag(rng);
            }
            p
        }
        1 => Pkt::new(
            client,
            vip,
            L4::Echo {
                id: rng.below(65536) as u16,
                seq: 1,
                reply: false,
                payload: b"weir".to_vec(),
            },
        ),
        2 if !v6 => return arp_request(&client.to_string(), &vip.to_string()),
        _ => match s.frontend.protocol {
            Protocol::Tcp => Pkt::new(
                client,
                vip,
                L4::Tcp {
                    sport,
                    dport: port,
                    syn: flag(rng),
                    payload: vec![0x61; rng.below(64) as usize],
                },
            ),
            Protocol::Udp => Pkt::new(
                client,
                vip,
                L4::Udp {
                    sport,
                    dport: port,
                    payload: vec![0x62; 1 + rng.below(64) as usize],
                    no_checksum: !v6 && rng.below(4) == 0,
                },
            ),
            Protocol::Sctp => Pkt::new(
                client,
                vip,
                L4::Raw {
                    proto: 132,
                    payload: sctp_packet(sport, port, 0, &sctp_init_chunk(rng.next() as u32)),
                },
            ),
        },
    };
    match rng.below(10) {
        0 => p.vlans = vec![100],
        1 => p.vlans = vec![100, 200],
        2 if !v6 => p.ipv4_options = vec![1, 1, 1, 1],
        3 if v6 => p.ipv6_ext_headers = true,
        _ => {}
    }
    p.bytes()
}

/// The next frame: a template, maybe mutated, or random bytes.
fn frame(rng: &mut Rng, d: &DesiredState) -> Vec<u8> {
    let roll = rng.below(12);
    if roll == 0 {
        let n = rng.below(200) as usize;
        return (0..n).map(|_| rng.next() as u8).collect();
    }
    let mut f = template(rng, d);
    match roll {
        1..=4 => {
            for _ in 0..=rng.below(4) {
                let i = rng.below(f.len() as u64) as usize;
                f[i] ^= 1 << rng.below(8);
            }
            if rng.below(2) == 0 {
                let i = rng.below(f.len() as u64) as usize;
                f[i] = rng.next() as u8;
            }
        }
        5 => f.truncate(rng.below(f.len() as u64) as usize),
        6 => f.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        _ => {}
    }
    f
}

/// Where an IP packet starts in a frame, and its family (after up to two VLAN tags).
fn ip_start(f: &[u8]) -> Option<(usize, bool)> {
    let mut off = 12;
    loop {
        let t = u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]);
        match t {
            0x8100 | 0x88a8 => off += 4,
            0x0800 => return Some((off + 2, false)),
            0x86dd => return Some((off + 2, true)),
            _ => return None,
        }
    }
}

fn sum(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn folds_to_ones(mut s: u32) -> bool {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

/// The IP packet of a frame: (source, destination, layer-4 protocol, layer-4 bytes, first
/// fragment, IPv4 header checksum valid); None when it is not one, or is cut short.
struct Ip<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: &'a [u8],
    whole: bool,
    header_ok: bool,
    pseudo: u32,
}

fn parse_ip(f: &[u8]) -> Option<Ip<'_>> {
    let (off, v6) = ip_start(f)?;
    let ip = f.get(off..)?;
    if v6 {
        if ip.len() < 40 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        let end = (40 + len).min(ip.len());
        let (mut next, mut at) = (ip[6], 40);
        while matches!(next, 0 | 43 | 60) {
            let h = ip.get(at..at + 2)?;
            next = h[0];
            at += (usize::from(h[1]) + 1) * 8;
        }
        let whole = next != 44;
        let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
        let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
        let l4 = ip.get(at..end)?;
        let pseudo = sum(&ip[8..40]) + u32::from(next) + l4.len() as u32;
        Some(Ip {
            src,
            dst,
            proto: next,
            l4,
            whole,
            header_ok: true,
            pseudo,
        })
    } else {
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        if ip.len() < ihl || ihl < 20 {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let end = total.min(ip.len());
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        // Neither more fragments nor an offset.
        let whole = frag.trailing_zeros() >= 14;
        let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).ok()?);
        let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).ok()?);
        let l4 = ip.get(ihl..end)?;
        let pseudo = sum(&ip[12..20]) + u32::from(ip[9]) + l4.len() as u32;
        Some(Ip {
            src,
            dst,
            proto: ip[9],
            l4,
            whole,
            header_ok: folds_to_ones(sum(&ip[..ihl])),
            pseudo,
        })
    }
}

/// Whether every checksum of the frame's IP packet is valid (None: not an IP packet whose
/// layer 4 can be checked).
fn checksums_ok(f: &[u8]) -> Option<bool> {
    let ip = parse_ip(f)?;
    if !ip.whole {
        return Some(ip.header_ok);
    }
    let v6 = ip.src.is_ipv6();
    let l4_ok = match ip.proto {
        6 if ip.l4.len() >= 20 => folds_to_ones(ip.pseudo + sum(ip.l4)),
        17 if ip.l4.len() >= 8 => {
            (!v6 && ip.l4[6..8] == [0, 0]) || folds_to_ones(ip.pseudo + sum(ip.l4))
        }
        1 if !v6 && ip.l4.len() >= 8 => folds_to_ones(sum(ip.l4)),
        58 if v6 && ip.l4.len() >= 8 => folds_to_ones(ip.pseudo + sum(ip.l4)),
        132 if ip.l4.len() >= 12 => sctp_crc_ok(ip.l4),
        _ => return Some(ip.header_ok),
    };
    Some(ip.header_ok && l4_ok)
}

/// The ports of a TCP, UDP or SCTP packet.
fn ports(ip: &Ip<'_>) -> Option<(u16, u16)> {
    if !matches!(ip.proto, 6 | 17 | 132) || ip.l4.len() < 4 {
        return None;
    }
    Some((
        u16::from_be_bytes([ip.l4[0], ip.l4[1]]),
        u16::from_be_bytes([ip.l4[2], ip.l4[3]]),
    ))
}

/// The source-NAT table key of a reply (backend → node address and port).
fn reply_key(ip: &Ip<'_>) -> Option<FlowKey> {
    let (sport, dport) = ports(ip)?;
    let proto = match ip.proto {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        _ => Protocol::Sctp,
    };
    Some(flow_key(
        SocketAddr::new(ip.src, sport),
        SocketAddr::new(ip.dst, dport),
        proto,
    ))
}

/// `addr` as the tables hold it.
fn words(addr: IpAddr) -> [u32; 4] {
    flow_key(
        SocketAddr::new(addr, 0),
        SocketAddr::new(addr, 0),
        Protocol::Tcp,
    )
    .src
}

/// Sum of every drop counter (all services and the unattributed), and the path counters.
fn counters(dp: &Datapath, ids: u32) -> (u64, [u64; datapath_stat::SLOTS]) {
    let mut drops = 0;
    for id in 0..ids {
        let s = dp.maps.service_stats(id).expect("service stats");
        drops += s.drops[..drop_reason::SLOTS].iter().sum::<u64>();
    }
    (
        drops,
        dp.maps.datapath_stats().expect("datapath stats").counters,
    )
}

/// Runs `n` frames from `seed` through a freshly loaded data plane.
pub fn run(n: u64, seed: u64) -> Report {
    let bed = Testbed::new();
    bed.ns.run_in(|| {
        let limits = DataplaneLimits::default();
        let mut dp = Datapath::load(&limits, None).expect("load the data plane");
        dp.add_redirect_port(bed.b_ifindex).expect("redirect port");
        let d = desired();
        let mut prog = Programmer::new(&limits, 0);
        prog.apply(&d, &mut dp.maps).expect("program");
        // The node's neighbours: clients get their replies redirected too.
        bed.ns
            .ip("neigh add 198.18.0.1 lladdr 02:00:00:00:00:01 dev c0 nud permanent");
        dp.add_redirect_port(bed.c_ifindex).expect("redirect port");
        let backends: BTreeSet<SocketAddr> = d
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.addr))
            .collect();
        let backend_ips: BTreeSet<IpAddr> = backends.iter().map(SocketAddr::ip).collect();
        let vips: BTreeSet<IpAddr> = d.services.iter().map(|s| s.frontend.vip).collect();
        let ids = prog.services().map(|s| s.id).max().unwrap_or(0) + 1;
        let mut report = Report {
            seed,
            ..Report::default()
        };
        let mut rng = Rng(seed);
        let (drops_before, paths_before) = counters(&dp, ids);
        let start = std::time::Instant::now();
        let mut out = vec![0u8; 4096];
        for i in 0..n {
            let f = frame(&mut rng, &d);
            // The kernel refuses a test run of less than an Ethernet header.
            if f.len() < 14 {
                continue;
            }
            let ctx = bed.xdp_ctx(f.len());
            let r = dp
                .xdp()
                .test_run(TestRunOptions {
                    data_in: Some(&f),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::new()
                })
                .expect("XDP test run");
            report.frames += 1;
            let v = r.return_value;
            let o = &out[..r.data_size_out as usize];
            match v {
                XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT => report.verdicts[v as usize] += 1,
                _ => {
                    report.verdicts[0] += 1;
                    report.fail(format!("frame {i}: verdict {v}: {}", hex(&f)));
                    continue;
                }
            }
            if v == XDP_DROP || o == f.as_slice() {
                continue;
            }
            report.rewritten += 1;
            if checksums_ok(&f) == Some(true) {
                report.checked += 1;
                if checksums_ok(o) != Some(true) {
                    report.fail(format!(
                        "frame {i}: rewritten with a bad checksum: {} → {}",
                        hex(&f),
                        hex(o)
                    ));
                }
            }
            let (Some(ip_in), Some(ip_out)) = (parse_ip(&f), parse_ip(o)) else {
                // ARP: answered to its sender.
                continue;
            };
            let to_backend = match ports(&ip_out) {
                Some((_, dport)) => backends.contains(&SocketAddr::new(ip_out.dst, dport)),
                // ICMP errors go to a backend address.
                None => backend_ips.contains(&ip_out.dst),
            };
            let to_sender = v == XDP_TX && ip_out.dst == ip_in.src;
            let to_known_client = vips.contains(&ip_out.src)
                && reply_key(&ip_in)
                    .and_then(|k| dp.maps.snat.get(&k, 0).ok())
                    .is_some_and(|e| e.client == words(ip_out.dst));
            if !(to_backend || to_sender || to_known_client) {
                report.fail(format!(
                    "frame {i}: rewritten to {} (verdict {v}), not a backend, a known client or \
                     the sender: {} → {}",
                    ip_out.dst,
                    hex(&f),
                    hex(o)
                ));
            }
        }
        report.seconds = start.elapsed().as_secs_f64();
        let (drops_after, paths_after) = counters(&dp, ids);
        let path = |slot: usize| paths_after[slot] - paths_before[slot];
        let [_, drop, _, tx, redirect] = report.verdicts;
        if drops_after - drops_before != drop {
            report.fail(format!(
                "{drop} frames dropped, {} drops counted",
                drops_after - drops_before
            ));
        }
        let tx_counted = path(datapath_stat::ICMP_ECHO_REPLY)
            + path(datapath_stat::ARP_REPLY)
            + path(datapath_stat::NEIGHBOR_ADVERT);
        if tx_counted != tx {
            report.fail(format!("{tx} frames sent back (tx), {tx_counted} counted"));
        }
        if path(datapath_stat::FWD_REDIRECT) != redirect {
            report.fail(format!(
                "{redirect} frames redirected, {} counted",
                path(datapath_stat::FWD_REDIRECT)
            ));
        }
        report
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
