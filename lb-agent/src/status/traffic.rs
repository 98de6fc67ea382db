//! Traffic accounting. A sampler reads the data plane's counters once a second
//! ([`SAMPLE_EVERY`]) and turns its per-id counters into per-service and per-backend totals and
//! rates, published whole on a `watch` channel for the metrics, the admin API and
//! `lb-agent status`.
//!
//! The data plane counts by id, and ids are reused (their counters zeroed first). A total is
//! kept per label set (service name and frontend; service and backend address), so it never
//! goes backwards within one agent life: when the id behind a label set changes, or its
//! counters drop (an id freed and taken again between two samples), what was read last is
//! carried into the total.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use lb_common::{BackendStats, ServiceStats, datapath_stat, drop_reason};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tracing::warn;

use crate::{
    dataplane::inspect::{Inspect, TableFill},
    model::{Protocol, Scope},
    status::{ServiceStatus, Snapshot},
};

/// How often the counters are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The tables with per-flow state are walked every this many samples (a walk reads every
/// entry).
pub const TABLES_EVERY: u32 = 5;

/// Totals since the label set first appeared in this agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Client → backend packets and bytes (IP header included).
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Backend → client.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// New flows.
    pub connections: u64,
}

/// Per second, over the last sampling period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub packets_in: f64,
    pub bytes_in: f64,
    pub packets_out: f64,
    pub bytes_out: f64,
    pub connections: f64,
}

impl Rates {
    fn between(now: &Counters, before: &Counters, seconds: f64) -> Self {
        let r = |a: u64, b: u64| a.saturating_sub(b) as f64 / seconds;
        Self {
            packets_in: r(now.packets_in, before.packets_in),
            bytes_in: r(now.bytes_in, before.bytes_in),
            packets_out: r(now.packets_out, before.packets_out),
            bytes_out: r(now.bytes_out, before.bytes_out),
            connections: r(now.connections, before.connections),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceTraffic {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
    pub totals: Counters,
    pub rates: Rates,
    /// By `drop_reason` code.
    pub drops: [u64; drop_reason::SLOTS],
    pub backends: Vec<BackendTraffic>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendTraffic {
    pub addr: SocketAddr,
    pub totals: Counters,
    pub rates: Rates,
}

/// One sample of every counter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    /// False until the first sample.
    pub sampled: bool,
    pub services: Vec<ServiceTraffic>,
    /// Drops no service could be charged with (no service on the port, malformed, ...).
    pub unattributed_drops: [u64; drop_reason::SLOTS],
    /// `DATAPATH_STATS`, by `datapath_stat` slot.
    pub datapath: [u64; datapath_stat::SLOTS],
    /// From the last walk of the tables with per-flow state.
    pub tables: Option<Vec<TableFill>>,
    /// Samples that failed to read the maps, since start.
    pub errors: u64,
}

impl Traffic {
    /// The first service named `name` (a Kubernetes Service with several ports or families is
    /// several services of one name: see [`Traffic::at`]).
    pub fn service(&self, name: &str) -> Option<&ServiceTraffic> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Every frontend's series by its labels, for a lookup per frontend without a scan (a
    /// sample has one series per frontend; where labels repeat, the first wins, as in
    /// [`Traffic::find`]).
    pub fn index(&self) -> HashMap<FrontendRef<'_>, &ServiceTraffic> {
        let mut index = HashMap::with_capacity(self.services.len());
        for s in &self.services {
            index
                .entry((s.name.as_str(), s.vip, s.port, s.protocol, s.scope))
                .or_insert(s);
        }
        index
    }

    /// The series of one frontend of service `name`.
    pub fn find(
        &self,
        name: &str,
        vip: IpAddr,
        port: u16,
        protocol: Protocol,
        scope: Scope,
    ) -> Option<&ServiceTraffic> {
        self.services.iter().find(|s| {
            s.name == name
                && s.vip == vip
                && s.port == port
                && s.protocol == protocol
                && s.scope == scope
        })
    }
}

const SERVICE_FIELDS: usize = 5 + drop_reason::SLOTS;
const BACKEND_FIELDS: usize = 5;

fn service_fields(s: &ServiceStats) -> [u64; SERVICE_FIELDS] {
    let mut f = [0; SERVICE_FIELDS];
    f[..5].copy_from_slice(&[
        s.packets_in,
        s.bytes_in,
        s.packets_out,
        s.bytes_out,
        s.new_flows,
    ]);
    f[5..].copy_from_slice(&s.drops);
    f
}

fn backend_fields(b: &BackendStats) -> [u64; BACKEND_FIELDS] {
    [
        b.packets_in,
        b.bytes_in,
        b.packets_out,
        b.bytes_out,
        b.new_flows,
    ]
}

fn counters(f: &[u64]) -> Counters {
    Counters {
        packets_in: f[0],
        bytes_in: f[1],
        packets_out: f[2],
        bytes_out: f[3],
        connections: f[4],
    }
}

/// One label set's total over the ids that carried it.
#[derive(Clone, Debug)]
struct Series<const N: usize> {
    id: u32,
    last: [u64; N],
    base: [u64; N],
}

impl<const N: usize> Series<N> {
    fn new(id: u32) -> Self {
        Self {
            id,
            last: [0; N],
            base: [0; N],
        }
    }

    /// Takes a reading of `id`; returns the total.
    fn update(&mut self, id: u32, raw: [u64; N]) -> [u64; N] {
        let went_back = raw.iter().zip(&self.last).any(|(r, l)| r < l);
        if id != self.id || went_back {
            for (b, l) in self.base.iter_mut().zip(self.last) {
                *b += l;
            }
        }
        self.id = id;
        self.last = raw;
        let mut total = self.base;
        for (t, r) in total.iter_mut().zip(raw) {
            *t += r;
        }
        total
    }
}

/// A frontend's labels, borrowed: (service name, address, port, protocol, scope).
pub type FrontendRef<'a> = (&'a str, IpAddr, u16, Protocol, Scope);

fn labels(s: &ServiceStatus) -> FrontendRef<'_> {
    (s.name.as_str(), s.vip, s.port, s.protocol, s.scope)
}

