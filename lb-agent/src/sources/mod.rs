//! Where desired state comes from besides the standalone config file (`crate::config`):
//! Kubernetes. Only this module imports kube.

pub mod kubernetes;
