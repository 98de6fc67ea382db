//! Watchers (with backoff) filling the stores the translation reads.

use kube::Client;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    hash::Hash,
    sync::Arc,
};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Resource,
    api::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::LockExt as _;

use super::super::{
    crd::{BGPAdvertisement, BGPPeer, IPPool, L2Advertisement},
    translate::{self, Options, Translation},
};

use super::*;

/// The watched objects.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub nodes: Store<Node>,
    pub pools: Lenient<IPPool>,
    pub bgp_peers: Lenient<BGPPeer>,
    pub bgp_advertisements: Lenient<BGPAdvertisement>,
    pub l2_advertisements: Lenient<L2Advertisement>,
    /// The Secrets BGPPeers name (BGP passwords), read by name from the agents' namespace.
    pub secrets: NamedSecrets,
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

/// A store of one of weir's custom resources, read leniently: objects are kept as they
/// came and decoded when read, so that one object the agent cannot decode (a value its
/// schema did not bound, written before the schema did) is reported and skipped instead of
/// failing the whole list, and with it every other object of its kind.
#[derive(Clone)]
pub struct Lenient<K> {
    store: Store<DynamicObject>,
    _kind: std::marker::PhantomData<fn() -> K>,
}

impl<K> Lenient<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    /// The objects that decode.
    pub fn state(&self) -> Vec<Arc<K>> {
        self.decoded().0
    }

    /// The objects that decode, and why each of the others does not (`Kind name: error`).
    pub fn decoded(&self) -> (Vec<Arc<K>>, Vec<String>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for obj in self.store.state() {
            let name = obj.metadata.name.clone().unwrap_or_default();
            match (*obj).clone().try_parse::<K>() {
                Ok(k) => ok.push(Arc::new(k)),
                Err(e) => bad.push(format!("{} {name}: cannot be read: {e}", K::kind(&()))),
            }
        }
        (ok, bad)
    }

    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.store.wait_until_ready().await
    }

    /// A store of `objects` as they are (for tests).
    #[cfg(test)]
    pub fn of(objects: impl IntoIterator<Item = serde_json::Value>) -> Self {
        let ar = ApiResource::erase::<K>(&());
        let mut writer = reflector::store::Writer::new(ar);
        for o in objects {
            let obj: DynamicObject = serde_json::from_value(o).expect("an object");
            writer.apply_watcher_event(&watcher::Event::Apply(obj));
        }
        let store = writer.as_reader();
        Self {
            store,
            _kind: std::marker::PhantomData,
        }
    }
}

/// The Secrets that BGPPeers name, read by name (`get`): the agent neither lists nor
/// watches the Secrets of its namespace, and holds only those it uses.
#[derive(Clone)]
pub struct NamedSecrets {
    secrets: Arc<std::sync::Mutex<BTreeMap<String, Arc<Secret>>>>,
    ready: watch::Receiver<bool>,
    /// Set by [`Stores::ready`] once the BGPPeers are listed: the reading starts then. (A
    /// store's readiness wakes only one waiter, so this task does not wait on it too.)
    peers_listed: Arc<watch::Sender<bool>>,
}

impl NamedSecrets {
    pub fn state(&self) -> Vec<Arc<Secret>> {
        self.secrets.locked().values().cloned().collect()
    }

    /// Waits until the Secrets named when the BGPPeers were first listed have been read
    /// (call once the BGPPeers' store is ready).
    pub async fn wait_until_ready(&self) -> Result<(), KubeError> {
        self.peers_listed.send_replace(true);
        let mut ready = self.ready.clone();
        // The sender never goes while the watches run; a dropped one means they stopped.
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| KubeError::WatchesStopped)
    }
}

/// Secrets are read again this often (a rotated BGP password is picked up within it), and
/// when the names the BGPPeers use change.
pub const SECRET_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// Keeps `NamedSecrets` in line with the names `peers` use; counts a change in `changed`.
fn spawn_named_secrets(
    api: Api<Secret>,
    peers: Lenient<BGPPeer>,
    mut any_change: watch::Receiver<u64>,
    changed: watch::Sender<u64>,
) -> (NamedSecrets, JoinHandle<()>) {
    let (ready_tx, ready) = watch::channel(false);
    let (listed_tx, mut listed) = watch::channel(false);
    let out = NamedSecrets {
        secrets: Arc::default(),
        ready,
        peers_listed: Arc::new(listed_tx),
    };
    let secrets = out.secrets.clone();
    let task = tokio::spawn(async move {
        if listed.wait_for(|l| *l).await.is_err() {
            return;
        }
        let mut read: Option<BTreeSet<String>> = None;
        let mut refresh = tokio::time::interval(SECRET_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            let names: BTreeSet<String> = peers
                .state()
                .iter()
                .filter_map(|p| p.spec.password_secret.as_ref().map(|r| r.name.clone()))
                .collect();
            let due = tokio::select! {
                _ = refresh.tick() => true,
                r = any_change.changed(), if read.is_some() => {
                    if r.is_err() { return; }
                    false
                }
            };
            if !due && read.as_ref() == Some(&names) {
                continue;
            }
            let mut now = BTreeMap::new();
            let mut ok = true;
            for name in &names {
                match tokio::time::timeout(CALL_TIMEOUT, api.get_opt(name)).await {
                    Ok(Ok(Some(s))) => {
                        now.insert(name.clone(), Arc::new(s));
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) if outage::is_outage(&e) => {
                        ok = false;
                        outage::failed("reading a Secret", &e);
                    }
                    Ok(Err(e)) => {
                        ok = false;
                        if !std::mem::replace(&mut failing, true) {
                            warn!(secret = %name, error = %e, "reading a Secret failed; retrying");
                        }
                    }
                    Err(_) => {
                        ok = false;
                        outage::failed("reading a Secret", &"no answer in time");
                    }
                }
                if !ok {
                    break;
                }
            }
            if !ok {
                // Keep what was read before; try again at the next tick.
                continue;
            }
            if std::mem::take(&mut failing) {
                info!("reading Secrets works again");
            }
            let differs = {
                let mut held = secrets.locked();
                let differs = *held != now;
                *held = now;
                differs
            };
            read = Some(names);
            ready_tx.send_replace(true);
            if differs {
                changed.send_modify(|n| *n += 1);
            }
        }
    });
    (out, task)
}

