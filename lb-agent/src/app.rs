//! The standalone agent: load and attach the data plane, start the health checks, program the
//! data plane from the config and the checks' results, serve the admin API, and apply config
//! changes (SIGHUP, or the file changing) and health changes until SIGTERM/SIGINT.

use crate::LockExt as _;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{error, info, warn};

use crate::{
    api::{self, ApiState},
    config::{Config, Source},
    dataplane::inspect::Inspect,
    dataplane::{ApplyError, ApplyReport, ProgrammedService, Programmer, ebpf::Datapath},
    health::{
        self, CheckUser, HealthMode,
        monitor::{CheckEvent, CheckKey, MAX_CONCURRENT_PROBES, Monitor},
        state::Health,
    },
    metrics::{AttachLabels, Metrics},
    model::{DesiredState, Frontend},
    sources::kubernetes::{
        healthport::HealthPorts,
        runtime as kube_runtime,
        translate::{self, Translation},
    },
    status::{BackendStatus, ServiceStatus, Snapshot},
    traffic::{self, Traffic},
};

/// How often the config file is compared with what was last loaded.
const FILE_POLL: Duration = Duration::from_secs(1);
/// How long the first state waits for the first health-check results beyond the longest
/// check timeout.
const FIRST_RESULTS_GRACE: Duration = Duration::from_secs(1);

/// Kubernetes mode (`lb-agent run --kubernetes`).
#[derive(Clone, Debug)]
pub struct KubeMode {
    /// None: in-cluster credentials.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// This node's name (`NODE_NAME`).
    pub node: String,
    /// Where the leader Lease lives (`POD_NAMESPACE`).
    pub namespace: String,
    /// This agent's name in the Lease and in Events (`POD_NAME`).
    pub identity: String,
    /// Also serve LoadBalancer Services without a `loadBalancerClass`.
    pub default_class: bool,
}

