//! weir's agent: it loads the XDP/TC data plane, probes the backends, programs the data plane
//! from a desired state (the standalone config file) and the probes' results, and serves the
//! admin API.
//!
//! The pipeline: `config` (the one place that reads config files) → `model` (pure desired
//! state) → `health` (checkers and their scheduler; `health::effective` applies their results
//! to the model) → `maglev` (pure table builder) → `dataplane` (diffing programmer, aya maps,
//! in-memory fake). `status` is the published view of what is programmed, which `api` and
//! `metrics` read; `app` runs it all.

pub mod announce;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod sources;
pub mod status;
pub mod traffic;

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
