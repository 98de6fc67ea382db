//! `ping`: ICMP / ICMPv6 echo over one raw socket per family. Each probe gets a 32-bit token,
//! carried as the echo identifier and sequence number and again in the payload; the reader task
//! matches replies (and destination-unreachable errors quoting our echo) to waiting probes.

use crate::LockExt as _;
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use socket2::{Protocol, SockAddr, Socket, Type};
use tokio::{io::unix::AsyncFd, sync::oneshot};

use crate::health::state::{Failure, FailureKind};

const MAGIC: &[u8; 4] = b"weir";

type WaiterMap = HashMap<(IpAddr, u32), oneshot::Sender<Result<(), Failure>>>;
type Waiters = Mutex<WaiterMap>;

pub struct Pinger {
    socket: super::Shared,
    v4: bool,
    next: AtomicU32,
    waiting: Arc<Waiters>,
}

impl Pinger {
    /// Opens the raw socket (needs CAP_NET_RAW) and starts its reader.
    pub fn open(v4: bool) -> io::Result<Arc<Self>> {
        let protocol = if v4 {
            Protocol::ICMPV4
        } else {
            Protocol::ICMPV6
        };
        let waiting: Arc<Waiters> = Arc::default();
        let socket = super::Shared::open(
            v4,
            Type::RAW,
            protocol,
            |s| filter(s, v4),
            |s| read_loop(s, v4, waiting.clone()),
        )?;
        // Start the tokens somewhere unpredictable, so that two agents on one host (or a
        // restarted one) do not hand out the same ones.
        let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), v4) as u32;
        Ok(Arc::new(Self {
            socket,
            v4,
            next: AtomicU32::new(seed),
            waiting,
        }))
    }

    pub async fn ping(&self, ip: IpAddr) -> Result<(), Failure> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let key = (ip, token);
        self.waiting.locked().insert(key, tx);
        let _waiting = super::Waiting {
            waiters: &self.waiting,
            key,
        };
        let packet = echo_request(self.v4, token);
        let to = SockAddr::from(SocketAddr::new(ip, 0));
        self.socket
            .send_to(&packet, &to)
            .await
            .map_err(|e| Failure::io("sending the echo request", &e))?;
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(Failure::new(FailureKind::Error, "the ICMP reader stopped")),
        }
    }
}

/// Lets only echo replies and the errors that quote an echo through to this socket.
fn filter(socket: &Socket, v4: bool) -> io::Result<()> {
    if v4 {
        // A set bit drops that type: pass echo reply, unreachable, time exceeded.
        let pass: u32 = (1 << 0) | (1 << 3) | (1 << 11);
        crate::sys::set_icmp_filter(socket, !pass)
    } else {
        // A set bit blocks that type: pass unreachable, time exceeded, echo reply.
        let mut bits = [u32::MAX; 8];
        for t in [1u8, 3, 129] {
            bits[(t >> 5) as usize] &= !(1 << (t & 31));
        }
        crate::sys::set_icmp6_filter(socket, bits)
    }
}

/// An echo request carrying `token`. ICMPv6 checksums are filled in by the kernel.
fn echo_request(v4: bool, token: u32) -> Vec<u8> {
    let mut p = vec![if v4 { 8 } else { 128 }, 0, 0, 0];
    p.extend_from_slice(&token.to_be_bytes()); // identifier, sequence number
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&token.to_be_bytes());
    if v4 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(b: &[u8]) -> u16 {
    checksum_of(&[b])
}

