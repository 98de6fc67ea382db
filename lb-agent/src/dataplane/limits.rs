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

/// Where the data plane is pinned (`dataplane.pin_dir`) and whether it outlives the agent
/// (`dataplane.keep_on_exit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinning {
    /// A directory on a bpf filesystem. The maps and links are pinned there, so that the next
    /// agent adopts them (a crash or SIGKILL always leaves them).
    pub dir: std::path::PathBuf,
    /// true: a stopping agent leaves the data plane attached and forwarding with its last
    /// state. false: it detaches and removes the pins (and without a bpf filesystem the data
    /// plane is not pinned at all).
    pub keep_on_exit: bool,
}

/// The default `dataplane.pin_dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/weir";

impl Default for Pinning {
    fn default() -> Self {
        Self {
            dir: DEFAULT_PIN_DIR.into(),
            keep_on_exit: true,
        }
    }
}
