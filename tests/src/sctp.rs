//! Just enough SCTP (RFC 4960) for the lab: this kernel has no SCTP, so the backends' responder
//! and the clients speak it in user space over raw IP sockets (protocol 132).

use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::packets::{sctp_crc_ok, sctp_packet};

pub const INIT: u8 = 1;
pub const INIT_ACK: u8 = 2;
pub const HEARTBEAT: u8 = 4;
pub const HEARTBEAT_ACK: u8 = 5;
pub const ABORT: u8 = 6;
pub const COOKIE_ECHO: u8 = 10;
pub const COOKIE_ACK: u8 = 11;
/// INIT-ACK parameter: State Cookie.
const STATE_COOKIE: u16 = 7;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub kind: u8,
    pub flags: u8,
    pub value: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub sport: u16,
    pub dport: u16,
    pub vtag: u32,
    pub chunks: Vec<Chunk>,
}

impl Packet {
    /// Parses an SCTP packet, checking its CRC32c.
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < 12 || !sctp_crc_ok(b) {
            return None;
        }
        let sport = u16::from_be_bytes([b[0], b[1]]);
        let dport = u16::from_be_bytes([b[2], b[3]]);
        let vtag = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let mut chunks = Vec::new();
        let mut at = 12;
        while at + 4 <= b.len() {
            let len = u16::from_be_bytes([b[at + 2], b[at + 3]]) as usize;
            if len < 4 || at + len > b.len() {
                return None;
            }
            chunks.push(Chunk {
                kind: b[at],
                flags: b[at + 1],
                value: b[at + 4..at + len].to_vec(),
            });
            at += len.div_ceil(4) * 4;
        }
        Some(Self {
            sport,
            dport,
            vtag,
            chunks,
        })
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for c in &self.chunks {
            body.push(c.kind);
            body.push(c.flags);
            body.extend_from_slice(&((c.value.len() + 4) as u16).to_be_bytes());
            body.extend_from_slice(&c.value);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        sctp_packet(self.sport, self.dport, self.vtag, &body)
    }
}

/// The value of an INIT or INIT-ACK chunk: tag, window, streams, TSN, then parameters.
pub fn init_value(tag: u32, params: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&tag.to_be_bytes());
    v.extend_from_slice(&65535u32.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&tag.to_be_bytes());
    for (kind, value) in params {
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&((value.len() + 4) as u16).to_be_bytes());
        v.extend_from_slice(value);
        while v.len() % 4 != 0 {
            v.push(0);
        }
    }
    v
}

/// The initiate tag of an INIT / INIT-ACK value.
pub fn init_tag(value: &[u8]) -> Option<u32> {
    value
        .get(..4)
        .map(|t| u32::from_be_bytes([t[0], t[1], t[2], t[3]]))
}

/// The State Cookie of an INIT-ACK value.
pub fn state_cookie(value: &[u8]) -> Option<Vec<u8>> {
    let mut at = 16;
    while at + 4 <= value.len() {
        let kind = u16::from_be_bytes([value[at], value[at + 1]]);
        let len = u16::from_be_bytes([value[at + 2], value[at + 3]]) as usize;
        if len < 4 || at + len > value.len() {
            return None;
        }
        if kind == STATE_COOKIE {
            return Some(value[at + 4..at + len].to_vec());
        }
        at += len.div_ceil(4) * 4;
    }
    None
}

/// A raw SCTP socket of `ip`'s family, bound to `ip` (which filters what it receives).
pub fn raw_socket(ip: IpAddr) -> io::Result<Socket> {
    let domain = if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::RAW, Some(Protocol::from(132)))?;
    s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    Ok(s)
}

/// Receives one datagram: (source address, SCTP bytes). IPv4 raw sockets deliver the IP
/// header too; it is stripped here.
pub fn recv(s: &Socket, buf: &mut [MaybeUninit<u8>]) -> io::Result<(IpAddr, Vec<u8>)> {
    let (n, from) = s.recv_from(buf)?;
    // SAFETY: recv_from initialised the first n bytes.
    let data: Vec<u8> = buf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect();
    let from = from
        .as_socket()
        .map(|a| a.ip())
        .ok_or_else(|| io::Error::other("not an IP peer"))?;
    if from.is_ipv4() {
        let ihl = data.first().map_or(0, |b| (b & 0x0f) as usize * 4);
        if data.len() < ihl {
            return Err(io::Error::other("short IPv4 packet"));
        }
        return Ok((from, data[ihl..].to_vec()));
    }
    Ok((from, data))
}

/// What an association attempt got back.
#[derive(Debug, PartialEq, Eq)]
pub struct InitAck {
    /// The address the INIT-ACK came from (the VIP, after reverse NAT).
    pub from: IpAddr,
    pub sport: u16,
    /// The responder's State Cookie: `backend=<name>`.
    pub cookie: String,
}

