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
