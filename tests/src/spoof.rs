//! An attacker on the nodes' network, for the hardening tests: it records UDP datagrams a
//! node receives (a raw socket sees a copy of each) and sends UDP datagrams with any source
//! address (IPv4 with a header of its own), as a host on the same link can.

use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::Netns;

/// In `ns`, the payload of the next UDP datagram from `from` to port `to_port` that arrives
/// within `timeout`.
pub fn record_udp(
    ns: &Netns,
    from: SocketAddrV4,
    to_port: u16,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    ns.run_in(|| {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let end = Instant::now() + timeout;
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 65536];
        while Instant::now() < end {
            let n = match s.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            // SAFETY: recv initialised the first n bytes.
            let d: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let ihl = usize::from(d[0] & 0x0f) * 4;
            if d.len() < ihl + 8 {
                continue;
            }
            let src = Ipv4Addr::new(d[12], d[13], d[14], d[15]);
            let udp = &d[ihl..];
            let (sport, dport) = (
                u16::from_be_bytes([udp[0], udp[1]]),
                u16::from_be_bytes([udp[2], udp[3]]),
            );
            if src == *from.ip() && sport == from.port() && dport == to_port {
                return Ok(udp[8..].to_vec());
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no datagram from {from} to port {to_port}"),
        ))
    })
}

/// Sends `payload` in a UDP datagram from `from` (any address: the IP header is ours) to `to`,
/// out of `ns`.
pub fn send_udp(
    ns: &Netns,
    from: SocketAddrV4,
    to: SocketAddrV4,
    payload: &[u8],
) -> io::Result<()> {
    let mut d = Vec::with_capacity(28 + payload.len());
    let total = u16::try_from(28 + payload.len()).map_err(|_| io::Error::other("too large"))?;
    // IPv4: version 4, 20 bytes, length, no id, DF, TTL 64, UDP; the kernel fills the
    // header checksum.
    d.extend_from_slice(&[0x45, 0]);
    d.extend_from_slice(&total.to_be_bytes());
    d.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    d.extend_from_slice(&from.ip().octets());
    d.extend_from_slice(&to.ip().octets());
    // UDP without a checksum (allowed over IPv4).
    d.extend_from_slice(&from.port().to_be_bytes());
    d.extend_from_slice(&to.port().to_be_bytes());
    d.extend_from_slice(&(total - 20).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    ns.run_in(|| {
        // IPPROTO_RAW: the datagram carries its own IP header.
        let s = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        s.send_to(
            &d,
            &SockAddr::from(SocketAddr::new(IpAddr::V4(*to.ip()), 0)),
        )?;
        Ok(())
    })
}

/// A SYN flood from spoofed sources: the lab's generator (`lab_tx`, BPF_PROG_TEST_RUN in
/// live-frames mode) sends 64-byte TCP SYNs out of an interface at the full rate one core
/// gives, from up to 64 000 addresses of `sources` (a /16 of 198.18.0.0/15) and one port, to
/// `dst`. The frames carry valid checksums: the generator writes the low half of the source
/// address and its complement into the IP identification and the TCP urgent pointer (no URG
/// flag), whose sums stay constant.
pub struct SynFlood {
    ebpf: aya::Ebpf,
    frame: [u8; 64],
    ifindex: u32,
}

/// Source addresses the flood uses.
pub const FLOOD_SOURCES: u32 = 64_000;

impl SynFlood {
    /// Out of `iface` in `ns` (whose peer must run a native XDP program to receive the
    /// frames), to the next hop `dst_mac`.
    pub fn new(
        ns: &Netns,
        iface: &str,
        dst_mac: [u8; 6],
        sources: Ipv4Addr,
        dst: SocketAddrV4,
    ) -> Self {
        let [a, b, ..] = sources.octets();
        let mut f = [0u8; 64];
        f[0..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&ns.mac(iface));
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        // IPv4: 40 bytes, identification 0xffff (the complement of the source's low half, 0),
        // DF, TTL 64, TCP.
        f[14..26].copy_from_slice(&[0x45, 0, 0, 40, 0xff, 0xff, 0x40, 0, 64, 6, 0, 0]);
        f[26..30].copy_from_slice(&[a, b, 0, 0]);
        f[30..34].copy_from_slice(&dst.ip().octets());
        let csum = !fold(sum(&f[14..34]));
        f[24..26].copy_from_slice(&csum.to_be_bytes());
        // TCP: port 40000, a sequence number, SYN, window 64240, urgent pointer 0xffff.
        let t = 34;
        f[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        f[t + 2..t + 4].copy_from_slice(&dst.port().to_be_bytes());
        f[t + 4..t + 8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        f[t + 12] = 0x50;
        f[t + 13] = 0x02;
        f[t + 14..t + 16].copy_from_slice(&64240u16.to_be_bytes());
        f[t + 18..t + 20].copy_from_slice(&[0xff, 0xff]);
        let mut pseudo = sum(&f[26..34]) + 6 + 20;
        pseudo += sum(&f[t..t + 20]);
        let csum = !fold(pseudo);
        f[t + 16..t + 18].copy_from_slice(&csum.to_be_bytes());
        let ebpf = ns.run_in(|| {
            let mut ebpf = aya::Ebpf::load(crate::xdp::LAB_OBJECT).expect("lab object");
            let p: &mut aya::programs::Xdp = ebpf
                .program_mut("lab_tx")
                .expect("lab_tx")
                .try_into()
                .expect("xdp");
            p.load().expect("load lab_tx");
            let mut cfg: aya::maps::Array<_, [u32; 4]> =
                aya::maps::Array::try_from(ebpf.map_mut("GEN").expect("GEN")).expect("array");
            // Source address low half, IP identification, TCP urgent pointer.
            cfg.set(0, [28, FLOOD_SOURCES, 18, t as u32 + 18], 0)
                .expect("GEN");
            let mut frame: aya::maps::Array<_, [u8; 64]> =
                aya::maps::Array::try_from(ebpf.map_mut("GEN_FRAME").expect("GEN_FRAME"))
                    .expect("array");
            frame.set(0, f, 0).expect("GEN_FRAME");
            ebpf
        });
        Self {
            ebpf,
            frame: f,
            ifindex: ns.ifindex(iface),
        }
    }

    /// Sends `count` SYNs (in `ns`, the namespace given to `new`) from CPU `cpu`; how long
    /// it took.
    pub fn send(&self, ns: &Netns, count: u32, cpu: usize) -> Duration {
        let start = Instant::now();
        ns.run_in(|| {
            crate::netns::pin_to_cpu(cpu);
            crate::xdp::transmit(&self.ebpf, &self.frame, self.ifindex, count);
        });
        start.elapsed()
    }
}

/// The ones' complement sum of `b` as 16-bit words (unfolded).
fn sum(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}
