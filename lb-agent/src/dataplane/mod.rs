//! The data plane seam. [`Dataplane`] is everything the agent does to the data plane: attach
//! and detach the programs, add L2 ports, keep the L2 lease running, write the maps (a
//! [`MapWriter`]) and read them (an [`Inspect`]). [`ebpf::Datapath`] is the kernel's;
//! [`fake::FakeDataplane`] keeps it all in memory for tests. [`Programmer`] turns a desired
//! state into map writes (diffing against what it programmed before). This module is the one
//! place where `IpAddr`/`SocketAddr` become the word-and-byte-order forms of `lb-common` and
//! back; only `ebpf` imports aya.

pub mod ebpf;
pub mod fake;
pub mod inspect;
mod limits;
pub mod memory;
mod programmer;
pub mod sockets;
mod sys;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_common::{
    BackendValue, EndpointKey, EndpointValue, ServiceKey, ServiceValue, SnatConfig,
    SourceRangeData, VipKey, VipValue, family, v4_mapped,
};
pub use programmer::{
    AdoptReport, ApplyError, ApplyReport, LeftOut, ProgrammedBackend, ProgrammedService,
    Programmer, TableDigest, TableRef,
};

pub use limits::{DEFAULT_PIN_DIR, DataplaneLimits, Pinning, XdpMode};

use crate::model::Frontend;
pub use ebpf::DataplaneError;
use inspect::Inspect;

/// How XDP ended up attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

/// The data plane as the agent drives it.
pub trait Dataplane: Send {
    /// Where the programmer writes.
    fn maps(&mut self) -> &mut dyn MapWriter;
    /// Attaches XDP (ingress) and TC (egress) to `iface`. On error nothing stays attached to
    /// `iface`.
    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<AttachedMode, DataplaneError>;
    /// Attaches the socket hooks (socket-level load balancing) to the cgroup v2 directory
    /// `cgroup`. On error nothing new stays attached.
    fn attach_cgroup(&mut self, cgroup: &std::path::Path) -> Result<(), DataplaneError>;
    /// Detaches from every interface and cgroup, logging each.
    fn detach_all(&mut self);
    /// Answers ARP and Neighbor Solicitations for announced VIPs on `iface` (whose index and
    /// MAC are given), while the L2 lease runs.
    fn add_l2_port(
        &mut self,
        iface: &str,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), DataplaneError>;
    /// A writer of the L2 lease that a task of its own can hold.
    fn l2_lease(&self) -> Result<Box<dyn L2LeaseWriter>, DataplaneError>;
    /// A reader of the maps with handles of its own (readers never wait for the writer).
    fn inspector(&self) -> Result<std::sync::Arc<dyn Inspect>, DataplaneError>;
    /// How the data plane came to be (fresh, adopted, replaced).
    fn start(&self) -> ebpf::Start;
    /// What a previous agent programmed, when its maps were adopted.
    fn previous_state(&self) -> Result<Option<MapContents>, MapError>;
    /// Once every configured interface is attached: lets go of what no longer serves
    /// (attachments of interfaces no longer configured, a replaced data plane). Says what it
    /// did.
    fn settle(&mut self) -> Vec<String>;
}

/// What a previous agent left in the maps, as the programmer reads it to carry on: the ids,
/// tables and entries it wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    /// Every backend slot ever given out (a freed one keeps its generation), by id.
    pub backends: std::collections::BTreeMap<u32, BackendValue>,
    /// Maglev table pages: page → entries.
    pub pages: std::collections::BTreeMap<u32, u32>,
    /// Each service's table as installed, by service id.
    pub tables: std::collections::BTreeMap<u32, Vec<u32>>,
    pub endpoints: Vec<(EndpointKey, EndpointValue)>,
    /// (prefix length, data).
    pub source_ranges: Vec<(u32, SourceRangeData)>,
    pub vips: Vec<(VipKey, VipValue)>,
    /// The VIP pre-filter's non-zero slots.
    pub vip_filter: std::collections::BTreeMap<u32, u32>,
    pub snat_config: SnatConfig,
}

/// The programmer of `dataplane`'s maps: new for fresh ones; for a previous agent's, rebuilt
/// from what they hold (with what adopting found).
pub fn programmer_for(
    dataplane: &mut dyn Dataplane,
    limits: &DataplaneLimits,
    seed: u64,
) -> Result<(Programmer, Option<AdoptReport>), MapError> {
    match dataplane.previous_state()? {
        None => Ok((Programmer::new(limits, seed), None)),
        Some(contents) => {
            let (p, report) = Programmer::adopt(limits, seed, &contents, dataplane.maps())?;
            Ok((p, Some(report)))
        }
    }
}

/// Keeps the data plane's L2 answers going (see `L2_LEASE`).
pub trait L2LeaseWriter: Send {
    /// Answers may go on for `lease` from now.
    fn extend(&mut self, lease: std::time::Duration) -> Result<(), MapError>;
}

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
#[error("{map}: {op}: {detail}")]
pub struct MapError {
    pub map: &'static str,
    pub op: String,
    pub detail: String,
}

