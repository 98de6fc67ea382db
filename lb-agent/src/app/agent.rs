//! The main loop's state: the reconciler and the announcer, the config they came from, and
//! what each kind of change (a reload, a Kubernetes translation, health results, gossip)
//! does to them.

use std::{collections::HashMap, sync::Arc, time::Instant};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::checks;
use crate::{
    announce::Announcer,
    api::ApiState,
    config::{Config, ConfigError, Source},
    dataplane::{Dataplane, LeftOut},
    health::{
        CheckUser,
        monitor::{CheckEvent, Checks},
        state::Health,
    },
    metrics::Metrics,
    model::DesiredState,
    reconcile::{self, ReconcileError, Reconciler},
    sources::kubernetes::{
        healthport::HealthPorts,
        runtime::{EventSink, ServiceEvent},
        translate::Translation,
    },
    status::{ServiceStatus, Snapshot},
};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0} only changes with a restart")]
    RestartOnly(&'static str),
    #[error("node.source_nat only changes with a restart in Kubernetes mode")]
    SourceNatInKubernetes,
    /// Rolled back (the message is the cause's: the API shows what to fix).
    #[error("{}", .0.cause())]
    Apply(ReconcileError),
}

pub struct Agent<D, C> {
    pub api: ApiState,
    pub source: Source,
    /// The node settings in force (and, standalone, the services).
    pub current: Config,
    /// The config file's contents last loaded.
    pub fingerprint: Option<Vec<u8>>,
    pub reconciler: Reconciler<D, C>,
    pub announcer: Announcer,
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    pub metrics: Arc<Metrics>,
    /// The services come from Kubernetes, not from the config file.
    pub kubernetes: bool,
    pub node_name: String,
    /// Events on Kubernetes Services (health transitions).
    pub events: Option<EventSink>,
    /// The services left out of the data plane as last reported.
    pub left_out: Vec<LeftOut>,
    /// A change the data plane refused, tried again with backoff.
    pub retry: Retry,
}

/// The first retry of a refused change after this long; each failure doubles it.
pub const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
/// Retries at most this far apart.
pub const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// A refused change waiting to be tried again.
#[derive(Debug, Default)]
pub struct Retry {
    /// When (None: nothing to retry).
    pub at: Option<tokio::time::Instant>,
    delay: std::time::Duration,
    /// Kubernetes mode: the desired state that was refused.
    desired: Option<DesiredState>,
    /// Standalone: the config reload that was refused by the data plane.
    reload: bool,
    /// Failures in a row.
    pub failures: u32,
}

impl Retry {
    fn failed(&mut self) {
        self.delay = if self.failures == 0 {
            RETRY_FIRST
        } else {
            (self.delay * 2).min(RETRY_MAX)
        };
        self.failures += 1;
        self.at = Some(tokio::time::Instant::now() + self.delay);
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }
}

impl<D: Dataplane, C: Checks> Agent<D, C> {
    /// Has the announcers follow the snapshot just published, then publishes their status.
    pub fn announce(&mut self) {
        let serving = self.snapshot.borrow().serving();
        let reconciler = &mut self.reconciler;
        self.announcer
            .update(&serving, |vips| reconciler.set_announced(vips));
        let status = self.announcer.status();
        self.snapshot.send_if_modified(|s| {
            let same = s.announce.l2 == status.l2
                && s.announce.problems == status.problems
                && Arc::ptr_eq(&s.announce.bgp, &status.bgp);
            if !same {
                Arc::make_mut(s).announce = status;
            }
            !same
        });
    }

    /// Brings BGP in line with what is wanted now, advertising what can be served.
    pub async fn sync_bgp(&mut self) {
        let serving = self.snapshot.borrow().serving();
        self.announcer.sync_bgp(&serving).await;
    }

    /// Applies health changes (the first seen at `since`).
    pub fn health_changed(&mut self, since: tokio::time::Instant) {
        let started = Instant::now();
        match self.reconciler.reprogram() {
            Ok(r) if r.changed() => {
                self.metrics.agent.observe_sync("health", since.elapsed());
                info!(
                    reason = "health change",
                    updated = ?r.updated,
                    took = ?started.elapsed(),
                    "data plane updated"
                );
            }
            Ok(_) => {}
            Err(e) => {
                reconcile::log_refused("health change", &e);
                self.refused();
            }
        }
        self.announce();
    }

    /// Counts a refused change and schedules its retry.
    fn refused(&mut self) {
        self.metrics.agent.apply_failures.inc();
        self.retry.failed();
        if let Some(at) = self.retry.at {
            warn!(
                failures = self.retry.failures,
                retry_in = ?at.saturating_duration_since(tokio::time::Instant::now()),
                "the data plane refused the change; trying again"
            );
        }
    }

