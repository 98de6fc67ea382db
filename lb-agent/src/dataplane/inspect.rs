//! Reading the data plane without changing it: its counters (for the traffic metrics) and the
//! decision it would take for a 5-tuple (the admin API's lookup endpoint). [`Inspect`] is the
//! seam: [`super::ebpf::EbpfInspector`] reads the kernel's maps through file descriptors of its
//! own, so readers never wait for the programmer; tests use an in-memory one.

use std::net::SocketAddr;

use lb_common::{BackendStats, DatapathStats, FlowKey, ServiceStats};

use super::{MapError, addr_words};
use crate::model::Protocol;

/// Every counter of the data plane, summed over CPUs, indexed by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawCounters {
    /// By service id; index 0 holds what no service could be charged with.
    pub services: Vec<ServiceStats>,
    /// By backend id (0 is unused).
    pub backends: Vec<BackendStats>,
    pub datapath: DatapathStats,
}

/// How a flow finds its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The connection table holds the flow, on a live backend.
    Connection,
    /// The client's affinity entry is fresh and its backend lives.
    Affinity,
    /// A new flow: the Maglev table's slot for its hash.
    Maglev,
}

/// What the data plane does with the next packet of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trace {
    /// No service listens on the destination (dropped if it is a VIP, else passed).
    NoService,
    /// Dropped for a service (`reason`: a `drop_reason` name).
    Dropped { service_id: u32, reason: u32 },
    Forwarded {
        service_id: u32,
        backend_id: u32,
        backend: SocketAddr,
        via: Via,
        /// The Maglev slot (within the service's table), for `Via::Maglev` and `Via::Affinity`
        /// decisions taken from the table.
        slot: Option<u32>,
        /// The connection table held the flow on a backend that is gone: it moves.
        resteered: bool,
        /// The backend is source-NATed (on another node): the flow's port, or 0 when the
        /// next packet takes one.
        source_nat_port: Option<u16>,
    },
}

/// One table with per-flow state: its `name` (the `table` label of `weir_table_entries`),
/// the entries in it when it was walked, and how many it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFill {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Reads the data plane. Implementations are cheap to share between threads.
pub trait Inspect: Send + Sync + 'static {
    /// Counters of service ids `0..services` and backend ids `0..backends`.
    fn counters(&self, services: u32, backends: u32) -> Result<RawCounters, MapError>;
    /// How full the tables with per-flow state are (a full walk of each: call it sparingly).
    fn tables(&self) -> Result<Vec<TableFill>, MapError>;
    /// The decision for `flow`, taken exactly as the XDP program takes it, without creating
    /// any state.
    fn trace(&self, flow: &FlowKey) -> Result<Trace, MapError>;
    /// The frontend the socket hooks connected socket `cookie` to when they sent it to
    /// `backend` (`SOCK_REVNAT`); None for a socket that asked for the backend itself.
    fn socket_frontend(
        &self,
        cookie: u64,
        backend: SocketAddr,
    ) -> Result<Option<SocketAddr>, MapError> {
        let _ = (cookie, backend);
        Ok(None)
    }
}

/// The connection-table key of a client's flow to a frontend.
pub fn flow_key(client: SocketAddr, vip: SocketAddr, protocol: Protocol) -> FlowKey {
    let (src, family) = addr_words(client.ip());
    let (dst, _) = addr_words(vip.ip());
    FlowKey {
        src,
        dst,
        sport_be: client.port().to_be(),
        dport_be: vip.port().to_be(),
        proto: protocol.number(),
        family,
        _pad: [0; 2],
    }
}

/// Sums per-CPU service counters.
pub fn sum_service(per_cpu: impl IntoIterator<Item = ServiceStats>) -> ServiceStats {
    let mut sum = ServiceStats::default();
    for s in per_cpu {
        sum.packets_in += s.packets_in;
        sum.bytes_in += s.bytes_in;
        sum.packets_out += s.packets_out;
        sum.bytes_out += s.bytes_out;
        sum.new_flows += s.new_flows;
        for (d, x) in sum.drops.iter_mut().zip(s.drops) {
            *d += x;
        }
    }
    sum
}

/// Sums per-CPU backend counters.
pub fn sum_backend(per_cpu: impl IntoIterator<Item = BackendStats>) -> BackendStats {
    let mut sum = BackendStats::default();
    for s in per_cpu {
        sum.packets_in += s.packets_in;
        sum.bytes_in += s.bytes_in;
        sum.packets_out += s.packets_out;
        sum.bytes_out += s.bytes_out;
        sum.new_flows += s.new_flows;
    }
    sum
}

/// Sums per-CPU path counters.
pub fn sum_datapath(per_cpu: impl IntoIterator<Item = DatapathStats>) -> DatapathStats {
    let mut sum = DatapathStats::default();
    for s in per_cpu {
        for (d, x) in sum.counters.iter_mut().zip(s.counters) {
            *d += x;
        }
    }
    sum
}
