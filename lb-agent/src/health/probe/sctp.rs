//! `sctp`: INIT → INIT-ACK (up) or ABORT (down), then an ABORT to tear the half-open
//! association down, over one raw IP socket (protocol 132) per family: weir does not need the
//! kernel's SCTP, which many nodes do not load. Every probe uses its own source port and a
//! random initiate tag; answers are matched on (peer, port, tag) and their CRC32c checked.

use crate::LockExt as _;
use std::{
    collections::HashMap,
    hash::BuildHasher as _,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::AtomicU32},
};

use socket2::{Protocol, SockAddr, Socket, Type};
use tokio::{io::unix::AsyncFd, sync::oneshot};

use crate::health::state::{Failure, FailureKind};

const INIT: u8 = 1;
const INIT_ACK: u8 = 2;
const ABORT: u8 = 6;
/// ABORT flag: the verification tag is the one the receiver of the INIT would have used (T bit).
const T_BIT: u8 = 1;
/// Source ports handed to probes.
const PORTS: std::ops::Range<u32> = 32768..61000;

/// What came back for a probe: the peer's initiate tag (INIT-ACK) or an ABORT.
type Answer = Result<u32, Failure>;
/// (peer, our port) → (its port, our tag, the probe waiting).
type WaiterMap = HashMap<(IpAddr, u16), (u16, u32, oneshot::Sender<Answer>)>;
type Waiters = Mutex<WaiterMap>;

pub struct Initiator {
    socket: super::Shared,
    next: AtomicU32,
    random: std::hash::RandomState,
    waiting: Arc<Waiters>,
}

impl Initiator {
    pub fn open(v4: bool) -> io::Result<Arc<Self>> {
        let waiting: Arc<Waiters> = Arc::default();
        let socket = super::Shared::open(
            v4,
            Type::RAW,
            Protocol::from(132),
            |_| Ok(()),
            |s| read_loop(s, v4, waiting.clone()),
        )?;
        let random = std::hash::RandomState::new();
        Ok(Arc::new(Self {
            socket,
            next: AtomicU32::new(random.hash_one(0u8) as u32),
            random,
            waiting,
        }))
    }

    pub async fn probe(&self, target: SocketAddr) -> Result<(), Failure> {
        let ip = target.ip();
        // A source port no other probe of this target is using.
        let (tx, rx) = oneshot::channel();
        let mut tag = 0;
        let ports = (PORTS.start as u16, PORTS.end - PORTS.start);
        let port = super::claim_port(&mut self.waiting.locked(), ip, &self.next, ports, |n| {
            tag = (self.random.hash_one(n) as u32).max(1);
            (target.port(), tag, tx)
        })
        .ok_or_else(|| {
            Failure::new(
                FailureKind::Error,
                "no free SCTP source port for this target",
            )
        })?;
        let key = (ip, port);
        let _waiting = super::Waiting {
            waiters: &self.waiting,
            key,
        };
        let init = packet(port, target.port(), 0, INIT, 0, &init_value(tag));
        self.send(ip, &init).await?;
        let peer_tag = match rx.await {
            Ok(r) => r?,
            Err(_) => return Err(Failure::new(FailureKind::Error, "the SCTP reader stopped")),
        };
        // Tear the association down: an ABORT carrying the peer's tag.
        let abort = packet(port, target.port(), peer_tag, ABORT, 0, &[]);
        if let Err(e) = self.send(ip, &abort).await {
            tracing::debug!(%target, error = %e, "sending the SCTP ABORT");
        }
        Ok(())
    }

    async fn send(&self, ip: IpAddr, bytes: &[u8]) -> Result<(), Failure> {
        let to = SockAddr::from(SocketAddr::new(ip, 0));
        self.socket
            .send_to(bytes, &to)
            .await
            .map_err(|e| Failure::io("sending SCTP", &e))
    }
}

/// INIT parameters: initiate tag, a_rwnd, outbound and inbound streams, initial TSN.
fn init_value(tag: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&tag.to_be_bytes());
    v.extend_from_slice(&65535u32.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&tag.to_be_bytes());
    v
}

/// An SCTP packet of one chunk, with its CRC32c (RFC 9260 appendix A: stored little-endian).
fn packet(sport: u16, dport: u16, vtag: u32, kind: u8, flags: u8, value: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(16 + value.len() + 3);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.push(kind);
    p.push(flags);
    p.extend_from_slice(&((value.len() + 4) as u16).to_be_bytes());
    p.extend_from_slice(value);
    while p.len() % 4 != 0 {
        p.push(0);
    }
    let crc = crc32c::crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

fn crc_ok(p: &[u8]) -> bool {
    if p.len() < 12 {
        return false;
    }
    let stored = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&p[..8]), &[0; 4]);
    crc32c::crc32c_append(crc, &p[12..]) == stored
}

