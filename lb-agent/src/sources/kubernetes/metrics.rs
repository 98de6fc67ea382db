//! Kubernetes mode's metrics: `weir_kubernetes_service_problems`.

use std::collections::BTreeMap;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Debug, Default)]
pub struct KubernetesMetrics {
    /// Problems per Service (bad annotations, ...).
    pub service_problems: Family<ServiceLabel, Gauge>,
}

impl KubernetesMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "kubernetes_service_problems",
            "Problems that keep part of a Kubernetes Service from being served (bad annotations, source ranges, conflicts); see its Events",
            self.service_problems.clone(),
        );
    }

    /// Sets the problem gauge of every Service with problems (and drops the others').
    pub fn set_service_problems(&self, problems: &BTreeMap<String, Vec<String>>) {
        self.service_problems.clear();
        for (service, p) in problems {
            self.service_problems
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .set(p.len() as i64);
        }
    }
}