/// Watches `K` (one of weir's custom resources) leniently: see [`Lenient`].
fn spawn_lenient<K>(client: &Client, changed: watch::Sender<u64>) -> (Lenient<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    let ar = ApiResource::erase::<K>(&());
    let writer = reflector::store::Writer::new(ar.clone());
    let store = writer.as_reader();
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let task = watch_into(K::kind(&()).to_string(), api, writer, changed);
    (
        Lenient {
            store,
            _kind: std::marker::PhantomData,
        },
        task,
    )
}

pub(super) fn spawn_reflector<K>(
    api: Api<K>,
    changed: watch::Sender<u64>,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    (store, watch_into(kind, api, writer, changed))
}

/// kubectl's annotation with the whole object as last applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Fills `writer` from a watch of `api`, counting every change in `changed`.
fn watch_into<K>(
    kind: String,
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: watch::Sender<u64>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default())
            .backoff(outage::WatchBackoff::default())
            // What the agent never reads stays out of its stores: the field managers and
            // kubectl's copy of the last applied object are often most of an object.
            .modify(|o: &mut K| {
                kube::ResourceExt::managed_fields_mut(o).clear();
                if let Some(a) = o.meta_mut().annotations.as_mut() {
                    a.remove(LAST_APPLIED);
                }
            }),
    );
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    outage::ok();
                    changed.send_modify(|n| *n += 1);
                }
                Err(e) => match &e {
                    watcher::Error::InitialListFailed(k)
                    | watcher::Error::WatchStartFailed(k)
                    | watcher::Error::WatchFailed(k)
                        if !outage::is_outage(k) =>
                    {
                        warn!(kind, error = %e, "watch failed; retrying");
                    }
                    _ => outage::failed(&format!("watching {kind}"), &e),
                },
            }
        }
    })
}

/// Starts watching everything weir needs: cluster-wide, and the Secrets of `namespace`
/// (the agents').
pub fn watch_all(client: &Client, namespace: &str) -> Watches {
    let (tx, changed) = watch::channel(0u64);
    let (services, a) = spawn_reflector(Api::<Service>::all(client.clone()), tx.clone());
    let (slices, b) = spawn_reflector(Api::<EndpointSlice>::all(client.clone()), tx.clone());
    let (nodes, c) = spawn_reflector(Api::<Node>::all(client.clone()), tx.clone());
    let (pools, d) = spawn_lenient::<IPPool>(client, tx.clone());
    let (bgp_peers, e) = spawn_lenient::<BGPPeer>(client, tx.clone());
    let (bgp_advertisements, f) = spawn_lenient::<BGPAdvertisement>(client, tx.clone());
    let (l2_advertisements, h) = spawn_lenient::<L2Advertisement>(client, tx.clone());
    let (secrets, g) = spawn_named_secrets(
        Api::<Secret>::namespaced(client.clone(), namespace),
        bgp_peers.clone(),
        changed.clone(),
        tx,
    );
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

pub(super) fn owned<K: Clone>(v: Vec<Arc<K>>) -> Vec<K> {
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
        self.secrets.wait_until_ready().await?;
        Ok(())
    }

    /// Translates the stores, reusing what `memo` holds of the Services that did not change.
    pub fn translate(&self, opts: &Options, memo: &mut translate::Memo) -> Translation {
        let services = self.services.state();
        let nodes = self.nodes.state();
        let mut t = translate::translate_with(memo, &services, &self.slices.state(), &nodes, opts);
        // Each custom resource store decoded once: the objects, and what could not be read.
        let (peers, bad_peers) = self.bgp_peers.decoded();
        let (advertisements, bad_advertisements) = self.bgp_advertisements.decoded();
        let (l2_advertisements, bad_l2) = self.l2_advertisements.decoded();
        let (pools, bad_pools) = self.pools.decoded();
        let inputs = super::super::announce::Inputs {
            node: &opts.node,
            nodes: &nodes,
            peers: &owned(peers),
            advertisements: &owned(advertisements),
            l2_advertisements: &owned(l2_advertisements),
            pools: &owned(pools),
            services: &services,
            secrets: &owned(self.secrets.state()),
            default_class: opts.default_class,
        };
        let (bgp, mut problems) = super::super::announce::config(&inputs);
        problems.extend(bad_pools);
        problems.extend(bad_peers);
        problems.extend(bad_advertisements);
        problems.extend(bad_l2);
        let (l2, l2_problems) = super::super::announce::l2(&inputs);
        problems.extend(l2_problems);
        t.bgp = bgp;
        t.l2 = l2;
        t.announce_problems = problems;
        t
    }
}
