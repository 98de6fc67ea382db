//! Kubernetes mode: weir's custom resources, the address allocator, the Service annotations,
//! and the translation of Services, EndpointSlices and Nodes into the same model the
//! standalone mode programs (one model, two sources).

pub mod addresses;
pub mod annotations;
pub mod announce;
pub mod crd;
pub mod healthport;
pub mod ipam;
pub mod metrics;
pub mod runtime;
pub mod translate;

#[cfg(test)]
pub mod fixtures;
