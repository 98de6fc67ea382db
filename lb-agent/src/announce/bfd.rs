//! BFD (RFC 5880) for single-hop IP (RFC 5881), asynchronous mode without authentication or
//! echo: sub-second detection that a BGP peer is gone, and — what matters more — the peer
//! detects this node's death within `interval × multiplier` and withdraws its routes.
//!
//! Control packets are received on UDP 3784 (one socket per family, shared by the sessions,
//! demultiplexed by Your Discriminator or, before the peer knows it, by source address) and
//! sent from a port in 49152–65535 with TTL 255; the kernel drops received packets whose
//! TTL is below 255 (IP_MINTTL, the GTSM check of RFC 5881 §5). Until a session is up it
//! sends once a second (RFC 5880 §6.8.3); once up, at the configured interval.

use crate::LockExt as _;
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{info, warn};

use crate::{announce::BfdTimers, announce::bgp::Slot};

/// Where single-hop control packets are received.
pub const PORT: u16 = 3784;
/// Before a session is up, packets go out at most once a second.
const SLOW: Duration = Duration::from_secs(1);

/// Session states (RFC 5880 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    AdminDown,
    Down,
    Init,
    Up,
}

impl State {
    fn from_bits(b: u8) -> Self {
        match b & 3 {
            0 => Self::AdminDown,
            1 => Self::Down,
            2 => Self::Init,
            _ => Self::Up,
        }
    }

    const fn bits(self) -> u8 {
        match self {
            Self::AdminDown => 0,
            Self::Down => 1,
            Self::Init => 2,
            Self::Up => 3,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AdminDown => "admin_down",
            Self::Down => "down",
            Self::Init => "init",
            Self::Up => "up",
        }
    }
}

/// Diagnostic codes (RFC 5880 §4.1).
mod diag {
    pub const NONE: u8 = 0;
    pub const DETECT_EXPIRED: u8 = 1;
    pub const NEIGHBOR_DOWN: u8 = 3;
    pub const ADMIN_DOWN: u8 = 7;
}

/// A control packet (24 octets, no authentication section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub diag: u8,
    pub state: State,
    pub poll: bool,
    pub fin: bool,
    pub detect_mult: u8,
    pub my_disc: u32,
    pub your_disc: u32,
    /// Microseconds.
    pub desired_min_tx: u32,
    pub required_min_rx: u32,
}

impl Packet {
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0] = (1 << 5) | (self.diag & 0x1f);
        b[1] = (self.state.bits() << 6) | (u8::from(self.poll) << 5) | (u8::from(self.fin) << 4);
        b[2] = self.detect_mult;
        b[3] = 24;
        b[4..8].copy_from_slice(&self.my_disc.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_disc.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx.to_be_bytes());
        b
    }

    /// Decodes and checks a packet (RFC 5880 §6.8.6, the checks that need no session).
    pub fn decode(b: &[u8]) -> Result<Self, &'static str> {
        if b.len() < 24 {
            return Err("shorter than 24 octets");
        }
        if b[0] >> 5 != 1 {
            return Err("not version 1");
        }
        let len = usize::from(b[3]);
        if len < 24 || len > b.len() {
            return Err("bad length");
        }
        if b[1] & 0x04 != 0 {
            return Err("authentication is not supported");
        }
        if b[1] & 0x01 != 0 {
            return Err("multipoint bit set");
        }
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let p = Self {
            diag: b[0] & 0x1f,
            state: State::from_bits(b[1] >> 6),
            poll: b[1] & 0x20 != 0,
            fin: b[1] & 0x10 != 0,
            detect_mult: b[2],
            my_disc: word(4),
            your_disc: word(8),
            desired_min_tx: word(12),
            required_min_rx: word(16),
        };
        if p.detect_mult == 0 {
            return Err("detect multiplier 0");
        }
        if p.my_disc == 0 {
            return Err("my discriminator 0");
        }
        if p.your_disc == 0 && !matches!(p.state, State::Down | State::AdminDown) {
            return Err("your discriminator 0 outside Down");
        }
        Ok(p)
    }
}