/// A received packet that answers a probe: (our port, its source port, vtag, what it says).
fn parse(p: &[u8]) -> Option<(u16, u16, u32, Chunk)> {
    if !crc_ok(p) {
        return None;
    }
    let sport = u16::from_be_bytes([p[0], p[1]]);
    let dport = u16::from_be_bytes([p[2], p[3]]);
    let vtag = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
    let mut at = 12;
    while at + 4 <= p.len() {
        let (kind, flags) = (p[at], p[at + 1]);
        let len = u16::from_be_bytes([p[at + 2], p[at + 3]]) as usize;
        if len < 4 || at + len > p.len() {
            return None;
        }
        let value = &p[at + 4..at + len];
        match kind {
            INIT_ACK if value.len() >= 16 => {
                let peer = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
                return Some((dport, sport, vtag, Chunk::InitAck(peer)));
            }
            ABORT => return Some((dport, sport, vtag, Chunk::Abort(flags & T_BIT != 0))),
            _ => {}
        }
        at += len.div_ceil(4) * 4;
    }
    None
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// With the peer's initiate tag.
    InitAck(u32),
    /// With the T bit.
    Abort(bool),
}

async fn read_loop(socket: Arc<AsyncFd<Socket>>, v4: bool, waiting: Arc<Waiters>) {
    super::raw_recv_loop(socket, "SCTP", |data, from| {
        let Some((port, sport, vtag, chunk)) = super::transport(v4, data).and_then(parse) else {
            return;
        };
        let mut w = waiting.locked();
        let Some((dport, tag, _)) = w.get(&(from, port)) else {
            return;
        };
        // Only the target port may answer, and only with our tag: an ABORT sent for an INIT
        // carries the INIT's initiate tag (or reflects its zero tag, with the T bit set).
        let ours = sport == *dport
            && match chunk {
                Chunk::InitAck(_) => vtag == *tag,
                Chunk::Abort(t_bit) => vtag == *tag || (t_bit && vtag == 0),
            };
        if !ours {
            return;
        }
        if let Some((_, _, tx)) = w.remove(&(from, port)) {
            let _ = tx.send(match chunk {
                Chunk::InitAck(peer) => Ok(peer),
                Chunk::Abort(_) => Err(Failure::new(
                    FailureKind::Refused,
                    format!("ABORT from {from}:{sport} (nothing listens on the port)"),
                )),
            });
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_carry_a_valid_crc32c() {
        let p = packet(40000, 3868, 0, INIT, 0, &init_value(0xdead_beef));
        assert_eq!(p.len(), 12 + 20);
        assert!(crc_ok(&p));
        // The CRC as RFC 9260 computes it: over the packet with a zero checksum field.
        let mut zeroed = p.clone();
        zeroed[8..12].fill(0);
        assert_eq!(crc32c::crc32c(&zeroed).to_le_bytes(), p[8..12]);
        let mut bad = p.clone();
        bad[13] ^= 0x40;
        assert!(!crc_ok(&bad));
        assert!(parse(&bad).is_none(), "a packet failing its CRC is ignored");
    }

    #[test]
    fn answers_are_recognised() {
        let mut ack_value = init_value(0x1234_5678);
        ack_value.extend_from_slice(&[0, 7, 0, 8, 1, 2, 3, 4]); // a State Cookie parameter
        let ack = packet(3868, 40000, 0xdead_beef, INIT_ACK, 0, &ack_value);
        assert_eq!(
            parse(&ack),
            Some((40000, 3868, 0xdead_beef, Chunk::InitAck(0x1234_5678)))
        );
        let abort = packet(3868, 40000, 0, ABORT, T_BIT, &[]);
        assert_eq!(parse(&abort), Some((40000, 3868, 0, Chunk::Abort(true))));
        // A chunk longer than the packet is malformed, even with a right CRC.
        let mut short = ack.clone();
        short.truncate(20);
        short[8..12].fill(0);
        let crc = crc32c::crc32c(&short);
        short[8..12].copy_from_slice(&crc.to_le_bytes());
        assert!(crc_ok(&short));
        assert!(parse(&short).is_none());
    }
}