/// Sends an INIT from `local_port` to `dst` and waits for the INIT-ACK (or ABORT).
pub fn init(
    local: IpAddr,
    local_port: u16,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<InitAck> {
    let s = raw_socket(local)?;
    let tag = 0x5eed_0000 | u32::from(local_port);
    let init = Packet {
        sport: local_port,
        dport: dst.port(),
        vtag: 0,
        chunks: vec![Chunk {
            kind: INIT,
            flags: 0,
            value: init_value(tag, &[]),
        }],
    };
    s.send_to(&init.bytes(), &SockAddr::from(SocketAddr::new(dst.ip(), 0)))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [MaybeUninit::uninit(); 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no INIT-ACK"));
        }
        s.set_read_timeout(Some(left))?;
        let (from, bytes) = match recv(&s, &mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let Some(p) = Packet::parse(&bytes) else {
            continue;
        };
        if p.dport != local_port || p.vtag != tag {
            continue;
        }
        if p.chunks.iter().any(|c| c.kind == ABORT) {
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "ABORT"));
        }
        if let Some(c) = p.chunks.iter().find(|c| c.kind == INIT_ACK) {
            let cookie = state_cookie(&c.value).unwrap_or_default();
            // Tear the half-open association down, as a health check would.
            let abort = Packet {
                sport: local_port,
                dport: p.sport,
                vtag: init_tag(&c.value).unwrap_or(0),
                chunks: vec![Chunk {
                    kind: ABORT,
                    flags: 0,
                    value: vec![],
                }],
            };
            let _ = s.send_to(
                &abort.bytes(),
                &SockAddr::from(SocketAddr::new(dst.ip(), 0)),
            );
            return Ok(InitAck {
                from,
                sport: p.sport,
                cookie: String::from_utf8_lossy(&cookie).into_owned(),
            });
        }
    }
}

/// The responder: answers INIT with INIT-ACK (its State Cookie names the backend), COOKIE-ECHO
/// with COOKIE-ACK and HEARTBEAT with HEARTBEAT-ACK, on `port` of `ip`, and an INIT to any
/// other port of `ip` with ABORT. Runs until an error.
pub fn respond(ip: IpAddr, port: u16, name: &str, on_init: impl Fn()) -> io::Result<()> {
    let s = raw_socket(ip)?;
    let mut buf = [MaybeUninit::uninit(); 2048];
    let cookie = format!("backend={name}").into_bytes();
    loop {
        let (from, bytes) = recv(&s, &mut buf)?;
        let Some(p) = Packet::parse(&bytes) else {
            continue;
        };
        if p.dport != port {
            // Nothing listens there: an INIT gets an ABORT carrying its initiate tag
            // (RFC 9260 8.4), as a kernel's SCTP would send.
            if let Some(init) = p.chunks.iter().find(|c| c.kind == INIT) {
                let abort = Packet {
                    sport: p.dport,
                    dport: p.sport,
                    vtag: init_tag(&init.value).unwrap_or(0),
                    chunks: vec![Chunk {
                        kind: ABORT,
                        flags: 0,
                        value: vec![],
                    }],
                };
                s.send_to(&abort.bytes(), &SockAddr::from(SocketAddr::new(from, 0)))?;
            }
            continue;
        }
        let mut out = Vec::new();
        let mut vtag = p.vtag;
        for c in &p.chunks {
            match c.kind {
                INIT => {
                    on_init();
                    vtag = init_tag(&c.value).unwrap_or(0);
                    let my_tag = vtag.rotate_left(16) ^ 0xa5a5_a5a5;
                    out.push(Chunk {
                        kind: INIT_ACK,
                        flags: 0,
                        value: init_value(my_tag, &[(STATE_COOKIE, cookie.clone())]),
                    });
                }
                COOKIE_ECHO => out.push(Chunk {
                    kind: COOKIE_ACK,
                    flags: 0,
                    value: vec![],
                }),
                HEARTBEAT => out.push(Chunk {
                    kind: HEARTBEAT_ACK,
                    flags: 0,
                    value: c.value.clone(),
                }),
                _ => {}
            }
        }
        if !out.is_empty() {
            let reply = Packet {
                sport: port,
                dport: p.sport,
                vtag,
                chunks: out,
            };
            s.send_to(&reply.bytes(), &SockAddr::from(SocketAddr::new(from, 0)))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip_with_a_valid_crc() {
        let p = Packet {
            sport: 1,
            dport: 2,
            vtag: 3,
            chunks: vec![Chunk {
                kind: INIT_ACK,
                flags: 0,
                value: init_value(9, &[(STATE_COOKIE, b"backend=b1".to_vec())]),
            }],
        };
        let b = p.bytes();
        assert!(sctp_crc_ok(&b));
        let q = Packet::parse(&b).unwrap();
        assert_eq!(q, p.clone());
        assert_eq!(state_cookie(&q.chunks[0].value).unwrap(), b"backend=b1");
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(
            Packet::parse(&bad).is_none(),
            "a corrupted packet fails its CRC"
        );
    }
}
