//! The scheduler: one logical check per distinct (target, probe spec), however many services
//! share it, all driven by one task on the health checks' own thread. The task keeps the checks
//! in a timer queue and starts each probe when it is due; probes run concurrently (a bounded
//! number at once) and each is bounded by its timeout (at most the interval), so a slow or
//! hanging target only delays its own next probe. Each check probes at a phase derived from its
//! key, so thousands of checks spread over the interval instead of firing in lock-step; a new
//! check probes at once, so that a new backend is known as soon as possible.
//!
//! One task rather than one per check: at thousands of probes a second, per-check tasks and
//! timers cost more CPU than the probes' own system calls (wake-ups, timer-wheel work, cache
//! misses on thousands of task states).
//!
//! Results go to each check's rise/fall tracker and to a shared status the API reads; only state
//! changes go to the agent's main loop, as [`CheckEvent`]s.

use crate::LockExt as _;
use crate::model::check::Probe;
use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
    future::Future,
    hash::{Hash as _, Hasher as _},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::histogram::Histogram;

use futures_util::{StreamExt as _, stream::FuturesUnordered};
use tokio::{sync::mpsc, time::Instant};

use super::metrics::HealthMetrics;
use super::{
    CheckUser,
    probe::Prober,
    state::{Failure, FailureKind, Health, Tracker},
};

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
    /// Services using the check (metric labels), and a counter bumped when they change, so
    /// that the task reads them only then.
    services: Mutex<Arc<[String]>>,
    services_version: AtomicU64,
}

impl Shared {
    pub fn status(&self) -> CheckStatus {
        self.status.locked().clone()
    }

    fn services(&self) -> Arc<[String]> {
        self.services.locked().clone()
    }

    fn set_services(&self, services: Arc<[String]>) {
        *self.services.locked() = services;
        self.services_version.fetch_add(1, Ordering::Release);
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

/// What a [`Monitor::start`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub started: usize,
    /// Started checks that took over the state of another check of the same target.
    pub inherited: usize,
}

/// The health checks' own runtime: one thread, so that thousands of probes a second cost no
/// cross-thread wake-ups, and the agent's main loop and API never wait behind probes.
struct ProbeThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ProbeThread {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("weir-health".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping the runtime here cancels the scheduler and its probes.
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }
}

impl Drop for ProbeThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

enum Command {
    Add {
        key: Arc<CheckKey>,
        shared: Arc<Shared>,
        probe_now: bool,
    },
    Remove(Box<CheckKey>),
}

pub struct Monitor {
    checks: HashMap<CheckKey, Arc<Shared>>,
    commands: mpsc::UnboundedSender<Command>,
    /// Last: the scheduler stops with it.
    _runtime: ProbeThread,
}

/// The running checks as the reconciler sees them: [`Monitor`] probes for real; tests give
/// results by hand.
pub trait Checks {
    /// Starts the checks of `wanted` that are not running (see [`Monitor::start`]).
    fn start(&mut self, wanted: &BTreeMap<CheckKey, Vec<CheckUser>>) -> SyncReport;
    /// Stops the checks that are not in `wanted`; returns how many.
    fn retain(&mut self, wanted: &BTreeMap<CheckKey, Vec<CheckUser>>) -> usize;
    /// Every check's state now.
    fn states(&self) -> HashMap<CheckKey, Health>;
    /// The live check, for its counters and last failure.
    fn shared(&self, key: &CheckKey) -> Option<Arc<Shared>>;
    /// The longest timeout among the checks.
    fn max_timeout(&self) -> Duration;
}

impl Checks for Monitor {
    fn start(&mut self, wanted: &BTreeMap<CheckKey, Vec<CheckUser>>) -> SyncReport {
        Monitor::start(self, wanted)
    }

    fn retain(&mut self, wanted: &BTreeMap<CheckKey, Vec<CheckUser>>) -> usize {
        Monitor::retain(self, wanted)
    }

    fn states(&self) -> HashMap<CheckKey, Health> {
        Monitor::states(self)
    }

    fn shared(&self, key: &CheckKey) -> Option<Arc<Shared>> {
        Monitor::shared(self, key)
    }

