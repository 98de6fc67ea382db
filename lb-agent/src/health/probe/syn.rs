//! `tcp` with `handshake: half` (the default without request or response): a SYN, then a SYN-ACK
//! (up) or a reset (refused), over one raw TCP socket per family. No connection is made: the
//! kernel answers the SYN-ACK with a reset (no socket of the node's holds that connection), so
//! the backend's listener never hands the probe to its application, and a probe costs the agent
//! one `sendto` and its share of one `recvfrom`, where a connect costs a socket, its set-up,
//! its event registration and its close. Every probe uses its own source port and a random
//! sequence number; an answer counts only from the target's port to ours and acknowledging our
//! sequence number. A classic BPF filter on the socket keeps every other TCP segment of the
//! node out of it (a raw TCP socket would otherwise get a copy of each).

use crate::LockExt as _;
use std::{
    collections::HashMap,
    hash::BuildHasher as _,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, atomic::AtomicU32},
    time::{Duration, Instant},
};

use socket2::{Protocol, SockAddr, SockFilter, Socket, Type};
use tokio::{io::unix::AsyncFd, sync::oneshot};

use crate::health::state::{Failure, FailureKind};

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
/// Source ports handed to probes (the answers' destination ports the filter lets in).
const PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;
/// How long the source address the routing table chose for a target is reused; a probe left
/// without an answer forgets it, so a route change is followed at once where it matters.
const SOURCE_TTL: Duration = Duration::from_secs(10);

/// (peer, our port) → (its port, our sequence number, the probe waiting).
type WaiterMap = HashMap<(IpAddr, u16), (u16, u32, oneshot::Sender<Result<(), Failure>>)>;
type Waiters = Mutex<WaiterMap>;
/// Target → (the node's address the kernel routes to it from, when that was looked up); kept
/// beside the time stale entries were last dropped.
type Sources = HashMap<IpAddr, (IpAddr, Instant)>;

pub struct Prober {
    socket: super::Shared,
    next: AtomicU32,
    random: std::hash::RandomState,
    waiting: Arc<Waiters>,
    sources: Mutex<(Sources, Option<Instant>)>,
}

impl Prober {
    /// Opens the raw socket (needs CAP_NET_RAW), filters it and starts its reader.
    pub fn open(v4: bool) -> io::Result<Arc<Self>> {
        let waiting: Arc<Waiters> = Arc::default();
        let socket = super::Shared::open(
            v4,
            Type::RAW,
            Protocol::TCP,
            |s| s.attach_filter(&filter(v4)),
            |s| read_loop(s, v4, waiting.clone()),
        )?;
        let random = std::hash::RandomState::new();
        Ok(Arc::new(Self {
            socket,
            next: AtomicU32::new(random.hash_one(1u8) as u32),
            random,
            waiting,
            sources: Mutex::default(),
        }))
    }

    pub async fn probe(&self, target: SocketAddr) -> Result<(), Failure> {
        let ip = target.ip();
        let source = self.source(ip)?;
        let (tx, rx) = oneshot::channel();
        let mut seq = 0;
        let ports = (*PORTS.start(), u32::from(PORTS.end() - PORTS.start()) + 1);
        let port = super::claim_port(&mut self.waiting.locked(), ip, &self.next, ports, |n| {
            seq = self.random.hash_one(n) as u32;
            (target.port(), seq, tx)
        })
        .ok_or_else(|| {
            Failure::new(
                FailureKind::Error,
                "no free TCP source port for this target",
            )
        })?;
        let key = (ip, port);
        let _waiting = super::Waiting {
            waiters: &self.waiting,
            key,
        };
        let syn = segment(source, ip, port, target.port(), seq);
        let to = SockAddr::from(SocketAddr::new(ip, 0));
        // Without an answer (a send error, the timeout dropping this future here) the source
        // is looked up again next time: the route may have changed. A reset is an answer.
        let unanswered = Forget(self, ip);
        self.socket
            .send_to(&syn, &to)
            .await
            .map_err(|e| Failure::io("sending the SYN", &e))?;
        let answer = rx
            .await
            .map_err(|_| Failure::new(FailureKind::Error, "the TCP reader stopped"))?;
        std::mem::forget(unanswered);
        answer
    }

