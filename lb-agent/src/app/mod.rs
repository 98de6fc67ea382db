//! The agent process: wiring only. It loads and attaches the data plane, sets up announcing,
//! starts Kubernetes mode's tasks, programs the first state, serves the admin API, then feeds
//! every change (SIGHUP or the file changing, a Kubernetes translation, health results,
//! gossip) to the [`agent::Agent`] until SIGTERM/SIGINT.
//!
//! - [`checks`]: what is refused before anything changes;
//! - [`kubernetes`]: Kubernetes mode's tasks;
//! - [`agent`]: the main loop's state and what each change does to it;
//! - [`signals`]: SIGHUP, SIGTERM, SIGINT.

mod agent;
mod checks;
mod kubernetes;
mod signals;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tracing::{error, info, warn};

pub use self::kubernetes::KubeMode;
use self::{agent::Agent, kubernetes::Kubernetes, signals::Signals};
use crate::{
    announce::AnnounceError,
    announce::Announcer,
    api::{self, ApiState},
    config::{Config, ConfigError, Source},
    dataplane::{
        self, ApplyError, Dataplane, DataplaneError, MapError,
        ebpf::{Datapath, Start},
    },
    health::monitor::{CheckEvent, MAX_CONCURRENT_PROBES, Monitor},
    metrics::{AttachLabels, Metrics},
    reconcile::Reconciler,
    sources::kubernetes::{
        healthport::HealthPorts,
        proxyhealth::{self, ProxyHealth},
        runtime::{self as kube_runtime, KubeError},
    },
    status::Snapshot,
    status::traffic::{self, Traffic},
};

