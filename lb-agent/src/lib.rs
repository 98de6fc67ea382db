//! weir's agent: it loads the XDP/TC data plane, probes the backends, programs the data plane
//! from a desired state (the standalone config file or Kubernetes) and the probes' results,
//! announces the VIPs, and serves the admin API and the metrics.
//!
//! The pipeline: a source (`config` or `sources::kubernetes`) builds a `model::DesiredState`;
//! `reconcile` applies `health`'s results to it, has `dataplane` program it (Maglev tables from
//! `maglev`) and publishes one `status::Snapshot`, which `announce`, `api` and `metrics` read;
//! `app` wires it all. `docs/architecture.md` draws it.
//!
//! # Layers
//!
//! Lowest first. A module uses only the modules listed before it (the `layers` test reads this
//! list and checks every `crate::` path outside test code against it):
//!
//! 1. `model`: the desired state, pure data (services, backends, health-check specs).
//! 2. `maglev`: the pure table builder.
//! 3. `health`: checkers, the rise/fall state machine, the scheduler, their metrics.
//! 4. `dataplane`: the `Dataplane` trait, the diffing programmer, aya, the in-memory fake.
//! 5. `announce`: L2, gossip, BGP and BFD, driven by what can be served.
//! 6. `status`: the published snapshot and the traffic sampled from the data plane.
//! 7. `sources`: Kubernetes watchers and translation into the model.
//! 8. `config`: the config file, the environment and `/proc` into checked settings.
//! 9. `reconcile`: desired state + health → data plane → snapshot, with rollback.
//! 10. `metrics`: the registry, each subsystem's metrics registered in it.
//! 11. `api`: the admin API.
//! 12. `app`: the process: wiring, signals, the main loop.
//! 13. `cli`: the command line's client side.
//! 14. `fuzz`: entry points for the fuzzers (`fuzz/`), over the decoders of outside input.
//!
//! Below every layer: the crate root's helpers (`LockExt`, `Supervised`) and `sys`, the sockets and
//! interfaces calls that need `unsafe`. `unsafe` is denied everywhere else but in
//! `dataplane::sys` (the `bpf()` calls).

#![deny(unsafe_code)]

pub mod announce;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod dataplane;
#[doc(hidden)]
pub mod fuzz;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod sources;
pub mod status;
mod sys;

/// A lock that outlives a panic elsewhere: the guard even when another thread panicked while
/// holding it (the shared tables here hold plain status, never half-made invariants).
pub trait LockExt<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T> LockExt<T> for std::sync::Mutex<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod layers;

/// The long-running tasks the agent cannot work without (gossip, the L2 lease, the Kubernetes
/// loops): each runs with a guard, and `/livez` fails once one has ended — returned or
/// panicked — while the agent runs, so that the kubelet restarts it.
#[derive(Clone, Debug, Default)]
pub struct Supervised(std::sync::Arc<std::sync::Mutex<SupervisedTable>>);

#[derive(Debug, Default)]
struct SupervisedTable {
    ended: Vec<String>,
    stopping: bool,
}

impl Supervised {
    /// Spawns `task` as `name`.
    pub fn spawn<F>(&self, name: &str, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let guard = Guard {
            name: name.to_string(),
            table: self.0.clone(),
        };
        tokio::spawn(async move {
            let _guard = guard;
            task.await
        })
    }

    /// The tasks that ended while the agent ran.
    pub fn ended(&self) -> Vec<String> {
        self.0.locked().ended.clone()
    }

    /// The agent stops: tasks ending from now on are expected to.
    pub fn stopping(&self) {
        self.0.locked().stopping = true;
    }
}

/// Records its task's end (dropped when the task returns, panics or is aborted).
struct Guard {
    name: String,
    table: std::sync::Arc<std::sync::Mutex<SupervisedTable>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut t = self.table.locked();
        if !t.stopping {
            tracing::error!(task = %self.name, "a supervised task ended; /livez now fails");
            t.ended.push(self.name.clone());
        }
    }
}