    /// The address the node sends from to `ip` (the TCP checksum covers it), as routing chooses
    /// it: a connected UDP socket's local address (no packet is sent).
    fn source(&self, ip: IpAddr) -> Result<IpAddr, Failure> {
        let now = Instant::now();
        if let Some((s, at)) = self.sources.locked().0.get(&ip)
            && now.duration_since(*at) < SOURCE_TTL
        {
            return Ok(*s);
        }
        let any: SocketAddr = if ip.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let route = std::net::UdpSocket::bind(any)
            .and_then(|s| {
                s.connect(SocketAddr::new(ip, 9))?;
                s.local_addr()
            })
            .map_err(|e| Failure::io("finding the source address (route)", &e))?;
        let (sources, pruned) = &mut *self.sources.locked();
        // Targets that went away leave with the stale entries, once per SOURCE_TTL.
        if pruned.is_none_or(|p| now.duration_since(p) >= SOURCE_TTL) {
            sources.retain(|_, (_, at)| now.duration_since(*at) < SOURCE_TTL);
            *pruned = Some(now);
        }
        sources.insert(ip, (route.ip(), now));
        Ok(route.ip())
    }
}

/// Forgets the target's source address when dropped (`mem::forget` it once answered).
struct Forget<'a>(&'a Prober, IpAddr);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.sources.locked().0.remove(&self.1);
    }
}

/// The socket filter: answers to our ports only, and only SYN-ACKs and resets. IPv4 raw sockets
/// see the IP header first (its length in X), IPv6 ones the TCP header.
fn filter(v4: bool) -> Vec<SockFilter> {
    use libc::{
        BPF_ALU, BPF_AND, BPF_B, BPF_H, BPF_IMM, BPF_IND, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JMP,
        BPF_JSET, BPF_K, BPF_LD, BPF_LDX, BPF_MSH, BPF_RET,
    };
    let op = |code: u32, jt: u8, jf: u8, k: u32| SockFilter::new(code as u16, jt, jf, k);
    let load_x = if v4 {
        op(BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0)
    } else {
        op(BPF_LDX | BPF_IMM, 0, 0, 0)
    };
    vec![
        load_x,
        // Destination port within PORTS.
        op(BPF_LD | BPF_H | BPF_IND, 0, 0, 2),
        op(BPF_JMP | BPF_JGE | BPF_K, 0, 5, u32::from(*PORTS.start())),
        op(BPF_JMP | BPF_JGT | BPF_K, 4, 0, u32::from(*PORTS.end())),
        // Flags: a reset, or SYN and ACK.
        op(BPF_LD | BPF_B | BPF_IND, 0, 0, 13),
        op(BPF_JMP | BPF_JSET | BPF_K, 3, 0, u32::from(RST)),
        op(BPF_ALU | BPF_AND | BPF_K, 0, 0, u32::from(SYN | ACK)),
        op(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, u32::from(SYN | ACK)),
        op(BPF_RET | BPF_K, 0, 0, 0),
        op(BPF_RET | BPF_K, 0, 0, 0xffff),
    ]
}

/// A SYN with an MSS option, its checksum over the pseudo-header of `src` → `dst`.
fn segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, seq: u32) -> [u8; 24] {
    let mut s = [0u8; 24];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..8].copy_from_slice(&seq.to_be_bytes());
    s[12] = 6 << 4; // data offset: 6 words
    s[13] = SYN;
    s[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
    s[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    let sum = checksum(src, dst, &s);
    s[16..18].copy_from_slice(&sum.to_be_bytes());
    s
}

/// The TCP checksum of `segment` between `src` and `dst` (RFC 9293 3.1; RFC 8200 8.1).
fn checksum(src: IpAddr, dst: IpAddr, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    let len = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo[0..4].copy_from_slice(&s.octets());
            pseudo[4..8].copy_from_slice(&d.octets());
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
            12
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            pseudo[0..16].copy_from_slice(&v6(s));
            pseudo[16..32].copy_from_slice(&v6(d));
            pseudo[32..36].copy_from_slice(&(segment.len() as u32).to_be_bytes());
            pseudo[39] = 6;
            40
        }
    };
    super::icmp::checksum_of(&[&pseudo[..len], segment])
}

