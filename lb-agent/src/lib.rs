//! weir's agent: it loads the XDP/TC data plane, programs it from a desired state (the
//! standalone config file), and serves the admin API.
//!
//! The pipeline: `config` (the one place that reads files) → `model` (pure desired state) →
//! `maglev` (pure table builder) → `dataplane` (diffing programmer, aya maps, in-memory fake);
//! `api` serves readiness; `app` runs it all.

pub mod api;
pub mod app;
pub mod config;
pub mod dataplane;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod status;