pub async fn run(source: Source, kube: Option<KubeMode>) -> anyhow::Result<()> {
    // Signal handlers first: a SIGHUP or SIGTERM sent as soon as /readyz answers must be seen.
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let (mut config, fingerprint) = source.load_with_fingerprint()?;
    if kube.is_some() && !config.desired.services.is_empty() {
        anyhow::bail!(
            "{source}: services: with --kubernetes the services come from Kubernetes; the config \
             file carries node settings only (remove the services list)"
        );
    }
    if kube.is_some()
        && !config.announce.l2_interfaces.is_empty()
        && config.announce.gossip.is_none()
    {
        anyhow::bail!(
            "{source}: announce.l2: in Kubernetes mode every node would answer for every \
             address; add announce.gossip (its peers default to the Nodes the \
             L2Advertisements select)"
        );
    }
    if kube.is_none()
        && let Some(g) = &config.announce.gossip
        && g.peers.is_none()
    {
        anyhow::bail!(
            "{source}: announce.gossip.peers: needed in standalone mode (only Kubernetes mode \
             finds the other nodes by itself)"
        );
    }
    if kube.is_some() && config.announce.bgp.is_some() {
        anyhow::bail!(
            "{source}: announce.bgp: in Kubernetes mode BGP comes from the BGPPeer and \
             BGPAdvertisement resources (weir.dev/v1alpha1); remove it from the node config"
        );
    }
    // Kubernetes mode source-NATs flows to other nodes' endpoints whenever the Node has an
    // address; standalone mode when a service asks for it.
    if kube.is_some() || config.desired.source_nat.is_some() {
        check_source_nat_ports(config.node.source_nat.ports).context(source.to_string())?;
    }
    info!(
        config = %source,
        mode = if kube.is_some() { "kubernetes" } else { "standalone" },
        services = config.desired.services.len(),
        interfaces = ?config.node.interfaces,
        "starting"
    );

    // Bind the admin port first: a port conflict should fail before the data plane changes.
    let listener = api::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen {}", config.admin.listen))?;
    let snapshot = watch::Sender::new(Arc::new(Snapshot::default()));
    let traffic = watch::Sender::new(Arc::new(Traffic::default()));
    let metrics = Arc::new(Metrics::new(snapshot.subscribe(), traffic.subscribe()));
    let mut state = ApiState::new(snapshot.subscribe(), traffic.subscribe(), metrics.clone());

    // The Kubernetes client before the data plane too: a bad kubeconfig changes nothing.
    let kube_client = match &kube {
        Some(k) => Some(kube_runtime::client(k.kubeconfig.as_deref()).await?),
        None => None,
    };
    let mut datapath = Datapath::load(&config.dataplane).context("loading the data plane")?;
    let inspector: Arc<dyn Inspect> = Arc::new(
        datapath
            .maps
            .inspector()
            .context("opening the data plane's maps for reading")?,
    );
    state.inspector = Some(inspector.clone());
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_task = tokio::spawn(api::serve(listener, state.clone(), async {
        let _ = api_stopped.await;
    }));
    info!(listen = %config.admin.listen, "admin API listening");
    for iface in &config.node.interfaces {
        // On error, dropping `datapath` detaches what was attached so far.
        let mode = datapath.attach(iface, config.node.xdp_mode)?;
        metrics
            .agent
            .attached
            .get_or_create(&AttachLabels {
                interface: iface.clone(),
                mode: mode.as_str(),
            })
            .set(1);
        info!(iface = %iface, mode = mode.as_str(), "XDP ingress and TC egress attached");
    }
    let mut l2_ports = Vec::new();
    for iface in &config.announce.l2_interfaces {
        let ifindex = crate::dataplane::ebpf::ifindex(iface)?;
        let mac = crate::announce::l2::interface_mac(iface)
            .with_context(|| format!("announce.l2.interfaces: {iface}: reading its MAC"))?;
        datapath.add_l2_port(ifindex, mac)?;
        info!(iface = %iface, mac = %mac_text(mac), "answering ARP and Neighbor Solicitations for the VIPs here");
        l2_ports.push(L2Port {
            iface: iface.clone(),
            ifindex,
            mac,
        });
    }
    let gossip = match &config.announce.gossip {
        None => None,
        Some(g) => {
            let node = match (&config.announce.node_name, &kube) {
                (Some(n), _) => n.clone(),
                (None, Some(k)) => k.node.clone(),
                (None, None) => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .context("announce.node_name not set and the host name unreadable")?
                    .trim()
                    .to_string(),
            };
            let socket = tokio::net::UdpSocket::bind(g.listen)
                .await
                .with_context(|| format!("announce.gossip.listen {}", g.listen))?;
            let (local, local_rx) = watch::channel(crate::announce::gossip::Local::default());
            let (view_tx, view) = watch::channel(crate::announce::gossip::View::default());
            let (peers, peers_rx) = watch::channel(g.peers.clone().unwrap_or_default());
            tokio::spawn(crate::announce::gossip::run(
                socket,
                crate::announce::gossip::Settings {
                    node: node.clone(),
                    peers: peers_rx,
                    interval: g.interval,
                    dead_after: g.dead_after,
                },
                local_rx,
                view_tx,
            ));
            info!(node = %node, listen = %g.listen, peers = ?g.peers, "gossip: heartbeats to the other announcing nodes");
            Some(Gossip {
                node,
                local,
                view,
                peers,
                from_nodes: g.peers.is_none(),
                listen: g.listen,
            })
        }
    };
    let mut gossip_view = gossip.as_ref().map(|g| g.view.clone());
    if !l2_ports.is_empty() {
        // The data plane answers for the VIPs only while this agent keeps its lease running:
        // a node whose agent died stops answering when its peers declare it dead.
        let (lease, refresh) = match &config.announce.gossip {
            Some(g) => (g.dead_after, g.interval),
            None => (Duration::from_secs(1), Duration::from_millis(250)),
        };
        let mut writer = datapath.l2_lease()?;
        writer.extend(lease).context("starting the L2 lease")?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresh);
            loop {
                tick.tick().await;
                if let Err(e) = writer.extend(lease) {
                    warn!(error = %e, "L2: the lease was not extended; answers stop when it runs out");
                }
            }
        });
    }
    state.readiness.attached.store(true, Ordering::Release);
    let sampler = tokio::spawn(traffic::sample(inspector, snapshot.subscribe(), traffic));

    // Kubernetes: watch, translate, elect; the first state waits for the first full lists.
    let (translations_tx, mut translations) = watch::channel::<Option<Arc<Translation>>>(None);
    let mut kube_tasks = Vec::new();
    let mut events_sink: Option<kube_runtime::EventSink> = None;
    let _watches = match &kube {
        None => None,
        Some(k) => {
            let client = kube_client
                .clone()
                .context("the Kubernetes client was made above")?;
            let watches = kube_runtime::watch_all(&client, &k.namespace);
            let opts = translate::Options {
                node: k.node.clone(),
                default_class: k.default_class,
                table_size: config.maglev.table_size,
                max_services: config.dataplane.max_services,
                max_backends: config.dataplane.max_backends,
                source_nat: config.node.source_nat,
            };
            // The Lease first: electing takes a few rounds and needs no lists.
            let (leader_tx, leader) = watch::channel(false);
            kube_tasks.push(tokio::spawn(kube_runtime::lease_loop(
                client.clone(),
                k.namespace.clone(),
                k.identity.clone(),
                leader_tx,
            )));
            info!(node = %k.node, identity = %k.identity, "waiting for the first full lists from the Kubernetes API");
            // One waiter: a store's readiness wakes only the last task that polled it, so the
            // loops below start once it is known.
            tokio::select! {
                r = watches.stores.ready() => r?,
                _ = term.recv() => { info!("SIGTERM before the first state: shutting down"); return Ok(()); }
                _ = int.recv() => { info!("SIGINT before the first state: shutting down"); return Ok(()); }
            }
            let (sink, sink_task) = kube_runtime::event_sink(
                client.clone(),
                watches.stores.services.clone(),
                k.identity.clone(),
            );
            kube_tasks.push(sink_task);
            events_sink = Some(sink.clone());
            kube_tasks.push(tokio::spawn(kube_runtime::translate_loop(
                watches.stores.clone(),
                watches.changed.clone(),
                opts,
                translations_tx,
                leader.clone(),
                sink,
                metrics.clone(),
            )));
            kube_tasks.push(tokio::spawn(kube_runtime::address_loop(
                client,
                watches.stores.clone(),
                watches.changed.clone(),
                leader,
                k.default_class,
                k.identity.clone(),
            )));
            tokio::select! {
                r = translations.wait_for(Option::is_some) => {
                    r.map_err(|_| anyhow::anyhow!("the Kubernetes watchers stopped"))?;
                }
                _ = term.recv() => { info!("SIGTERM before the first state: shutting down"); return Ok(()); }
                _ = int.recv() => { info!("SIGINT before the first state: shutting down"); return Ok(()); }
            }
            if let Some(t) = translations.borrow_and_update().clone() {
                config.desired = t.desired.clone();
            }
            Some(watches)
        }
    };

    let (monitor, mut events) = Monitor::new(metrics.health.clone(), MAX_CONCURRENT_PROBES)
        .context("starting the health-check thread")?;
    let mut agent = Agent {
        api: state.clone(),
        programmer: Programmer::new(&config.dataplane, config.maglev.seed),
        checks: health::wanted_checks(&config.desired),
        source,
        current: config,
        fingerprint,
        datapath,
        monitor,
        metrics: metrics.clone(),
        snapshot,
        programmed: DesiredState::default(),
        modes: BTreeMap::new(),
        states: HashMap::new(),
        kubernetes: kube.is_some(),
        node_name: kube.as_ref().map(|k| k.node.clone()).unwrap_or_default(),
        events: events_sink,
        l2_ports,
        announced: BTreeSet::new(),
        gossip,
        // Kubernetes mode: nothing until the L2Advertisements say what.
        l2_vips: kube.is_some().then(BTreeSet::new),
        bgp: None,
    };
    agent.first_state(&mut events).await?;
    // BGP once the first state is programmed: the first routes are the VIPs that can be
    // served. From the config file a speaker that cannot start stops the agent; from
    // Kubernetes it is logged and retried at the next change.
    if let Some(t) = translations.borrow().clone() {
        agent.current.announce.bgp = t.bgp.clone();
        agent.sync_l2(&t.l2);
        agent.sync_bgp().await;
    } else if let Some(b) = &agent.current.announce.bgp {
        match crate::announce::bgp::Speaker::start(b, metrics.bgp.clone()).await {
            Ok(speaker) => {
                agent.bgp = Some(speaker);
                agent.announce_bgp();
            }
            Err(e) => {
                agent.datapath.detach_all();
                return Err(e.context("announce.bgp"));
            }
        }
    }
    state.readiness.programmed.store(true, Ordering::Release);
    state.note_config(Ok(()));

    let mut health_ports = HealthPorts::default();
    if let Some(t) = translations.borrow().clone() {
        health_ports.sync(&t.health_node_ports).await;
        agent.update_health_ports(&health_ports);
    }
    let mut poll = tokio::time::interval(FILE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                agent.reload("SIGHUP");
                agent.sync_bgp().await;
            }
            _ = poll.tick() => {
                let now = agent.source.fingerprint();
                if now.is_some() && now != agent.fingerprint {
                    agent.reload("config file changed");
                    agent.sync_bgp().await;
                }
                // An L2 interface's link going down or up changes this node's eligibility.
                agent.announce_l2();
            }
            Ok(()) = translations.changed(), if kube.is_some() => {
                let t = translations.borrow_and_update().clone();
                if let Some(t) = t {
                    agent.apply_kubernetes(&t);
                    agent.sync_bgp().await;
                    health_ports.sync(&t.health_node_ports).await;
                    agent.update_health_ports(&health_ports);
                }
            }
            Ok(()) = async { gossip_view.as_mut().expect("guarded").changed().await }, if gossip_view.is_some() => {
                agent.announce_l2();
            }
            Some(event) = events.recv() => {
                let since = Instant::now();
                agent.note_event(&event);
                // Take every change that is already waiting, then program once.
                while let Ok(event) = events.try_recv() {
                    agent.note_event(&event);
                }
                agent.reprogram("health change", since);
                agent.update_health_ports(&health_ports);
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }

    state.readiness.attached.store(false, Ordering::Release);
    // Routes go before the data plane does: the peers stop sending here first.
    if let Some(speaker) = agent.bgp.take() {
        speaker.shutdown(Duration::from_secs(3)).await;
    }
    sampler.abort();
    for t in &kube_tasks {
        t.abort();
    }
    if let (Some(k), Some(client)) = (&kube, kube_client) {
        let release = kube_runtime::release_lease(client, &k.namespace, &k.identity);
        let _ = tokio::time::timeout(Duration::from_secs(2), release).await;
    }
    drop(agent.monitor);
    agent.datapath.detach_all();
    metrics.agent.attached.clear();
    let _ = stop_api.send(());
    match api_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "admin API stopped with an error"),
        Err(e) => warn!(error = %e, "admin API task failed"),
    }
    info!("stopped");
    Ok(())
}

