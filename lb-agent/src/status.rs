//! The published view of what the agent serves: every service with its backends, their health
//! and whether they are in rotation. The main loop builds one snapshot after each change it
//! programmed and publishes it whole (a `watch` channel); the admin API and the metrics read
//! it, so they never show a state the data plane does not have yet.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    health::{
        HealthMode,
        monitor::{LastFailure, Shared},
        state::Health,
    },
    model::Protocol,
};

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<ServiceStatus>,
}

#[derive(Clone, Debug)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The check type, when the service has a health check.
    pub check: Option<&'static str>,
    pub mode: HealthMode,
    pub backends: Vec<BackendStatus>,
}

impl ServiceStatus {
    pub fn checked(&self) -> bool {
        self.check.is_some()
    }

    pub fn fail_open(&self) -> bool {
        self.mode == HealthMode::FailOpen
    }
}

#[derive(Clone, Debug)]
pub struct BackendStatus {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Passes its check (or the service has none).
    pub healthy: bool,
    /// The check's state as programmed (None: not checked).
    pub state: Option<Health>,
    /// New flows may go to it (healthy with a weight, or failing open).
    pub in_rotation: bool,
    /// The live check, for its counters and last failure.
    pub check: Option<Arc<Shared>>,
}

impl BackendStatus {
    /// `ip:port`, the `backend` label.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

/// `/api/v1/services`.
#[derive(Serialize)]
pub struct ServicesJson {
    pub services: Vec<ServiceJson>,
}

#[derive(Serialize)]
pub struct ServiceJson {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub health_check: Option<&'static str>,
    /// unchecked | checked | pending | fail_open | fail_closed
    pub health: HealthMode,
    pub backends: Vec<BackendJson>,
}

#[derive(Serialize)]
pub struct BackendJson {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub healthy: bool,
    /// up | down | unknown | unchecked
    pub state: &'static str,
    pub in_rotation: bool,
    /// RFC 3339, when the check entered its state.
    pub since: Option<String>,
    pub probes: Option<u64>,
    pub last_probe_ms: Option<f64>,
    pub last_failure: Option<FailureJson>,
}

#[derive(Serialize)]
pub struct FailureJson {
    pub reason: &'static str,
    pub detail: String,
    pub at: String,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl From<&LastFailure> for FailureJson {
    fn from(f: &LastFailure) -> Self {
        Self {
            reason: f.kind.as_str(),
            detail: f.detail.clone(),
            at: rfc3339(f.at),
        }
    }
}

impl Snapshot {
    pub fn to_json(&self) -> ServicesJson {
        ServicesJson {
            services: self
                .services
                .iter()
                .map(|s| ServiceJson {
                    name: s.name.clone(),
                    vip: s.vip,
                    port: s.port,
                    protocol: s.protocol,
                    health_check: s.check,
                    health: s.mode,
                    backends: s
                        .backends
                        .iter()
                        .map(|b| {
                            let live = b.check.as_ref().map(|c| c.status());
                            BackendJson {
                                address: b.addr.ip(),
                                port: b.addr.port(),
                                weight: b.weight,
                                healthy: b.healthy,
                                state: b.state.map_or("unchecked", Health::as_str),
                                in_rotation: b.in_rotation,
                                since: live.as_ref().and_then(|l| l.since).map(rfc3339),
                                probes: live.as_ref().map(|l| l.probes),
                                last_probe_ms: live
                                    .as_ref()
                                    .filter(|l| l.probes > 0)
                                    .map(|l| l.last_duration.as_secs_f64() * 1000.0),
                                last_failure: live
                                    .as_ref()
                                    .and_then(|l| l.last_failure.as_ref())
                                    .map(FailureJson::from),
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}
