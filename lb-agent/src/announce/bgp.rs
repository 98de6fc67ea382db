//! BGP mode: a speaker that advertises the VIPs this node can serve as /32 and /128 routes
//! with this node as the next hop, to every configured peer. RFC 4271 with 4-octet AS
//! numbers (RFC 6793) and MP-BGP for IPv6 unicast (RFC 4760, 2545); the wire format is the
//! `rustbgpd-wire` crate's, the session state machine and timers are here.
//!
//! Each peer has one role: active peers are connected to (and their own connection
//! attempts turned away), passive peers connect to this node's listener. One connection
//! per peer means no collision resolution (RFC 4271 §6.8) is ever needed. The speaker only
//! sends routes; what peers send is counted and dropped.
//!
//! A VIP family goes to the peers of the same family: the next hop is the session's own
//! local address. Stopping withdraws every route, then closes each session with a Cease
//! NOTIFICATION (administrative shutdown, RFC 9003 message). With `bfd`, a BFD session
//! (RFC 5880/5881) runs beside the BGP one; its failure closes the BGP session at once.

mod session;
mod socket;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    announce::bfd,
    config::{BgpConfig, BgpPeerConfig},
};

pub use session::{End, Families};

/// The BGP session states of RFC 4271 §8.2.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Connect => "connect",
            Self::Active => "active",
            Self::OpenSent => "open_sent",
            Self::OpenConfirm => "open_confirm",
            Self::Established => "established",
        }
    }
}

/// One peer as the admin API and the metrics show it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub address: IpAddr,
    pub remote_as: u32,
    pub passive: bool,
    pub state: State,
    /// Unix time of the last state change.
    pub since: u64,
    /// Times the session reached Established.
    pub established: u64,
    /// Hold time agreed with the peer, in seconds (0: no keepalives).
    pub hold_time: Option<u16>,
    /// The routes this session has advertised and not withdrawn.
    pub advertised: Vec<IpAddr>,
    /// UPDATEs the peer sent (ignored: this speaker only advertises).
    pub updates_received: u64,
    /// Why the last session ended or the last attempt failed.
    pub last_error: Option<String>,
    /// The BFD session's state, when BFD is on for this peer.
    pub bfd: Option<bfd::State>,
}

/// Every peer's status, shared with the admin API and the metrics.
pub type Peers = Arc<Mutex<Vec<PeerStatus>>>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A peer's slot in [`Peers`].
#[derive(Clone)]
pub(crate) struct Slot {
    peers: Peers,
    index: usize,
}

impl Slot {
    pub(crate) fn update(&self, f: impl FnOnce(&mut PeerStatus)) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get_mut(self.index) {
            f(p);
        }
    }

    pub(crate) fn set_state(&self, state: State) {
        self.update(|p| {
            if p.state != state {
                p.state = state;
                p.since = unix_now();
                if state == State::Established {
                    p.established += 1;
                }
                if state != State::Established {
                    p.hold_time = None;
                    p.advertised.clear();
                }
            }
        });
    }
}

/// The speaker: one task per peer, one listener per family with passive peers.
pub struct Speaker {
    routes: watch::Sender<BTreeSet<IpAddr>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    listeners: Vec<JoinHandle<()>>,
    bfd: Option<bfd::Bfd>,
}

impl Speaker {
    /// Binds the listeners (when a peer is passive) and starts every peer's session. Errors
    /// only for what makes the speaker unusable: a listener port in use, a BFD port in use.
    pub async fn start(config: &BgpConfig, peers: Peers) -> anyhow::Result<Self> {
        let (routes, routes_rx) = watch::channel(BTreeSet::new());
        let (stop, stop_rx) = watch::channel(false);
        {
            let mut table = peers.lock().unwrap_or_else(|p| p.into_inner());
            *table = config
                .peers
                .iter()
                .map(|p| PeerStatus {
                    address: p.address,
                    remote_as: p.remote_as,
                    passive: p.passive,
                    state: State::Idle,
                    since: unix_now(),
                    established: 0,
                    hold_time: None,
                    advertised: Vec::new(),
                    updates_received: 0,
                    last_error: None,
                    bfd: p.bfd.then_some(bfd::State::Down),
                })
                .collect();
        }
        let mut bfd = if config.peers.iter().any(|p| p.bfd) {
            Some(bfd::Bfd::start(config.bfd).await.context("BFD")?)
        } else {
            None
        };

        // Passive peers' connections arrive through the listeners.
        let mut inboxes = Vec::new();
        let mut listeners = Vec::new();
        for family_v4 in [true, false] {
            let passive: Vec<&BgpPeerConfig> = config
                .peers
                .iter()
                .filter(|p| p.passive && p.address.is_ipv4() == family_v4)
                .collect();
            if passive.is_empty() {
                continue;
            }
            let listener = socket::listen(family_v4, config.listen_port, &passive)
                .with_context(|| format!("announce.bgp.listen_port {}", config.listen_port))?;
            let (tx, rx) = mpsc::channel::<(IpAddr, TcpStream)>(8);
            inboxes.push(rx);
            listeners.push(tokio::spawn(accept_loop(
                listener,
                passive.iter().map(|p| p.address).collect(),
                tx,
            )));
        }
        let mut inbox = merge(inboxes);

        let mut tasks = Vec::new();
        let mut passive_inbox: Vec<(IpAddr, mpsc::Sender<TcpStream>)> = Vec::new();
        for (index, peer) in config.peers.iter().enumerate() {
            let slot = Slot {
                peers: peers.clone(),
                index,
            };
            let (conn_tx, conn_rx) = mpsc::channel(1);
            if peer.passive {
                passive_inbox.push((peer.address, conn_tx));
            }
            let bfd_state = match &mut bfd {
                Some(b) if peer.bfd => Some(b.add(peer.address, slot.clone())?),
                _ => None,
            };
            let ctx = session::Context {
                local_as: config.local_as,
                router_id: config.router_id,
                communities: config.communities.clone(),
                large_communities: config.large_communities.clone(),
                local_pref: config.local_pref,
                peer: peer.clone(),
            };
            tasks.push(tokio::spawn(peer_loop(
                ctx,
                slot,
                conn_rx,
                routes_rx.clone(),
                stop_rx.clone(),
                bfd_state,
            )));
        }
        // Hand each accepted connection to its peer's task.
        if !passive_inbox.is_empty() {
            listeners.push(tokio::spawn(async move {
                while let Some((from, stream)) = inbox.recv().await {
                    if let Some((_, tx)) = passive_inbox.iter().find(|(a, _)| *a == from) {
                        // A session already running keeps its connection: the new one is
                        // dropped (closed) when the peer's task is busy.
                        let _ = tx.try_send(stream);
                    }
                }
            }));
        }
        info!(
            local_as = config.local_as,
            router_id = %config.router_id,
            peers = config.peers.len(),
            "BGP: speaker started"
        );
        Ok(Self {
            routes,
            stop,
            tasks,
            listeners,
            bfd,
        })
    }