/// Why the agent could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("installing the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("admin.metrics_listen {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("admin.listen {addr}: {source}")]
    AdminListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
    #[error("listing this node's addresses for node.nodeport_addresses: {0}")]
    LocalAddresses(#[source] std::io::Error),
    #[error("node.healthz_listen {addr}: {source}")]
    HealthzListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the Kubernetes watchers stopped before the first translation")]
    KubernetesStopped,
    #[error("loading the data plane: {0}")]
    Load(#[source] DataplaneError),
    #[error("opening the data plane's maps for reading: {0}")]
    Inspector(#[source] DataplaneError),
    /// Says which interface.
    #[error(transparent)]
    Attach(DataplaneError),
    #[error("announce.node_name not set: {0}")]
    NodeName(#[source] ConfigError),
    #[error(transparent)]
    Announce(#[from] AnnounceError),
    #[error("starting the health-check thread: {0}")]
    HealthThread(#[source] std::io::Error),
    #[error("programming the first state: {0}")]
    FirstState(#[source] ApplyError),
    #[error("adopting the pinned data plane: {0} (lb-agent cleanup removes it)")]
    Adopt(#[source] MapError),
}

/// How often the config file is compared with what was last loaded.
const FILE_POLL: Duration = Duration::from_secs(1);

pub async fn run(source: Source, kube: Option<KubeMode>) -> Result<(), AppError> {
    // Signal handlers first: a SIGHUP or SIGTERM sent as soon as /readyz answers must be seen.
    let mut signals = Signals::new()?;
    let (config, fingerprint) = source.load_with_fingerprint()?;
    checks::mode(&source, &config, kube.is_some())?;
    let mode = if kube.is_some() {
        "kubernetes"
    } else {
        "standalone"
    };
    info!(config = %source, mode, services = config.desired.services.len(), interfaces = ?config.node.interfaces, "starting");

    // The admin port and the Kubernetes client before the data plane: a port conflict or a
    // bad kubeconfig changes nothing.
    let listener =
        api::bind(config.admin.listen)
            .await
            .map_err(|source| AppError::AdminListen {
                addr: config.admin.listen,
                source,
            })?;
    let metrics_listener = match config.admin.metrics_listen {
        Some(addr) => Some(
            api::bind(addr)
                .await
                .map_err(|source| AppError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let kube_client = match &kube {
        Some(k) => Some(kube_runtime::client(k.kubeconfig.as_deref()).await?),
        None => None,
    };
    let out = Outputs::new();
    check_memory(&config, &out.metrics);
    let mut datapath = load(&config)?;
    match datapath.start() {
        Start::Replaced(why) => {
            warn!(%why, "the pinned data plane is not one this agent reads: replacing it (its connections are steered again by Maglev; its counters start over)");
        }
        Start::Fresh => info!(dir = %config.pinning.dir.display(), "fresh data plane, pinned"),
        Start::Adopted | Start::Unpinned => {}
    }
    out.metrics.agent.note_start(datapath.start().as_str());
    let (limits, seed) = (config.dataplane, config.maglev.seed);
    let (programmer, adopted) =
        dataplane::programmer_for(&mut datapath, &limits, seed).map_err(AppError::Adopt)?;
    let claims = adopted
        .as_ref()
        .map(|r| r.announced.clone())
        .unwrap_or_default();
    if let Some(r) = adopted {
        info!(services = r.services, repaired = ?r.repaired, "adopted the pinned data plane: its connections, source-NAT and affinity entries and counters carry on");
    }
    let inspector = datapath.inspector().map_err(AppError::Inspector)?;
    let mut state = out.api.clone();
    state.inspector = Some(inspector.clone());
    let mut api = vec![api::spawn(listener, api::router(state.clone()))];
    info!(listen = %config.admin.listen, "admin API listening");
    if let (Some(l), Some(addr)) = (metrics_listener, config.admin.metrics_listen) {
        api.push(api::spawn(l, api::metrics_router(state.clone())));
        info!(listen = %addr, "metrics, /livez and /readyz listening");
    }
    let node = node_name(&config, kube.as_ref())?;
    let mut announcer = Announcer::start(
        &config.announce,
        node,
        kube.is_some(),
        &mut datapath,
        &out.api.tasks,
    )
    .await?;
    announcer.set_restarted(*datapath.start() == Start::Adopted, claims);
    let sampler = tokio::spawn(traffic::sample(
        inspector.clone(),
        out.snapshot.subscribe(),
        out.traffic,
    ));

    let mut k8s = match (kube, kube_client) {
        (Some(mode), Some(client)) => {
            let stop = signals.stop.stopped(" before the first state");
            match kubernetes::start(
                mode,
                client,
                &config,
                out.metrics.clone(),
                &out.api.tasks,
                stop,
            )
            .await?
            {
                Some(k) => Some(k),
                None => return Ok(()),
            }
        }
        _ => None,
    };
    let (monitor, mut events) = Monitor::new(out.metrics.health.clone(), MAX_CONCURRENT_PROBES)
        .map_err(AppError::HealthThread)?;
    let l2 = announcer.l2();
    let mut reconciler = Reconciler::new(datapath, monitor, programmer, out.snapshot.clone(), l2);
    if config.node.socket_lb.is_some() {
        reconciler.set_terminator(dataplane::sockets::Terminator::new(
            inspector,
            config.node.netns_dir.clone(),
        ));
    }
    let mut agent = Agent {
        api: state.clone(),
        source,
        current: config,
        fingerprint,
        reconciler,
        announcer,
        snapshot: out.snapshot,
        metrics: out.metrics,
        kubernetes: k8s.is_some(),
        node_name: k8s
            .as_ref()
            .map(|k| k.mode.node.clone())
            .unwrap_or_default(),
        events: k8s.as_ref().map(|k| k.events.clone()),
        left_out: Vec::new(),
        retry: agent::Retry::default(),
    };
    first_state(&mut agent, k8s.as_mut(), &mut events).await?;
    state.readiness.programmed.store(true, Ordering::Release);
    state.note_config(Ok::<(), &str>(()));

    serve(&mut agent, &mut signals, k8s.as_mut(), &mut events).await;

    Box::pin(stop(agent, &state, sampler, k8s, api)).await;
    Ok(())
}

/// Stops in the order that loses no traffic: routes and L2 answers first (the peers stop
/// sending here), then the tasks, then the data plane, the API last.
async fn stop<D: Dataplane, C: crate::health::monitor::Checks>(
    agent: Agent<D, C>,
    state: &ApiState,
    sampler: tokio::task::JoinHandle<()>,
    k8s: Option<Kubernetes>,
    api: Vec<api::Running>,
) {
    state.readiness.attached.store(false, Ordering::Release);
    state.tasks.stopping();
    let mut keep = agent.current.pinning.keep_on_exit
        && agent.reconciler.dataplane().start() != Start::Unpinned;
    if keep
        && let Some(k) = &k8s
        && k.uninstalling().await
    {
        info!(
            "the DaemonSet is gone: weir is being uninstalled, so the data plane goes with the agent"
        );
        keep = false;
    }
    agent.announcer.shutdown(keep).await;
    sampler.abort();
    if let Some(k) = k8s {
        k.stop().await;
    }
    let mut dataplane = agent.reconciler.into_dataplane();
    if keep {
        info!(dir = %agent.current.pinning.dir.display(), "data plane left attached and forwarding with its last state (dataplane.keep_on_exit); the next agent adopts it, lb-agent cleanup removes it");
    } else {
        dataplane.detach_all();
    }
    agent.metrics.agent.attached.clear();
    for a in api {
        a.stop().await;
    }
    info!("stopped");
}

/// What the agent publishes: the status snapshot, the traffic sample, the metrics and the
/// admin API's view of them.
struct Outputs {
    snapshot: watch::Sender<Arc<Snapshot>>,
    traffic: watch::Sender<Arc<Traffic>>,
    metrics: Arc<Metrics>,
    api: ApiState,
}

impl Outputs {
    fn new() -> Self {
        let snapshot = watch::Sender::new(Arc::new(Snapshot::default()));
        let traffic = watch::Sender::new(Arc::new(Traffic::default()));
        let metrics = Arc::new(Metrics::new(snapshot.subscribe(), traffic.subscribe()));
        let api = ApiState::new(snapshot.subscribe(), traffic.subscribe(), metrics.clone());
        Self {
            snapshot,
            traffic,
            metrics,
            api,
        }
    }
}

/// This node's name among the announcing nodes: `announce.node_name`, else the Kubernetes
/// node's, else (with gossip) the host name.
fn node_name(config: &Config, kube: Option<&KubeMode>) -> Result<String, AppError> {
    Ok(match (&config.announce.node_name, kube) {
        (Some(n), _) => n.clone(),
        (None, Some(k)) => k.node.clone(),
        (None, None) if config.announce.gossip.is_some() => {
            crate::config::host_name().map_err(AppError::NodeName)?
        }
        (None, None) => String::new(),
    })
}

/// Logs what the maps will cost (charged to this cgroup when this agent creates them) and
/// warns when it does not fit the cgroup's memory limit with room for the agent itself.
fn check_memory(config: &Config, metrics: &Metrics) {
    let ncpus = dataplane::memory::possible_cpus();
    let maps = dataplane::memory::estimate(&config.dataplane, ncpus);
    let total: u64 = maps.iter().map(|(_, b)| b).sum();
    let tables = dataplane::memory::tables(
        config.desired.services.len().max(1) as u32,
        config.maglev.table_size,
    );
    metrics.agent.map_memory.set(total as i64);
    let mib = |b: u64| b.div_ceil(1 << 20);
    let top: Vec<String> = maps
        .iter()
        .take(4)
        .map(|(n, b)| format!("{n} {} MiB", mib(*b)))
        .collect();
    info!(total_mib = mib(total), ncpus, largest = ?top, "data plane maps (kernel memory, charged to this cgroup)");
    if let Some(limit) = crate::config::cgroup_memory_limit()
        && total + tables + AGENT_MEMORY > limit
    {
        warn!(
            maps_mib = mib(total),
            tables_mib = mib(tables),
            agent_mib = mib(AGENT_MEMORY),
            limit_mib = mib(limit),
            "the maps, the Maglev tables and the agent do not fit the cgroup's memory limit: raise the limit (chart: resources.limits.memory) or lower the dataplane capacities"
        );
    }
}

/// Room for the agent's own memory (its RSS at 10 000 services is about 100 MiB).
const AGENT_MEMORY: u64 = 160 << 20;

/// Loads the data plane, pinned under `dataplane.pin_dir`. Without a bpf filesystem there,
/// `keep_on_exit: false` runs it unpinned (it goes with the agent, as asked); with `true`
/// that is an error.
fn load(config: &Config) -> Result<Datapath, AppError> {
    let pinning = &config.pinning;
    match Datapath::load(&config.dataplane, Some(&pinning.dir)) {
        Err(DataplaneError::Pins { detail }) if !pinning.keep_on_exit => {
            warn!(%detail, "running the data plane unpinned (dataplane.keep_on_exit is false): it goes with the agent");
            Datapath::load(&config.dataplane, None)
        }
        r => r,
    }
    .map_err(AppError::Load)
}

/// Attaches the programs to every `node.interfaces` entry (a previous agent's pinned links get
/// the new programs in place), then lets go of what no longer serves. On error, what was
/// attached stays (pinned) or goes with the data plane (unpinned).
fn attach(
    dataplane: &mut dyn Dataplane,
    config: &Config,
    metrics: &Metrics,
) -> Result<(), AppError> {
    for iface in &config.node.interfaces {
        let mode = dataplane
            .attach(iface, config.node.xdp_mode)
            .map_err(AppError::Attach)?;
        let labels = AttachLabels {
            interface: iface.clone(),
            mode: mode.as_str(),
        };
        metrics.agent.attached.get_or_create(&labels).set(1);
        info!(iface = %iface, mode = mode.as_str(), "XDP ingress and TC egress attached");
    }
    if let Some(cgroup) = &config.node.socket_lb {
        dataplane.attach_cgroup(cgroup).map_err(AppError::Attach)?;
        info!(cgroup = %cgroup.display(), "socket load balancing attached (connect, sendmsg, recvmsg, getpeername)");
    }
    for done in dataplane.settle() {
        info!("{done}");
    }
    Ok(())
}

/// Programs the first state (after the checks' first results), then starts BGP: its first
/// routes are the VIPs that can be served. From the config file a speaker that cannot start
/// stops the agent; from Kubernetes it is logged and retried at the next change.
async fn first_state<D: Dataplane, C: crate::health::monitor::Checks>(
    agent: &mut Agent<D, C>,
    k8s: Option<&mut Kubernetes>,
    events: &mut tokio::sync::mpsc::Receiver<CheckEvent>,
) -> Result<(), AppError> {
    let translation = k8s.and_then(Kubernetes::latest);
    let desired = translation
        .as_ref()
        .map_or_else(|| agent.current.desired.clone(), |t| t.desired.clone());
    let started = std::time::Instant::now();
    let (metrics, sink, node) = (
        agent.metrics.clone(),
        agent.events.clone(),
        agent.node_name.clone(),
    );
    let report = agent
        .reconciler
        .first_state(desired, events, |users, e| {
            agent::note_event(&metrics, sink.as_ref(), &node, users, e);
        })
        .await
        .map_err(AppError::FirstState)?;
    metrics.agent.observe_sync("start", started.elapsed());
    // Attached once programmed: a replaced data plane's links switch to programs whose maps
    // hold the whole state.
    attach(
        agent.reconciler.dataplane_mut(),
        &agent.current,
        &agent.metrics,
    )?;
    agent.api.readiness.attached.store(true, Ordering::Release);
    info!(services = report.added.len() + report.updated.len() + report.unchanged, took = ?started.elapsed(), "data plane programmed; ready");
    agent.report_left_out();
    if let Some(t) = translation {
        agent.apply_kubernetes(&t);
        agent.sync_bgp().await;
    } else {
        if let Some(b) = agent.current.announce.bgp.clone() {
            agent.announcer.start_bgp(&b).await?;
        }
        agent.announce();
    }
    Ok(())
}

/// The main loop: every change goes to the agent until SIGTERM/SIGINT.
async fn serve<D: Dataplane, C: crate::health::monitor::Checks>(
    agent: &mut Agent<D, C>,
    signals: &mut Signals,
    mut k8s: Option<&mut Kubernetes>,
    events: &mut tokio::sync::mpsc::Receiver<CheckEvent>,
) {
    let mut health_ports = HealthPorts::default();
    // kube-proxy's health endpoint, in Kubernetes mode as its replacement; the first state
    // (programmed by now) counts as its first update.
    let proxy = ProxyHealth::default();
    proxy.updated(std::time::SystemTime::now());
    let _healthz = match (&k8s, agent.current.node.healthz_listen) {
        (Some(_), Some(addr)) => Some(AbortOnDrop(tokio::spawn(serve_healthz(
            addr,
            proxy.clone(),
        )))),
        _ => None,
    };
    // A translation published while the first state was programmed has been seen by no one
    // yet: apply it here (reading it marks it seen, so the loop would not wake for it).
    if let Some(t) = k8s.as_mut().and_then(|k| k.latest()) {
        apply_translation(agent, &t, &mut health_ports, &proxy).await;
    }
    let mut gossip_view = agent.announcer.gossip_view();
    let mut poll = tokio::time::interval(FILE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = signals.hup.recv() => {
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
                agent.announce();
            }
            Some(t) = async { k8s.as_mut()?.translations.changed().await.ok()?; k8s.as_mut()?.latest() }, if k8s.is_some() => {
                apply_translation(agent, &t, &mut health_ports, &proxy).await;
            }
            Some(()) = async { gossip_view.as_mut()?.changed().await.ok() }, if gossip_view.is_some() => {
                agent.announce();
            }
            Some(event) = events.recv() => {
                let since = Instant::now();
                agent.note_event(&event);
                // Take every change that is already waiting, then program once.
                while let Ok(event) = events.try_recv() {
                    agent.note_event(&event);
                }
                agent.health_changed(since);
                agent.update_health_ports(&health_ports);
            }
            () = async { tokio::time::sleep_until(agent.retry.at.unwrap_or_else(Instant::now)).await }, if agent.retry.at.is_some() => {
                agent.retry();
                agent.sync_bgp().await;
                agent.update_health_ports(&health_ports);
            }
            () = signals.stop.stopped("") => break,
        }
    }
}

/// Programs a Kubernetes translation, then BGP and the health check node ports follow it.
async fn apply_translation<D: Dataplane, C: crate::health::monitor::Checks>(
    agent: &mut Agent<D, C>,
    t: &crate::sources::kubernetes::translate::Translation,
    health_ports: &mut HealthPorts,
    proxy: &ProxyHealth,
) {
    proxy.queued(std::time::SystemTime::now());
    proxy.set_node_eligible(!t.node_leaving);
    if agent.apply_kubernetes(t) {
        proxy.updated(std::time::SystemTime::now());
    }
    agent.sync_bgp().await;
    health_ports.sync(&t.health_node_ports).await;
    agent.update_health_ports(health_ports);
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves kube-proxy's health endpoint at `addr`, binding again every few seconds while the
/// address is taken (kube-proxy still running on the node, typically).
async fn serve_healthz(addr: std::net::SocketAddr, health: ProxyHealth) {
    let mut warned = false;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                info!(%addr, "serving kube-proxy's health endpoint (/healthz, /livez)");
                proxyhealth::serve(listener, health).await;
                return;
            }
            Err(e) => {
                if !warned {
                    error!(%addr, error = %e, "node.healthz_listen: cannot serve kube-proxy's health endpoint (is kube-proxy still running on this node?); retrying every 5s");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
