//! The [`Announcer`]: L2 (ARP/NDP answers, gratuitous announcements), the gossip that decides
//! which node answers for which VIP, and the BGP speaker, driven by what the published
//! snapshot says this node programs and can serve.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{AnnounceConfig, BgpConfig, Serving, Status, bgp, gossip, l2};
use crate::dataplane::{Dataplane, DataplaneError, MapError};

/// How long a BGP speaker gets to withdraw its routes and close its sessions.
const BGP_SHUTDOWN: Duration = Duration::from_secs(3);
/// L2 without gossip: the lease the data plane's answers run on, and how often it is renewed.
const LEASE_ALONE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_millis(250));
/// L2 without gossip: how long the data plane answers on after a stop that keeps it (no other
/// node would take over anyway).
const RESTART_GRACE_ALONE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("announce.l2.interfaces: {iface}: {source}")]
    Interface {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("announce.l2.interfaces: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("starting the L2 lease: {0}")]
    Lease(#[source] MapError),
    #[error("announce.gossip.listen {listen}: {source}")]
    GossipListen {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("announce.bgp: {0}")]
    Bgp(#[source] bgp::BgpError),
}

/// An interface where this node answers ARP and Neighbor Solicitations.
struct L2Port {
    iface: String,
    ifindex: u32,
    mac: [u8; 6],
}

struct Gossip {
    node: String,
    /// Where the heartbeats go.
    peers: watch::Sender<Vec<SocketAddr>>,
    /// The peers are the Nodes the L2Advertisements select (Kubernetes mode without
    /// `announce.gossip.peers`).
    from_nodes: bool,
    listen: SocketAddr,
    /// What the heartbeats say about this node.
    local: watch::Sender<gossip::Local>,
    view: watch::Receiver<gossip::View>,
    task: tokio::task::JoinHandle<()>,
    restart_grace: Duration,
    authenticated: bool,
    /// The gossip task's count of rejected datagrams.
    rejections: Arc<gossip::wire::Rejections>,
}

/// Everything this node announces, and how.
pub struct Announcer {
    /// Where this node answers for its VIPs (empty: not announcing on L2).
    l2_ports: Vec<L2Port>,
    /// The VIPs announced on L2.
    announced: BTreeSet<IpAddr>,
    /// Liveness of the other announcing nodes (None: this node owns every VIP).
    gossip: Option<Gossip>,
    /// The VIPs this node may answer for on L2 (None: every VIP; Kubernetes mode: what the
    /// L2Advertisements selecting this node give it).
    l2_vips: Option<BTreeSet<IpAddr>>,
    /// BGP: what is wanted, and the speaker running it.
    bgp_config: Option<BgpConfig>,
    bgp: Option<bgp::Speaker>,
    /// This agent adopted a running data plane (graceful restart's R bit).
    restarted: bool,
    /// The VIPs the adopted data plane was answering for: kept until gossip's view settles
    /// (the other nodes held this node alive with them while its agent restarted).
    initial_claims: BTreeSet<IpAddr>,
    /// Renews the L2 lease while the agent runs.
    lease_task: Option<tokio::task::JoinHandle<()>>,
    /// A writer of the lease for the stop: a restart that keeps the data plane extends it.
    last_lease: Option<Box<dyn crate::dataplane::L2LeaseWriter>>,
    /// Every BGP peer's session, shared with the speaker's tasks (they change on their own).
    peers: bgp::Peers,
    /// Kubernetes mode: the announcement resources left out, and why.
    problems: Vec<String>,
    /// The last status published.
    l2_status: Option<gossip::Status>,
}

impl Announcer {
    /// Sets up L2 (the ports in the data plane, the lease, the gossip socket) as `config`
    /// says; BGP starts with [`Announcer::start_bgp`] or [`Announcer::set_bgp`] once the
    /// first state is programmed. `node`: this node's name among the announcing nodes.
    /// `kubernetes`: the VIPs to answer for come from L2Advertisements (none until they do).
    pub async fn start(
        config: &AnnounceConfig,
        node: String,
        kubernetes: bool,
        dataplane: &mut dyn Dataplane,
        tasks: &crate::Supervised,
    ) -> Result<Self, AnnounceError> {
        let mut l2_ports = Vec::new();
        for iface in &config.l2_interfaces {
            let io_err = |source| AnnounceError::Interface {
                iface: iface.clone(),
                source,
            };
            let ifindex = crate::sys::if_nametoindex(iface).map_err(io_err)?;
            let mac = l2::interface_mac(iface).map_err(io_err)?;
            dataplane.add_l2_port(iface, ifindex, mac)?;
            info!(iface = %iface, mac = %mac_text(mac), "answering ARP and Neighbor Solicitations for the VIPs here");
            l2_ports.push(L2Port {
                iface: iface.clone(),
                ifindex,
                mac,
            });
        }
        let gossip = match &config.gossip {
            None => None,
            Some(g) => {
                let socket = tokio::net::UdpSocket::bind(g.listen)
                    .await
                    .map_err(|source| AnnounceError::GossipListen {
                        listen: g.listen,
                        source,
                    })?;
                let (local, local_rx) = watch::channel(gossip::Local::default());
                let (view_tx, view) = watch::channel(gossip::View::default());
                let (peers, peers_rx) = watch::channel(g.peers.clone().unwrap_or_default());
                let key = gossip::wire::Key::new(g.key.as_ref().map(|k| k.0.as_slice()));
                if !key.authenticated() {
                    warn!(listen = %g.listen, "gossip: heartbeats are not authenticated (no announce.gossip.key_file): anyone who can send to this port from a peer's address can speak for that node");
                }
                let rejections = Arc::new(gossip::wire::Rejections::default());
                let task = tasks.spawn(
                    "gossip",
                    gossip::run(
                        socket,
                        gossip::Settings {
                            node: node.clone(),
                            peers: peers_rx,
                            interval: g.interval,
                            dead_after: g.dead_after,
                            key: key.clone(),
                            rejections: rejections.clone(),
                        },
                        local_rx,
                        view_tx,
                    ),
                );
                info!(node = %node, listen = %g.listen, peers = ?g.peers, "gossip: heartbeats to the other announcing nodes");
                Some(Gossip {
                    node,
                    local,
                    view,
                    peers,
                    from_nodes: g.peers.is_none(),
                    listen: g.listen,
                    task,
                    restart_grace: g.restart_grace,
                    authenticated: key.authenticated(),
                    rejections,
                })
            }
        };
        let mut lease_task = None;
        let mut last_lease = None;
        if !l2_ports.is_empty() {
            // The data plane answers for the VIPs only while this agent keeps its lease
            // running: a node whose agent died stops answering when its peers declare it dead.
            let (lease, refresh) = config
                .gossip
                .as_ref()
                .map_or(LEASE_ALONE, |g| (g.dead_after, g.interval));
            let mut writer = dataplane.l2_lease()?;
            writer.extend(lease).map_err(AnnounceError::Lease)?;
            last_lease = Some(dataplane.l2_lease()?);
            lease_task = Some(tasks.spawn("L2 lease", async move {
                let mut tick = tokio::time::interval(refresh);
                loop {
                    tick.tick().await;
                    if let Err(e) = writer.extend(lease) {
                        warn!(error = %e, "L2: the lease was not extended; answers stop when it runs out");
                    }
                }
            }));
        }
        Ok(Self {
            l2_ports,
            announced: BTreeSet::new(),
            gossip,
            l2_vips: kubernetes.then(BTreeSet::new),
            bgp_config: None,
            bgp: None,
            restarted: false,
            initial_claims: BTreeSet::new(),
            lease_task,
            last_lease,
            peers: bgp::Peers::default(),
            problems: Vec::new(),
            l2_status: None,
        })
    }

    /// Whether this node announces on L2.
    pub fn l2(&self) -> bool {
        !self.l2_ports.is_empty()
    }

    /// Gossip's view of the other nodes, to watch for changes (None without gossip).
    pub fn gossip_view(&self) -> Option<watch::Receiver<gossip::View>> {
        self.gossip.as_ref().map(|g| g.view.clone())
    }

    /// Starts the BGP speaker of the config file: a speaker that cannot start (a peer's
    /// listener port taken) is an error.
    pub async fn start_bgp(&mut self, config: &BgpConfig) -> Result<(), AnnounceError> {
        let speaker = bgp::Speaker::start(config, self.peers.clone(), self.restarted)
            .await
            .map_err(AnnounceError::Bgp)?;
        self.bgp = Some(speaker);
        self.bgp_config = Some(config.clone());
        Ok(())
    }

    /// The BGP configuration wanted (None: no speaker); [`Announcer::sync_bgp`] applies it.
    pub fn set_bgp(&mut self, config: Option<BgpConfig>) {
        self.bgp_config = config;
    }

    /// The BGP configuration wanted.
    pub fn bgp_config(&self) -> Option<&BgpConfig> {
        self.bgp_config.as_ref()
    }

    /// Kubernetes mode: the announcement resources left out, and why.
    pub fn set_problems(&mut self, problems: Vec<String>) {
        self.problems = problems;
    }

    /// Brings the BGP speaker in line with the wanted configuration (changed by a reload or,
    /// in Kubernetes mode, by the BGPPeer and BGPAdvertisement resources): peers are added
    /// and removed one by one (a new `local_as` restarts the peers that use it); a new router
    /// id, listen port or BFD timers restart the speaker. A peer that cannot start is logged
    /// and listed in `/api/v1/bgp` with why; the rest runs, and the next change tries again.
    /// Then advertises what `serving` says this node can serve.
    pub async fn sync_bgp(&mut self, serving: &Serving) {
        let running = self.bgp.as_ref().map(|s| s.config().clone());
        if self.bgp_config == running {
            return;
        }
        match (self.bgp_config.clone(), self.bgp.take()) {
            (None, Some(speaker)) => {
                info!("BGP: no peers any more; stopping the speaker");
                speaker.shutdown(BGP_SHUTDOWN).await;
            }
            (Some(config), Some(mut speaker)) if speaker.reconcilable(&config) => {
                speaker.reconcile(&config).await;
                self.bgp = Some(speaker);
            }
            (Some(config), old) => {
                if let Some(speaker) = old {
                    info!(
                        "BGP: router id, listen port or BFD timers changed; restarting the speaker"
                    );
                    speaker.shutdown(BGP_SHUTDOWN).await;
                }
                let mut speaker =
                    bgp::Speaker::without_peers(&config, self.peers.clone(), self.restarted);
                speaker.reconcile(&config).await;
                self.bgp = Some(speaker);
            }
            (None, None) => {}
        }
        self.advertise(serving);
    }

    /// Kubernetes mode: the VIPs the L2Advertisements give this node, and the other selected
    /// Nodes as gossip peers (unless the node config lists them); [`Announcer::update`]
    /// applies them.
    pub fn set_l2_plan(&mut self, vips: Option<&BTreeSet<IpAddr>>, nodes: &[IpAddr]) {
        if self.l2_ports.is_empty() {
            return;
        }
        if let Some(g) = &self.gossip
            && g.from_nodes
        {
            let peers: Vec<SocketAddr> = nodes
                .iter()
                .filter(|ip| ip.is_ipv4() == g.listen.is_ipv4())
                .map(|ip| SocketAddr::new(*ip, g.listen.port()))
                .collect();
            g.peers.send_if_modified(|now| {
                if *now == peers {
                    return false;
                }
                info!(peers = ?peers, "gossip: peers from the Nodes the L2Advertisements select");
                *now = peers;
                true
            });
        }
        if self.l2_vips.as_ref() != vips {
            info!(vips = ?vips, "L2: the addresses the L2Advertisements give this node");
            self.l2_vips = vips.cloned();
        }
    }

    /// Announces what `serving` says: BGP advertises the VIPs this node can serve and
    /// withdraws the rest; L2 decides the VIPs to answer for, has `mark` make the data plane
    /// answer for exactly those, then sends a gratuitous ARP / unsolicited Neighbor
    /// Advertisement for each VIP new to this node on each L2 interface, so that neighbours
    /// that cached another MAC for it move at once.
    pub fn update(
        &mut self,
        serving: &Serving,
        mark: impl FnOnce(BTreeSet<IpAddr>) -> Result<(), MapError>,
    ) {
        self.advertise(serving);
        self.announce_l2(serving, mark);
    }

    /// What the admin API and the metrics show.
    pub fn status(&self) -> Status {
        Status {
            l2: self.l2_status.clone(),
            bgp: self.peers.clone(),
            problems: self.problems.clone(),
        }
    }

    /// This agent adopted a running data plane that answered on L2 for `claims`: BGP says so
    /// to the peers (graceful restart's R bit), and L2 keeps answering for them until gossip's
    /// view settles.
    pub fn set_restarted(&mut self, restarted: bool, claims: BTreeSet<IpAddr>) {
        self.restarted = restarted;
        self.initial_claims = claims;
    }

    /// Closes the BGP sessions. `keep`: the data plane stays (the agent restarts), so the
    /// routes stay with the peers that support graceful restart; otherwise they are
    /// withdrawn first (the peers stop sending here before the data plane goes).
    ///
    /// L2, with `keep`: the data plane goes on answering for this node's VIPs (its lease
    /// extended by `restart_grace`), and gossip tells the other nodes to hold this node alive
    /// that long, so that its VIPs do not move while the agent restarts.
    pub async fn shutdown(mut self, keep: bool) {
        if let Some(speaker) = self.bgp.take() {
            if keep {
                speaker.keep_routes();
            }
            speaker.shutdown(BGP_SHUTDOWN).await;
        }
        if let Some(t) = self.lease_task.take() {
            t.abort();
        }
        if !keep || self.l2_ports.is_empty() {
            return;
        }
        let grace = self
            .gossip
            .as_ref()
            .map_or(RESTART_GRACE_ALONE, |g| g.restart_grace);
        if let Some(w) = &mut self.last_lease
            && let Err(e) = w.extend(grace)
        {
            warn!(error = %e, "L2: the lease was not extended for the restart");
        }
        if let Some(g) = self.gossip.take() {
            g.local.send_modify(|l| l.restarting = Some(grace));
            let _ = tokio::time::timeout(Duration::from_secs(1), g.task).await;
            info!(grace = ?grace, vips = ?self.announced, "L2: the other nodes hold this node alive while its agent restarts");
        }
    }

    fn advertise(&mut self, serving: &Serving) {
        if let (Some(speaker), Some(config)) = (&mut self.bgp, &self.bgp_config) {
            speaker.advertise(bgp::routes(config, &serving.servable));
        }
    }

    /// L2 mode: the VIPs this node owns are answered for here — every programmed VIP without
    /// gossip, else those it ranks first for among the live eligible nodes (once no other
    /// live node still claims them). This node is eligible while every L2 interface is up.
    fn announce_l2(
        &mut self,
        serving: &Serving,
        mark: impl FnOnce(BTreeSet<IpAddr>) -> Result<(), MapError>,
    ) {
        if self.l2_ports.is_empty() {
            return;
        }
        let mine = |v: &IpAddr| self.l2_vips.as_ref().is_none_or(|l| l.contains(v));
        let all: BTreeSet<IpAddr> = serving.all.iter().copied().filter(mine).collect();
        let eligible = self.l2_ports.iter().all(|p| l2::link_up(&p.iface));
        // With other nodes to take over, a VIP goes to a node that can serve it; alone, this
        // node keeps answering (fail-open still forwards).
        let servable: BTreeSet<IpAddr> = serving.servable.iter().copied().filter(mine).collect();
        let vips = match &self.gossip {
            None => all,
            Some(g) => {
                let view = g.view.borrow().clone();
                let vips = if view.settled || self.initial_claims.is_empty() {
                    self.initial_claims.clear();
                    gossip::owned(&g.node, eligible, &servable, &view, &all)
                } else {
                    // Restarted: what the data plane answered for until the view settles.
                    self.initial_claims.intersection(&all).copied().collect()
                };
                self.l2_status = Some(gossip::Status {
                    node: g.node.clone(),
                    peers: g.peers.borrow().clone(),
                    settled: view.settled,
                    alive: view.members(),
                    allowed: self.l2_vips.clone(),
                    announced: vips.clone(),
                    authenticated: g.authenticated,
                    rejected: g.rejections.clone(),
                });
                vips
            }
        };
        if let Err(e) = mark(vips.clone()) {
            error!(error = %e, "L2: could not mark the VIPs to answer for");
            return;
        }
        for vip in vips.difference(&self.announced) {
            for port in &self.l2_ports {
                let frame = l2::announcement(port.mac, *vip);
                match l2::send(port.ifindex, &frame) {
                    Ok(()) => info!(vip = %vip, iface = %port.iface, "L2: announced"),
                    Err(e) => {
                        warn!(vip = %vip, iface = %port.iface, error = %e, "L2: gratuitous announcement not sent (ARP and Neighbor Solicitations are still answered)");
                    }
                }
            }
        }
        for vip in self.announced.difference(&vips) {
            info!(vip = %vip, "L2: no longer announced");
        }
        if let Some(g) = &self.gossip {
            let next = gossip::Local {
                eligible,
                claims: vips.clone(),
                serving: servable,
                restarting: None,
            };
            g.local.send_if_modified(|l| {
                let changed = *l != next;
                *l = next;
                changed
            });
        }
        self.announced = vips;
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}
