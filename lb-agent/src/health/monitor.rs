//! The scheduler: one task per distinct check (target and probe spec), however many services
//! share it. Each task probes on its own clock, so a slow or hanging target only delays its own
//! next probe (a probe never outlives its timeout, and the timeout is at most the interval). A
//! semaphore bounds how many probes run at once. Each check starts at a phase derived from its
//! key, so thousands of checks spread over the interval instead of firing in lock-step; a new
//! check probes at once, so that a new backend is known as soon as possible.
//!
//! Results stay in the task (the rise/fall tracker) and in a shared status the API reads; only
//! state changes go to the agent's main loop, as [`CheckEvent`]s.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash as _, Hasher as _},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{
    sync::{Semaphore, mpsc},
    time::Instant,
};

use super::{
    CheckUser,
    probe::Prober,
    spec::Probe,
    state::{Failure, FailureKind, Health, Tracker},
};
use crate::metrics::HealthMetrics;

/// Probes in flight at most; the rest wait their turn (their timeout starts when they run).
pub const MAX_CONCURRENT_PROBES: usize = 1024;

/// One logical check: a target (its port is 0 for `ping`) and how to probe it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckKey {
    pub target: SocketAddr,
    pub probe: Probe,
}

/// The last failure of a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastFailure {
    pub kind: FailureKind,
    pub detail: String,
    pub at: SystemTime,
}

/// What a check knows, for the API.
#[derive(Clone, Debug)]
pub struct CheckStatus {
    pub tracker: Tracker,
    /// When the check entered its current state (None while unknown).
    pub since: Option<SystemTime>,
    pub probes: u64,
    pub last_probe: Option<SystemTime>,
    pub last_duration: Duration,
    pub last_failure: Option<LastFailure>,
}

impl CheckStatus {
    fn new(tracker: Tracker) -> Self {
        Self {
            tracker,
            since: None,
            probes: 0,
            last_probe: None,
            last_duration: Duration::ZERO,
            last_failure: None,
        }
    }

    pub fn health(&self) -> Health {
        self.tracker.health()
    }
}

/// A check's state, shared by its task, the monitor and the API.
#[derive(Debug)]
pub struct Shared {
    status: Mutex<CheckStatus>,
    /// Services using the check (metric labels).
    services: Mutex<Arc<[String]>>,
}

