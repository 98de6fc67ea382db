//! The agent's metrics: one prometheus-client registry with the `weir` prefix. Each subsystem
//! owns a struct of its metrics; gauges that describe the current state (backend health) are
//! read from the published status snapshot at scrape time, so a removed backend's series goes
//! with it.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType, counter::Counter, family::Family, gauge::ConstGauge, histogram::Histogram,
    },
    registry::Registry,
};
use tokio::sync::watch;

use crate::status::Snapshot;

/// Probe durations: 250 µs to 10 s.
const PROBE_BUCKETS: [f64; 15] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub service: String,
    pub r#type: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub service: String,
    pub backend: String,
    pub to: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// `weir_health_check_duration_seconds`, `weir_health_transitions_total`.
#[derive(Debug)]
pub struct HealthMetrics {
    pub check_duration: HistogramFamily<ProbeLabels>,
    pub transitions: Family<TransitionLabels, Counter>,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        Self {
            check_duration: Family::new_with_constructor(|| Histogram::new(PROBE_BUCKETS)),
            transitions: Family::default(),
        }
    }
}

impl HealthMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "health_check_duration_seconds",
            "Duration of health-check probes, by service, check type and result (ok or the failure reason)",
            self.check_duration.clone(),
        );
        r.register(
            "health_transitions",
            "Backend health changes seen by a service's checks (to: healthy or unhealthy)",
            self.transitions.clone(),
        );
    }

    /// The histogram of one (service, type, result): a handle to keep and observe.
    pub fn histogram(&self, service: &str, kind: &'static str, result: &'static str) -> Histogram {
        self.check_duration.get_or_create_owned(&ProbeLabels {
            service: service.to_string(),
            r#type: kind,
            result,
        })
    }

    pub fn observe_probe(
        &self,
        service: &str,
        kind: &'static str,
        result: &'static str,
        took: Duration,
    ) {
        self.check_duration
            .get_or_create(&ProbeLabels {
                service: service.to_string(),
                r#type: kind,
                result,
            })
            .observe(took.as_secs_f64());
    }

    pub fn transition(&self, service: &str, backend: &str, healthy: bool) {
        self.transitions
            .get_or_create(&TransitionLabels {
                service: service.to_string(),
                backend: backend.to_string(),
                to: if healthy { "healthy" } else { "unhealthy" },
            })
            .inc();
    }
}

/// Gauges read from the status snapshot: `weir_backend_healthy`, `weir_service_fail_open`.
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
            for s in &snapshot.services {
                for b in &s.backends {
                    let backend = b.endpoint();
                    let labels = [("service", s.name.as_str()), ("backend", backend.as_str())];
                    ConstGauge::new(i64::from(b.healthy)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let mut m = encoder.encode_descriptor(
            "service_fail_open",
            "1 while every backend of the service is unhealthy and it sends to all of them (fail-open)",
            None,
            MetricType::Gauge,
        )?;
        for s in snapshot.services.iter().filter(|s| s.checked()) {
            let labels = [("service", s.name.as_str())];
            ConstGauge::new(i64::from(s.fail_open())).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The registry and the metrics the agent updates.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub health: Arc<HealthMetrics>,
}

impl Metrics {
    pub fn new(snapshot: watch::Receiver<Arc<Snapshot>>) -> Self {
        let mut registry = Registry::with_prefix("weir");
        let health = Arc::new(HealthMetrics::default());
        health.register(&mut registry);
        registry.register_collector(Box::new(SnapshotGauges(snapshot)));
        Self { registry, health }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(watch::Sender::default().subscribe())
    }
}

#[cfg(test)]
mod tests;
