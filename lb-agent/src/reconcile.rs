//! The reconciler: desired state + health-check results → the data plane → one published
//! snapshot.
//!
//! It owns the [`Dataplane`], the running [`Checks`] and the [`Programmer`], and keeps three
//! things in step: the desired state it was last given, what is programmed (the desired state
//! with health applied) and the [`Snapshot`] the admin API, the metrics and the announcers
//! read. Invariants:
//! - a snapshot is published only after the maps it describes are written, so no reader ever
//!   sees a state the data plane does not have yet;
//! - a change either lands whole or is rolled back to what was programmed before (new checks
//!   start before the change is programmed and old ones stop only after it is, so a rollback
//!   finds the old checks still running with their state);
//! - the first state waits (a bounded time) for the first check results, so that no backend
//!   gets traffic before it has answered.
//!
//! It reads no file, no clock but tokio's and no socket: its tests run on the in-memory fakes
//! with a paused clock.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{error, info, warn};

use crate::{
    dataplane::{ApplyError, ApplyReport, Dataplane, LeftOut, MapError, Programmer},
    health::{
        self, CheckUser, HealthMode,
        monitor::{CheckEvent, CheckKey, Checks},
        state::Health,
    },
    model::{DesiredState, Frontend, Service},
    status::{BackendStatus, ServiceStatus, Snapshot},
};

/// How long the first state waits for the first health-check results beyond the longest
/// check timeout.
pub const FIRST_RESULTS_GRACE: Duration = Duration::from_secs(1);

/// A change that did not land.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The data plane is back as it was before the change.
    #[error("{0}")]
    RolledBack(#[source] Box<ApplyError>),
    /// Rolling back failed too: the data plane may be partly updated.
    #[error("{error}; rolling back failed too ({rollback}): the data plane may be partly updated")]
    RollbackFailed {
        #[source]
        error: ApplyError,
        rollback: Box<ApplyError>,
    },
}

impl ReconcileError {
    /// `error`, and how writing the previous state again went.
    fn after(error: ApplyError, rollback: Result<ApplyReport, ApplyError>) -> Self {
        match rollback {
            Ok(_) => Self::RolledBack(Box::new(error)),
            Err(rollback) => Self::RollbackFailed {
                error,
                rollback: Box::new(rollback),
            },
        }
    }

    /// What made the change fail.
    pub fn cause(&self) -> &ApplyError {
        match self {
            Self::RolledBack(e) => e,
            Self::RollbackFailed { error, .. } => error,
        }
    }
}

/// What [`Reconciler::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    pub report: ApplyReport,
    pub checks_started: usize,
    pub checks_stopped: usize,
}

pub struct Reconciler<D, C> {
    dataplane: D,
    checks: C,
    programmer: Programmer,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The desired state last asked for.
    requested: DesiredState,
    /// The desired state last applied: `requested` without what does not fit the data plane
    /// (or with its previous version).
    desired: DesiredState,
    /// What of `requested` does not fit.
    left_out: Vec<LeftOut>,
    /// The desired state of the last apply that failed (for a retry).
    refused: Option<DesiredState>,
    /// The checks `desired` needs, with the service backends each covers.
    wanted: BTreeMap<CheckKey, Vec<CheckUser>>,
    /// What is in the maps: `desired` with health applied.
    programmed: DesiredState,
    /// Each service's health mode as programmed.
    modes: BTreeMap<Frontend, HealthMode>,
    /// The check states `programmed` was computed from.
    states: HashMap<CheckKey, Health>,
    /// L2 mode: the VIPs answered for on L2 (None: no L2 announcement).
    announced: Option<BTreeSet<IpAddr>>,
    /// With the socket hooks: closes connected UDP sockets to backends out of rotation.
    terminator: Option<crate::dataplane::sockets::Terminator>,
    /// The statuses last published, with the programmed service each was made from (in
    /// `programmed`'s order), and what the announcers were given.
    published: Vec<(Arc<Service>, Arc<ServiceStatus>)>,
    serving: Option<Arc<crate::announce::Serving>>,
}

impl<D: Dataplane, C: Checks> Reconciler<D, C> {
    /// A reconciler that has programmed nothing yet. `l2`: this node announces VIPs on L2
    /// (the snapshot then says, per service, whether it does now).
    /// `programmer` knows what `dataplane`'s maps hold (new for fresh maps, adopted for a
    /// previous agent's: see [`crate::dataplane::programmer_for`]).
    pub fn new(
        dataplane: D,
        checks: C,
        programmer: Programmer,
        snapshot: watch::Sender<Arc<Snapshot>>,
        l2: bool,
    ) -> Self {
        Self {
            dataplane,
            checks,
            programmer,
            snapshot,
            requested: DesiredState::default(),
            desired: DesiredState::default(),
            left_out: Vec::new(),
            refused: None,
            wanted: BTreeMap::new(),
            programmed: DesiredState::default(),
            modes: BTreeMap::new(),
            states: HashMap::new(),
            announced: l2.then(BTreeSet::new),
            terminator: None,
            published: Vec::new(),
            serving: None,
        }
    }