struct Agent {
    api: ApiState,
    source: Source,
    current: Config,
    fingerprint: Option<Vec<u8>>,
    programmer: Programmer,
    datapath: Datapath,
    monitor: Monitor,
    metrics: Arc<Metrics>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The checks `current` needs, with the service backends each covers.
    checks: BTreeMap<CheckKey, Vec<CheckUser>>,
    /// What is in the maps: `current.desired` with health applied.
    programmed: DesiredState,
    /// Each service's health mode as programmed.
    modes: BTreeMap<Frontend, HealthMode>,
    /// The check states `programmed` was computed from.
    states: HashMap<CheckKey, Health>,
    /// The services come from Kubernetes, not from the config file.
    kubernetes: bool,
    node_name: String,
    /// Events on Kubernetes Services (health transitions).
    events: Option<kube_runtime::EventSink>,
    /// L2 announcement: where this node answers for its VIPs (empty: not announcing).
    l2_ports: Vec<L2Port>,
    /// The VIPs announced on L2.
    announced: BTreeSet<std::net::IpAddr>,
    /// Liveness of the other announcing nodes (None: this node owns every VIP).
    gossip: Option<Gossip>,
    /// The VIPs this node may answer for on L2 (None: every VIP; Kubernetes mode: what the
    /// L2Advertisements selecting this node give it).
    l2_vips: Option<BTreeSet<std::net::IpAddr>>,
    /// BGP mode's speaker.
    bgp: Option<crate::announce::bgp::Speaker>,
}