/// Per-id readings → per-label-set totals and rates (see the module docs). One entry per
/// service of the snapshot last sampled, in its order: a snapshot that shares a service's
/// status with the one before keeps its entry where it is, so a sample of thousands of
/// frontends costs an array read per frontend and backend, not a lookup by labels.
#[derive(Debug, Default)]
pub struct Accounting {
    /// The snapshot's services the entries are for.
    statuses: Vec<Arc<ServiceStatus>>,
    entries: Vec<Entry>,
    previous: Option<(Instant, Arc<Traffic>)>,
    errors: u64,
}

#[derive(Debug)]
struct Entry {
    service: Series<SERVICE_FIELDS>,
    /// The totals of the last sample (for the rates; None: not in it).
    last: Option<Counters>,
    /// By the status's backends, in their order.
    backends: Vec<BackendEntry>,
    /// Backends that left the service: their totals continue if they come back (pods
    /// turning unready).
    departed: Vec<(SocketAddr, BackendEntry)>,
}

#[derive(Debug)]
struct BackendEntry {
    series: Series<BACKEND_FIELDS>,
    last: Option<Counters>,
}

impl BackendEntry {
    fn new(id: u32) -> Self {
        Self {
            series: Series::new(id),
            last: None,
        }
    }
}

impl Entry {
    fn new(s: &ServiceStatus) -> Self {
        Self {
            service: Series::new(s.id),
            last: None,
            backends: s.backends.iter().map(|b| BackendEntry::new(b.id)).collect(),
            departed: Vec::new(),
        }
    }

    /// From `old`'s backends to `new`'s (the same frontend), by address.
    fn realign(&mut self, old: &ServiceStatus, new: &ServiceStatus) {
        let mut pool: Vec<(SocketAddr, BackendEntry)> = old
            .backends
            .iter()
            .map(|b| b.addr)
            .zip(self.backends.drain(..))
            .chain(self.departed.drain(..))
            .collect();
        self.backends = new
            .backends
            .iter()
            .map(|b| match pool.iter().position(|(a, _)| *a == b.addr) {
                Some(i) => pool.swap_remove(i).1,
                None => BackendEntry::new(b.id),
            })
            .collect();
        self.departed = pool;
    }
}