    /// Closes connected UDP sockets to backends that leave rotation from now on.
    pub fn set_terminator(&mut self, t: crate::dataplane::sockets::Terminator) {
        self.terminator = Some(t);
    }

    /// Starts the checks of `desired`, waits until each has a result or the longest timeout
    /// (plus [`FIRST_RESULTS_GRACE`]) has passed, then programs it. `on_event` sees every
    /// check result that arrives meanwhile. On error the maps may hold part of it (the caller
    /// stops: nothing was serving before).
    /// Services that do not fit the data plane's limits are left out, as in
    /// [`Reconciler::apply`] ([`Reconciler::left_out`]).
    pub async fn first_state(
        &mut self,
        requested: DesiredState,
        events: &mut mpsc::Receiver<CheckEvent>,
        mut on_event: impl FnMut(&[CheckUser], &CheckEvent),
    ) -> Result<ApplyReport, ApplyError> {
        let (desired, left_out) = self.programmer.fit(&requested, &DesiredState::default());
        self.wanted = health::wanted_checks(&desired);
        self.checks.start(&self.wanted);
        if !self.wanted.is_empty() {
            let began = Instant::now();
            let deadline = began + self.checks.max_timeout() + FIRST_RESULTS_GRACE;
            let unknown = |c: &C| {
                c.states()
                    .values()
                    .filter(|h| **h == Health::Unknown)
                    .count()
            };
            while unknown(&self.checks) > 0 {
                tokio::select! {
                    Some(event) = events.recv() => on_event(self.users(&event.key), &event),
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            let states = self.checks.states();
            let count = |h: Health| states.values().filter(|s| **s == h).count();
            info!(
                checks = states.len(),
                up = count(Health::Up),
                down = count(Health::Down),
                unknown = count(Health::Unknown),
                took = ?began.elapsed(),
                "first health-check results"
            );
        }
        let report = self.program(&desired)?;
        self.requested = requested;
        self.desired = desired;
        self.left_out = left_out;
        self.publish();
        Ok(report)
    }

    /// Brings the data plane to `desired` (with the checks' current results): the new checks
    /// start first, the ones it drops stop once it is programmed. On error everything goes
    /// back to the previous desired state.
    ///
    /// Services that do not fit the data plane's limits are left out (their previous version
    /// stays) and listed in [`Applied::left_out`]; the rest is programmed.
    pub fn apply(&mut self, requested: DesiredState) -> Result<Applied, ReconcileError> {
        let (desired, left_out) = self.programmer.fit(&requested, &self.desired);
        let mut applied = self.apply_fitted(desired, left_out, requested)?;
        // A changed service counts with its old and new parts while it switches over; now
        // that every change is through, what was left out for that may fit.
        while !self.left_out.is_empty() {
            let (desired, left_out) = self.programmer.fit(&self.requested, &self.desired);
            if left_out.len() >= self.left_out.len() {
                break;
            }
            let more = self.apply_fitted(desired, left_out, self.requested.clone())?;
            applied.report.added.extend(more.report.added);
            applied.report.updated.extend(more.report.updated);
            applied.report.removed.extend(more.report.removed);
            applied.report.unchanged = more.report.unchanged;
            applied
                .report
                .cleanup_errors
                .extend(more.report.cleanup_errors);
            applied.checks_started += more.checks_started;
            applied.checks_stopped += more.checks_stopped;
        }
        Ok(applied)
    }

    /// [`Reconciler::apply`] of `desired`, the part of `requested` that fits.
    fn apply_fitted(
        &mut self,
        desired: DesiredState,
        left_out: Vec<LeftOut>,
        requested: DesiredState,
    ) -> Result<Applied, ReconcileError> {
        let wanted = health::wanted_checks(&desired);
        let started = self.checks.start(&wanted);
        match self.program(&desired) {
            Ok(report) => {
                let stopped = self.checks.retain(&wanted);
                self.requested = requested;
                self.desired = desired;
                self.left_out = left_out;
                self.wanted = wanted;
                self.publish();
                Ok(Applied {
                    report,
                    checks_started: started.started,
                    checks_stopped: stopped,
                })
            }
            Err(error) => {
                self.checks.retain(&self.wanted);
                let previous = self.desired.clone();
                let rollback = self.program(&previous);
                self.refused = Some(requested);
                self.forget_published();
                self.publish();
                Err(ReconcileError::after(error, rollback))
            }
        }
    }

    /// Programs the current desired state with the checks' results as they are now (after
    /// health changes). On error the previous programmed state is written again.
    pub fn reprogram(&mut self) -> Result<ApplyReport, ReconcileError> {
        let desired = self.desired.clone();
        let before = self.programmed.clone();
        match self.program(&desired) {
            Ok(report) => {
                self.publish();
                Ok(report)
            }
            Err(error) => {
                let rollback = self.programmer.apply(&before, self.dataplane.maps());
                self.forget_published();
                self.publish();
                Err(ReconcileError::after(error, rollback))
            }
        }
    }

    /// Makes the data plane answer ARP and Neighbor Solicitations for exactly `vips` (L2
    /// mode), and publishes the change.
    pub fn set_announced(&mut self, vips: BTreeSet<IpAddr>) -> Result<(), MapError> {
        self.programmer
            .set_announced(vips.clone(), self.dataplane.maps())?;
        if self.announced.as_ref() != Some(&vips) {
            self.announced = Some(vips);
            self.publish();
        }
        Ok(())
    }

    /// The service backends a check covers (empty for a check that was just stopped).
    pub fn users(&self, key: &CheckKey) -> &[CheckUser] {
        self.wanted.get(key).map_or(&[], Vec::as_slice)
    }

    /// The desired state last applied (without what does not fit the data plane).
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The desired state last asked for (applied, maybe with services left out).
    pub fn requested(&self) -> &DesiredState {
        &self.requested
    }

    /// The desired state of the last [`Reconciler::apply`] that failed, if not taken yet.
    pub fn take_refused(&mut self) -> Option<DesiredState> {
        self.refused.take()
    }

    /// What of the requested state does not fit the data plane's limits.
    pub fn left_out(&self) -> &[LeftOut] {
        &self.left_out
    }

    /// What is programmed: the desired state with health applied.
    pub fn programmed(&self) -> &DesiredState {
        &self.programmed
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dataplane
    }

    /// Stops the checks and hands back the data plane (to detach it).
    pub fn into_dataplane(self) -> D {
        drop(self.checks);
        self.dataplane
    }

    fn mode(&self, frontend: &Frontend) -> HealthMode {
        self.modes
            .get(frontend)
            .copied()
            .unwrap_or(HealthMode::Unchecked)
    }

    /// Programs `desired` with the checks' current results. On error the maps may be partly
    /// changed; the caller rolls back.
    fn program(&mut self, desired: &DesiredState) -> Result<ApplyReport, ApplyError> {
        let states = self.checks.states();
        let (effective, modes) = health::effective(desired, |k| {
            states.get(k).copied().unwrap_or(Health::Unknown)
        });
        let report = self.programmer.apply(&effective, self.dataplane.maps())?;
        for (frontend, mode) in &modes {
            let before = self.modes.get(frontend).copied();
            if before != Some(*mode) {
                log_mode(*frontend, before, *mode, &effective);
            }
        }
        if let Some(t) = &self.terminator {
            t.terminate(crate::dataplane::sockets::udp_left(
                &self.programmed,
                &effective,
            ));
        }
        self.programmed = effective;
        self.modes = modes;
        self.states = states;
        Ok(report)
    }

    /// Publishes what is programmed, for the API, the metrics and the announcers. A service
    /// without a health check whose programmed version is the one last published keeps its
    /// status (its ids cannot have changed: every failed change forgets the statuses), and
    /// what the announcers are given is worked out again only when a VIP or whether it can
    /// be served changed.
    fn publish(&mut self) {
        let old = std::mem::take(&mut self.published);
        let mut old = old.iter().peekable();
        let mut published = Vec::with_capacity(self.programmed.services.len());
        let mut same_serving = self.serving.is_some();
        for s in self.programmed.services.iter() {
            let announced = self.announced.as_ref().map(|a| a.contains(&s.frontend.vip));
            let mut before = None;
            while let Some((spec, status)) = old.peek() {
                if Arc::ptr_eq(spec, s) {
                    before = Some((true, status));
                    old.next();
                    break;
                }
                match (&spec.name, spec.frontend).cmp(&(&s.name, s.frontend)) {
                    std::cmp::Ordering::Less => {
                        same_serving = false;
                        old.next();
                    }
                    std::cmp::Ordering::Equal => {
                        before = Some((false, status));
                        old.next();
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            let status = match before {
                Some((true, status))
                    if s.health_check.is_none() && status.announced == announced =>
                {
                    Arc::clone(status)
                }
                _ => {
                    let status = Arc::new(self.status(s, announced));
                    if !before.is_some_and(|(_, b)| {
                        b.vip == status.vip && b.servable() == status.servable()
                    }) {
                        same_serving = false;
                    }
                    status
                }
            };
            published.push((Arc::clone(s), status));
        }
        if old.next().is_some() {
            same_serving = false;
        }
        let services: Vec<Arc<ServiceStatus>> =
            published.iter().map(|(_, s)| Arc::clone(s)).collect();
        let serving = match (&self.serving, same_serving) {
            (Some(s), true) => Arc::clone(s),
            _ => Arc::new(Snapshot::serving_of(&services)),
        };
        // Debug builds (the tests) check every reused status and the announcers' part against
        // a fresh one.
        #[cfg(debug_assertions)]
        {
            for (spec, status) in &published {
                let fresh = self.status(spec, status.announced);
                assert_eq!(
                    published_parts(&fresh),
                    published_parts(status),
                    "{}",
                    spec.frontend
                );
            }
            assert_eq!(*serving, Snapshot::serving_of(&services));
        }
        self.serving = Some(Arc::clone(&serving));
        self.published = published;
        // The announcers' part stays as they last published it.
        self.snapshot.send_modify(|s| {
            *s = Arc::new(Snapshot {
                services,
                left_out: self.left_out.clone(),
                announce: s.announce.clone(),
                serving: Some(serving),
            });
        });
    }

    /// Forgets the published statuses: the next publication makes every one again (after a
    /// change that failed, the programmer's ids may have changed under the same services).
    fn forget_published(&mut self) {
        self.published.clear();
        self.serving = None;
    }

    /// The status of programmed service `s`.
    fn status(&self, s: &Service, announced: Option<bool>) -> ServiceStatus {
        let programmed = self.programmer.service(&s.frontend);
        ServiceStatus {
            name: s.name.clone(),
            id: programmed.map_or(0, |p| p.id),
            vip: s.frontend.vip,
            port: s.frontend.port,
            protocol: s.frontend.protocol,
            scope: s.frontend.scope,
            check: s.health_check.as_ref().map(|h| h.probe.kind.as_str()),
            mode: self.mode(&s.frontend),
            announced,
            backends: s
                .backends
                .iter()
                .map(|b| {
                    let key = health::check_key(s, b);
                    let state = key
                        .as_ref()
                        .map(|k| self.states.get(k).copied().unwrap_or(Health::Unknown));
                    BackendStatus {
                        addr: b.addr,
                        id: programmed
                            .and_then(|p| p.backends.get(&b.addr))
                            .map_or(0, |pb| pb.id),
                        weight: b.weight,
                        healthy: state.is_none_or(|h| h == Health::Up),
                        state,
                        in_rotation: b.share() > 0,
                        source_nat: b.snat,
                        check: key.and_then(|k| self.checks.shared(&k)),
                    }
                })
                .collect(),
        }
    }
}

fn log_mode(
    frontend: Frontend,
    before: Option<HealthMode>,
    mode: HealthMode,
    state: &DesiredState,
) {
    let Some(s) = state.services.iter().find(|s| s.frontend == frontend) else {
        return;
    };
    let name = s.name.as_str();
    let frontend = frontend.to_string();
    let frontend = frontend.as_str();
    let backends = s.backends.iter().filter(|b| b.share() > 0).count();
    match mode {
        HealthMode::FailOpen => warn!(
            service = name,
            frontend,
            backends,
            "every backend failed its health check: failing open, new flows go to all of them \
             (set health_check.fail_closed to drop them instead)"
        ),
        HealthMode::FailClosed => warn!(
            service = name,
            frontend,
            "every backend failed its health check: fail_closed is set, new flows are dropped"
        ),
        HealthMode::Pending => info!(
            service = name,
            frontend, "no backend has answered its first health check yet: new flows wait"
        ),
        HealthMode::Checked
            if matches!(
                before,
                Some(HealthMode::FailOpen | HealthMode::FailClosed | HealthMode::Pending)
            ) =>
        {
            info!(
                service = name,
                backends, "healthy backends again: back to normal"
            );
        }
        _ => {}
    }
}

/// Logs a rolled-back change.
pub fn log_refused(why: &str, e: &ReconcileError) {
    match e {
        ReconcileError::RolledBack(cause) => {
            error!(reason = why, error = %cause, "applying the change failed; rolled back");
        }
        ReconcileError::RollbackFailed {
            error: cause,
            rollback,
        } => {
            error!(reason = why, error = %cause, rollback = %rollback, "applying the change failed and rolling back failed too; the data plane may be partly updated");
        }
    }
}

/// What a published status says, for the debug cross-check of reused statuses: every field,
/// with a backend's live check named by its address — the check is shared with the checker
/// thread, which changes its counters at any moment; the status must hold the same check, not
/// a copy of its counters at one instant.
#[cfg(debug_assertions)]
fn published_parts(status: &ServiceStatus) -> String {
    let mut parts = status.clone();
    let checks: Vec<Option<*const health::monitor::Shared>> = parts
        .backends
        .iter_mut()
        .map(|b| b.check.take().map(|c| Arc::as_ptr(&c)))
        .collect();
    format!("{parts:?} checks {checks:?}")
}

#[cfg(test)]
mod tests;
