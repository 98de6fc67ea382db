//! The Kubernetes side at run time: watchers (with backoff) filling stores of Services,
//! EndpointSlices, Nodes and IPPools; the desired state translated from the full stores after
//! every change; and, on the one agent holding the `weir` Lease, the address work written to
//! the Services' status (server-side apply, field manager `weir`) with Events for failures.

/// The API client (the one kube type the rest of the agent holds).
pub use kube::Client;
use std::{collections::BTreeMap, fmt::Debug, hash::Hash, path::Path, sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, ObjectReference, Secret, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Config, Resource, ResourceExt as _,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::{
    addresses::{self, CONDITION, Outcome},
    crd::{BGPAdvertisement, BGPPeer, IPPool, L2Advertisement},
    ipam::Allocator,
    translate::{self, Options, Translation},
};

/// The field manager of weir's server-side applies.
pub const MANAGER: &str = "weir";
/// The Lease the agents elect their leader with.
pub const LEASE: &str = "weir-leader";
/// A leader that has not renewed for this long has lost the Lease.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and the others look.
pub const LEASE_RENEW: Duration = Duration::from_secs(2);
/// A holder that could not renew for this long stops leading — well before the others may take
/// the Lease ([`LEASE_DURATION`] after its last renewal), so two never lead at once.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Changes arriving this close together are translated once.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Kubernetes mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    ReadKubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no --kubeconfig and no in-cluster credentials: {0}")]
    NoCredentials(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("waiting for the first full lists: {0}")]
    Lists(#[source] kube::runtime::reflector::store::WriterDropped),
}

/// A client from `kubeconfig`, or the in-cluster credentials.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let k = Kubeconfig::read_from(path).map_err(|source| KubeError::ReadKubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
            Config::from_custom_kubeconfig(k, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None => Config::infer().await.map_err(KubeError::NoCredentials)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// The watched objects.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub nodes: Store<Node>,
    pub pools: Store<IPPool>,
    pub bgp_peers: Store<BGPPeer>,
    pub bgp_advertisements: Store<BGPAdvertisement>,
    pub l2_advertisements: Store<L2Advertisement>,
    /// The agents' namespace's (BGP passwords).
    pub secrets: Store<Secret>,
}

/// The watchers; dropped, they stop.
pub struct Watches {
    pub stores: Stores,
    /// Counts changes to any store.
    pub changed: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn spawn_reflector<K>(api: Api<K>, changed: watch::Sender<u64>) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if std::mem::take(&mut failing) {
                        info!(kind, "watching works again");
                    }
                    changed.send_modify(|n| *n += 1);
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(kind, error = %e, "watch failed; retrying with backoff");
                    }
                }
            }
        }
    });
    (store, task)
}

/// Starts watching everything weir needs: cluster-wide, and the Secrets of `namespace`
/// (the agents').
pub fn watch_all(client: &Client, namespace: &str) -> Watches {
    let (tx, changed) = watch::channel(0u64);
    let (services, a) = spawn_reflector(Api::<Service>::all(client.clone()), tx.clone());
    let (slices, b) = spawn_reflector(Api::<EndpointSlice>::all(client.clone()), tx.clone());
    let (nodes, c) = spawn_reflector(Api::<Node>::all(client.clone()), tx.clone());
    let (pools, d) = spawn_reflector(Api::<IPPool>::all(client.clone()), tx.clone());
    let (bgp_peers, e) = spawn_reflector(Api::<BGPPeer>::all(client.clone()), tx.clone());
    let (bgp_advertisements, f) =
        spawn_reflector(Api::<BGPAdvertisement>::all(client.clone()), tx.clone());
    let (l2_advertisements, h) =
        spawn_reflector(Api::<L2Advertisement>::all(client.clone()), tx.clone());
    let (secrets, g) = spawn_reflector(Api::<Secret>::namespaced(client.clone(), namespace), tx);
    Watches {
        stores: Stores {
            services,
            slices,
            nodes,
            pools,
            bgp_peers,
            bgp_advertisements,
            l2_advertisements,
            secrets,
        },
        changed,
        tasks: vec![a, b, c, d, e, f, g, h],
    }
}

fn owned<K: Clone>(v: Vec<Arc<K>>) -> Vec<K> {
    v.into_iter().map(|k| (*k).clone()).collect()
}