    /// Tries the refused change again (the desired state asked for last, or the config
    /// reload, and the health results as they are now).
    pub fn retry(&mut self) {
        self.retry.at = None;
        let desired = self.retry.desired.take();
        if let Some(d) = desired {
            self.apply(d, "retry").ok();
        } else if std::mem::take(&mut self.retry.reload) {
            self.reload("retry");
        } else {
            self.health_changed(tokio::time::Instant::now());
        }
    }

    /// Logs and counts a check's result for every service backend it covers (and sends an
    /// Event on each Kubernetes Service).
    pub fn note_event(&self, e: &CheckEvent) {
        note_event(
            &self.metrics,
            self.events.as_ref(),
            &self.node_name,
            self.reconciler.users(&e.key),
            e,
        );
    }

    /// Loads the config again and applies the difference; a refused config changes nothing.
    pub fn reload(&mut self, why: &str) {
        let started = Instant::now();
        let result = self.try_reload(why);
        match &result {
            Ok(()) => self.metrics.agent.observe_sync("config", started.elapsed()),
            // Logged where it was rolled back.
            Err(ReloadError::Apply(_)) => {}
            Err(e) => error!(
                reason = why,
                "config reload refused; the previous config stays:\n{e}"
            ),
        }
        self.api.note_config(result);
    }

    fn try_reload(&mut self, why: &str) -> Result<(), ReloadError> {
        let loaded = self.source.load_with_fingerprint();
        // A broken file is not tried again every second: only once it changes.
        self.fingerprint = match &loaded {
            Ok((_, fingerprint)) => fingerprint.clone(),
            Err(_) => self.source.fingerprint(),
        };
        let mut new = loaded?.0;
        if let Some(field) = checks::restart_only_change(&self.current, &new) {
            return Err(ReloadError::RestartOnly(field));
        }
        if self.kubernetes {
            if new.node.source_nat != self.current.node.source_nat {
                return Err(ReloadError::SourceNatInKubernetes);
            }
            // The services and BGP come from Kubernetes; the file carries node settings only.
            new.desired = self.reconciler.requested().clone();
            new.announce.bgp = self.announcer.bgp_config().cloned();
        } else if let Some(nat) = new.desired.source_nat {
            checks::source_nat_ports(nat.ports)?;
        }
        let bgp_before = self.announcer.bgp_config().cloned();
        self.announcer.set_bgp(new.announce.bgp.clone());
        if let Err(e) = self.apply(new.desired.clone(), why) {
            // The BGP configuration in force stays.
            self.announcer.set_bgp(bgp_before);
            self.retry.desired = None;
            self.retry.reload = true;
            return Err(ReloadError::Apply(e));
        }
        self.current = new;
        Ok(())
    }

    /// Applies a new translation of the Kubernetes stores (the BGP part takes effect with
    /// [`Agent::sync_bgp`]); false when the data plane refused it.
    pub fn apply_kubernetes(&mut self, t: &Translation) -> bool {
        let started = Instant::now();
        self.announcer.set_bgp(t.bgp.clone());
        self.announcer.set_problems(t.announce_problems.clone());
        self.announcer.set_l2_plan(t.l2.vips.as_ref(), &t.l2.peers);
        if t.desired == *self.reconciler.requested() && self.retry.at.is_none() {
            // The announcement resources may have changed alone.
            self.announce();
            return true;
        }
        // A refused translation is logged; the next one tries again.
        let applied = self.apply(t.desired.clone(), "Kubernetes change").is_ok();
        self.metrics
            .agent
            .observe_sync("kubernetes", started.elapsed());
        applied
    }

