//! The agent's configuration: the one place that reads config files, the environment and
//! `/proc`. Three steps, one module each:
//! - [`raw`]: the file as written (YAML, unknown fields rejected);
//! - [`check`]: one conversion into a checked [`Config`] built of each subsystem's own types
//!   (`model`, `dataplane`, `maglev`, `announce`); an error names the file, the field path and
//!   what is wrong, and nothing is applied;
//! - [`source`]: where a config comes from, and the host's facts.

mod check;
mod raw;
mod source;

use std::{fmt, net::SocketAddr, time::Duration};

pub use self::{
    check::{PortRangeError, ephemeral_overlap, parse_port_range},
    source::{KubeEnv, Source, cgroup_memory_limit, ephemeral_ports, host_name},
};
use crate::{
    announce::AnnounceConfig,
    dataplane::{DataplaneLimits, Pinning, XdpMode},
    maglev::MaglevConfig,
    model::{DesiredState, SourceNat},
};

/// The example configuration, also what `lb-agent run` uses when no `--config` is given: the
/// standalone lab's addresses (see `weir-lab demo`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../examples/standalone.yaml");
pub const DEFAULT_CONFIG_NAME: &str = "<embedded default config>";

/// Largest weight a backend may have.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Longest ClientIP affinity timeout (Kubernetes' limit for `timeoutSeconds`).
pub const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_hours(24);
/// Affinity timeout when the block is given without one (Kubernetes' default).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_hours(3);

/// A checked configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    pub admin: AdminConfig,
    pub maglev: MaglevConfig,
    pub dataplane: DataplaneLimits,
    pub pinning: Pinning,
    pub desired: DesiredState,
    pub announce: AnnounceConfig,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// `node.source_nat`: the port range given to source-NATed flows and the node's addresses
    /// they leave with (in Kubernetes mode, by default this Node's InternalIP of each family).
    pub source_nat: SourceNat,
    /// `node.kube_proxy_replacement`: in Kubernetes mode weir serves every Service type
    /// (ClusterIP, NodePort, LoadBalancer, externalIPs) and kube-proxy is removed; false:
    /// LoadBalancer Services only, beside kube-proxy.
    pub kube_proxy_replacement: bool,
    /// `node.socket_lb`: the cgroup v2 directory where the socket hooks attach (every process
    /// in it and below connects to services through them); None: no socket load balancing.
    pub socket_lb: Option<std::path::PathBuf>,
    /// `node.socket_lb.netns_dir`: where the pods' network namespaces are named, whose
    /// connected UDP sockets to a backend out of rotation are closed (with `socket_lb`).
    pub netns_dir: Option<std::path::PathBuf>,
    /// `node.nodeport_addresses`: the prefixes of the node addresses NodePorts are served on
    /// (kube-proxy's `--nodeport-addresses`); empty: the Node's InternalIPs.
    pub nodeport_addresses: Vec<ipnet::IpNet>,
    /// `node.healthz_listen`: kube-proxy's health endpoint (`/healthz`, `/livez`), served
    /// with `kube_proxy_replacement` only (beside kube-proxy, kube-proxy serves it).
    pub healthz_listen: Option<SocketAddr>,
}

/// The default `node.healthz_listen`: kube-proxy's `--healthz-bind-address`.
pub const DEFAULT_HEALTHZ_LISTEN: &str = "0.0.0.0:10256";

/// The default `node.socket_lb.netns_dir`: where `ip netns` and CNI plugins name them.
pub const DEFAULT_NETNS_DIR: &str = "/run/netns";

/// The default `node.socket_lb.cgroup`: the node's cgroup v2 root.
pub const DEFAULT_CGROUP: &str = "/sys/fs/cgroup";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// The full admin API (the service topology, backends, health, BGP, L2): loopback by
    /// default.
    pub listen: SocketAddr,
    /// A listener of its own for `/metrics`, `/livez` and `/readyz` (the chart binds it on the
    /// node's addresses for Prometheus and the kubelet); the full API also serves them.
    pub metrics_listen: Option<SocketAddr>,
}

/// One thing wrong with a config, at a field path such as `services[1].backends[0].port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join(&format!("\n{file}: ")))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
    /// A valid config that does not fit here (the mode, the node's sysctls).
    #[error("{0}")]
    Refused(String),
    /// A fact of the host that could not be read.
    #[error("{what}: {source}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } | Self::Refused(_) | Self::Host { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

#[cfg(test)]
mod tests;
