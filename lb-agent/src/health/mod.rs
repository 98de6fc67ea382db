//! Active health checks: weir probes every backend of a checked service itself and takes a
//! dead one out of that service's Maglev table within about `interval × fall`.
//!
//! - what a check is (from the config block or from Service annotations) is part of the
//!   desired state: [`crate::model::check`];
//! - [`state`]: the rise/fall state machine and failure reasons (pure);
//! - [`probe`]: the checkers (ping, tcp, udp, sctp, http, https) on real sockets;
//! - [`monitor`]: the scheduler, one task per distinct check;
//! - [`effective`]: desired state + check results → what the data plane gets (pure).

#[cfg(test)]
pub mod fake;
pub mod metrics;
pub mod monitor;
pub mod probe;
pub mod state;

use std::{collections::BTreeMap, net::SocketAddr};

use serde::Serialize;

use self::{monitor::CheckKey, state::Health};
use crate::model::check::CheckKind;
use crate::model::{Backend, DesiredState, Frontend, Service};

/// How a service's backends are chosen, given their checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthMode {
    /// No health check: every backend with a weight gets flows.
    Unchecked,
    /// Healthy backends with a weight get flows.
    Checked,
    /// No backend has answered its first check yet: no new flows until one does.
    Pending,
    /// Every backend failed its check: new flows go to all of them (the default).
    FailOpen,
    /// Every backend failed its check and `fail_closed` is set: new flows are dropped.
    FailClosed,
}

impl HealthMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unchecked => "unchecked",
            Self::Checked => "checked",
            Self::Pending => "pending",
            Self::FailOpen => "fail_open",
            Self::FailClosed => "fail_closed",
        }
    }
}

/// The check that covers `backend` of `service`, if the service has one.
pub fn check_key(service: &Service, backend: &Backend) -> Option<CheckKey> {
    let hc = service.health_check.as_ref()?;
    let port = match hc.probe.kind {
        CheckKind::Ping => 0,
        _ => hc.port.unwrap_or(backend.addr.port()),
    };
    Some(CheckKey {
        target: SocketAddr::new(backend.addr.ip(), port),
        probe: hc.probe.clone(),
    })
}

/// A backend of a service that a check covers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CheckUser {
    pub service: String,
    pub backend: SocketAddr,
}

/// Every check the desired state needs, with the service backends it covers.
pub fn wanted_checks(desired: &DesiredState) -> BTreeMap<CheckKey, Vec<CheckUser>> {
    let mut wanted: BTreeMap<CheckKey, Vec<CheckUser>> = BTreeMap::new();
    for s in desired.services.iter().filter(|s| s.health_check.is_some()) {
        for b in &s.backends {
            if let Some(k) = check_key(s, b) {
                wanted.entry(k).or_default().push(CheckUser {
                    service: s.name.clone(),
                    backend: b.addr,
                });
            }
        }
    }
    wanted
}

/// What the data plane should carry: `desired` with each backend's `available` flag set from
/// its check, and the mode of every checked service (by frontend; the others are
/// [`HealthMode::Unchecked`]: a Kubernetes Service with several
/// ports or families is several model services of one name).
///
/// For a checked service, backends that are up are available. When no backend with a weight is
/// up: if none has answered yet the service waits (`Pending`, nothing available); otherwise it
/// fails open to every backend with a weight, or, with `fail_closed`, drops new flows.
pub fn effective(
    desired: &DesiredState,
    health: impl Fn(&CheckKey) -> Health,
) -> (DesiredState, BTreeMap<Frontend, HealthMode>) {
    let mut modes = BTreeMap::new();
    let mut out = desired.clone();
    for i in 0..desired.services.len() {
        let s = &desired.services[i];
        let Some(hc) = &s.health_check else {
            continue;
        };
        let states: Vec<Health> = s
            .backends
            .iter()
            .map(|b| check_key(s, b).map_or(Health::Up, |k| health(&k)))
            .collect();
        let active = |i: &usize| s.backends[*i].weight > 0;
        let indices = 0..s.backends.len();
        let any_up = indices
            .clone()
            .filter(active)
            .any(|i| states[i] == Health::Up);
        let all_unknown = indices
            .clone()
            .filter(active)
            .all(|i| states[i] == Health::Unknown);
        let has_active = indices.clone().any(|i| active(&i));
        let mode = if any_up || !has_active {
            HealthMode::Checked
        } else if all_unknown {
            HealthMode::Pending
        } else if hc.fail_closed {
            HealthMode::FailClosed
        } else {
            HealthMode::FailOpen
        };
        let available = |b: &Backend, state: &Health| -> bool {
            *state == Health::Up || (mode == HealthMode::FailOpen && b.weight > 0)
        };
        modes.insert(s.frontend, mode);
        // A service whose flags stay as they are stays the same allocation.
        if s.backends
            .iter()
            .zip(&states)
            .any(|(b, state)| b.available != available(b, state))
        {
            // The list is copied at the first service that changes, once.
            let s = &mut std::sync::Arc::make_mut(&mut out.services)[i];
            for (b, state) in std::sync::Arc::make_mut(s).backends.iter_mut().zip(&states) {
                b.available = available(b, state);
            }
        }
    }
    (out, modes)
}

#[cfg(test)]
mod tests;