/// The Internet checksum of `parts` one after the other; every part but the last has an even
/// length (a pseudo-header, then a segment).
pub(super) fn checksum_of(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = parts
        .iter()
        .flat_map(|b| b.chunks(2))
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What an ICMP message means for one of our probes: (target, token, result).
type Matched = (IpAddr, u32, Result<(), Failure>);

/// Parses an ICMP message (IPv4: with its IP header, as raw sockets deliver it).
fn parse(v4: bool, from: IpAddr, data: &[u8]) -> Option<Matched> {
    let icmp = if v4 {
        data.get((data.first()? & 0x0f) as usize * 4..)?
    } else {
        data
    };
    let (kind, code) = (*icmp.first()?, *icmp.get(1)?);
    let echo_token = |echo: &[u8], request: u8| -> Option<u32> {
        if *echo.first()? != request || echo.len() < 16 || &echo[8..12] != MAGIC {
            return None;
        }
        let token = u32::from_be_bytes(echo[4..8].try_into().ok()?);
        (echo[12..16] == token.to_be_bytes()).then_some(token)
    };
    match (v4, kind) {
        (true, 0) | (false, 129) => {
            let token = echo_token(icmp, if v4 { 0 } else { 129 })?;
            Some((from, token, Ok(())))
        }
        (true, 3 | 11) => {
            // The error quotes our request: its IP header (the target is its destination),
            // then the first 8 bytes of the echo (enough for the token, not for the payload).
            let inner = icmp.get(8..)?;
            let ihl = (inner.first()? & 0x0f) as usize * 4;
            if inner.get(9) != Some(&1) {
                return None;
            }
            let dst: [u8; 4] = inner.get(16..20)?.try_into().ok()?;
            let echo = inner.get(ihl..ihl + 8)?;
            if echo[0] != 8 {
                return None;
            }
            let token = u32::from_be_bytes(echo[4..8].try_into().ok()?);
            let what = if kind == 3 {
                format!("ICMP destination unreachable (code {code}) from {from}")
            } else {
                format!("ICMP time exceeded from {from}")
            };
            Some((
                IpAddr::from(dst),
                token,
                Err(Failure::new(FailureKind::Unreachable, what)),
            ))
        }
        (false, 1 | 3) => {
            let inner = icmp.get(8..)?;
            if inner.get(6) != Some(&58) {
                return None;
            }
            let dst: [u8; 16] = inner.get(24..40)?.try_into().ok()?;
            let echo = inner.get(40..48)?;
            if echo[0] != 128 {
                return None;
            }
            let token = u32::from_be_bytes(echo[4..8].try_into().ok()?);
            let what = if kind == 1 {
                format!("ICMPv6 destination unreachable (code {code}) from {from}")
            } else {
                format!("ICMPv6 time exceeded from {from}")
            };
            Some((
                IpAddr::from(dst),
                token,
                Err(Failure::new(FailureKind::Unreachable, what)),
            ))
        }
        _ => None,
    }
}

async fn read_loop(socket: Arc<AsyncFd<Socket>>, v4: bool, waiting: Arc<Waiters>) {
    super::raw_recv_loop(socket, "ICMP", |data, from| {
        if let Some((target, token, result)) = parse(v4, from, data)
            && let Some(tx) = waiting.locked().remove(&(target, token))
        {
            let _ = tx.send(result);
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let p = echo_request(true, 0x0102_0304);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        assert_eq!(&p[4..8], &[1, 2, 3, 4]);
    }

    #[test]
    fn replies_and_errors_are_matched_to_their_probe() {
        let target: IpAddr = "198.18.1.11".parse().unwrap();
        // An IPv4 echo reply as a raw socket sees it: IP header, then ICMP.
        let mut reply = vec![0x45u8, 0, 0, 44, 0, 0, 0, 0, 64, 1, 0, 0];
        reply.extend_from_slice(&[198, 18, 1, 11, 198, 18, 0, 254]);
        let mut echo = echo_request(true, 77);
        echo[0] = 0;
        reply.extend_from_slice(&echo);
        let (t, token, r) = parse(true, target, &reply).unwrap();
        assert_eq!((t, token, r), (target, 77, Ok(())));

        // A reply whose payload does not carry the token is someone else's.
        let mut other = reply.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        assert!(parse(true, target, &other).is_none());

        // Destination unreachable from a router, quoting our request to the target.
        let router: IpAddr = "198.18.1.1".parse().unwrap();
        let mut err = vec![
            0x45u8, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 198, 18, 1, 1, 198, 18, 0, 254,
        ];
        err.extend_from_slice(&[3, 1, 0, 0, 0, 0, 0, 0]);
        err.extend_from_slice(&[
            0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 198, 18, 0, 254, 198, 18, 1, 11,
        ]);
        err.extend_from_slice(&echo_request(true, 78)[..8]);
        let (t, token, r) = parse(true, router, &err).unwrap();
        assert_eq!((t, token), (target, 78));
        assert_eq!(r.unwrap_err().kind, FailureKind::Unreachable);

        // ICMPv6 echo reply (no IP header on IPv6 raw sockets).
        let t6: IpAddr = "fd00:1::11".parse().unwrap();
        let mut echo6 = echo_request(false, 5);
        echo6[0] = 129;
        assert_eq!(parse(false, t6, &echo6).unwrap().1, 5);
    }
}