impl Stores {
    /// Waits until every store has its first full list.
    pub async fn ready(&self) -> Result<(), KubeError> {
        let lists = KubeError::Lists;
        self.services.wait_until_ready().await.map_err(lists)?;
        self.slices.wait_until_ready().await.map_err(lists)?;
        self.nodes.wait_until_ready().await.map_err(lists)?;
        self.pools.wait_until_ready().await.map_err(lists)?;
        self.bgp_peers.wait_until_ready().await.map_err(lists)?;
        self.bgp_advertisements
            .wait_until_ready()
            .await
            .map_err(lists)?;
        self.l2_advertisements
            .wait_until_ready()
            .await
            .map_err(lists)?;
        self.secrets.wait_until_ready().await.map_err(lists)?;
        Ok(())
    }

    pub fn translate(&self, opts: &Options) -> Translation {
        let services = owned(self.services.state());
        let nodes = owned(self.nodes.state());
        let mut t = translate::translate(&services, &owned(self.slices.state()), &nodes, opts);
        let inputs = super::announce::Inputs {
            node: &opts.node,
            nodes: &nodes,
            peers: &owned(self.bgp_peers.state()),
            advertisements: &owned(self.bgp_advertisements.state()),
            l2_advertisements: &owned(self.l2_advertisements.state()),
            pools: &owned(self.pools.state()),
            services: &services,
            secrets: &owned(self.secrets.state()),
            default_class: opts.default_class,
        };
        let (bgp, mut problems) = super::announce::config(&inputs);
        let (l2, l2_problems) = super::announce::l2(&inputs);
        problems.extend(l2_problems);
        t.bgp = bgp;
        t.l2 = l2;
        t.announce_problems = problems;
        t
    }
}

/// Publishes a translation of the stores after their first full lists and after every
/// change (debounced); logs each Service's problems when they change.
pub async fn translate_loop(
    stores: Stores,
    mut changed: watch::Receiver<u64>,
    opts: Options,
    out: watch::Sender<Option<Arc<Translation>>>,
    leader: watch::Receiver<bool>,
    events: EventSink,
    metrics: Arc<super::metrics::KubernetesMetrics>,
) {
    tracing::debug!("translate loop: waiting for the stores");
    if let Err(e) = stores.ready().await {
        warn!(error = %e, "the Kubernetes stores never became ready");
        return;
    }
    tracing::debug!("translate loop: stores ready");
    let mut reported: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut last: Option<crate::model::DesiredState> = None;
    let mut excluded = false;
    let mut announce_reported: Vec<String> = Vec::new();
    loop {
        let t = stores.translate(&opts);
        if last.as_ref() != Some(&t.desired) {
            info!(
                services = t.desired.services.len(),
                backends = t
                    .desired
                    .services
                    .iter()
                    .map(|s| s.backends.len())
                    .sum::<usize>(),
                "Kubernetes state translated"
            );
            last = Some(t.desired.clone());
        }
        for (svc, problems) in &t.problems {
            if reported.get(svc) != Some(problems) {
                warn!(service = %svc, problems = ?problems, "part of the Service is not served");
                // Every agent sees the same problems; the leader says so on the Service.
                if *leader.borrow() {
                    events.send(ServiceEvent {
                        service: svc.clone(),
                        warning: true,
                        reason: "InvalidService",
                        note: problems.join("; "),
                    });
                }
            }
        }
        metrics.set_service_problems(&t.problems);
        reported = t.problems.clone();
        if t.announce_problems != announce_reported {
            for p in &t.announce_problems {
                warn!(problem = %p, "announcement resource left out");
            }
            if t.announce_problems.is_empty() && !announce_reported.is_empty() {
                info!("every announcement resource applies again");
            }
            announce_reported = t.announce_problems.clone();
        }
        if t.excluded != excluded {
            excluded = t.excluded;
            if excluded {
                info!(node = %opts.node, label = translate::EXCLUDE_LABEL, "this node is excluded from external load balancing: it serves nothing");
            } else {
                info!(node = %opts.node, "this node takes part in external load balancing again");
            }
        }
        out.send_replace(Some(Arc::new(t)));
        if changed.changed().await.is_err() || out.is_closed() {
            return;
        }
        tokio::time::sleep(DEBOUNCE).await;
        changed.borrow_and_update();
    }
}

/// An Event about a Service (`namespace/name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEvent {
    pub service: String,
    pub warning: bool,
    /// CamelCase.
    pub reason: &'static str,
    pub note: String,
}

/// Where Events go; sending never blocks.
#[derive(Clone, Debug)]
pub struct EventSink(tokio::sync::mpsc::UnboundedSender<ServiceEvent>);

impl EventSink {
    pub fn send(&self, e: ServiceEvent) {
        let _ = self.0.send(e);
    }
}

/// The same (Service, reason, note) at most this often.
const EVENT_INTERVAL: Duration = Duration::from_secs(10);