    /// The VIPs to advertise from now on (each to the peers of its family).
    pub fn advertise(&self, vips: BTreeSet<IpAddr>) {
        self.routes.send_if_modified(|now| {
            if *now == vips {
                false
            } else {
                *now = vips;
                true
            }
        });
    }

    /// Withdraws every route, closes every session with a Cease NOTIFICATION, and waits (up
    /// to `timeout`) for the peers' tasks to end.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.stop.send(true);
        for l in &self.listeners {
            l.abort();
        }
        let all = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(timeout, all).await.is_err() {
            warn!("BGP: sessions did not close in time; leaving them to the kernel");
        }
        if let Some(b) = self.bfd {
            b.shutdown().await;
        }
    }
}

/// Merges the per-family listeners' channels into one.
fn merge(inboxes: Vec<mpsc::Receiver<(IpAddr, TcpStream)>>) -> mpsc::Receiver<(IpAddr, TcpStream)> {
    let (tx, rx) = mpsc::channel(8);
    for mut inbox in inboxes {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(c) = inbox.recv().await {
                if tx.send(c).await.is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Accepts connections from the passive peers; others are closed at once.
async fn accept_loop(
    listener: TcpListener,
    passive: Vec<IpAddr>,
    tx: mpsc::Sender<(IpAddr, TcpStream)>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let ip = from.ip().to_canonical();
                if passive.contains(&ip) {
                    if tx.send((ip, stream)).await.is_err() {
                        return;
                    }
                } else {
                    debug!(from = %from, "BGP: connection from an address that is not a passive peer, closed");
                }
            }
            Err(e) => {
                warn!(error = %e, "BGP: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One peer's life: connect (or wait to be connected to), run the session, wait the
/// connect-retry time, again, until the speaker stops.
async fn peer_loop(
    ctx: session::Context,
    slot: Slot,
    mut incoming: mpsc::Receiver<TcpStream>,
    mut routes: watch::Receiver<BTreeSet<IpAddr>>,
    mut stop: watch::Receiver<bool>,
    mut bfd: Option<watch::Receiver<bfd::State>>,
) {
    let peer = SocketAddr::new(ctx.peer.address, ctx.peer.port);
    loop {
        if *stop.borrow() {
            return;
        }
        let stream = if ctx.peer.passive {
            slot.set_state(State::Active);
            tokio::select! {
                s = incoming.recv() => match s {
                    Some(s) => s,
                    None => return,
                },
                _ = stop.changed() => return,
            }
        } else {
            slot.set_state(State::Connect);
            let attempt = socket::connect(peer, &ctx.peer);
            tokio::select! {
                r = tokio::time::timeout(ctx.peer.connect_retry.max(Duration::from_secs(1)) * 2, attempt) => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(peer = %peer, error = %e, "BGP: connect failed");
                        slot.update(|p| p.last_error = Some(format!("connect: {e}")));
                        slot.set_state(State::Active);
                        if wait(super::jitter(ctx.peer.connect_retry), &mut stop).await { return; }
                        continue;
                    }
                    Err(_) => {
                        slot.update(|p| p.last_error = Some("connect: timed out".into()));
                        slot.set_state(State::Active);
                        continue;
                    }
                },
                _ = stop.changed() => return,
            }
        };
        let result = session::run(&ctx, &slot, stream, &mut routes, &mut stop, bfd.as_mut()).await;
        slot.set_state(State::Idle);
        match result {
            Ok(End::Stopped) => {
                info!(peer = %peer, "BGP: session closed (routes withdrawn, Cease sent)");
                return;
            }
            Err(e) => {
                warn!(peer = %peer, error = %e, "BGP: session down");
                slot.update(|p| p.last_error = Some(e.to_string()));
            }
        }
        if wait(super::jitter(ctx.peer.connect_retry), &mut stop).await {
            return;
        }
    }
}

/// Sleeps `d`; true when the speaker stopped meanwhile.
async fn wait(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