/// An answer to a probe: (its source port, our port, what it says), if it is a SYN-ACK
/// acknowledging some sequence number or a reset of one (the acknowledged number minus one).
fn parse(tcp: &[u8]) -> Option<(u16, u16, u32, bool)> {
    if tcp.len() < 20 {
        return None;
    }
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];
    // Both answers to a SYN acknowledge it (RFC 9293 3.10.7.1: a reset to a SYN carries ACK).
    if flags & ACK == 0 {
        return None;
    }
    let seq = ack.wrapping_sub(1);
    if flags & RST != 0 {
        Some((sport, dport, seq, false))
    } else if flags & SYN != 0 {
        Some((sport, dport, seq, true))
    } else {
        None
    }
}

async fn read_loop(socket: Arc<AsyncFd<Socket>>, v4: bool, waiting: Arc<Waiters>) {
    super::raw_recv_loop(socket, "TCP", |data, from| {
        let Some((sport, port, seq, open)) = super::transport(v4, data).and_then(parse) else {
            return;
        };
        let mut w = waiting.locked();
        let Some((dport, ours, _)) = w.get(&(from, port)) else {
            return;
        };
        if sport != *dport || seq != *ours {
            return;
        }
        if let Some((_, _, tx)) = w.remove(&(from, port)) {
            let _ = tx.send(if open {
                Ok(())
            } else {
                Err(Failure::new(
                    FailureKind::Refused,
                    format!("reset from {from}:{sport} (nothing listens on the port)"),
                ))
            });
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_verify() {
        let (s4, d4): (IpAddr, IpAddr) = (
            "198.18.7.254".parse().unwrap(),
            "198.18.8.1".parse().unwrap(),
        );
        let syn = segment(s4, d4, 40000, 8081, 0xdead_beef);
        assert_eq!(
            checksum(s4, d4, &syn),
            0,
            "a segment with its checksum sums to zero"
        );
        assert_eq!(&syn[4..8], &0xdead_beefu32.to_be_bytes());
        assert_eq!(syn[13], SYN);
        assert_ne!(checksum(s4, "198.18.8.2".parse().unwrap(), &syn), 0);
        let (s6, d6): (IpAddr, IpAddr) =
            ("fd00:7::fe".parse().unwrap(), "fd00:8::1".parse().unwrap());
        let syn6 = segment(s6, d6, 40000, 8081, 7);
        assert_eq!(checksum(s6, d6, &syn6), 0);
    }

    #[test]
    fn answers_are_recognised() {
        let mut synack = [0u8; 20];
        synack[0..2].copy_from_slice(&8081u16.to_be_bytes());
        synack[2..4].copy_from_slice(&40000u16.to_be_bytes());
        synack[8..12].copy_from_slice(&0xdead_bef0u32.to_be_bytes());
        synack[13] = SYN | ACK;
        assert_eq!(parse(&synack), Some((8081, 40000, 0xdead_beef, true)));
        let mut rst = synack;
        rst[13] = RST | ACK;
        assert_eq!(parse(&rst), Some((8081, 40000, 0xdead_beef, false)));
        // A SYN (someone connecting to us) and a reset without ACK answer nothing of ours.
        let mut syn = synack;
        syn[13] = SYN;
        assert_eq!(parse(&syn), None);
        rst[13] = RST;
        assert_eq!(parse(&rst), None);
        assert_eq!(parse(&synack[..19]), None);
    }
}
