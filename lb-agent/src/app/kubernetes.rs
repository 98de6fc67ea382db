//! Kubernetes mode's tasks: the watchers, the translate loop, the leader Lease, the Event sink
//! and the address allocator, started in the order the first state needs them.

use std::sync::Arc;

use tokio::{sync::watch, task::JoinHandle};
use tracing::info;

use crate::{
    config::Config,
    metrics::Metrics,
    sources::kubernetes::{
        runtime::{self as kube_runtime, EventSink},
        translate::{self, Translation},
    },
};

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
    /// The agent's DaemonSet (`DAEMONSET_NAME`): when it is gone at SIGTERM, the chart is
    /// being uninstalled and the data plane goes with the agent.
    pub daemonset: Option<String>,
}

/// The running Kubernetes side.
pub struct Kubernetes {
    pub mode: KubeMode,
    client: kube_runtime::Client,
    /// Each new translation of the stores.
    pub translations: watch::Receiver<Option<Arc<Translation>>>,
    /// Events on Kubernetes Services (health transitions).
    pub events: EventSink,
    tasks: Vec<JoinHandle<()>>,
    _watches: kube_runtime::Watches,
}

/// Starts the Lease election and the watchers, waits for the first full lists (returns None
/// when `stop` resolves first), then starts the loops that translate, send Events and give
/// out addresses, and waits for the first translation.
pub async fn start(
    mode: KubeMode,
    client: kube_runtime::Client,
    config: &Config,
    metrics: Arc<Metrics>,
    supervised: &crate::Supervised,
    stop: impl Future<Output = ()>,
) -> Result<Option<Kubernetes>, super::AppError> {
    tokio::pin!(stop);
    let watches = kube_runtime::watch_all(&client, &mode.namespace);
    let opts = translate::Options {
        node: mode.node.clone(),
        default_class: mode.default_class,
        table_size: config.maglev.table_size,
        max_services: config.dataplane.max_services,
        max_backends: config.dataplane.max_backends,
        source_nat: config.node.source_nat,
        all_types: config.node.kube_proxy_replacement,
        internal: config.node.socket_lb.is_some(),
        nodeport_addresses: config.node.nodeport_addresses.clone(),
        local_addresses: if config.node.nodeport_addresses.is_empty() {
            Vec::new()
        } else {
            crate::sys::local_addresses().map_err(super::AppError::LocalAddresses)?
        },
    };
    let mut tasks = Vec::new();
    // The Lease first: electing takes a few rounds and needs no lists.
    let (leader_tx, leader) = watch::channel(false);
    tasks.push(supervised.spawn(
        "Kubernetes lease",
        kube_runtime::lease_loop(
            client.clone(),
            mode.namespace.clone(),
            mode.identity.clone(),
            leader_tx,
        ),
    ));
    info!(node = %mode.node, identity = %mode.identity, "waiting for the first full lists from the Kubernetes API");
    // One waiter: a store's readiness wakes only the last task that polled it, so the loops
    // below start once it is known.
    tokio::select! {
        r = watches.stores.ready() => r?,
        () = &mut stop => { supervised.stopping(); abort(&tasks); return Ok(None); }
    }
    let (sink, sink_task) = kube_runtime::event_sink(
        client.clone(),
        watches.stores.services.clone(),
        mode.identity.clone(),
    );
    tasks.push(sink_task);
    let (translations_tx, mut translations) = watch::channel::<Option<Arc<Translation>>>(None);
    tasks.push(supervised.spawn(
        "Kubernetes translation",
        kube_runtime::translate_loop(
            watches.stores.clone(),
            watches.changed.clone(),
            opts,
            translations_tx,
            leader.clone(),
            sink.clone(),
            metrics.kubernetes.clone(),
        ),
    ));
    tasks.push(supervised.spawn(
        "Kubernetes addresses",
        kube_runtime::address_loop(
            client.clone(),
            watches.stores.clone(),
            watches.changed.clone(),
            leader,
            mode.default_class,
            mode.identity.clone(),
        ),
    ));
    tokio::select! {
        r = translations.wait_for(Option::is_some) => {
            r.map_err(|_| super::AppError::KubernetesStopped)?;
        }
        () = &mut stop => { supervised.stopping(); abort(&tasks); return Ok(None); }
    }
    Ok(Some(Kubernetes {
        mode,
        client,
        translations,
        events: sink,
        tasks,
        _watches: watches,
    }))
}

fn abort(tasks: &[JoinHandle<()>]) {
    for t in tasks {
        t.abort();
    }
}

impl Kubernetes {
    /// The translation last received (marked seen).
    pub fn latest(&mut self) -> Option<Arc<Translation>> {
        self.translations.borrow_and_update().clone()
    }

    /// Whether the agent's DaemonSet is gone or being deleted (an uninstall, not a restart);
    /// false when unknown (asking at most two seconds).
    pub async fn uninstalling(&self) -> bool {
        let Some(name) = &self.mode.daemonset else {
            return false;
        };
        let ask = kube_runtime::daemonset_gone(self.client.clone(), &self.mode.namespace, name);
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(2), ask).await,
            Ok(Some(true))
        )
    }

    /// Stops the tasks and gives the leader Lease up (waiting at most two seconds).
    pub async fn stop(self) {
        abort(&self.tasks);
        let release =
            kube_runtime::release_lease(self.client, &self.mode.namespace, &self.mode.identity);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), release).await;
    }
}