/// Publishes Events on the Services they are about (found in `services` for their uid),
/// at most one per [`EVENT_INTERVAL`] for the same Service, reason and note; the rest are
/// counted in the next one's note.
pub fn event_sink(
    client: Client,
    services: Store<Service>,
    identity: String,
) -> (EventSink, JoinHandle<()>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ServiceEvent>();
    let task = tokio::spawn(async move {
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "weir.dev/lb".into(),
                instance: Some(identity),
            },
        );
        let mut last: BTreeMap<(String, &'static str, String), (tokio::time::Instant, u32)> =
            BTreeMap::new();
        while let Some(e) = rx.recv().await {
            let key = (e.service.clone(), e.reason, e.note.clone());
            let now = tokio::time::Instant::now();
            let suppressed = match last.get_mut(&key) {
                Some((at, n)) if now.duration_since(*at) < EVENT_INTERVAL => {
                    *n += 1;
                    continue;
                }
                Some((_, n)) => std::mem::take(n),
                None => 0,
            };
            last.insert(key, (now, 0));
            last.retain(|_, (at, _)| now.duration_since(*at) < EVENT_INTERVAL * 6);
            let Some(svc) = services
                .state()
                .into_iter()
                .find(|s| translate::key(s) == e.service)
            else {
                continue;
            };
            let mut note = e.note;
            if suppressed > 0 {
                note.push_str(&format!(" ({suppressed} more like it suppressed)"));
            }
            let ev = Event {
                type_: if e.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: e.reason.into(),
                note: Some(note.chars().take(1000).collect()),
                action: e.reason.into(),
                secondary: None,
            };
            if let Err(err) = recorder.publish(&ev, &svc.object_ref(&())).await {
                warn!(service = %e.service, error = %err, "publishing an Event failed");
            }
        }
    });
    (EventSink(tx), task)
}

/// What the Lease says this agent should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// Nobody holds it: create it.
    Create,
    /// This agent holds it: renew.
    Renew,
    /// The holder stopped renewing: take it over.
    TakeOver,
    /// Another agent holds it.
    Follow(String),
}

/// Decides from the Lease as read at `now`.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> LeaseAction {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            LeaseAction::TakeOver
        } else {
            LeaseAction::Create
        };
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => LeaseAction::Renew,
        None | Some("") => LeaseAction::TakeOver,
        Some(holder) => {
            let duration = spec
                .lease_duration_seconds
                .map_or(LEASE_DURATION.as_secs() as i64, i64::from);
            let expired = spec
                .renew_time
                .as_ref()
                .is_none_or(|t| now.as_second() - t.0.as_second() > duration);
            if expired {
                LeaseAction::TakeOver
            } else {
                LeaseAction::Follow(holder.to_string())
            }
        }
    }
}

fn lease_spec(me: &str, now: Timestamp, previous: Option<&LeaseSpec>, takeover: bool) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: if takeover || previous.is_none() {
            Some(MicroTime(now))
        } else {
            previous.and_then(|p| p.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(
            previous.and_then(|p| p.lease_transitions).unwrap_or(0) + i32::from(takeover),
        ),
        ..LeaseSpec::default()
    }
}

