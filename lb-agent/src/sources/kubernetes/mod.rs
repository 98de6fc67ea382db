//! Kubernetes mode: weir's custom resources, the address allocator, the Service annotations,
//! and the translation of Services, EndpointSlices and Nodes into the same model the
//! standalone mode programs (one model, two sources).

pub mod addresses;
pub mod annotations;
pub mod announce;
pub mod crd;
#[doc(hidden)]
pub mod fuzz;
pub mod healthport;
pub mod ipam;
pub mod metrics;
pub mod proxyhealth;
pub mod runtime;
pub mod translate;

#[cfg(test)]
pub mod fixtures;

/// What is wrong with a resource: each problem names its field (`spec.addresses[0]: ...`).
/// A resource with problems is left out whole; the problems go to its Events, the log and
/// `/api/v1/bgp`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct SpecError(pub Vec<String>);

impl SpecError {
    pub fn new(problem: impl Into<String>) -> Self {
        Self(vec![problem.into()])
    }

    /// The same problems, at `field` (`spec.addresses[0]: ...`).
    #[must_use]
    pub fn at(self, field: &str) -> Self {
        Self(
            self.0
                .into_iter()
                .map(|p| format!("{field}: {p}"))
                .collect(),
        )
    }
}