impl Accounting {
    /// Brings the entries in line with `services`: a status shared with the last sample's
    /// keeps its entry; another of the same labels takes that entry over (its backends by
    /// address); a new one starts from zero; a service that is gone takes its totals with it.
    fn align(&mut self, services: &[Arc<ServiceStatus>]) {
        if self.statuses.len() == services.len()
            && self
                .statuses
                .iter()
                .zip(services)
                .all(|(a, b)| Arc::ptr_eq(a, b))
        {
            return;
        }
        let old_statuses = std::mem::take(&mut self.statuses);
        let mut old: Vec<Option<Entry>> = std::mem::take(&mut self.entries)
            .into_iter()
            .map(Some)
            .collect();
        let mut by_labels: HashMap<FrontendRef<'_>, usize, foldhash::fast::RandomState> =
            HashMap::default();
        by_labels.reserve(old_statuses.len());
        for (i, s) in old_statuses.iter().enumerate() {
            by_labels.entry(labels(s)).or_insert(i);
        }
        let mut entries = Vec::with_capacity(services.len());
        for (i, s) in services.iter().enumerate() {
            let same_place = old_statuses.get(i).is_some_and(|o| Arc::ptr_eq(o, s));
            let entry = match (same_place, old.get_mut(i).and_then(Option::take)) {
                (true, Some(e)) => e,
                (_, taken) => {
                    // Not the one at this place: put it back.
                    if let Some(e) = taken {
                        old[i] = Some(e);
                    }
                    match by_labels
                        .get(&labels(s))
                        .and_then(|j| old[*j].take().map(|e| (*j, e)))
                    {
                        Some((j, mut e)) => {
                            if !Arc::ptr_eq(&old_statuses[j], s) {
                                e.realign(&old_statuses[j], s);
                            }
                            e
                        }
                        None => Entry::new(s),
                    }
                }
            };
            entries.push(entry);
        }
        self.statuses = services.to_vec();
        self.entries = entries;
    }

    /// Folds one reading of the counters (taken after `snapshot` was published) into a sample.
    pub fn update(
        &mut self,
        snapshot: &Snapshot,
        raw: &crate::dataplane::inspect::RawCounters,
        tables: Option<Vec<TableFill>>,
        now: Instant,
    ) -> Arc<Traffic> {
        let zero_service = ServiceStats::default();
        let zero_backend = BackendStats::default();
        let seconds = self
            .previous
            .as_ref()
            .map(|(t, _)| now.duration_since(*t).as_secs_f64());
        let rate = |now: &Counters, before: Option<Counters>| match (before, seconds) {
            (Some(b), Some(secs)) if secs > 0.0 => Rates::between(now, &b, secs),
            _ => Rates::default(),
        };
        self.align(&snapshot.services);
        let mut services = Vec::with_capacity(snapshot.services.len());
        for (s, e) in self.statuses.iter().zip(&mut self.entries) {
            let reading = raw.services.get(s.id as usize).unwrap_or(&zero_service);
            let total = e.service.update(s.id, service_fields(reading));
            let totals = counters(&total);
            let rates = rate(&totals, e.last.replace(totals));
            let backends = s
                .backends
                .iter()
                .zip(&mut e.backends)
                .map(|(b, be)| {
                    let reading = raw.backends.get(b.id as usize).unwrap_or(&zero_backend);
                    let totals = counters(&be.series.update(b.id, backend_fields(reading)));
                    BackendTraffic {
                        addr: b.addr,
                        totals,
                        rates: rate(&totals, be.last.replace(totals)),
                    }
                })
                .collect();
            // Not in this sample: no rate from it when they come back.
            for (_, d) in &mut e.departed {
                d.last = None;
            }
            let mut drops = [0; drop_reason::SLOTS];
            drops.copy_from_slice(&total[5..]);
            services.push(ServiceTraffic {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
                scope: s.scope,
                rates,
                totals,
                drops,
                backends,
            });
        }
        let unattributed = raw.services.first().copied().unwrap_or_default();
        let traffic = Arc::new(Traffic {
            sampled: true,
            services,
            unattributed_drops: unattributed.drops,
            datapath: raw.datapath.counters,
            tables: tables.or_else(|| self.previous.as_ref().and_then(|(_, p)| p.tables.clone())),
            errors: self.errors,
        });
        self.previous = Some((now, traffic.clone()));
        traffic
    }