impl Shared {
    pub fn status(&self) -> CheckStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn services(&self) -> Arc<[String]> {
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A check changed state.
#[derive(Clone, Debug)]
pub struct CheckEvent {
    pub key: CheckKey,
    pub from: Health,
    pub to: Health,
    /// The failure that took it down.
    pub failure: Option<Failure>,
}

struct Running {
    shared: Arc<Shared>,
    task: tokio::task::AbortHandle,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a [`Monitor::start`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub started: usize,
    /// Started checks that took over the state of another check of the same target.
    pub inherited: usize,
}

pub struct Monitor {
    prober: Arc<Prober>,
    limit: Arc<Semaphore>,
    metrics: Arc<HealthMetrics>,
    events: mpsc::UnboundedSender<CheckEvent>,
    checks: HashMap<CheckKey, Running>,
}

impl Monitor {
    pub fn new(
        metrics: Arc<HealthMetrics>,
        max_concurrent: usize,
    ) -> (Self, mpsc::UnboundedReceiver<CheckEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Self {
                prober: Arc::new(Prober::new()),
                limit: Arc::new(Semaphore::new(max_concurrent.max(1))),
                metrics,
                events,
                checks: HashMap::new(),
            },
            rx,
        )
    }

    /// Starts the checks of `wanted` (check → the service backends it covers) that are not
    /// running, and relabels the running ones; stops nothing (see [`retain`](Self::retain)),
    /// so that a change can be rolled back. A new check of a target that another check already
    /// knows (its spec changed) starts from that check's state, so changing an interval never
    /// takes a healthy backend out of rotation.
    pub fn start(&mut self, wanted: &BTreeMap<CheckKey, Vec<CheckUser>>) -> SyncReport {
        let mut report = SyncReport::default();
        let mut known: HashMap<SocketAddr, CheckStatus> = HashMap::new();
        for (key, r) in &self.checks {
            let status = r.shared.status();
            if status.health() != Health::Unknown {
                known.entry(key.target).or_insert(status);
            }
        }
        for (key, users) in wanted {
            let mut services: Vec<String> = users.iter().map(|u| u.service.clone()).collect();
            services.dedup();
            let services: Arc<[String]> = services.into();
            if let Some(r) = self.checks.get(key) {
                *r.shared.services.lock().unwrap_or_else(|p| p.into_inner()) = services;
                continue;
            }
            let inherited = known.get(&key.target).cloned();
            report.inherited += usize::from(inherited.is_some());
            let probe_now = inherited.is_none();
            let mut status = inherited.unwrap_or_else(|| CheckStatus::new(Tracker::default()));
            // The new spec's rise/fall count from here.
            status.tracker = Tracker::new(status.tracker.health());
            let shared = Arc::new(Shared {
                status: Mutex::new(status),
                services: Mutex::new(services),
            });
            let task = tokio::spawn(run(
                key.clone(),
                shared.clone(),
                self.prober.clone(),
                self.limit.clone(),
                self.metrics.clone(),
                self.events.clone(),
                probe_now,
            ))
            .abort_handle();
            self.checks.insert(key.clone(), Running { shared, task });
            report.started += 1;
        }
        report
    }

    /// Stops the checks that are not in `wanted`; returns how many.
    pub fn retain<V>(&mut self, wanted: &BTreeMap<CheckKey, V>) -> usize {
        let before = self.checks.len();
        self.checks.retain(|k, _| wanted.contains_key(k));
        before - self.checks.len()
    }

    /// Every check's state now.
    pub fn states(&self) -> HashMap<CheckKey, Health> {
        self.checks
            .iter()
            .map(|(k, r)| (k.clone(), r.shared.status().health()))
            .collect()
    }

    pub fn health(&self, key: &CheckKey) -> Health {
        self.checks
            .get(key)
            .map_or(Health::Unknown, |r| r.shared.status().health())
    }

    pub fn shared(&self, key: &CheckKey) -> Option<Arc<Shared>> {
        self.checks.get(key).map(|r| r.shared.clone())
    }

    /// Checks that have no result yet.
    pub fn unknown(&self) -> usize {
        self.checks
            .values()
            .filter(|r| r.shared.status().health() == Health::Unknown)
            .count()
    }

    pub fn len(&self) -> usize {
        self.checks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// The longest timeout among the checks.
    pub fn max_timeout(&self) -> Duration {
        self.checks
            .keys()
            .map(|k| k.probe.timeout)
            .max()
            .unwrap_or_default()
    }
}

/// Where in its interval a check probes: a stable function of the check, spread evenly.
pub fn phase(key: &CheckKey) -> Duration {
    // SipHash with fixed keys: the same check gets the same phase on every start.
    #[expect(deprecated, reason = "SipHasher is the std hasher with fixed keys")]
    let mut h = std::hash::SipHasher::new();
    key.hash(&mut h);
    let interval = key.probe.interval.as_nanos().max(1) as u64;
    Duration::from_nanos(h.finish() % interval)
}

/// The first `start + phase + k * interval` after `now`.
fn next_tick(start: Instant, phase: Duration, interval: Duration, now: Instant) -> Instant {
    let first = start + phase;
    if now < first {
        return first;
    }
    let interval = interval.as_nanos().max(1);
    let k = (now - first).as_nanos() / interval + 1;
    first + Duration::from_nanos((k * interval) as u64)
}

async fn run(
    key: CheckKey,
    shared: Arc<Shared>,
    prober: Arc<Prober>,
    limit: Arc<Semaphore>,
    metrics: Arc<HealthMetrics>,
    events: mpsc::UnboundedSender<CheckEvent>,
    probe_now: bool,
) {
    let start = Instant::now();
    let phase = phase(&key);
    let mut at = if probe_now {
        start
    } else {
        next_tick(start, phase, key.probe.interval, start)
    };
    let kind = key.probe.kind.as_str();
    loop {
        tokio::time::sleep_until(at).await;
        let Ok(permit) = limit.acquire().await else {
            return;
        };
        let began = Instant::now();
        let result = prober.probe(key.target, &key.probe).await;
        let took = began.elapsed();
        drop(permit);

        let label = match &result {
            Ok(()) => "ok",
            Err(f) => f.kind.as_str(),
        };
        for service in shared.services().iter() {
            metrics.observe_probe(service, kind, label, took);
        }
        let now = SystemTime::now();
        let event = {
            let mut s = shared.status.lock().unwrap_or_else(|p| p.into_inner());
            s.probes += 1;
            s.last_probe = Some(now);
            s.last_duration = took;
            if let Err(f) = &result {
                tracing::debug!(target = %key.target, check = kind, failure = %f, "probe failed");
                s.last_failure = Some(LastFailure {
                    kind: f.kind,
                    detail: f.detail.clone(),
                    at: now,
                });
            }
            let from = s.tracker.health();
            s.tracker
                .record(result.is_ok(), key.probe.rise, key.probe.fall)
                .map(|to| {
                    s.since = Some(now);
                    CheckEvent {
                        key: key.clone(),
                        from,
                        to,
                        failure: result.err(),
                    }
                })
        };
        if let Some(e) = event
            && events.send(e).is_err()
        {
            return;
        }
        at = next_tick(start, phase, key.probe.interval, Instant::now());
    }
}

#[cfg(test)]
mod tests;