struct Gossip {
    node: String,
    /// Where the heartbeats go.
    peers: watch::Sender<Vec<std::net::SocketAddr>>,
    /// The peers are the Nodes the L2Advertisements select (Kubernetes mode without
    /// `announce.gossip.peers`).
    from_nodes: bool,
    listen: std::net::SocketAddr,
    /// What the heartbeats say about this node.
    local: watch::Sender<crate::announce::gossip::Local>,
    view: watch::Receiver<crate::announce::gossip::View>,
}

/// An interface where this node answers ARP and Neighbor Solicitations.
struct L2Port {
    iface: String,
    ifindex: u32,
    mac: [u8; 6],
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

impl Agent {
    /// Starts the checks, waits (a bounded time) for their first results so that no backend
    /// gets traffic before it has answered, then programs the first full state.
    async fn first_state(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<CheckEvent>,
    ) -> anyhow::Result<()> {
        self.monitor.start(&self.checks);
        if !self.monitor.is_empty() {
            let began = Instant::now();
            let deadline = began + self.monitor.max_timeout() + FIRST_RESULTS_GRACE;
            while self.monitor.unknown() > 0 {
                tokio::select! {
                    Some(event) = events.recv() => self.note_event(&event),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let states = self.monitor.states();
            let count = |h: Health| states.values().filter(|s| **s == h).count();
            info!(
                checks = states.len(),
                up = count(Health::Up),
                down = count(Health::Down),
                unknown = count(Health::Unknown),
                took = ?began.elapsed(),
                "first health-check results"
            );
        }
        let started = std::time::Instant::now();
        let desired = self.current.desired.clone();
        let report = self
            .program(&desired)
            .context("programming the first state")?;
        self.metrics.agent.observe_sync("start", started.elapsed());
        info!(
            services = report.added.len(),
            took = ?started.elapsed(),
            "data plane programmed; ready"
        );
        Ok(())
    }

    /// Programs `desired` with the checks' current results. On error the maps may be partly
    /// changed; the caller rolls back.
    fn program(&mut self, desired: &DesiredState) -> Result<ApplyReport, ApplyError> {
        let states = self.monitor.states();
        let (effective, modes) = health::effective(desired, |k| {
            states.get(k).copied().unwrap_or(Health::Unknown)
        });
        let report = self.programmer.apply(&effective, &mut self.datapath.maps)?;
        for (frontend, mode) in &modes {
            let before = self.modes.get(frontend).copied();
            if before != Some(*mode) {
                log_mode(*frontend, before, *mode, &effective);
            }
        }
        self.programmed = effective;
        self.modes = modes;
        self.states = states;
        self.announce_l2();
        self.announce_bgp();
        self.publish();
        Ok(report)
    }

    /// The VIPs this node can serve: at least one of its services sends new flows to a
    /// backend (with health checks: a healthy one; a service whose backends all failed —
    /// fail-open or fail-closed — or that waits for its first results does not count). In
    /// Kubernetes mode a Local-policy Service's backends are this node's endpoints only, so
    /// a node without a healthy local endpoint does not serve it.
    fn servable_vips(&self) -> BTreeSet<std::net::IpAddr> {
        self.programmed
            .services
            .iter()
            .filter(|s| {
                matches!(
                    self.modes
                        .get(&s.frontend)
                        .copied()
                        .unwrap_or(HealthMode::Unchecked),
                    HealthMode::Unchecked | HealthMode::Checked
                ) && s.backends.iter().any(|b| b.share() > 0)
            })
            .map(|s| s.frontend.vip)
            .collect()
    }

    /// BGP mode: advertise what this node can serve, withdraw the rest.
    fn announce_bgp(&mut self) {
        let servable = self.servable_vips();
        if let (Some(speaker), Some(config)) = (&mut self.bgp, &self.current.announce.bgp) {
            speaker.advertise(crate::announce::bgp::routes(config, &servable));
        }
    }

    /// Brings the BGP speaker in line with `current.announce.bgp` (changed by a reload or,
    /// in Kubernetes mode, by the BGPPeer and BGPAdvertisement resources): peers are added
    /// and removed one by one (a new `local_as` restarts the peers that use it); a new router
    /// id, listen port or BFD timers restart the speaker.
    /// A peer that cannot start is logged and listed in `/api/v1/bgp` with why; the rest runs,
    /// and the next change tries it again.
    async fn sync_bgp(&mut self) {
        let wanted = self.current.announce.bgp.clone();
        let running = self.bgp.as_ref().map(|s| s.config().clone());
        if wanted == running {
            return;
        }
        match (wanted, self.bgp.take()) {
            (None, Some(speaker)) => {
                info!("BGP: no peers any more; stopping the speaker");
                speaker.shutdown(Duration::from_secs(3)).await;
            }
            (Some(config), Some(mut speaker)) if speaker.reconcilable(&config) => {
                // Peers that cannot start are logged and listed with the reason.
                speaker.reconcile(&config).await;
                self.bgp = Some(speaker);
            }
            (Some(config), old) => {
                if let Some(speaker) = old {
                    info!(
                        "BGP: router id, listen port or BFD timers changed; restarting the speaker"
                    );
                    speaker.shutdown(Duration::from_secs(3)).await;
                }
                let mut speaker =
                    crate::announce::bgp::Speaker::without_peers(&config, self.metrics.bgp.clone());
                speaker.reconcile(&config).await;
                self.bgp = Some(speaker);
            }
            (None, None) => {}
        }
        self.announce_bgp();
    }

    /// L2 mode: the VIPs this node owns are answered for here — every programmed VIP without
    /// gossip, else those it ranks first for among the live eligible nodes (once no other
    /// live node still claims them) — and a VIP new to this node is announced with a
    /// gratuitous ARP / unsolicited Neighbor Advertisement on each L2 interface, so that
    /// neighbours that cached another MAC for it move at once. This node is eligible while
    /// every L2 interface is up.
    fn announce_l2(&mut self) {
        if self.l2_ports.is_empty() {
            return;
        }
        let mine = |v: &std::net::IpAddr| self.l2_vips.as_ref().is_none_or(|l| l.contains(v));
        let all: BTreeSet<std::net::IpAddr> = self
            .programmed
            .services
            .iter()
            .map(|s| s.frontend.vip)
            .filter(mine)
            .collect();
        let eligible = self
            .l2_ports
            .iter()
            .all(|p| crate::announce::l2::link_up(&p.iface));
        // With other nodes to take over, a VIP goes to a node that can serve it; alone, this
        // node keeps answering (fail-open still forwards).
        let serving: BTreeSet<std::net::IpAddr> =
            self.servable_vips().into_iter().filter(mine).collect();
        let vips = match &self.gossip {
            None => all,
            Some(g) => {
                let view = g.view.borrow().clone();
                let vips = crate::announce::gossip::owned(&g.node, eligible, &serving, &view, &all);
                let status = crate::announce::gossip::Status {
                    node: g.node.clone(),
                    peers: g.peers.borrow().clone(),
                    settled: view.settled,
                    alive: view.members(),
                    allowed: self.l2_vips.clone(),
                    announced: vips.clone(),
                };
                *self.metrics.l2.locked() = Some(status);
                vips
            }
        };
        if let Err(e) = self
            .programmer
            .set_announced(vips.clone(), &mut self.datapath.maps)
        {
            error!(error = %e, "L2: could not mark the VIPs to answer for");
            return;
        }
        for vip in vips.difference(&self.announced) {
            for port in &self.l2_ports {
                let frame = crate::announce::l2::announcement(port.mac, *vip);
                match crate::announce::l2::send(port.ifindex, &frame) {
                    Ok(()) => info!(vip = %vip, iface = %port.iface, "L2: announced"),
                    Err(e) => {
                        warn!(vip = %vip, iface = %port.iface, error = %e, "L2: gratuitous announcement not sent (ARP and Neighbor Solicitations are still answered)")
                    }
                }
            }
        }
        for vip in self.announced.difference(&vips) {
            info!(vip = %vip, "L2: no longer announced");
        }
        let changed = vips != self.announced;
        if let Some(g) = &self.gossip {
            let next = crate::announce::gossip::Local {
                eligible,
                claims: vips.clone(),
                serving,
            };
            g.local.send_if_modified(|l| {
                let changed = *l != next;
                *l = next;
                changed
            });
        }
        self.announced = vips;
        if changed {
            self.publish();
        }
    }

    /// Kubernetes mode: the VIPs the L2Advertisements give this node, and the other selected
    /// Nodes as gossip peers (unless the node config lists them).
    fn sync_l2(&mut self, plan: &crate::sources::kubernetes::announce::L2Plan) {
        if self.l2_ports.is_empty() {
            return;
        }
        if let Some(g) = &self.gossip
            && g.from_nodes
        {
            let peers: Vec<std::net::SocketAddr> = plan
                .peers
                .iter()
                .filter(|ip| ip.is_ipv4() == g.listen.is_ipv4())
                .map(|ip| std::net::SocketAddr::new(*ip, g.listen.port()))
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
        if self.l2_vips != plan.vips {
            info!(vips = ?plan.vips, "L2: the addresses the L2Advertisements give this node");
            self.l2_vips = plan.vips.clone();
            self.announce_l2();
        }
    }

    /// Applies health changes (the first seen at `since`) to the current config.
    fn reprogram(&mut self, why: &str, since: Instant) {
        let started = std::time::Instant::now();
        let desired = self.current.desired.clone();
        match self.program(&desired) {
            Ok(r) if r.changed() => {
                self.metrics.agent.observe_sync("health", since.elapsed());
                info!(
                    reason = why,
                    updated = ?r.updated,
                    took = ?started.elapsed(),
                    "data plane updated"
                )
            }
            Ok(_) => {}
            Err(e) => {
                error!(reason = why, error = %e, "programming a health change failed; rolling back");
                let previous = self.programmed.clone();
                if let Err(e) = self.programmer.apply(&previous, &mut self.datapath.maps) {
                    error!(error = %e, "rolling back failed too; the data plane may be partly updated");
                }
            }
        }
    }

    /// Logs a check's change for every service backend it covers, and counts it.
    fn note_event(&self, e: &CheckEvent) {
        let Some(users) = self.checks.get(&e.key) else {
            return; // A check that was just stopped.
        };
        for u in users {
            let backend = u.backend.to_string();
            let check = e.key.probe.kind.as_str();
            match e.to {
                Health::Up => {
                    self.metrics.health.transition(&u.service, &backend, true);
                    if let Some(ev) = &self.events {
                        ev.send(kube_runtime::ServiceEvent {
                            service: u.service.clone(),
                            warning: false,
                            reason: "BackendHealthy",
                            note: format!(
                                "node {}: backend {backend} passes its {check} check",
                                self.node_name
                            ),
                        });
                    }
                    info!(service = %u.service, backend, check, from = %e.from, "backend is healthy");
                }
                Health::Down => {
                    self.metrics.health.transition(&u.service, &backend, false);
                    let (reason, detail) = e
                        .failure
                        .as_ref()
                        .map_or(("", ""), |f| (f.kind.as_str(), f.detail.as_str()));
                    if let Some(ev) = &self.events {
                        ev.send(kube_runtime::ServiceEvent {
                            service: u.service.clone(),
                            warning: true,
                            reason: "BackendUnhealthy",
                            note: format!(
                                "node {}: backend {backend} failed its {check} check ({reason}: {detail}); no new flows go to it from this node",
                                self.node_name
                            ),
                        });
                    }
                    warn!(
                        service = %u.service,
                        backend,
                        check,
                        from = %e.from,
                        reason,
                        detail,
                        failures = if e.from == Health::Unknown { 1 } else { e.key.probe.fall },
                        "backend is unhealthy"
                    );
                }
                Health::Unknown => {}
            }
        }
    }

    /// Publishes what is programmed, for the API and the metrics.
    fn publish(&self) {
        let ids: HashMap<Frontend, &ProgrammedService> = self
            .programmer
            .services()
            .map(|p| (p.spec.frontend, p))
            .collect();
        let services = self
            .programmed
            .services
            .iter()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                id: ids.get(&s.frontend).map_or(0, |p| p.id),
                vip: s.frontend.vip,
                port: s.frontend.port,
                protocol: s.frontend.protocol,
                check: s.health_check.as_ref().map(|h| h.probe.kind.as_str()),
                mode: self
                    .modes
                    .get(&s.frontend)
                    .copied()
                    .unwrap_or(HealthMode::Unchecked),
                announced: (!self.l2_ports.is_empty())
                    .then(|| self.announced.contains(&s.frontend.vip)),
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let key = health::check_key(s, b);
                        let state = key
                            .as_ref()
                            .map(|k| self.states.get(k).copied().unwrap_or(Health::Unknown));
                        BackendStatus {
                            addr: b.addr,
                            id: ids
                                .get(&s.frontend)
                                .and_then(|p| p.backends.get(&b.addr))
                                .map_or(0, |pb| pb.id),
                            weight: b.weight,
                            healthy: state.is_none_or(|h| h == Health::Up),
                            state,
                            in_rotation: b.share() > 0,
                            source_nat: b.snat,
                            check: key.and_then(|k| self.monitor.shared(&k)),
                        }
                    })
                    .collect(),
            })
            .collect();
        self.snapshot.send_replace(Arc::new(Snapshot { services }));
    }

