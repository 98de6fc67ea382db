//! The health checks' metrics: `weir_health_check_duration_seconds`,
//! `weir_health_transitions_total`.

use std::{collections::HashSet, sync::Mutex, time::Duration};

use crate::LockExt as _;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

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

/// `weir_health_check_duration_seconds`, `weir_health_transitions_total`.
#[derive(Debug)]
pub struct HealthMetrics {
    pub check_duration: HistogramFamily<ProbeLabels>,
    pub transitions: Family<TransitionLabels, Counter>,
    /// `weir_health_events_dropped_total`: transitions not reported because the main loop's
    /// queue was full (the states themselves are never lost; see `monitor::EVENT_QUEUE`).
    pub events_dropped: Counter,
    /// The label sets made so far (the families cannot list theirs), for [`Self::prune`].
    made: Mutex<(HashSet<ProbeLabels>, HashSet<TransitionLabels>)>,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        Self {
            check_duration: Family::new_with_constructor(|| Histogram::new(PROBE_BUCKETS)),
            transitions: Family::default(),
            events_dropped: Counter::default(),
            made: Mutex::default(),
        }
    }
}

impl HealthMetrics {
    pub fn register(&self, r: &mut Registry) {
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
        r.register(
            "health_events_dropped",
            "Health transitions not logged or counted because the agent's queue was full; \
             the data plane still follows every check's state",
            self.events_dropped.clone(),
        );
    }

    /// The histogram of one (service, type, result): a handle to keep and observe.
    pub fn histogram(&self, service: &str, kind: &'static str, result: &'static str) -> Histogram {
        let labels = ProbeLabels {
            service: service.to_string(),
            r#type: kind,
            result,
        };
        let h = self.check_duration.get_or_create_owned(&labels);
        self.made.locked().0.insert(labels);
        h
    }

    /// Drops the series of the services `service` says are gone and of the (service, backend)
    /// pairs `backend` says are, so that the label sets stay bounded by what is served;
    /// returns how many. Asks about the series made so far only (few: failures and
    /// transitions), not about everything served.
    pub fn prune(
        &self,
        service: impl Fn(&str) -> bool,
        backend: impl Fn(&str, &str) -> bool,
    ) -> usize {
        let mut made = self.made.locked();
        let mut removed = 0;
        made.0.retain(|l| {
            let keep = service(l.service.as_str());
            if !keep {
                self.check_duration.remove(l);
                removed += 1;
            }
            keep
        });
        made.1.retain(|l| {
            let keep = backend(l.service.as_str(), l.backend.as_str());
            if !keep {
                self.transitions.remove(l);
                removed += 1;
            }
            keep
        });
        removed
    }

    pub fn observe_probe(
        &self,
        service: &str,
        kind: &'static str,
        result: &'static str,
        took: Duration,
    ) {
        self.histogram(service, kind, result)
            .observe(took.as_secs_f64());
    }

    pub fn transition(&self, service: &str, backend: &str, healthy: bool) {
        let labels = TransitionLabels {
            service: service.to_string(),
            backend: backend.to_string(),
            to: if healthy { "healthy" } else { "unhealthy" },
        };
        self.transitions.get_or_create(&labels).inc();
        self.made.locked().1.insert(labels);
    }
}
