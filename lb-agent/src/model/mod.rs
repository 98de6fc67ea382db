//! The desired state: what the data plane should do, whatever source it came from (the
//! standalone config file or Kubernetes). Pure data; validated when built.

pub mod check;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use self::check::HealthCheck;

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

/// Which clients a frontend serves: where the data plane looks it up.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Both of the below, with the same backends.
    #[default]
    Both,
    /// Packets that arrive on `node.interfaces` (XDP): clients outside the node.
    External,
    /// Connections and datagrams of the node's own processes and its pods (the socket hooks):
    /// a ClusterIP, or an external address whose in-cluster clients get other backends.
    Internal,
}

impl Scope {
    pub const fn external(self) -> bool {
        matches!(self, Self::Both | Self::External)
    }

    pub const fn internal(self) -> bool {
        matches!(self, Self::Both | Self::Internal)
    }

    /// Whether a client could reach both.
    pub const fn overlaps(self, other: Self) -> bool {
        (self.external() && other.external()) || (self.internal() && other.internal())
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::External => "external",
            Self::Internal => "internal",
        }
    }
}

/// Where clients connect: the key of a service in the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    /// Whether a client could reach both (same address, port and protocol, overlapping
    /// scopes).
    pub fn overlaps(&self, other: &Self) -> bool {
        self.vip == other.vip
            && self.port == other.port
            && self.protocol == other.protocol
            && self.scope.overlaps(other.scope)
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.vip, self.port),
            self.protocol
        )?;
        match self.scope {
            Scope::Both => Ok(()),
            s => write!(f, " ({})", s.as_str()),
        }
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
    /// Its replies do not pass this node by themselves (an endpoint on another node): flows
    /// to it are source-NATed to the node's address ([`DesiredState::source_nat`]).
    pub snat: bool,
}

impl Backend {
    /// An available backend.
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            available: true,
            snat: false,
        }
    }

    /// The same backend, source-NATed.
    pub fn with_snat(self) -> Self {
        Self { snat: true, ..self }
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
    /// The address is the node's own (a NodePort): only this port is the service's; every
    /// other port, ICMP and neighbour resolution stay the node's.
    pub node_address: bool,
}

/// The source-NAT port range when none is configured: above Linux's default ephemeral range
/// (32768-60999), so that the node's own connections never use these ports.
pub const DEFAULT_SOURCE_NAT_PORTS: (u16, u16) = (61000, 65535);

/// Everything the data plane should carry, as one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Sorted by name, then frontend; frontends are unique. Shared: a service that did not
    /// change is the same allocation from one state to the next, so that comparing and
    /// copying whole states costs a pointer per service (`Arc`'s equality checks the
    /// pointer first).
    /// The list itself is shared too: a copy of a whole state (kept by the translation,
    /// the reconciler and the programmer) costs one pointer.
    pub services: Arc<Vec<Arc<Service>>>,
    /// The node's source-NAT addresses and ports, for backends with `snat`.
    pub source_nat: Option<SourceNat>,
}

/// A difference between two desired states ([`DesiredState::changes`]).
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// In the first state only.
    Removed(&'a Arc<Service>),
    /// In the second state only.
    Added(&'a Arc<Service>),
    /// In both (same name and frontend), with other contents: (first, second).
    Changed(&'a Arc<Service>, &'a Arc<Service>),
}

impl<'a> Change<'a> {
    /// The service the change is about (the second state's when there is one).
    pub fn service(&self) -> &'a Arc<Service> {
        match self {
            Self::Removed(s) | Self::Added(s) | Self::Changed(_, s) => s,
        }
    }

    /// The first state's version, if it has one.
    pub fn before(&self) -> Option<&'a Arc<Service>> {
        match self {
            Self::Removed(s) | Self::Changed(s, _) => Some(s),
            Self::Added(_) => None,
        }
    }

    /// The second state's version, if it has one.
    pub fn after(&self) -> Option<&'a Arc<Service>> {
        match self {
            Self::Added(s) | Self::Changed(_, s) => Some(s),
            Self::Removed(_) => None,
        }
    }
}

impl DesiredState {
    /// What differs between `self` and `other` (both sorted by name, then frontend), in
    /// that order. A service that is the same allocation in both is the same service, so a
    /// state that shares most of its services with the other costs a pointer comparison per
    /// service.
    pub fn changes<'a>(&'a self, other: &'a Self) -> Vec<Change<'a>> {
        let (a, b) = (&self.services, &other.services);
        let mut changes = Vec::new();
        let (mut i, mut j) = (0, 0);
        loop {
            match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if Arc::ptr_eq(x, y) => {
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) => match (&x.name, x.frontend).cmp(&(&y.name, y.frontend)) {
                    std::cmp::Ordering::Equal => {
                        if x != y {
                            changes.push(Change::Changed(x, y));
                        }
                        i += 1;
                        j += 1;
                    }
                    std::cmp::Ordering::Less => {
                        changes.push(Change::Removed(x));
                        i += 1;
                    }
                    std::cmp::Ordering::Greater => {
                        changes.push(Change::Added(y));
                        j += 1;
                    }
                },
                (Some(x), None) => {
                    changes.push(Change::Removed(x));
                    i += 1;
                }
                (None, Some(y)) => {
                    changes.push(Change::Added(y));
                    j += 1;
                }
                (None, None) => break,
            }
        }
        changes
    }

    /// The names whose services differ between `self` and `other` ([`DesiredState::changes`]).
    pub fn changed_names<'a>(&'a self, other: &'a Self) -> std::collections::BTreeSet<&'a str> {
        self.changes(other)
            .iter()
            .map(|c| c.service().name.as_str())
            .collect()
    }
}

/// Source NAT of flows to backends on other nodes: they leave with this node's address of
/// their family and a port of `ports`, so that the replies come back through this node.
/// The default: no addresses, the default port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceNat {
    pub ipv4: Option<std::net::Ipv4Addr>,
    pub ipv6: Option<std::net::Ipv6Addr>,
    /// Inclusive; outside the node's ephemeral port range.
    pub ports: (u16, u16),
}

impl Default for SourceNat {
    fn default() -> Self {
        Self {
            ipv4: None,
            ipv6: None,
            ports: DEFAULT_SOURCE_NAT_PORTS,
        }
    }
}

impl SourceNat {
    /// The node's address of `ip`'s family, if it has one.
    pub fn address_for(&self, ip: IpAddr) -> Option<IpAddr> {
        match ip {
            IpAddr::V4(_) => self.ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => self.ipv6.map(IpAddr::V6),
        }
    }
}