    /// Loads the config again and applies the difference; a refused config changes nothing.
    fn reload(&mut self, why: &str) {
        let started = std::time::Instant::now();
        let mut new = match self.source.load_with_fingerprint() {
            Ok((c, fingerprint)) => {
                self.fingerprint = fingerprint;
                c
            }
            Err(e) => {
                // Do not retry the same broken file every second; wait for it to change.
                self.fingerprint = self.source.fingerprint();
                error!(
                    reason = why,
                    "config reload refused; the previous config stays:\n{e}"
                );
                self.api.note_config(Err(e.to_string()));
                return;
            }
        };
        if let Some(field) = restart_only_change(&self.current, &new) {
            error!(
                reason = why,
                field,
                "config reload refused: this field only changes with a restart; the previous config stays"
            );
            self.api
                .note_config(Err(format!("{field} only changes with a restart")));
            return;
        }
        if self.kubernetes {
            if new.node.source_nat != self.current.node.source_nat {
                error!(
                    reason = why,
                    field = "node.source_nat",
                    "config reload refused: in Kubernetes mode this field only changes with a restart; the previous config stays"
                );
                self.api.note_config(Err(
                    "node.source_nat only changes with a restart in Kubernetes mode".into(),
                ));
                return;
            }
            // The services and BGP come from Kubernetes; the file carries node settings only.
            new.desired = self.current.desired.clone();
            new.announce.bgp = self.current.announce.bgp.clone();
        } else if let Some(nat) = new.desired.source_nat
            && let Err(e) = check_source_nat_ports(nat.ports)
        {
            error!(
                reason = why,
                "config reload refused: {e:#}; the previous config stays"
            );
            self.api.note_config(Err(format!("{e:#}")));
            return;
        }
        self.apply(new, why, Some(started));
    }