/// The state machine of one session (RFC 5880 §6.8.6), without I/O.
#[derive(Debug)]
pub struct Machine {
    pub state: State,
    pub diag: u8,
    pub local_disc: u32,
    pub remote_disc: u32,
    pub remote_state: State,
    /// The peer's Required Min RX and Desired Min TX (µs), and its multiplier.
    pub remote_min_rx: u32,
    pub remote_min_tx: u32,
    pub remote_mult: u8,
    pub timers: BfdTimers,
    /// A Poll sequence is running (sent with P until an F arrives).
    pub polling: bool,
    /// The peer asked for a Final.
    pub send_final: bool,
}

impl Machine {
    pub fn new(local_disc: u32, timers: BfdTimers) -> Self {
        Self {
            state: State::Down,
            diag: diag::NONE,
            local_disc,
            remote_disc: 0,
            remote_state: State::Down,
            remote_min_rx: 1,
            remote_min_tx: 0,
            remote_mult: 0,
            timers,
            polling: false,
            send_final: false,
        }
    }

    fn interval_us(&self) -> u32 {
        self.timers.interval.as_micros().min(u128::from(u32::MAX)) as u32
    }

    /// The Desired Min TX this node advertises: 1 s until up.
    fn desired_min_tx(&self) -> u32 {
        if self.state == State::Up {
            self.interval_us()
        } else {
            SLOW.as_micros() as u32
        }
    }

    /// The next packet to send.
    pub fn packet(&mut self) -> Packet {
        let fin = std::mem::take(&mut self.send_final);
        Packet {
            diag: self.diag,
            state: self.state,
            poll: self.polling && !fin,
            fin,
            detect_mult: self.timers.multiplier,
            my_disc: self.local_disc,
            your_disc: self.remote_disc,
            desired_min_tx: self.desired_min_tx(),
            required_min_rx: self.interval_us(),
        }
    }

    /// How often to send now (before jitter).
    pub fn tx_interval(&self) -> Duration {
        let us = self.desired_min_tx().max(self.remote_min_rx);
        Duration::from_micros(u64::from(us))
    }

    /// How long without a packet declares the peer down (None: not detecting yet).
    pub fn detection_time(&self) -> Option<Duration> {
        if !matches!(self.state, State::Init | State::Up) || self.remote_mult == 0 {
            return None;
        }
        let us = self.interval_us().max(self.remote_min_tx);
        Some(Duration::from_micros(
            u64::from(us) * u64::from(self.remote_mult),
        ))
    }

    /// Takes a received packet; returns true when the state changed.
    pub fn receive(&mut self, p: &Packet) -> bool {
        self.remote_disc = p.my_disc;
        self.remote_state = p.state;
        self.remote_min_rx = p.required_min_rx.max(1);
        self.remote_min_tx = p.desired_min_tx;
        self.remote_mult = p.detect_mult;
        if p.fin {
            self.polling = false;
        }
        if p.poll {
            self.send_final = true;
        }
        let before = self.state;
        if self.state == State::AdminDown {
            return false;
        }
        if p.state == State::AdminDown {
            if self.state != State::Down {
                self.down(diag::NEIGHBOR_DOWN);
            }
        } else {
            match (self.state, p.state) {
                (State::Down, State::Down) => self.state = State::Init,
                (State::Down, State::Init) | (State::Init, State::Init | State::Up) => {
                    self.state = State::Up;
                    self.diag = diag::NONE;
                    // The interval drops from 1 s to the configured one: a decrease takes
                    // effect at once, the Poll tells the peer.
                    self.polling = true;
                }
                (State::Up, State::Down) => self.down(diag::NEIGHBOR_DOWN),
                _ => {}
            }
        }
        self.state != before
    }

    /// The detection time passed without a packet.
    pub fn expire(&mut self) {
        if matches!(self.state, State::Init | State::Up) {
            self.down(diag::DETECT_EXPIRED);
        }
    }