/// Holds or watches the Lease in `namespace`; `leader` says whether this agent leads.
/// Writes use the Lease's resourceVersion, so two agents can never both win one round.
pub async fn lease_loop(
    client: Client,
    namespace: String,
    me: String,
    leader: watch::Sender<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut tick = tokio::time::interval(LEASE_RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renew: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        let current = match api.get_opt(LEASE).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "reading Lease {namespace}/{LEASE} failed");
                None
            }
        };
        let action = decide(current.as_ref(), &me, now);
        let result = match (&action, &current) {
            (LeaseAction::Create, _) => {
                let lease = Lease {
                    metadata: kube::api::ObjectMeta {
                        name: Some(LEASE.into()),
                        namespace: Some(namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(lease_spec(&me, now, None, false)),
                };
                api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
            (LeaseAction::Renew | LeaseAction::TakeOver, Some(l)) => {
                let mut l = l.clone();
                l.spec = Some(lease_spec(
                    &me,
                    now,
                    l.spec.as_ref(),
                    action == LeaseAction::TakeOver,
                ));
                api.replace(LEASE, &PostParams::default(), &l)
                    .await
                    .map(|_| ())
            }
            _ => Ok(()),
        };
        let won = matches!(
            action,
            LeaseAction::Create | LeaseAction::Renew | LeaseAction::TakeOver
        ) && result.is_ok();
        if won {
            last_renew = Some(tokio::time::Instant::now());
        }
        if let Err(e) = &result {
            // A conflict means another agent wrote first: it leads this round.
            info!(error = %e, "Lease not won this round");
        }
        // Leader while the last successful write is younger than the renew deadline.
        let leads = last_renew.is_some_and(|t| t.elapsed() < RENEW_DEADLINE)
            && !matches!(action, LeaseAction::Follow(_));
        if *leader.borrow() != leads {
            info!(identity = %me, leader = leads, "leadership changed");
        }
        leader.send_if_modified(|l| std::mem::replace(l, leads) != leads);
        if leader.is_closed() {
            return;
        }
    }
}

/// Gives the Lease up when this agent holds it (on a clean stop), so another agent takes
/// over at its next look instead of waiting for the Lease to expire.
pub async fn release_lease(client: Client, namespace: &str, me: &str) {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let Ok(Some(mut lease)) = api.get_opt(LEASE).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api.replace(LEASE, &PostParams::default(), &lease).await {
        Ok(_) => info!("Lease released"),
        Err(e) => warn!(error = %e, "releasing the Lease failed; it expires by itself"),
    }
}

fn current_ingress(svc: &Service) -> Vec<String> {
    addresses::status_ips(svc)
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn current_condition(svc: &Service) -> Option<(String, String, String)> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == CONDITION)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The status patch of an outcome (server-side apply: what weir omits, weir stops owning).
fn status_patch(svc: &Service, o: &Outcome, now: Timestamp) -> serde_json::Value {
    let ingress: Vec<serde_json::Value> = o
        .ingress
        .iter()
        .map(|ip| serde_json::json!({"ip": ip.to_string(), "ipMode": "VIP"}))
        .collect();
    let mut status = serde_json::json!({ "loadBalancer": { "ingress": ingress } });
    if let Some(c) = &o.condition {
        let state = if c.ok { "True" } else { "False" };
        let same = current_condition(svc).is_some_and(|(s, _, _)| s == state);
        let since = svc
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|x| x.type_ == CONDITION && same)
            .map(|x| x.last_transition_time.0.to_string())
            .unwrap_or_else(|| now.to_string());
        status["conditions"] = serde_json::json!([{
            "type": CONDITION,
            "status": state,
            "reason": c.reason,
            "message": c.message,
            "lastTransitionTime": since,
            "observedGeneration": svc.metadata.generation,
        }]);
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": svc.name_any(), "namespace": svc.namespace() },
        "status": status,
    })
}

/// While this agent leads: hands out addresses and writes them (and failures) to the
/// Services' status. A new leader starts from the Services' status (see
/// [`addresses::reconcile`]).
pub async fn address_loop(
    client: Client,
    stores: Stores,
    mut changed: watch::Receiver<u64>,
    mut leader: watch::Receiver<bool>,
    default_class: bool,
    identity: String,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "weir.dev/lb".into(),
            instance: Some(identity),
        },
    );
    if stores.ready().await.is_err() {
        return;
    }
    loop {
        // Wait to lead.
        while !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
        }
        info!("leading: handing out LoadBalancer addresses");
        let mut alloc = Allocator::default();
        while *leader.borrow() {
            let (pools, bad) = addresses::pools(&owned(stores.pools.state()));
            for (name, e) in &bad {
                warn!(pool = %name, error = %e, "IPPool left out");
            }
            alloc.set_pools(pools);
            let services = owned(stores.services.state());
            for o in addresses::reconcile(&mut alloc, &services, default_class) {
                let Some((ns, name)) = o.service.split_once('/') else {
                    continue;
                };
                let Some(svc) = services.iter().find(|s| translate::key(s) == o.service) else {
                    continue;
                };
                let want: Vec<String> = o.ingress.iter().map(ToString::to_string).collect();
                let want_cond = o.condition.as_ref().map(|c| {
                    (
                        if c.ok { "True" } else { "False" }.to_string(),
                        c.reason.to_string(),
                        c.message.clone(),
                    )
                });
                if current_ingress(svc) == want && current_condition(svc) == want_cond {
                    continue;
                }
                let api: Api<Service> = Api::namespaced(client.clone(), ns);
                let patch = status_patch(svc, &o, Timestamp::now());
                match api
                    .patch_status(
                        name,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        info!(service = %o.service, ingress = ?want, condition = ?want_cond, "Service status written")
                    }
                    Err(e) => {
                        warn!(service = %o.service, error = %e, "writing the Service status failed; retried on the next change")
                    }
                }
                if let Some(c) = o.condition.as_ref().filter(|c| !c.ok) {
                    // An Event when the failure is new (the condition above changed).
                    let reference: ObjectReference = svc.object_ref(&());
                    let ev = Event {
                        type_: EventType::Warning,
                        reason: c.reason.to_string(),
                        note: Some(c.message.clone()),
                        action: "AllocateAddress".into(),
                        secondary: None,
                    };
                    if let Err(e) = recorder.publish(&ev, &reference).await {
                        warn!(service = %o.service, error = %e, "publishing an Event failed");
                    }
                }
            }
            write_pool_status(&client, &stores, &alloc, &bad).await;
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                r = leader.changed() => if r.is_err() { return },
            }
            tokio::time::sleep(DEBOUNCE).await;
        }
        info!("no longer leading");
    }
}