    /// Tells each health-check node port how many of its Service's endpoints are in rotation
    /// here (distinct addresses over the Service's frontends).
    fn update_health_ports(&self, ports: &HealthPorts) {
        ports.update(|service| {
            let mut live = std::collections::BTreeSet::new();
            for s in self
                .programmed
                .services
                .iter()
                .filter(|s| s.name == service)
            {
                live.extend(s.backends.iter().filter(|b| b.share() > 0).map(|b| b.addr));
            }
            live.len()
        });
    }

    /// Applies a new translation of the Kubernetes stores (the BGP part takes effect with
    /// [`Agent::sync_bgp`]).
    fn apply_kubernetes(&mut self, t: &Translation) {
        let started = std::time::Instant::now();
        self.current.announce.bgp = t.bgp.clone();
        self.sync_l2(&t.l2);
        let mut new = self.current.clone();
        new.desired = t.desired.clone();
        if new.desired == self.current.desired {
            return;
        }
        self.apply(new, "Kubernetes change", None);
        self.metrics
            .agent
            .observe_sync("kubernetes", started.elapsed());
    }

    /// Programs `new` (starting its checks first, stopping the old ones after), or rolls back.
    /// `config_started`: a config reload (counted, timed from then); None: a Kubernetes change.
    fn apply(&mut self, new: Config, why: &str, config_started: Option<std::time::Instant>) {
        let started = config_started.unwrap_or_else(std::time::Instant::now);
        let note = |api: &ApiState, r: Result<(), String>| {
            if config_started.is_some() {
                api.note_config(r);
            }
        };
        // New checks start first (a changed check keeps its target's state); the checks the
        // new config drops stop only once it is programmed, so a failure can roll back.
        let checks = health::wanted_checks(&new.desired);
        let started_checks = self.monitor.start(&checks);
        match self.program(&new.desired) {
            Ok(r) => {
                if config_started.is_some() {
                    self.metrics.agent.observe_sync("config", started.elapsed());
                }
                let stopped = self.monitor.retain(&checks);
                info!(
                    reason = why,
                    added = ?r.added,
                    updated = ?r.updated,
                    removed = ?r.removed,
                    unchanged = r.unchanged,
                    checks_started = started_checks.started,
                    checks_stopped = stopped,
                    took = ?started.elapsed(),
                    "applied"
                );
                for e in &r.cleanup_errors {
                    warn!("{e}");
                }
                self.current = new;
                self.checks = checks;
                self.publish();
                note(&self.api, Ok(()));
            }
            Err(e) => {
                error!(reason = why, error = %e, "applying the change failed; rolling back");
                note(&self.api, Err(e.to_string()));
                self.monitor.retain(&self.checks);
                let desired = self.current.desired.clone();
                match self.program(&desired) {
                    Ok(_) => info!("rolled back to the previous config"),
                    Err(e) => {
                        error!(error = %e, "rolling back failed too; the data plane may be partly updated")
                    }
                }
            }
        }
    }
}