    fn down(&mut self, diag: u8) {
        self.state = State::Down;
        self.diag = diag;
        self.remote_disc = 0;
        self.polling = false;
    }
}

type Inbox = mpsc::Sender<Packet>;

/// The BFD sessions of the speaker.
pub struct Bfd {
    timers: BfdTimers,
    /// Sessions by local discriminator and by peer address.
    by_disc: Arc<Mutex<HashMap<u32, Inbox>>>,
    by_addr: Arc<Mutex<HashMap<IpAddr, Inbox>>>,
    receivers: Vec<JoinHandle<()>>,
    /// By peer address: the task, its stop, its local discriminator.
    sessions: HashMap<IpAddr, (JoinHandle<()>, watch::Sender<bool>, u32)>,
    next_disc: u32,
}

/// A BFD socket that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BfdError {
    #[error("binding UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("BFD: a source port for {peer}: {source}")]
    SourcePort {
        peer: IpAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Bfd {
    /// Binds the receive sockets of both families (IPv6 where the host has it); runs on the
    /// current tokio runtime.
    pub fn bind(timers: BfdTimers) -> Result<Self, BfdError> {
        let by_disc: Arc<Mutex<HashMap<u32, Inbox>>> = Arc::default();
        let by_addr: Arc<Mutex<HashMap<IpAddr, Inbox>>> = Arc::default();
        let mut receivers = Vec::new();
        for v4 in [true, false] {
            let any: IpAddr = if v4 {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            let sock = match bind(SocketAddr::new(any, PORT), true) {
                Ok(s) => s,
                Err(e) if !v4 => {
                    // A host without IPv6: BFD runs over IPv4 only.
                    warn!(error = %e, "BFD: no IPv6 receive socket");
                    continue;
                }
                Err(source) => {
                    return Err(BfdError::Bind {
                        addr: SocketAddr::new(any, PORT),
                        source,
                    });
                }
            };
            let (by_disc, by_addr) = (by_disc.clone(), by_addr.clone());
            receivers.push(tokio::spawn(async move {
                let mut buf = [0u8; 128];
                loop {
                    let (n, from) = match sock.recv_from(&mut buf).await {
                        Ok(x) => x,
                        Err(e) => {
                            warn!(error = %e, "BFD: receive failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let p = match Packet::decode(&buf[..n]) {
                        Ok(p) => p,
                        Err(why) => {
                            tracing::debug!(from = %from, why, "BFD: packet dropped");
                            continue;
                        }
                    };
                    let inbox = if p.your_disc != 0 {
                        by_disc.locked().get(&p.your_disc).cloned()
                    } else {
                        by_addr.locked().get(&from.ip().to_canonical()).cloned()
                    };
                    if let Some(inbox) = inbox {
                        let _ = inbox.try_send(p);
                    }
                }
            }));
        }
        Ok(Self {
            timers,
            by_disc,
            by_addr,
            receivers,
            sessions: HashMap::new(),
            next_disc: {
                use std::hash::BuildHasher as _;
                (std::hash::RandomState::new().hash_one(std::process::id()) as u32 & 0x7fff_ffff)
                    | 1
            },
        })
    }

    /// Starts the session with `peer`; its state is published on the returned channel and in
    /// the peer's status.
    pub(crate) fn add(
        &mut self,
        peer: IpAddr,
        slot: Slot,
    ) -> Result<watch::Receiver<State>, BfdError> {
        let disc = self.next_disc;
        self.next_disc = self.next_disc.wrapping_add(1).max(1);
        let sock = source_socket(peer).map_err(|source| BfdError::SourcePort { peer, source })?;
        let (tx, rx) = mpsc::channel(16);
        self.by_disc.locked().insert(disc, tx.clone());
        self.by_addr.locked().insert(peer, tx);
        let (state_tx, state_rx) = watch::channel(State::Down);
        let (stop_tx, stop_rx) = watch::channel(false);
        let machine = Machine::new(disc, self.timers);
        if let Some((task, stop, old)) = self.sessions.remove(&peer) {
            // A peer added again: the old session goes first.
            let _ = stop.send(true);
            task.abort();
            self.by_disc.locked().remove(&old);
        }
        self.sessions.insert(
            peer,
            (
                tokio::spawn(session(
                    machine,
                    sock,
                    SocketAddr::new(peer, PORT),
                    rx,
                    state_tx,
                    stop_rx,
                    slot,
                )),
                stop_tx,
                disc,
            ),
        );
        Ok(state_rx)
    }

    /// Ends the session with `peer` (AdminDown sent).
    pub async fn remove(&mut self, peer: IpAddr) {
        let Some((task, stop, disc)) = self.sessions.remove(&peer) else {
            return;
        };
        let _ = stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        self.by_disc.locked().remove(&disc);
        self.by_addr.locked().remove(&peer);
    }

    /// Tells every peer this node goes administratively down, then stops.
    pub async fn shutdown(self) {
        for (_, stop, _) in self.sessions.values() {
            let _ = stop.send(true);
        }
        for (task, _, _) in self.sessions.into_values() {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        for r in self.receivers {
            r.abort();
        }
    }
}

fn bind(addr: SocketAddr, receive: bool) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if receive {
        // GTSM: only packets sent with TTL 255 (from a directly connected peer) get here.
        crate::sys::set_min_ttl(&s, addr.is_ipv4(), 255)?;
    } else if addr.is_ipv4() {
        s.set_ttl_v4(255)?;
        s.set_tos_v4(0xc0)?;
    } else {
        s.set_unicast_hops_v6(255)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// A sending socket with a source port in 49152–65535 (RFC 5881 §4).
fn source_socket(peer: IpAddr) -> std::io::Result<UdpSocket> {
    use std::hash::BuildHasher as _;
    let any: IpAddr = if peer.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let start = std::hash::RandomState::new().hash_one(peer) as u16 % 16384;
    let mut last = None;
    for i in 0..64u16 {
        let port = 49152 + (start.wrapping_add(i * 257) % 16384);
        match bind(SocketAddr::new(any, port), false) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

async fn session(
    mut m: Machine,
    sock: UdpSocket,
    peer: SocketAddr,
    mut inbox: mpsc::Receiver<Packet>,
    state: watch::Sender<State>,
    mut stop: watch::Receiver<bool>,
    slot: Slot,
) {
    let mut next_tx = Instant::now();
    let mut last_rx = Instant::now();
    loop {
        let detect = m.detection_time().map(|d| last_rx + d);
        tokio::select! {
            () = tokio::time::sleep_until(next_tx) => {
                let _ = sock.send_to(&m.packet().encode(), peer).await;
                next_tx = Instant::now() + super::jitter(m.tx_interval());
            }
            () = async { tokio::time::sleep_until(detect.expect("guarded")).await }, if detect.is_some() => {
                m.expire();
                publish(&m, &state, &slot, peer);
            }
            Some(p) = inbox.recv() => {
                last_rx = Instant::now();
                let changed = m.receive(&p);
                if changed {
                    publish(&m, &state, &slot, peer);
                }
                if changed || m.send_final {
                    // Answer a Poll, and tell the peer of a new state, without waiting.
                    let _ = sock.send_to(&m.packet().encode(), peer).await;
                    next_tx = Instant::now() + super::jitter(m.tx_interval());
                }
            }
            _ = stop.changed() => {
                m.state = State::AdminDown;
                m.diag = diag::ADMIN_DOWN;
                for _ in 0..3 {
                    let _ = sock.send_to(&m.packet().encode(), peer).await;
                }
                publish(&m, &state, &slot, peer);
                return;
            }
        }
    }
}

fn publish(m: &Machine, state: &watch::Sender<State>, slot: &Slot, peer: SocketAddr) {
    info!(peer = %peer.ip(), state = m.state.as_str(), diag = m.diag, "BFD: session state");
    state.send_replace(m.state);
    let s = m.state;
    slot.update(|p| p.bfd = Some(s));
}

#[cfg(test)]
mod tests;
