//! The desired state: what the data plane should do, whatever source it came from (the
//! standalone config file now, Kubernetes later). Pure data; validated when built.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::health::spec::HealthCheck;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IANA protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::proto::TCP,
            Self::Udp => lb_common::proto::UDP,
            Self::Sctp => lb_common::proto::SCTP,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where clients connect: the key of a service in the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.vip, self.port),
            self.protocol
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Relative share of new flows; 0 drains (existing flows stay, no new ones).
    pub weight: u32,
    /// False when health checks took it out of rotation: no new flows, and its existing flows
    /// are steered to other backends. Sources set it true; [`crate::health::effective`] sets it.
    pub available: bool,
}

impl Backend {
    /// An available backend.
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            available: true,
        }
    }

    /// The weight Maglev gets: 0 when out of rotation.
    pub fn share(&self) -> u32 {
        if self.available { self.weight } else { 0 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The config name in standalone mode (unique there); `namespace/name` in Kubernetes
    /// mode, where a Service with several ports or address families is several services of
    /// one name. The frontend is what is unique.
    pub name: String,
    pub frontend: Frontend,
    /// Sorted by address, no duplicates, same family as the VIP.
    pub backends: Vec<Backend>,
    /// Allow-list of client prefixes (empty: everyone). Sorted, no duplicates, host bits
    /// cleared, same family as the VIP.
    pub source_ranges: Vec<IpNet>,
    /// ClientIP affinity timeout, when affinity is on.
    pub affinity_timeout: Option<Duration>,
    /// Maglev table size (prime).
    pub table_size: u32,
    /// Active health check of the backends.
    pub health_check: Option<HealthCheck>,
}

/// Everything the data plane should carry, as one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Sorted by name, then frontend; frontends are unique.
    pub services: Vec<Service>,
}