/// The status an IPPool should show: addresses handed out, addresses left, and whether its
/// spec is valid (`bad`: the reason when not).
pub fn pool_status(alloc: &Allocator, name: &str, bad: Option<&String>) -> serde_json::Value {
    let pool = alloc.pools().find(|p| p.name == name);
    let assigned = alloc.assigned_in(name);
    let available = pool.map_or(0, |p| p.size(None).saturating_sub(u128::from(assigned)));
    let available = if available >= 1u128 << 64 {
        "2^64 or more".to_string()
    } else {
        available.to_string()
    };
    let (state, reason, message) = match bad {
        Some(e) => ("False", "InvalidSpec", e.clone()),
        None => (
            "True",
            "Valid",
            format!("{assigned} assigned, {available} available"),
        ),
    };
    serde_json::json!({
        "assigned": assigned,
        "available": available,
        "conditions": [{
            "type": "Valid", "status": state, "reason": reason, "message": message,
            "lastTransitionTime": Timestamp::now().to_string(),
        }],
    })
}

/// Writes each IPPool's status when it changed.
async fn write_pool_status(
    client: &Client,
    stores: &Stores,
    alloc: &Allocator,
    bad: &BTreeMap<String, String>,
) {
    let api: Api<IPPool> = Api::all(client.clone());
    for pool in stores.pools.state() {
        let name = pool.name_any();
        let want = pool_status(alloc, &name, bad.get(&name));
        let have = pool.status.as_ref();
        let same = have.is_some_and(|h| {
            serde_json::json!(h.assigned) == want["assigned"]
                && h.available == want["available"].as_str().unwrap_or_default()
                && h.conditions.first().is_some_and(|c| {
                    c.status == want["conditions"][0]["status"]
                        && c.message == want["conditions"][0]["message"]
                })
        });
        if same {
            continue;
        }
        let patch = serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "IPPool",
            "metadata": {"name": name}, "status": want,
        });
        if let Err(e) = api
            .patch_status(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            warn!(pool = %name, error = %e, "writing the IPPool status failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_status_counts_and_validity() {
        let mut alloc = Allocator::default();
        alloc.set_pools([super::super::ipam::Pool::from_spec(
            "p",
            &super::super::crd::IPPoolSpec {
                addresses: vec!["198.18.100.0/30".into(), "fd00:100::/64".into()],
                auto_assign: true,
                ..Default::default()
            },
        )
        .unwrap()]);
        let s = pool_status(&alloc, "p", None);
        assert_eq!(s["assigned"], 0);
        assert_eq!(s["available"], "2^64 or more");
        assert_eq!(s["conditions"][0]["status"], "True");
        let bad = "spec.addresses[0]: x".to_string();
        let s = pool_status(&alloc, "q", Some(&bad));
        assert_eq!(s["conditions"][0]["reason"], "InvalidSpec");
        assert_eq!(s["available"], "0");
    }

    fn lease(holder: Option<&str>, renewed_ago: i64, duration: i32) -> Lease {
        let now = Timestamp::now();
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(
                    now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(renewed_ago))
                        .unwrap(),
                )),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn the_lease_decides_who_leads() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), LeaseAction::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), 1, 15)), "a", now),
            LeaseAction::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 1, 15)), "a", now),
            LeaseAction::Follow("b".into())
        );
        // b stopped renewing 20 s ago with a 15 s lease: a takes over.
        assert_eq!(
            decide(Some(&lease(Some("b"), 20, 15)), "a", now),
            LeaseAction::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(None, 0, 15)), "a", now),
            LeaseAction::TakeOver
        );
        // A takeover counts a transition and resets the acquire time.
        let prev = lease(Some("b"), 20, 15).spec.unwrap();
        let s = lease_spec("a", now, Some(&prev), true);
        assert_eq!(s.lease_transitions, Some(1));
        assert_eq!(s.acquire_time, Some(MicroTime(now)));
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
    }
}
