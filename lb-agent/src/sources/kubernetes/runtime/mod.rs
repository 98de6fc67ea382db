//! The Kubernetes side at run time, one room per job:
//! - [`watchers`]: watchers (with backoff) filling the stores of Services, EndpointSlices,
//!   Nodes, IPPools and weir's resources;
//! - [`translator`]: the desired state translated from the full stores after every change;
//! - [`lease`]: the leader election (a `coordination.k8s.io` Lease);
//! - [`events`]: Events on Services (health transitions, address problems);
//! - [`outage`]: the API server's reachability, logged once per backoff step;
//! - [`status`]: on the leader, the address work written to the Services' and IPPools'
//!   status (server-side apply, field manager `weir`).

mod events;
mod lease;
pub mod outage;
mod status;
mod translator;
mod watchers;

/// The API client (the one kube type the rest of the agent holds).
pub use kube::Client;

pub use self::{events::*, lease::*, status::*, translator::*, watchers::*};

use std::{fmt::Debug, path::Path};

use kube::{
    Config,
    config::{KubeConfigOptions, Kubeconfig},
};

/// The field manager of weir's server-side applies.
pub const MANAGER: &str = "weir";
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
    #[error("waiting for the first full lists: the watches stopped")]
    WatchesStopped,
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
    let mut config = config;
    // A connection attempt to an API server that is away gives up soon (kube's default is
    // 30 s); the watches' and the Lease's own retries take it from there.
    config.connect_timeout = Some(CALL_TIMEOUT);
    Client::try_from(config).map_err(KubeError::Client)
}

#[cfg(test)]
mod tests;
