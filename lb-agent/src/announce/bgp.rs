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

pub(crate) mod session;
mod socket;
#[cfg(test)]
mod tests;

use crate::LockExt as _;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    announce::bfd,
    announce::{BgpConfig, BgpPeerConfig, RouteAttrs},
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

/// A peer's slot in [`Peers`] (found by address: peers come and go).
#[derive(Clone)]
pub(crate) struct Slot {
    peers: Peers,
    address: IpAddr,
}

impl Slot {
    pub(crate) fn update(&self, f: impl FnOnce(&mut PeerStatus)) {
        let mut peers = self.peers.locked();
        if let Some(p) = peers.iter_mut().find(|p| p.address == self.address) {
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

/// The routes for one peer: VIP → the attributes it carries.
pub type Routes = BTreeMap<IpAddr, RouteAttrs>;

/// Every peer's routes: the VIPs of `servable` that an advertisement gives it, with the
/// advertisements' attributes merged.
pub fn routes(config: &BgpConfig, servable: &BTreeSet<IpAddr>) -> BTreeMap<IpAddr, Routes> {
    let mut out: BTreeMap<IpAddr, Routes> = BTreeMap::new();
    for peer in &config.peers {
        let mine = out.entry(peer.address).or_default();
        for a in &config.advertisements {
            if a.peers.as_ref().is_some_and(|p| !p.contains(&peer.address)) {
                continue;
            }
            for vip in servable {
                if a.vips.as_ref().is_none_or(|v| v.contains(vip)) {
                    mine.entry(*vip).or_default().merge(&a.attrs);
                }
            }
        }
    }
    out
}

/// One running peer.
struct Peer {
    config: BgpPeerConfig,
    routes: watch::Sender<Routes>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A listener for passive peers, shared with its accept loop (MD5 keys are added and
/// removed on it as passive peers come and go).
struct Listener {
    socket: Arc<TcpListener>,
    task: JoinHandle<()>,
}

/// Where each passive peer's accepted connections go.
type Inboxes = Arc<Mutex<BTreeMap<IpAddr, mpsc::Sender<TcpStream>>>>;

/// The speaker: one task per peer, one listener per family with passive peers. Peers are
/// added and removed one by one ([`Speaker::reconcile`]): a change to one peer leaves the
/// other sessions alone.
pub struct Speaker {
    config: BgpConfig,
    status: Peers,
    peers: BTreeMap<IpAddr, Peer>,
    listeners: BTreeMap<bool, Listener>,
    inboxes: Inboxes,
    bfd: Option<bfd::Bfd>,
    /// The last routes given, by peer.
    routes: BTreeMap<IpAddr, Routes>,
    /// This agent adopted a running data plane (the R bit of graceful restart).
    restarted: bool,
    /// Shared with the sessions (see `session::Context::keep_routes`).
    keep_routes: Arc<std::sync::atomic::AtomicBool>,
}

/// A peer that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    #[error("setting the TCP MD5 key on the listener: {0}")]
    ListenerMd5(#[source] std::io::Error),
    #[error("announce.bgp.listen_port {port}: {source}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("BFD: {0}")]
    Bfd(#[from] bfd::BfdError),
    #[error("peer {peer}: {source}")]
    Peer {
        peer: IpAddr,
        #[source]
        source: Box<BgpError>,
    },
}

impl Speaker {
    /// Starts every peer's session (binding the listeners when a peer is passive). Errors for
    /// what makes the speaker unusable: a listener port in use, a BFD port in use.
    /// `restarted`: this agent adopted a running data plane (graceful restart's R bit).
    pub async fn start(
        config: &BgpConfig,
        status: Peers,
        restarted: bool,
    ) -> Result<Self, BgpError> {
        let mut speaker = Self::without_peers(config, status, restarted);
        let problems = speaker.reconcile(config).await;
        if let Some((peer, e)) = problems.into_iter().next() {
            speaker.shutdown(Duration::from_secs(1)).await;
            return Err(BgpError::Peer {
                peer,
                source: Box::new(e),
            });
        }
        Ok(speaker)
    }

    /// A speaker with `config`'s AS, router id, listen port and BFD timers and no peer yet
    /// ([`Speaker::reconcile`] adds them, and tells which could not start).
    pub fn without_peers(config: &BgpConfig, status: Peers, restarted: bool) -> Self {
        status.locked().clear();
        info!(
            local_as = config.local_as,
            router_id = %config.router_id,
            peers = config.peers.len(),
            "BGP: speaker started"
        );
        Self {
            config: BgpConfig {
                peers: Vec::new(),
                ..config.clone()
            },
            status,
            peers: BTreeMap::new(),
            listeners: BTreeMap::new(),
            inboxes: Arc::default(),
            bfd: None,
            routes: BTreeMap::new(),
            restarted,
            keep_routes: Arc::default(),
        }
    }

    /// The configuration running.
    pub fn config(&self) -> &BgpConfig {
        &self.config
    }

    /// Whether `config` differs from the running one only in its peers, its AS (which only
    /// the peers without their own use) and advertisements, which [`Speaker::reconcile`]
    /// applies peer by peer; otherwise the speaker has to be restarted.
    pub fn reconcilable(&self, config: &BgpConfig) -> bool {
        self.config.router_id == config.router_id
            && self.config.listen_port == config.listen_port
            && self.config.bfd == config.bfd
    }

    /// Brings the sessions in line with `config.peers`: removed or changed peers are closed
    /// (routes withdrawn, Cease sent), new or changed ones started; the others keep running.
    /// Returns the peers that could not be started, with why (the rest is applied).
    pub async fn reconcile(&mut self, config: &BgpConfig) -> Vec<(IpAddr, BgpError)> {
        debug_assert!(self.reconcilable(config));
        // Each peer with the AS it uses: a new `local_as` changes the peers that use it.
        let wanted: BTreeMap<IpAddr, BgpPeerConfig> = config
            .peers
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.local_as = Some(p.local_as.unwrap_or(config.local_as));
                (p.address, p)
            })
            .collect();
        let gone: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(a, p)| wanted.get(a).is_none_or(|w| *w != p.config))
            .map(|(a, _)| *a)
            .collect();
        self.remove(&gone).await;
        let mut problems = Vec::new();
        for (address, peer) in &wanted {
            let address = *address;
            if self.peers.contains_key(&address) {
                continue;
            }
            let slot = Slot {
                peers: self.status.clone(),
                address,
            };
            let mut before = None;
            slot.update(|p| before.clone_from(&p.last_error));
            if let Err(e) = self.add(peer) {
                let why = format!("not started: {e:#}");
                // Retried at every change: said again only when the reason changes.
                if before.as_deref() == Some(why.as_str()) {
                    debug!(peer = %address, error = %why, "BGP: peer still not started");
                } else {
                    warn!(peer = %address, error = %why, "BGP: peer not started");
                }
                // The peer stays listed, with why it is not running.
                slot.update(|p| p.last_error = Some(why));
                problems.push((address, e));
            }
        }
        // Listeners without passive peers close.
        let inboxes = self.inboxes.locked().clone();
        self.listeners.retain(|v4, l| {
            let used = inboxes.keys().any(|a| a.is_ipv4() == *v4);
            if !used {
                l.task.abort();
            }
            used
        });
        // Peers that failed are left out, so that the next change tries them again.
        self.config = config.clone();
        self.config
            .peers
            .retain(|p| !problems.iter().any(|(a, _)| *a == p.address));
        let routes = std::mem::take(&mut self.routes);
        self.advertise(routes);
        problems
    }

    fn add(&mut self, peer: &BgpPeerConfig) -> Result<(), BgpError> {
        let slot = Slot {
            peers: self.status.clone(),
            address: peer.address,
        };
        {
            let mut table = self.status.locked();
            table.retain(|s| s.address != peer.address);
            table.push(PeerStatus {
                address: peer.address,
                remote_as: peer.remote_as,
                passive: peer.passive,
                state: State::Idle,
                since: unix_now(),
                established: 0,
                hold_time: None,
                advertised: Vec::new(),
                updates_received: 0,
                last_error: None,
                bfd: peer.bfd.then_some(bfd::State::Down),
            });
            table.sort_by_key(|s| s.address);
        }
        let (conn_tx, conn_rx) = mpsc::channel(1);
        if peer.passive {
            let v4 = peer.address.is_ipv4();
            if let Some(l) = self.listeners.get(&v4) {
                if let Some(key) = &peer.password {
                    socket::set_md5(&*l.socket, peer.address, key.0.as_bytes())
                        .map_err(BgpError::ListenerMd5)?;
                }
            } else {
                let listener =
                    socket::listen(v4, self.config.listen_port, &[peer]).map_err(|source| {
                        BgpError::Listen {
                            port: self.config.listen_port,
                            source,
                        }
                    })?;
                let socket = Arc::new(listener);
                let task = tokio::spawn(accept_loop(socket.clone(), self.inboxes.clone()));
                self.listeners.insert(v4, Listener { socket, task });
            }
        }
        let bfd_state = if peer.bfd {
            if self.bfd.is_none() {
                // Synchronous bind inside: ready at once.
                self.bfd = Some(bfd::Bfd::bind(self.config.bfd)?);
            }
            let b = self.bfd.as_mut().expect("just set");
            Some(b.add(peer.address, slot.clone())?)
        } else {
            None
        };
        if peer.passive {
            self.inboxes.locked().insert(peer.address, conn_tx);
        }
        let ctx = session::Context {
            // Set by `reconcile`.
            local_as: peer.local_as.unwrap_or(self.config.local_as),
            router_id: self.config.router_id,
            peer: peer.clone(),
            graceful: (!self.config.graceful_restart.is_zero()).then(|| session::Graceful {
                restart_time: self.config.graceful_restart.as_secs().min(4095) as u16,
                restarted: self.restarted,
            }),
            keep_routes: self.keep_routes.clone(),
        };
        let (routes, routes_rx) = watch::channel(Routes::new());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(peer_loop(ctx, slot, conn_rx, routes_rx, stop_rx, bfd_state));
        info!(peer = %peer.address, remote_as = peer.remote_as, passive = peer.passive, "BGP: peer added");
        self.peers.insert(
            peer.address,
            Peer {
                config: peer.clone(),
                routes,
                stop,
                task,
            },
        );
        Ok(())
    }

    /// Closes these peers' sessions together (routes withdrawn, Cease sent; at most 3 s) and
    /// forgets the peers.
    async fn remove(&mut self, addresses: &[IpAddr]) {
        let gone: Vec<(IpAddr, Peer)> = addresses
            .iter()
            .filter_map(|a| Some((*a, self.peers.remove(a)?)))
            .collect();
        let mut tasks = Vec::new();
        let mut configs = Vec::new();
        for (address, peer) in gone {
            let _ = peer.stop.send(true);
            tasks.push(peer.task);
            configs.push((address, peer.config));
        }
        if tokio::time::timeout(
            Duration::from_secs(3),
            futures_util::future::join_all(tasks),
        )
        .await
        .is_err()
        {
            warn!("BGP: a removed peer's session did not close in time");
        }
        for (address, config) in configs {
            self.forget(address, &config).await;
        }
    }

    /// A removed peer's listener entry, MD5 key, BFD session and status.
    async fn forget(&mut self, address: IpAddr, config: &BgpPeerConfig) {
        if config.passive {
            self.inboxes.locked().remove(&address);
            if let Some(l) = self.listeners.get(&address.is_ipv4())
                && config.password.is_some()
            {
                let _ = socket::set_md5(&*l.socket, address, &[]);
            }
        }
        if let Some(b) = &mut self.bfd {
            b.remove(address).await;
        }
        self.status.locked().retain(|s| s.address != address);
        info!(peer = %address, "BGP: peer removed");
    }

    /// The routes to advertise from now on, by peer (see [`routes`]); a peer left out gets
    /// none.
    pub fn advertise(&mut self, routes: BTreeMap<IpAddr, Routes>) {
        for (address, peer) in &self.peers {
            let want = routes.get(address).cloned().unwrap_or_default();
            peer.routes.send_if_modified(|now| {
                if *now == want {
                    false
                } else {
                    *now = want;
                    true
                }
            });
        }
        self.routes = routes;
    }

    /// From now on, stopping leaves the routes to the peers' graceful restart (sessions that
    /// negotiated it close without withdrawing or a NOTIFICATION): the data plane stays.
    pub fn keep_routes(&self) {
        self.keep_routes
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Withdraws every route, closes every session with a Cease NOTIFICATION (unless
    /// [`Speaker::keep_routes`]), and waits (up to `timeout`) for the peers' tasks to end.
    pub async fn shutdown(self, timeout: Duration) {
        for p in self.peers.values() {
            let _ = p.stop.send(true);
        }
        for l in self.listeners.values() {
            l.task.abort();
        }
        let all = futures_util::future::join_all(self.peers.into_values().map(|p| p.task));
        if tokio::time::timeout(timeout, all).await.is_err() {
            warn!("BGP: sessions did not close in time; leaving them to the kernel");
        }
        if let Some(b) = self.bfd {
            b.shutdown().await;
        }
        self.status.locked().clear();
    }
}

/// Accepts connections from the passive peers and hands each to its peer's task (a session
/// already running keeps its connection: the new one is closed); others are closed at once.
async fn accept_loop(listener: Arc<TcpListener>, inboxes: Inboxes) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let ip = from.ip().to_canonical();
                let inbox = inboxes.locked().get(&ip).cloned();
                match inbox {
                    Some(tx) => {
                        let _ = tx.try_send(stream);
                    }
                    None => {
                        debug!(from = %from, "BGP: connection from an address that is not a passive peer, closed");
                    }
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
    mut routes: watch::Receiver<Routes>,
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
            Ok(End::Kept) => {
                info!(peer = %peer, "BGP: session closed, routes left to the peer's graceful restart");
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
        () = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
