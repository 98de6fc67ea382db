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
    collections::{HashMap, HashSet},
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
    status::Snapshot,
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

type ServiceLabels = (String, IpAddr, u16, Protocol, Scope);
/// A frontend's labels, borrowed: (service name, address, port, protocol, scope).
pub type FrontendRef<'a> = (&'a str, IpAddr, u16, Protocol, Scope);
type BackendLabels = (String, IpAddr, u16, Protocol, Scope, SocketAddr);

/// Per-id readings → per-label-set totals and rates (see the module docs).
#[derive(Debug, Default)]
pub struct Accounting {
    services: HashMap<ServiceLabels, Series<SERVICE_FIELDS>>,
    backends: HashMap<BackendLabels, Series<BACKEND_FIELDS>>,
    previous: Option<(Instant, Arc<Traffic>)>,
    errors: u64,
}

impl Accounting {
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
        let previous = self.previous.as_ref();
        let seconds = previous.map(|(t, _)| now.duration_since(*t).as_secs_f64());
        // Lookups by label, not scans: a node serves thousands of frontends.
        let before_index = previous.map(|(_, p)| p.index());
        let mut services = Vec::with_capacity(snapshot.services.len());
        for s in &snapshot.services {
            let labels = (s.name.clone(), s.vip, s.port, s.protocol, s.scope);
            let reading = raw.services.get(s.id as usize).unwrap_or(&zero_service);
            let total = self
                .services
                .entry(labels)
                .or_insert_with(|| Series::new(s.id))
                .update(s.id, service_fields(reading));
            let before = before_index.as_ref().and_then(|i| {
                i.get(&(s.name.as_str(), s.vip, s.port, s.protocol, s.scope))
                    .copied()
            });
            let backends_before: HashMap<SocketAddr, &Counters> = before
                .map(|p| p.backends.iter().map(|x| (x.addr, &x.totals)).collect())
                .unwrap_or_default();
            let totals = counters(&total);
            let rate = |now: &Counters, before: Option<&Counters>| match (before, seconds) {
                (Some(b), Some(secs)) if secs > 0.0 => Rates::between(now, b, secs),
                _ => Rates::default(),
            };
            let backends = s
                .backends
                .iter()
                .map(|b| {
                    let reading = raw.backends.get(b.id as usize).unwrap_or(&zero_backend);
                    let total = self
                        .backends
                        .entry((s.name.clone(), s.vip, s.port, s.protocol, s.scope, b.addr))
                        .or_insert_with(|| Series::new(b.id))
                        .update(b.id, backend_fields(reading));
                    let totals = counters(&total);
                    let was = backends_before.get(&b.addr).copied();
                    BackendTraffic {
                        addr: b.addr,
                        totals,
                        rates: rate(&totals, was),
                    }
                })
                .collect();
            let mut drops = [0; drop_reason::SLOTS];
            drops.copy_from_slice(&total[5..]);
            services.push(ServiceTraffic {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
                scope: s.scope,
                rates: rate(&totals, before.map(|p| &p.totals)),
                totals,
                drops,
                backends,
            });
        }
        // Keep the totals of label sets that are still served. A service that is gone takes
        // its backends' totals with it; a backend that left a service that stays keeps its
        // total, so that it continues if the backend comes back (pods turning unready).
        let served_set: HashSet<FrontendRef<'_>> = snapshot
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.vip, s.port, s.protocol, s.scope))
            .collect();
        let served =
            |name: &String, vip: &IpAddr, port: &u16, protocol: &Protocol, scope: &Scope| {
                served_set.contains(&(name.as_str(), *vip, *port, *protocol, *scope))
            };
        self.services
            .retain(|(name, vip, port, protocol, scope), _| {
                served(name, vip, port, protocol, scope)
            });
        self.backends
            .retain(|(name, vip, port, protocol, scope, _), _| {
                served(name, vip, port, protocol, scope)
            });
        let unattributed = raw.services.first().copied().unwrap_or_default();
        let traffic = Arc::new(Traffic {
            sampled: true,
            services,
            unattributed_drops: unattributed.drops,
            datapath: raw.datapath.counters,
            tables: tables.or_else(|| previous.and_then(|(_, p)| p.tables.clone())),
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

/// Reads the counters every [`SAMPLE_EVERY`] and publishes each sample until `out` has no
/// receivers left.
pub async fn sample(
    inspector: Arc<dyn Inspect>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    out: watch::Sender<Arc<Traffic>>,
) {
    let mut accounting = Accounting::default();
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
        let walk = n.is_multiple_of(TABLES_EVERY);
        n = n.wrapping_add(1);
        let reading = inspector.counters(services, backends).and_then(|raw| {
            let entries = if walk {
                Some(inspector.tables()?)
            } else {
                None
            };
            Ok((raw, entries))
        });
        match reading {
            Ok((raw, entries)) => {
                if last_error.take().is_some() {
                    tracing::info!("reading the data plane's counters works again");
                }
                let traffic = accounting.update(&snap, &raw, entries, Instant::now());
                out.send_replace(traffic);
            }
            Err(e) => {
                accounting.failed();
                let e = e.to_string();
                // Say it once per distinct error, not every second.
                if last_error.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "reading the data plane's counters failed; metrics are stale");
                    last_error = Some(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