    /// Programs `desired` or rolls back (logging either).
    fn apply(&mut self, desired: DesiredState, why: &str) -> Result<(), ReconcileError> {
        let started = Instant::now();
        let landed = match self.reconciler.apply(desired) {
            Ok(a) => {
                info!(
                    reason = why,
                    added = ?a.report.added,
                    updated = ?a.report.updated,
                    removed = ?a.report.removed,
                    unchanged = a.report.unchanged,
                    checks_started = a.checks_started,
                    checks_stopped = a.checks_stopped,
                    took = ?started.elapsed(),
                    "applied"
                );
                for e in &a.report.cleanup_errors {
                    warn!("{e}");
                }
                // The health series of services and backends that are gone go with them.
                let removed = {
                    let snapshot = self.snapshot.borrow();
                    // Made only when a series is asked about (the series are few: failures
                    // and transitions), not per change over every service.
                    let index = std::cell::OnceCell::new();
                    let by_name = || {
                        index.get_or_init(|| {
                            let mut by_name: HashMap<&str, Vec<&ServiceStatus>> = HashMap::new();
                            for s in &snapshot.services {
                                by_name.entry(s.name.as_str()).or_default().push(&**s);
                            }
                            by_name
                        })
                    };
                    self.metrics.health.prune(
                        |service| by_name().contains_key(service),
                        |service, backend| {
                            let Ok(addr) = backend.parse::<std::net::SocketAddr>() else {
                                return false;
                            };
                            by_name().get(service).is_some_and(|frontends| {
                                frontends
                                    .iter()
                                    .any(|f| f.backends.iter().any(|b| b.addr == addr))
                            })
                        },
                    )
                };
                if removed > 0 {
                    debug!(
                        series = removed,
                        "health metric series of removed services and backends dropped"
                    );
                }
                Ok(())
            }
            Err(e) => {
                reconcile::log_refused(why, &e);
                Err(e)
            }
        };
        if landed.is_ok() {
            self.retry.succeeded();
            self.report_left_out();
        } else {
            self.retry.desired = self.reconciler.take_refused();
            self.refused();
        }
        self.announce();
        landed
    }

    /// Logs, counts and (Kubernetes mode) sends Events for the services that do not fit the
    /// data plane's limits, when that changes.
    pub fn report_left_out(&mut self) {
        let now = self.reconciler.left_out();
        if now == self.left_out.as_slice() {
            return;
        }
        for l in now.iter().filter(|l| !self.left_out.contains(l)) {
            let outcome = if l.kept_previous {
                "its previous version stays programmed"
            } else {
                "it is not served by this node"
            };
            warn!(service = %l.name, limit = l.limit, kept_previous = l.kept_previous, "service does not fit the data plane: {}; {outcome}", l.reason);
            if let Some(ev) = &self.events {
                ev.send(ServiceEvent {
                    service: l.name.clone(),
                    warning: true,
                    reason: "NotProgrammed",
                    note: format!("node {}: {}; {outcome}", self.node_name, l.reason),
                });
            }
        }
        for l in &self.left_out {
            if !now.iter().any(|n| n.name == l.name) {
                info!(service = %l.name, "service fits the data plane again and is programmed");
            }
        }
        self.metrics.agent.set_left_out(now);
        self.left_out = now.to_vec();
    }

    /// Tells each health-check node port how many of its Service's endpoints are in rotation
    /// here (distinct addresses over the Service's frontends).
    pub fn update_health_ports(&self, ports: &HealthPorts) {
        let programmed = self.reconciler.programmed();
        ports.update(|service| {
            let mut live = std::collections::BTreeSet::new();
            // The frontends outside clients reach (externalTrafficPolicy Local: this node's
            // endpoints); the in-cluster ones reach every node's.
            for s in programmed
                .services
                .iter()
                .filter(|s| s.name == service && s.frontend.scope.external())
            {
                live.extend(s.backends.iter().filter(|b| b.share() > 0).map(|b| b.addr));
            }
            live.len()
        });
    }
}

/// Logs and counts a check's result for every service backend it covers.
pub fn note_event(
    metrics: &Metrics,
    events: Option<&EventSink>,
    node: &str,
    users: &[CheckUser],
    e: &CheckEvent,
) {
    for u in users {
        let backend = u.backend.to_string();
        let check = e.key.probe.kind.as_str();
        match e.to {
            Health::Up => {
                metrics.health.transition(&u.service, &backend, true);
                if let Some(ev) = events {
                    ev.send(ServiceEvent {
                        service: u.service.clone(),
                        warning: false,
                        reason: "BackendHealthy",
                        note: format!("node {node}: backend {backend} passes its {check} check"),
                    });
                }
                info!(service = %u.service, backend, check, from = %e.from, "backend is healthy");
            }
            Health::Down => {
                metrics.health.transition(&u.service, &backend, false);
                let (reason, detail) = e
                    .failure
                    .as_ref()
                    .map_or(("", ""), |f| (f.kind.as_str(), f.detail.as_str()));
                if let Some(ev) = events {
                    ev.send(ServiceEvent {
                        service: u.service.clone(),
                        warning: true,
                        reason: "BackendUnhealthy",
                        note: format!(
                            "node {node}: backend {backend} failed its {check} check ({reason}: {detail}); no new flows go to it from this node"
                        ),
                    });
                }
                warn!(
                    service = %u.service,
                    backend,
                    check,
                    from = %e.from,
                    reason,
                    detail,
                    failures = if e.from == Health::Unknown { 1 } else { e.key.probe.fall },
                    "backend is unhealthy"
                );
            }
            Health::Unknown => {}
        }
    }
}
