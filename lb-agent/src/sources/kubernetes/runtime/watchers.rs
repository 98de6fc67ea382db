//! Watchers (with backoff) filling the stores the translation reads.

use kube::Client;
use std::{fmt::Debug, hash::Hash, sync::Arc};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

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
        self.secrets.wait_until_ready().await.map_err(lists)?;
        Ok(())
    }

    pub fn translate(&self, opts: &Options) -> Translation {
        let services = owned(self.services.state());
        let nodes = owned(self.nodes.state());
        let mut t = translate::translate(&services, &owned(self.slices.state()), &nodes, opts);
        let inputs = super::super::announce::Inputs {
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
        let (bgp, mut problems) = super::super::announce::config(&inputs);
        let (l2, l2_problems) = super::super::announce::l2(&inputs);
        problems.extend(l2_problems);
        t.bgp = bgp;
        t.l2 = l2;
        t.announce_problems = problems;
        t
    }
}