    /// Counts a failed reading.
    pub fn failed(&mut self) {
        self.errors += 1;
    }
}

/// What the sampling thread is asked for: a reading for this snapshot (with a walk of the
/// flow tables or not), and where the sample goes.
type Request = (
    Arc<Snapshot>,
    bool,
    tokio::sync::oneshot::Sender<Result<Arc<Traffic>, String>>,
);

/// The sampler threads' nice value: below the agent's other work.
pub const SAMPLER_NICE: i32 = 10;

/// Reads the counters every [`SAMPLE_EVERY`] and publishes each sample until `out` has no
/// receivers left.
///
/// The reading and the accounting run on a thread of their own at a lower priority
/// ([`SAMPLER_NICE`]): with thousands of frontends they take tens of milliseconds, and a
/// change on its way to the maps must not wait behind them on a busy node.
pub async fn sample(
    inspector: Arc<dyn Inspect>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    out: watch::Sender<Arc<Traffic>>,
) {
    let (requests, incoming) = std::sync::mpsc::channel::<Request>();
    let worker = std::thread::Builder::new()
        .name("weir-sampler".into())
        .spawn(move || {
            if let Err(e) = crate::sys::lower_thread_priority(SAMPLER_NICE) {
                tracing::debug!(error = %e, "the sampler keeps the agent's priority");
            }
            let mut accounting = Accounting::default();
            while let Ok((snap, walk, reply)) = incoming.recv() {
                let _ = reply.send(read(&*inspector, &mut accounting, &snap, walk));
            }
        });
    if let Err(e) = worker {
        warn!(error = %e, "no thread for the traffic sampler: no traffic metrics");
        return;
    }
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u32;
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        if out.is_closed() {
            return;
        }
        let snap = snapshot.borrow().clone();
        let walk = n.is_multiple_of(TABLES_EVERY);
        n = n.wrapping_add(1);
        let (reply, answer) = tokio::sync::oneshot::channel();
        if requests.send((snap, walk, reply)).is_err() {
            warn!("the traffic sampler's thread stopped: no traffic metrics");
            return;
        }
        match answer.await {
            Ok(Ok(traffic)) => {
                if last_error.take().is_some() {
                    tracing::info!("reading the data plane's counters works again");
                }
                out.send_replace(traffic);
            }
            Ok(Err(e)) => {
                // Say it once per distinct error, not every second.
                if last_error.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "reading the data plane's counters failed; metrics are stale");
                    last_error = Some(e);
                }
            }
            Err(_) => {
                warn!("the traffic sampler's thread stopped: no traffic metrics");
                return;
            }
        }
    }
}

/// One sample: the counters (and, with `walk`, the flow tables) read for `snap`'s ids.
fn read(
    inspector: &dyn Inspect,
    accounting: &mut Accounting,
    snap: &Snapshot,
    walk: bool,
) -> Result<Arc<Traffic>, String> {
    let services = snap
        .services
        .iter()
        .map(|s| s.id)
        .max()
        .map_or(1, |m| m + 1);
    let backends = snap
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.id))
        .max()
        .map_or(0, |m| m + 1);
    let reading = inspector.counters(services, backends).and_then(|raw| {
        let entries = if walk {
            Some(inspector.tables()?)
        } else {
            None
        };
        Ok((raw, entries))
    });
    match reading {
        Ok((raw, entries)) => Ok(accounting.update(snap, &raw, entries, Instant::now())),
        Err(e) => {
            accounting.failed();
            Err(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests;
