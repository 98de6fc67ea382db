//! The published view of what the agent serves: every service with its backends, their health
//! and whether they are in rotation. The main loop builds one snapshot after each change it
//! programmed and publishes it whole (a `watch` channel); the admin API and the metrics read
//! it, so they never show a state the data plane does not have yet.

pub mod traffic;

use self::traffic::{Counters, Rates, ServiceTraffic, Traffic};

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use lb_common::drop_reason;
use serde::{Deserialize, Serialize};

use crate::{
    health::{
        HealthMode,
        monitor::{LastFailure, Shared},
        state::Health,
    },
    model::{Protocol, Scope},
};

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Shared: a service that did not change keeps its status from one snapshot to the next.
    pub services: Vec<Arc<ServiceStatus>>,
    /// Services that do not fit the data plane's limits (their previous version, if any,
    /// is in `services`).
    pub left_out: Vec<crate::dataplane::LeftOut>,
    /// L2, gossip and BGP as announced.
    pub announce: crate::announce::Status,
    /// [`Snapshot::serving`] of `services`, when the publisher worked it out (None: worked
    /// out when asked for).
    pub serving: Option<Arc<crate::announce::Serving>>,
}

impl Snapshot {
    /// What the announcers need: every VIP, and those this node can serve — at least one of
    /// its services sends new flows to a backend (with health checks: a healthy one; a
    /// service whose backends all failed — fail-open or fail-closed — or that waits for its
    /// first results does not count). In Kubernetes mode a Local-policy Service's backends
    /// are this node's endpoints only, so a node without a healthy local endpoint does not
    /// serve it.
    pub fn serving(&self) -> Arc<crate::announce::Serving> {
        match &self.serving {
            Some(s) => Arc::clone(s),
            None => Arc::new(Self::serving_of(&self.services)),
        }
    }