/// The writes the programmer needs. Each call is one kernel update (or a few for a table),
/// visible to packets as soon as it returns.
pub trait MapWriter {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    /// Writes backend `id` (a zeroed value clears it: flows on it are steered again).
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError>;
    /// Creates Maglev table page `page` (an inner map of `entries` entries) and installs it.
    fn create_table_page(&mut self, page: u32, entries: u32) -> Result<(), MapError>;
    /// Writes a whole table into `page` from `offset` (a region no service points at yet).
    fn write_table(&mut self, page: u32, offset: u32, slots: &[u32]) -> Result<(), MapError>;
    fn put_source_range(&mut self, prefix_len: u32, data: &SourceRangeData)
    -> Result<(), MapError>;
    fn delete_source_range(
        &mut self,
        prefix_len: u32,
        data: &SourceRangeData,
    ) -> Result<(), MapError>;
    fn put_vip(&mut self, key: &VipKey, value: &VipValue) -> Result<(), MapError>;
    fn delete_vip(&mut self, key: &VipKey) -> Result<(), MapError>;
    /// Writes the node's source-NAT addresses and port range.
    fn put_snat_config(&mut self, value: &SnatConfig) -> Result<(), MapError>;
    fn set_vip_filter(&mut self, index: u32, count: u32) -> Result<(), MapError>;
    /// Writes the frontends a backend endpoint serves (reverse NAT's table).
    fn put_endpoint(&mut self, key: &EndpointKey, value: &EndpointValue) -> Result<(), MapError>;
    fn delete_endpoint(&mut self, key: &EndpointKey) -> Result<(), MapError>;
    /// Zeroes a service's counters before its id is (re)used.
    fn reset_service_stats(&mut self, id: u32) -> Result<(), MapError>;
    /// Zeroes a backend's counters before its id is (re)used.
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapError>;
}

/// The 16-byte address form (IPv4 mapped) and the family byte.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(a) => (v4_mapped(u32::from_ne_bytes(a.octets())), family::V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], family::V6)
        }
    }
}

/// The inverse of [`addr_words`].
pub fn words_addr(words: &[u32; 4], fam: u8) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    if fam == family::V4 {
        IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

/// The `SERVICES` keys of a frontend: one for each path that looks it up.
pub fn service_keys(f: &Frontend) -> impl Iterator<Item = ServiceKey> + use<> {
    let (addr, fam) = addr_words(f.vip);
    let (port_be, proto) = (f.port.to_be(), f.protocol.number());
    [
        (f.scope.external(), lb_common::scope::EXTERNAL),
        (f.scope.internal(), lb_common::scope::INTERNAL),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(move |(_, scope)| ServiceKey {
        addr,
        port_be,
        proto,
        family: fam,
        scope,
        _pad: [0; 3],
    })
}

pub fn endpoint_key(addr: SocketAddr, protocol: crate::model::Protocol) -> EndpointKey {
    let (words, fam) = addr_words(addr.ip());
    EndpointKey {
        addr: words,
        port_be: addr.port().to_be(),
        proto: protocol.number(),
        family: fam,
    }
}

pub fn vip_key(ip: IpAddr) -> VipKey {
    let (addr, fam) = addr_words(ip);
    VipKey {
        addr,
        family: fam,
        _pad: [0; 3],
    }
}

pub fn backend_value(addr: SocketAddr, generation: u32, flags: u8) -> BackendValue {
    let (words, fam) = addr_words(addr.ip());
    BackendValue {
        addr: words,
        port_be: addr.port().to_be(),
        family: fam,
        flags,
        generation,
    }
}

/// A backend's identity for Maglev: `ip:port`, `[ip6]:port`.
pub fn maglev_key(addr: SocketAddr) -> String {
    addr.to_string()
}

/// The slot a flow hashes to, exactly as the data plane computes it (the debug endpoint and
/// tests use this).
pub fn flow_slot(
    client: SocketAddr,
    vip: SocketAddr,
    protocol: crate::model::Protocol,
    affinity: bool,
    table_size: u32,
) -> u32 {
    flow_hash_of(client, vip, protocol, affinity) % table_size
}

/// The hash whose remainder is a flow's Maglev slot (see `flow_slot`).
pub fn flow_hash_of(
    client: SocketAddr,
    vip: SocketAddr,
    protocol: crate::model::Protocol,
    affinity: bool,
) -> u32 {
    let (src, _) = addr_words(client.ip());
    let (dst, _) = addr_words(vip.ip());
    if affinity {
        lb_common::hash::client_hash(&src)
    } else {
        lb_common::hash::flow_hash(
            &src,
            &dst,
            client.port().to_be(),
            vip.port().to_be(),
            protocol.number(),
        )
    }
}

#[cfg(test)]
mod tests;