    fn max_timeout(&self) -> Duration {
        Monitor::max_timeout(self)
    }
}

impl Monitor {
    /// Starts the probe thread and its scheduler, which runs at most `max_concurrent` probes at
    /// once; errors when the thread or its runtime cannot be made.
    pub fn new(
        metrics: Arc<HealthMetrics>,
        max_concurrent: usize,
    ) -> std::io::Result<(Self, mpsc::Receiver<CheckEvent>)> {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let runtime = ProbeThread::start()?;
        runtime.handle.spawn(schedule(Scheduler {
            commands: command_rx,
            prober: Arc::new(Prober::new()),
            metrics,
            events,
            max_concurrent: max_concurrent.max(1),
            checks: HashMap::new(),
            ids: HashMap::new(),
            next_id: 0,
            queue: BinaryHeap::new(),
        }));
        Ok((
            Self {
                checks: HashMap::new(),
                commands,
                _runtime: runtime,
            },
            rx,
        ))
    }

    /// Starts the checks of `wanted` (check → the service backends it covers) that are not
    /// running, and relabels the running ones; stops nothing (see [`retain`](Self::retain)),
    /// so that a change can be rolled back. A new check of a target that another check already
    /// knows (its spec changed) starts from that check's state, so changing an interval never
    /// takes a healthy backend out of rotation.
    pub fn start(&mut self, wanted: &BTreeMap<CheckKey, Vec<CheckUser>>) -> SyncReport {
        let mut report = SyncReport::default();
        let mut known: HashMap<SocketAddr, CheckStatus> = HashMap::new();
        for (key, shared) in &self.checks {
            let status = shared.status();
            if status.health() != Health::Unknown {
                known.entry(key.target).or_insert(status);
            }
        }
        for (key, users) in wanted {
            let mut services: Vec<String> = users.iter().map(|u| u.service.clone()).collect();
            services.dedup();
            let services: Arc<[String]> = services.into();
            if let Some(shared) = self.checks.get(key) {
                shared.set_services(services);
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
                services_version: AtomicU64::new(0),
            });
            let _ = self.commands.send(Command::Add {
                key: Arc::new(key.clone()),
                shared: shared.clone(),
                probe_now,
            });
            self.checks.insert(key.clone(), shared);
            report.started += 1;
        }
        report
    }

