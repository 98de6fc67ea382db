//! The agent's metrics: one prometheus-client registry with the `weir` prefix. Each subsystem
//! owns a struct of its metrics; what describes the current state (backend health, the
//! traffic counters) is read at scrape time from the published status snapshot and the last
//! traffic sample, so a removed backend's series goes with it. Labels come only from bounded
//! sets: configured services and backends, interfaces, and fixed lists (directions, drop
//! reasons, paths, check types and results).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};
use tokio::sync::watch;

use lb_common::{datapath_stat, drop_reason};

use crate::{
    health::metrics::HealthMetrics,
    sources::kubernetes::metrics::KubernetesMetrics,
    status::Snapshot,
    status::traffic::{Counters, ServiceTraffic, Traffic},
};

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Gauges read from the status snapshot: `weir_backend_healthy`, `weir_service_fail_open`,
/// `weir_l2_announced`.
#[derive(Debug)]
struct SnapshotGauges(watch::Receiver<Arc<Snapshot>>);

impl Collector for SnapshotGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.borrow().clone();
        {
            let mut m = encoder.encode_descriptor(
                "backend_healthy",
                "1 when the backend passes its service's health check (or the service has none), else 0",
                None,
                MetricType::Gauge,
            )?;
            // One series per (service, backend): a backend behind several frontends of one
            // Kubernetes Service counts as healthy only if every check of it passes.
            let mut healthy: BTreeMap<(&str, String), bool> = BTreeMap::new();
            for s in &snapshot.services {
                for b in &s.backends {
                    *healthy
                        .entry((s.name.as_str(), b.endpoint()))
                        .or_insert(true) &= b.healthy;
                }
            }
            for ((service, backend), ok) in &healthy {
                let labels = [("service", *service), ("backend", backend.as_str())];
                ConstGauge::new(i64::from(*ok)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "service_fail_open",
            "1 while every backend of the service is unhealthy and it sends to all of them (fail-open)",
            None,
            MetricType::Gauge,
        )?;
        let mut open: BTreeMap<&str, bool> = BTreeMap::new();
        for s in snapshot.services.iter().filter(|s| s.checked()) {
            *open.entry(s.name.as_str()).or_insert(false) |= s.fail_open();
        }
        for (service, open) in open {
            ConstGauge::new(i64::from(open)).encode(m.encode_family(&[("service", service)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "l2_announced",
            "1 while this node answers ARP/NDP for the VIP (L2 announcement), 0 while another node does",
            None,
            MetricType::Gauge,
        )?;
        let mut vips: BTreeMap<String, bool> = BTreeMap::new();
        for s in &snapshot.services {
            if let Some(a) = s.announced {
                *vips.entry(s.vip.to_string()).or_insert(false) |= a;
            }
        }
        for (vip, on) in &vips {
            ConstGauge::new(i64::from(*on)).encode(m.encode_family(&[("vip", vip.as_str())])?)?;
        }
        Ok(())
    }
}

/// Sync durations: 100 µs to 10 s.
const SYNC_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// start | config | health
    pub trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttachLabels {
    pub interface: String,
    /// native | generic
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeftOutLabels {
    pub service: String,
    /// services | backends | source_ranges | endpoint_frontends
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StartLabels {
    /// unpinned | fresh | adopted | replaced
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The agent's own metrics: data-plane syncs, config reloads, attachments.
#[derive(Debug)]
pub struct AgentMetrics {
    /// `weir_dataplane_sync_duration_seconds`: desired-state change → maps programmed.
    pub sync_duration: HistogramFamily<TriggerLabels>,
    /// `weir_config_reloads_total`: reload attempts (refused ones included).
    pub reloads: Counter,
    /// `weir_config_reload_failures_total`.
    pub reload_failures: Counter,
    /// `weir_config_last_reload_successful`.
    pub last_reload_ok: Gauge,
    /// `weir_dataplane_attached`: 1 per interface the programs are attached to.
    pub attached: Family<AttachLabels, Gauge>,
    /// `weir_dataplane_map_memory_bytes`: the fixed-size maps' kernel memory (estimated).
    pub map_memory: Gauge,
    /// `weir_dataplane_left_out`: 1 per service that does not fit the data plane's limits.
    left_out: Family<LeftOutLabels, Gauge>,
    /// `weir_dataplane_apply_failures_total`: changes the data plane refused (rolled back,
    /// then retried).
    pub apply_failures: Counter,
    /// `weir_dataplane_start`: 1 for how this agent's data plane came to be.
    start: Family<StartLabels, Gauge>,
    build: Family<BuildLabels, Gauge>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let m = Self {
            sync_duration: Family::new_with_constructor(|| Histogram::new(SYNC_BUCKETS)),
            reloads: Counter::default(),
            reload_failures: Counter::default(),
            last_reload_ok: Gauge::default(),
            attached: Family::default(),
            start: Family::default(),
            map_memory: Gauge::default(),
            left_out: Family::default(),
            apply_failures: Counter::default(),
            build: Family::default(),
        };
        m.last_reload_ok.set(1);
        m.build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        m
    }
}

impl AgentMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "dataplane_sync_duration_seconds",
            "Time from a desired-state change (start, config, health) to the maps being programmed",
            self.sync_duration.clone(),
        );
        r.register(
            "config_reloads",
            "Config reload attempts (SIGHUP or a changed file), refused ones included",
            self.reloads.clone(),
        );
        r.register(
            "config_reload_failures",
            "Config reloads refused or failed; the previous config kept serving",
            self.reload_failures.clone(),
        );
        r.register(
            "config_last_reload_successful",
            "1 when the last config reload was applied (or none was tried), 0 when it failed",
            self.last_reload_ok.clone(),
        );
        r.register(
            "dataplane_attached",
            "1 for each interface the XDP and TC programs are attached to, with the XDP mode",
            self.attached.clone(),
        );
        r.register(
            "dataplane_map_memory_bytes",
            "Kernel memory of the data plane's fixed-size maps at their configured capacities \
             (estimated; the Maglev tables come on top: 8 bytes per slot per service)",
            self.map_memory.clone(),
        );
        r.register(
            "dataplane_left_out",
            "1 for each service that does not fit the data plane's limits (services, backends, \
             source_ranges, endpoint_frontends): left out, or kept at its previous version",
            self.left_out.clone(),
        );
        r.register(
            "dataplane_apply_failures",
            "Changes the data plane refused and rolled back; each is retried with backoff",
            self.apply_failures.clone(),
        );
        r.register(
            "dataplane_start",
            "1 for what this agent found when it loaded the data plane: unpinned, fresh, adopted \
             (a previous agent's pinned maps, with their connections and counters) or replaced \
             (a pinned data plane of another layout or capacity, which this agent does not read)",
            self.start.clone(),
        );
        r.register(
            "build_info",
            "The agent's version; always 1",
            self.build.clone(),
        );
    }

    /// Sets the left-out gauge to exactly `left_out`.
    pub fn set_left_out(&self, left_out: &[crate::dataplane::LeftOut]) {
        self.left_out.clear();
        for l in left_out {
            self.left_out
                .get_or_create(&LeftOutLabels {
                    service: l.name.clone(),
                    limit: l.limit,
                })
                .set(1);
        }
    }

    /// Records how the data plane came to be.
    pub fn note_start(&self, outcome: &'static str) {
        self.start.get_or_create(&StartLabels { outcome }).set(1);
    }

    pub fn observe_sync(&self, trigger: &'static str, took: Duration) {
        self.sync_duration
            .get_or_create(&TriggerLabels { trigger })
            .observe(took.as_secs_f64());
    }

    /// Counts a config reload attempt.
    pub fn reload(&self, ok: bool) {
        self.reloads.inc();
        if !ok {
            self.reload_failures.inc();
        }
        self.last_reload_ok.set(i64::from(ok));
    }
}

/// The traffic counters of the last sample (see [`crate::status::traffic`]).
#[derive(Debug)]
struct TrafficCollector(watch::Receiver<Arc<Traffic>>);

const DIRECTIONS: [&str; 2] = ["in", "out"];

/// `DATAPATH_STATS` slots exported as `weir_dataplane_packets_total{path}`.
const PATHS: [(usize, &str); 9] = [
    (datapath_stat::FWD_REDIRECT, "redirect"),
    (datapath_stat::FWD_KERNEL, "kernel"),
    (datapath_stat::ICMP_ECHO_REPLY, "icmp_echo_reply"),
    (
        datapath_stat::ICMP_ERROR_TO_BACKEND,
        "icmp_error_to_backend",
    ),
    (datapath_stat::REVNAT, "reverse_nat"),
    (datapath_stat::SNAT_REPLY, "snat_reply"),
    (datapath_stat::REVNAT_FRAGMENT, "reverse_nat_fragment"),
    (datapath_stat::ARP_REPLY, "arp_reply"),
    (datapath_stat::NEIGHBOR_ADVERT, "neighbor_advert"),
];

fn add(to: &mut Counters, c: &Counters) {
    to.packets_in += c.packets_in;
    to.bytes_in += c.bytes_in;
    to.packets_out += c.packets_out;
    to.bytes_out += c.bytes_out;
    to.connections += c.connections;
}

fn counter<'a>(
    encoder: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &'a str,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, std::fmt::Error> {
    encoder.encode_descriptor(name, help, None, MetricType::Counter)
}

impl Collector for TrafficCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = self.0.borrow().clone();
        if !t.sampled {
            return Ok(());
        }
        // One series per frontend address: the external and internal frontends of one
        // address (other endpoints for in-cluster clients) are summed.
        let mut merged: Vec<ServiceTraffic> = Vec::with_capacity(t.services.len());
        for s in &t.services {
            match merged.iter_mut().find(|m| {
                m.name == s.name && m.vip == s.vip && m.port == s.port && m.protocol == s.protocol
            }) {
                Some(m) => {
                    add(&mut m.totals, &s.totals);
                    for (d, x) in m.drops.iter_mut().zip(s.drops) {
                        *d += x;
                    }
                }
                None => merged.push(s.clone()),
            }
        }
        let services: Vec<_> = merged
            .iter()
            .map(|s| {
                let port = s.port.to_string();
                (s, s.vip.to_string(), port)
            })
            .collect();
        let per_direction = |c: &Counters, packets: bool| {
            if packets {
                [c.packets_in, c.packets_out]
            } else {
                [c.bytes_in, c.bytes_out]
            }
        };
        for (name, help, packets) in [
            (
                "service_packets",
                "Packets through a service's VIP (in: client to backend, out: backend to client)",
                true,
            ),
            (
                "service_bytes",
                "Bytes (IP header included) through a service's VIP, by direction",
                false,
            ),
        ] {
            let mut m = counter(&mut encoder, name, help)?;
            for (s, vip, port) in &services {
                for (direction, v) in DIRECTIONS.iter().zip(per_direction(&s.totals, packets)) {
                    let labels = [
                        ("service", s.name.as_str()),
                        ("vip", vip.as_str()),
                        ("port", port.as_str()),
                        ("protocol", s.protocol.as_str()),
                        ("direction", direction),
                    ];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = counter(
                &mut encoder,
                "service_connections",
                "New flows (connections) a service steered to a backend",
            )?;
            for (s, vip, port) in &services {
                let labels = [
                    ("service", s.name.as_str()),
                    ("vip", vip.as_str()),
                    ("port", port.as_str()),
                    ("protocol", s.protocol.as_str()),
                ];
                ConstCounter::new(s.totals.connections).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = counter(
                &mut encoder,
                "service_drops",
                "Packets to a service that the data plane dropped, by reason",
            )?;
            for (s, vip, port) in &services {
                for code in drop_reason::ALL {
                    let labels = [
                        ("service", s.name.as_str()),
                        ("vip", vip.as_str()),
                        ("port", port.as_str()),
                        ("protocol", s.protocol.as_str()),
                        ("reason", drop_reason::name(code)),
                    ];
                    ConstCounter::new(s.drops[code as usize]).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        // One series per (service, backend): summed over the frontends of one Kubernetes
        // Service that reach the same backend.
        let mut backends: BTreeMap<(&str, String), Counters> = BTreeMap::new();
        for s in &t.services {
            for b in &s.backends {
                add(
                    backends
                        .entry((s.name.as_str(), b.addr.to_string()))
                        .or_default(),
                    &b.totals,
                );
            }
        }
        for (name, help, packets) in [
            (
                "backend_packets",
                "Packets a backend got from (in) and sent back through (out) a service",
                true,
            ),
            (
                "backend_bytes",
                "Bytes (IP header included) between a service and a backend, by direction",
                false,
            ),
        ] {
            let mut m = counter(&mut encoder, name, help)?;
            for ((service, backend), c) in &backends {
                for (direction, v) in DIRECTIONS.iter().zip(per_direction(c, packets)) {
                    let labels = [
                        ("service", *service),
                        ("backend", backend.as_str()),
                        ("direction", direction),
                    ];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = counter(
                &mut encoder,
                "backend_connections",
                "New flows a service steered to a backend",
            )?;
            for ((service, backend), c) in &backends {
                let labels = [("service", *service), ("backend", backend.as_str())];
                ConstCounter::new(c.connections).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = counter(
                &mut encoder,
                "dataplane_drops",
                "Packets to a VIP dropped before a service was found (no service on the port, \
                 malformed, fragments, ...), by reason",
            )?;
            for code in drop_reason::ALL {
                let labels = [("reason", drop_reason::name(code))];
                ConstCounter::new(t.unattributed_drops[code as usize])
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = counter(
                &mut encoder,
                "dataplane_packets",
                "Packets the data plane handled, by path (redirect: sent out by XDP; kernel: \
                 handed to the kernel to route; reverse_nat: replies rewritten; \
                 reverse_nat_fragment: fragments of replies rewritten; snat_reply: replies of \
                 source-NATed flows translated back; icmp_*: ICMP answered or sent on; \
                 arp_reply, neighbor_advert: L2 announcement answers)",
            )?;
            for (slot, path) in PATHS {
                ConstCounter::new(t.datapath[slot]).encode(m.encode_family(&[("path", path)])?)?;
            }
        }
        {
            let mut m = counter(
                &mut encoder,
                "dataplane_untranslated",
                "Packets that may be a flow's reply and left without their address translated \
                 back (the client cannot match them to its connection): by reason \
                 (unreadable: headers the kernel would not pull; fragment: a fragment that \
                 cannot be rewritten; snat_entry_gone: a source-NATed reply whose entry went \
                 away). Each should stay at 0",
            )?;
            for (slot, reason) in datapath_stat::UNTRANSLATED {
                ConstCounter::new(t.datapath[slot])
                    .encode(m.encode_family(&[("reason", reason)])?)?;
            }
        }
        ConstCounter::new(t.datapath[datapath_stat::FLOW_RESTEERED]).encode(counter(
            &mut encoder,
            "flows_resteered",
            "Flows whose backend left and that Maglev steered again",
        )?)?;
        ConstCounter::new(t.datapath[datapath_stat::AFFINITY_HIT]).encode(counter(
            &mut encoder,
            "affinity_hits",
            "New flows steered by a fresh ClientIP affinity entry",
        )?)?;
        ConstCounter::new(t.datapath[datapath_stat::FLOW_HALF_OPEN]).encode(counter(
            &mut encoder,
            "conntrack_half_open",
            "New TCP flows that entered the half-open table (a SYN); a SYN flood shows here, \
             and churns that table only",
        )?)?;
        ConstCounter::new(t.datapath[datapath_stat::FLOW_PROMOTED]).encode(counter(
            &mut encoder,
            "conntrack_promoted",
            "Half-open TCP flows whose handshake completed (the client's ACK) and that moved to \
             the connection table; half_open minus promoted is roughly the handshakes never \
             completed",
        )?)?;
        ConstCounter::new(t.errors).encode(counter(
            &mut encoder,
            "stats_read_errors",
            "Readings of the data plane's statistics maps that failed",
        )?)?;
        {
            let mut m = encoder.encode_descriptor(
                "snat_ports_taken",
                "Source-NAT ports given to new flows, by where they came from (free: unused; \
                 expired: idle past its protocol's time; half_open: taken from a handshake that \
                 had not completed, only when no port was free: a SYN flood shows here)",
                None,
                MetricType::Counter,
            )?;
            for (slot, from) in [
                (datapath_stat::SNAT_PORT_FREE, "free"),
                (datapath_stat::SNAT_PORT_EXPIRED, "expired"),
                (datapath_stat::SNAT_PORT_HALF_OPEN, "half_open"),
            ] {
                ConstCounter::new(t.datapath[slot]).encode(m.encode_family(&[("from", from)])?)?;
            }
        }
        {
            let mut m = counter(
                &mut encoder,
                "flows_tuple_clash",
                "New flows whose Maglev choice was an endpoint where the client already had a \
                 connection from the same address and port through another Service (the same \
                 4-tuple at the backend), by outcome (avoided: steered to another backend; \
                 unavoidable: no other backend was free of such a connection, so that flow \
                 fails at the backend)",
            )?;
            for (slot, outcome) in [
                (datapath_stat::TUPLE_CLASH_AVOIDED, "avoided"),
                (datapath_stat::TUPLE_CLASH_UNAVOIDABLE, "unavoidable"),
            ] {
                ConstCounter::new(t.datapath[slot])
                    .encode(m.encode_family(&[("outcome", outcome)])?)?;
            }
        }
        ConstCounter::new(t.datapath[datapath_stat::SNAT_RANGE_SEARCH]).encode(counter(
            &mut encoder,
            "snat_range_searches",
            "Searches of a backend endpoint's whole source-NAT port range (a new flow's first \
             tries were all held): a range close to full",
        )?)?;
        if let Some(tables) = &t.tables {
            if let Some(c) = tables.iter().find(|f| f.name == "conntrack") {
                ConstGauge::new(c.entries as i64).encode(encoder.encode_descriptor(
                    "conntrack_entries",
                    "Entries in the connection table (walked every few seconds)",
                    None,
                    MetricType::Gauge,
                )?)?;
            }
            let mut m = encoder.encode_descriptor(
                "table_entries",
                "Entries in each table with per-flow state (conntrack, half_open, snat, \
                 affinity; walked every few seconds); a table at its capacity evicts its least \
                 recently used entries",
                None,
                MetricType::Gauge,
            )?;
            for f in tables {
                ConstGauge::new(f.entries as i64).encode(m.encode_family(&[("table", f.name)])?)?;
            }
            let mut m = encoder.encode_descriptor(
                "table_capacity",
                "Entries each table with per-flow state holds",
                None,
                MetricType::Gauge,
            )?;
            for f in tables {
                ConstGauge::new(f.capacity as i64)
                    .encode(m.encode_family(&[("table", f.name)])?)?;
            }
        }
        Ok(())
    }
}

/// The registry and the metrics the agent updates.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub health: Arc<HealthMetrics>,
    /// Kubernetes mode's.
    pub kubernetes: Arc<KubernetesMetrics>,
    pub agent: Arc<AgentMetrics>,
}

impl Metrics {
    pub fn new(
        snapshot: watch::Receiver<Arc<Snapshot>>,
        traffic: watch::Receiver<Arc<Traffic>>,
    ) -> Self {
        let mut registry = Registry::with_prefix("weir");
        let health = Arc::new(HealthMetrics::default());
        health.register(&mut registry);
        let agent = Arc::new(AgentMetrics::default());
        agent.register(&mut registry);
        let announce = snapshot.clone();
        crate::announce::metrics::register(&mut registry, move || {
            announce.borrow().announce.clone()
        });
        registry.register_collector(Box::new(SnapshotGauges(snapshot)));
        registry.register_collector(Box::new(TrafficCollector(traffic)));
        let kubernetes = Arc::new(KubernetesMetrics::default());
        kubernetes.register(&mut registry);
        Self {
            registry,
            health,
            kubernetes,
            agent,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format 0.0.4, for clients that do not ask for OpenMetrics.
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }
}

/// OpenMetrics → Prometheus text format 0.0.4: counter families take their samples' `_total`
/// name in HELP and TYPE, and the `# UNIT` and `# EOF` lines go (this encoder emits neither
/// exemplars nor `_created` samples).
pub fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(h) = help.replace(line) {
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = kind == "counter" && !name.ends_with("_total");
            if let Some(h) = help.take() {
                match (
                    counter,
                    h.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')),
                ) {
                    (true, Some((_, text))) => {
                        out.push_str(&format!("# HELP {name}_total {text}\n"));
                    }
                    (true, None) => out.push_str(&format!("# HELP {name}_total\n")),
                    (false, _) => {
                        out.push_str(h);
                        out.push('\n');
                    }
                }
            }
            if counter {
                out.push_str(&format!("# TYPE {name}_total counter\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(h) = help {
        out.push_str(h);
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(
            watch::Sender::default().subscribe(),
            watch::Sender::default().subscribe(),
        )
    }
}

#[cfg(test)]
mod tests;