    /// [`Snapshot::serving`] of `services`.
    pub fn serving_of(services: &[Arc<ServiceStatus>]) -> crate::announce::Serving {
        crate::announce::Serving {
            all: services.iter().map(|s| s.vip).collect(),
            servable: services
                .iter()
                .filter(|s| s.servable())
                .map(|s| s.vip)
                .collect(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServiceStatus {
    pub name: String,
    /// The data plane's id (its counters' index).
    pub id: u32,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Which clients the frontend serves (a Kubernetes address may be two frontends: one for
    /// outside clients, one for in-cluster ones, with other endpoints).
    pub scope: Scope,
    /// The check type, when the service has a health check.
    pub check: Option<&'static str>,
    pub mode: HealthMode,
    pub backends: Vec<BackendStatus>,
    /// L2 mode: whether this node answers ARP/NDP for the VIP now (None: no L2 announcement).
    pub announced: Option<bool>,
}

impl ServiceStatus {
    pub fn checked(&self) -> bool {
        self.check.is_some()
    }

    pub fn fail_open(&self) -> bool {
        self.mode == HealthMode::FailOpen
    }

    /// It sends new flows to a backend (with health checks: a healthy one).
    pub fn servable(&self) -> bool {
        matches!(self.mode, HealthMode::Unchecked | HealthMode::Checked)
            && self.backends.iter().any(|b| b.in_rotation)
    }
}

#[derive(Clone, Debug)]
pub struct BackendStatus {
    pub addr: SocketAddr,
    /// The data plane's id (its counters' index).
    pub id: u32,
    pub weight: u32,
    /// Passes its check (or the service has none).
    pub healthy: bool,
    /// The check's state as programmed (None: not checked).
    pub state: Option<Health>,
    /// New flows may go to it (healthy with a weight, or failing open).
    pub in_rotation: bool,
    /// Flows to it are source-NATed to the node (an endpoint on another node).
    pub source_nat: bool,
    /// The live check, for its counters and last failure.
    pub check: Option<Arc<Shared>>,
}

impl BackendStatus {
    /// `ip:port`, the `backend` label.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

/// `/api/v1/services`; also what `lb-agent status` reads.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServicesJson {
    pub services: Vec<ServiceJson>,
    /// Services that do not fit the data plane's limits, and why.
    #[serde(default)]
    pub left_out: Vec<LeftOutJson>,
}

/// A service left out of the data plane.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeftOutJson {
    pub name: String,
    /// services | backends | source_ranges | endpoint_frontends
    pub limit: String,
    pub reason: String,
    /// Its previous version is still served.
    pub kept_previous: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceJson {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// both | external (clients outside the node) | internal (the node's processes and pods)
    #[serde(default)]
    pub scope: Scope,
    pub health_check: Option<String>,
    /// unchecked | checked | pending | fail_open | fail_closed
    pub health: HealthMode,
    pub backends: Vec<BackendJson>,
    /// From the last traffic sample (absent before the first).
    #[serde(default)]
    pub traffic: Option<TrafficJson>,
    /// L2 mode: this node answers ARP/NDP for the VIP now (absent without L2 announcement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendJson {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub healthy: bool,
    /// up | down | unknown | unchecked
    pub state: String,
    pub in_rotation: bool,
    /// Flows to it leave with the node's source-NAT address (an endpoint on another node).
    #[serde(default)]
    pub source_nat: bool,
    /// RFC 3339, when the check entered its state.
    pub since: Option<String>,
    pub probes: Option<u64>,
    pub last_probe_ms: Option<f64>,
    pub last_failure: Option<FailureJson>,
    #[serde(default)]
    pub traffic: Option<TrafficJson>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FailureJson {
    pub reason: String,
    pub detail: String,
    pub at: String,
}

/// Totals since the agent started serving the service (or backend), and per-second rates
/// over the last sampling period.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrafficJson {
    #[serde(flatten)]
    pub totals: Counters,
    pub rates: Rates,
    /// Drops by reason, only the reasons that happened (services only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drops: BTreeMap<String, u64>,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl From<&LastFailure> for FailureJson {
    fn from(f: &LastFailure) -> Self {
        Self {
            reason: f.kind.as_str().to_string(),
            detail: f.detail.clone(),
            at: rfc3339(f.at),
        }
    }
}

impl Snapshot {
    /// The API's view, with the traffic of `traffic` (a sample taken for this snapshot or an
    /// earlier one: series are matched by name and address).
    pub fn to_json(&self, traffic: &Traffic) -> ServicesJson {
        let index = traffic.index();
        ServicesJson {
            services: self
                .services
                .iter()
                .map(|s| {
                    let t = index
                        .get(&(s.name.as_str(), s.vip, s.port, s.protocol, s.scope))
                        .copied();
                    ServiceJson {
                        name: s.name.clone(),
                        vip: s.vip,
                        port: s.port,
                        protocol: s.protocol,
                        scope: s.scope,
                        health_check: s.check.map(str::to_string),
                        health: s.mode,
                        announced: s.announced,
                        traffic: t.map(|t| TrafficJson {
                            totals: t.totals,
                            rates: t.rates,
                            drops: drop_reason::ALL
                                .iter()
                                .filter(|c| t.drops[**c as usize] > 0)
                                .map(|c| (drop_reason::name(*c).to_string(), t.drops[*c as usize]))
                                .collect(),
                        }),
                        backends: s.backends.iter().map(|b| backend_json(b, t)).collect(),
                    }
                })
                .collect(),
            left_out: self
                .left_out
                .iter()
                .map(|l| LeftOutJson {
                    name: l.name.clone(),
                    limit: l.limit.to_string(),
                    reason: l.reason.clone(),
                    kept_previous: l.kept_previous,
                })
                .collect(),
        }
    }
}

fn backend_json(b: &BackendStatus, traffic: Option<&ServiceTraffic>) -> BackendJson {
    let live = b.check.as_ref().map(|c| c.status());
    BackendJson {
        address: b.addr.ip(),
        port: b.addr.port(),
        weight: b.weight,
        healthy: b.healthy,
        state: b.state.map_or("unchecked", Health::as_str).to_string(),
        in_rotation: b.in_rotation,
        source_nat: b.source_nat,
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
        traffic: traffic
            .and_then(|t| t.backends.iter().find(|x| x.addr == b.addr))
            .map(|x| TrafficJson {
                totals: x.totals,
                rates: x.rates,
                drops: BTreeMap::new(),
            }),
    }
}

/// Snapshots and traffic samples for tests.
#[cfg(test)]
pub mod fixtures {
    use super::*;
    use crate::status::traffic::{BackendTraffic, Counters, Rates, ServiceTraffic, Traffic};

    pub fn backend(addr: &str, id: u32, state: Option<Health>) -> BackendStatus {
        BackendStatus {
            addr: addr.parse().unwrap(),
            id,
            weight: 1,
            healthy: state.is_none_or(|h| h == Health::Up),
            state,
            in_rotation: state != Some(Health::Down),
            source_nat: false,
            check: None,
        }
    }

    pub fn service(
        name: &str,
        id: u32,
        check: Option<&'static str>,
        mode: HealthMode,
        backends: Vec<BackendStatus>,
    ) -> ServiceStatus {
        ServiceStatus {
            name: name.into(),
            id,
            vip: "198.18.100.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            scope: Scope::Both,
            check,
            mode,
            backends,
            announced: None,
        }
    }

    /// `web` (http check) over b1 (up, id 1) and b2 (down, id 2); `plain` (no check) over an
    /// IPv6 backend.
    pub fn snapshot() -> Snapshot {
        let mut plain = service(
            "plain",
            2,
            None,
            HealthMode::Unchecked,
            vec![backend("[fd00:1::11]:8080", 3, None)],
        );
        plain.port = 81;
        Snapshot {
            services: vec![
                service(
                    "web",
                    1,
                    Some("http"),
                    HealthMode::Checked,
                    vec![
                        backend("198.18.1.11:8080", 1, Some(Health::Up)),
                        backend("198.18.1.12:8080", 2, Some(Health::Down)),
                    ],
                ),
                plain,
            ]
            .into_iter()
            .map(Arc::new)
            .collect(),
            ..Snapshot::default()
        }
    }

    pub fn counters(packets_in: u64, packets_out: u64, connections: u64) -> Counters {
        Counters {
            packets_in,
            bytes_in: packets_in * 60,
            packets_out,
            bytes_out: packets_out * 1000,
            connections,
        }
    }

    /// Traffic for [`snapshot`]: web's b1 carried everything.
    pub fn traffic() -> Traffic {
        let mut drops = [0; drop_reason::SLOTS];
        drops[drop_reason::NO_BACKEND as usize] = 2;
        let rates = Rates {
            packets_in: 12.5,
            bytes_in: 750.0,
            packets_out: 10.0,
            bytes_out: 10_000.0,
            connections: 2.0,
        };
        Traffic {
            sampled: true,
            services: vec![ServiceTraffic {
                name: "web".into(),
                vip: "198.18.100.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                scope: Scope::Both,
                totals: counters(120, 100, 20),
                rates,
                drops,
                backends: vec![
                    BackendTraffic {
                        addr: "198.18.1.11:8080".parse().unwrap(),
                        totals: counters(120, 100, 20),
                        rates,
                    },
                    BackendTraffic {
                        addr: "198.18.1.12:8080".parse().unwrap(),
                        totals: Counters::default(),
                        rates: Rates::default(),
                    },
                ],
            }],
            ..Traffic::default()
        }
    }
}