    /// Stops the checks that are not in `wanted`; returns how many.
    pub fn retain<V>(&mut self, wanted: &BTreeMap<CheckKey, V>) -> usize {
        let gone: Vec<CheckKey> = self
            .checks
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.checks.remove(key);
            let _ = self.commands.send(Command::Remove(Box::new(key.clone())));
        }
        gone.len()
    }

    /// Every check's state now.
    pub fn states(&self) -> HashMap<CheckKey, Health> {
        self.checks
            .iter()
            .map(|(k, s)| (k.clone(), s.status().health()))
            .collect()
    }

    pub fn health(&self, key: &CheckKey) -> Health {
        self.checks
            .get(key)
            .map_or(Health::Unknown, |s| s.status().health())
    }

    pub fn shared(&self, key: &CheckKey) -> Option<Arc<Shared>> {
        self.checks.get(key).cloned()
    }

    /// Checks that have no result yet.
    pub fn unknown(&self) -> usize {
        self.checks
            .values()
            .filter(|s| s.status().health() == Health::Unknown)
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

/// A check as the scheduler holds it.
struct Check {
    key: Arc<CheckKey>,
    shared: Arc<Shared>,
    start: Instant,
    phase: Duration,
    /// When it is due; the queue entry with another time is stale.
    next: Instant,
    in_flight: bool,
    /// Histograms of successful probes, per service, for the labels' version.
    ok_histograms: (Option<u64>, Vec<Histogram>),
}

type ProbeFuture = Pin<Box<dyn Future<Output = (u64, Result<(), Failure>, Duration)> + Send>>;

struct Scheduler {
    commands: mpsc::UnboundedReceiver<Command>,
    prober: Arc<Prober>,
    metrics: Arc<HealthMetrics>,
    events: mpsc::Sender<CheckEvent>,
    max_concurrent: usize,
    checks: HashMap<u64, Check>,
    ids: HashMap<Arc<CheckKey>, u64>,
    next_id: u64,
    /// (due, check id), earliest first.
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Scheduler {
    fn command(&mut self, c: Command) {
        match c {
            Command::Add {
                key,
                shared,
                probe_now,
            } => {
                let id = self.next_id;
                self.next_id += 1;
                let start = Instant::now();
                let phase = phase(&key);
                let next = if probe_now {
                    start
                } else {
                    next_tick(start, phase, key.probe.interval, start)
                };
                if let Some(old) = self.ids.insert(key.clone(), id) {
                    self.checks.remove(&old);
                }
                self.queue.push(Reverse((next, id)));
                self.checks.insert(
                    id,
                    Check {
                        key,
                        shared,
                        start,
                        phase,
                        next,
                        in_flight: false,
                        ok_histograms: (None, Vec::new()),
                    },
                );
            }
            Command::Remove(key) => {
                if let Some(id) = self.ids.remove(&*key) {
                    // A probe in flight finds its check gone and is dropped.
                    self.checks.remove(&id);
                }
            }
        }
    }

    /// The probe of check `id`, as a future that yields its result and duration.
    fn launch(&mut self, id: u64) -> Option<ProbeFuture> {
        let check = self.checks.get_mut(&id)?;
        check.in_flight = true;
        let (key, prober) = (check.key.clone(), self.prober.clone());
        Some(Box::pin(async move {
            let began = Instant::now();
            let r = prober.probe(key.target, &key.probe).await;
            (id, r, began.elapsed())
        }))
    }

    fn record(&mut self, id: u64, result: Result<(), Failure>, took: Duration) -> bool {
        let Some(check) = self.checks.get_mut(&id) else {
            return true;
        };
        check.in_flight = false;
        let key = &check.key;
        let kind = key.probe.kind.as_str();
        // The histograms of successful probes are looked up once per label change; a
        // failure's are looked up when it happens.
        let version = check.shared.services_version.load(Ordering::Acquire);
        if check.ok_histograms.0 != Some(version) {
            let services = check.shared.services();
            check.ok_histograms = (
                Some(version),
                services
                    .iter()
                    .map(|s| self.metrics.histogram(s, kind, "ok"))
                    .collect(),
            );
        }
        match &result {
            Ok(()) => {
                for h in &check.ok_histograms.1 {
                    h.observe(took.as_secs_f64());
                }
            }
            Err(f) => {
                for service in check.shared.services().iter() {
                    self.metrics
                        .observe_probe(service, kind, f.kind.as_str(), took);
                }
            }
        }
        let now = SystemTime::now();
        let event = {
            let mut s = check.shared.status.locked();
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
                        key: (**key).clone(),
                        from,
                        to,
                        failure: result.err(),
                    }
                })
        };
        // The next grid point after this probe's own (it may have started a little early) and
        // after now (it may have overrun a tick).
        let after = check.next.max(Instant::now());
        check.next = next_tick(check.start, check.phase, key.probe.interval, after);
        self.queue.push(Reverse((check.next, id)));
        let Some(e) = event else {
            return true;
        };
        match self.events.try_send(e) {
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The state is in the check's record, which the reconciler reads; only this
                // transition's log line, metric and Event are lost.
                self.metrics.events_dropped.inc();
                true
            }
            Ok(()) => true,
        }
    }
}

/// Transitions waiting for the main loop at most. It drains them all at once, so the queue
/// fills only when the loop is stuck; then transitions are counted and dropped rather than
/// held (the check states the data plane follows are kept elsewhere).
pub const EVENT_QUEUE: usize = 4096;

/// Far enough to mean "nothing due".
const IDLE: Duration = Duration::from_hours(1);

/// Probes due this soon start with the ones due now: the thread wakes for batches of probes,
/// not for each one (at thousands of probes a second, wake-ups cost more than probes).
const SLACK: Duration = Duration::from_millis(5);

async fn schedule(mut s: Scheduler) {
    let mut running: FuturesUnordered<ProbeFuture> = FuturesUnordered::new();
    let timer = tokio::time::sleep(IDLE);
    tokio::pin!(timer);
    loop {
        // Start what is due, as far as the concurrency bound allows.
        let now = Instant::now();
        while running.len() < s.max_concurrent
            && let Some(Reverse((at, id))) = s.queue.peek().copied()
            && at <= now + SLACK
        {
            s.queue.pop();
            let current = s
                .checks
                .get(&id)
                .is_some_and(|c| c.next == at && !c.in_flight);
            if current && let Some(f) = s.launch(id) {
                running.push(f);
            }
        }
        let wake = match s.queue.peek() {
            Some(Reverse((at, _))) if running.len() < s.max_concurrent => *at,
            _ => now + IDLE,
        };
        if timer.deadline() != wake {
            timer.as_mut().reset(wake);
        }
        tokio::select! {
            biased;
            c = s.commands.recv() => match c {
                Some(c) => s.command(c),
                None => return,
            },
            Some((id, result, took)) = running.next(), if !running.is_empty() => {
                if !s.record(id, result, took) {
                    return;
                }
            }
            () = &mut timer => {}
        }
    }
}

#[cfg(test)]
mod tests;