fn log_mode(
    frontend: Frontend,
    before: Option<HealthMode>,
    mode: HealthMode,
    state: &DesiredState,
) {
    let Some(s) = state.services.iter().find(|s| s.frontend == frontend) else {
        return;
    };
    let name = s.name.as_str();
    let frontend = frontend.to_string();
    let frontend = frontend.as_str();
    let backends = s.backends.iter().filter(|b| b.share() > 0).count();
    match mode {
        HealthMode::FailOpen => warn!(
            service = name,
            frontend,
            backends,
            "every backend failed its health check: failing open, new flows go to all of them \
             (set health_check.fail_closed to drop them instead)"
        ),
        HealthMode::FailClosed => warn!(
            service = name,
            frontend,
            "every backend failed its health check: fail_closed is set, new flows are dropped"
        ),
        HealthMode::Pending => info!(
            service = name,
            frontend, "no backend has answered its first health check yet: new flows wait"
        ),
        HealthMode::Checked
            if matches!(
                before,
                Some(HealthMode::FailOpen | HealthMode::FailClosed | HealthMode::Pending)
            ) =>
        {
            info!(
                service = name,
                backends, "healthy backends again: back to normal"
            )
        }
        _ => {}
    }
}

/// Refuses a source-NAT port range that the node's own connections may use (read from this
/// network namespace's sysctls).
pub fn check_source_nat_ports(ports: (u16, u16)) -> anyhow::Result<()> {
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let text = std::fs::read_to_string(RANGE).with_context(|| format!("reading {RANGE}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        anyhow::bail!("{RANGE}: unexpected contents {text:?}");
    };
    let reserved = std::fs::read_to_string(RESERVED).unwrap_or_default();
    if let Some(port) = crate::config::ephemeral_overlap(ports, (lo, hi), &reserved) {
        anyhow::bail!(
            "node.source_nat.ports {}-{} overlaps the node's ephemeral ports \
             (net.ipv4.ip_local_port_range {lo}-{hi}; port {port} is not in \
             net.ipv4.ip_local_reserved_ports): the node's own connections could take a port \
             whose replies weir would translate. Choose a range outside it, or reserve it with \
             sysctl net.ipv4.ip_local_reserved_ports",
            ports.0,
            ports.1
        );
    }
    Ok(())
}

/// The first field that differs and can only change with a restart (the programs' attachment,
/// map capacities, the admin listener, the Maglev hash and seed every node must share).
fn restart_only_change(old: &Config, new: &Config) -> Option<&'static str> {
    if old.node.interfaces != new.node.interfaces {
        Some("node.interfaces")
    } else if old.node.xdp_mode != new.node.xdp_mode {
        Some("node.xdp_mode")
    } else if old.admin != new.admin {
        Some("admin.listen")
    } else if old.dataplane != new.dataplane {
        Some("dataplane")
    } else if old.maglev.hash != new.maglev.hash || old.maglev.seed != new.maglev.seed {
        Some("maglev.hash/maglev.seed")
    } else if old.announce.node_name != new.announce.node_name
        || old.announce.l2_interfaces != new.announce.l2_interfaces
        || old.announce.gossip != new.announce.gossip
    {
        // BGP changes apply peer by peer (`Agent::sync_bgp`).
        Some("announce")
    } else {
        None
    }
}
