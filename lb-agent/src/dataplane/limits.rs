//! What the data plane is loaded and attached with: map capacities and the XDP mode.

use serde::Deserialize;

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, generic mode otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

/// Capacities of the data plane's maps, fixed when the programs are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneLimits {
    pub max_services: u32,
    pub max_backends: u32,
    pub conntrack_size: u32,
    pub affinity_size: u32,
}

impl Default for DataplaneLimits {
    fn default() -> Self {
        use lb_common::limits;
        Self {
            max_services: limits::MAX_SERVICES,
            max_backends: limits::MAX_BACKENDS,
            conntrack_size: limits::MAX_FLOWS,
            affinity_size: limits::MAX_AFFINITY,
        }
    }
}
