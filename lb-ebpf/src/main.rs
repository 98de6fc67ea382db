//! weir's data plane: entry points and maps only; the logic lives in the modules, by packet stage.
//!
//! - `weir_xdp` (XDP, on the configured interfaces): client → VIP packets are looked up,
//!   steered to a backend (connection table, ClientIP affinity, Maglev), DNATed (and, for a
//!   backend on another node, source-NATed to the node) and forwarded; replies of source-NATed
//!   flows are translated back here.
//! - `weir_tc_egress` (TC egress, on the same interfaces): backend → client replies get the
//!   VIP and port back as their source (reverse NAT), whatever shape the kernel gives the skb
//!   (non-linear, GSO, fragmented; see `revnat`).
//! - `weir_sock_*` (cgroup v2 `sock_addr` hooks, at the node's cgroup root): the node's own
//!   and its pods' connections and datagrams to a service go to a backend from the start
//!   (socket-level load balancing, see `sock`).
//!
//! Every map type is defined in `lb-common`; the capacities below are defaults that the agent
//! overrides at load time.
#![no_std]
#![no_main]

mod csum;
mod fwd;
mod icmp;
mod l4;
mod lookup;
mod nat;
mod neigh;
mod parse;
mod revnat;
mod sctp;
mod shared;
mod snat;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, xdp_action},
    btf_maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray,
    },
    macros::{btf_map, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::{
    AffinityKey, AffinityValue, BackendStats, BackendValue, DatapathStats, EndpointKey,
    EndpointValue, FlowKey, FlowValue, FragKey, FragValue, L2Port, NextHop, SctpScratch,
    ServiceKey, ServiceStats, ServiceValue, SnatConfig, SnatScratch, SnatValue, SockRevKey,
    SockRevValue, SourceRangeData, VipKey, VipValue, limits,
};

const MAX_SERVICES: usize = limits::MAX_SERVICES as usize;
const MAX_BACKENDS: usize = limits::MAX_BACKENDS as usize;
const MAX_FLOWS: usize = limits::MAX_FLOWS as usize;
/// Each CPU keeps its own LRU list (as Katran does): inserting a flow then never takes a lock
/// shared with the other CPUs, which a full table under a new-flow storm otherwise pays for
/// on every insert. A CPU evicts among the entries it inserted.
const PER_CPU_LRU: usize = aya_ebpf::bindings::BPF_F_NO_COMMON_LRU as usize;

/// (VIP, port, protocol) → service.
#[btf_map]
static SERVICES: HashMap<ServiceKey, ServiceValue, MAX_SERVICES> = HashMap::new();

/// Backend id → address, port, flags, generation.
#[btf_map]
static BACKENDS: Array<BackendValue, MAX_BACKENDS> = Array::new();

/// Maglev table pages: page → (entry → backend id); a service's table is `table_size` entries
/// from `table_offset` in page `table_page`. Pages may differ in size (a table larger than the
/// usual page gets a page of its own), hence the BPF_F_INNER_MAP template, which also keeps the
/// verifier from inlining inner lookups with the template's size.
#[btf_map]
static MAGLEV: ArrayOfMaps<
    Array<u32, 1, { BPF_F_INNER_MAP as usize }>,
    { limits::MAX_TABLE_PAGES as usize },
> = ArrayOfMaps::new();

/// Client 5-tuple → the backend the flow was steered to.
#[btf_map]
static CONNTRACK: LruHashMap<FlowKey, FlowValue, MAX_FLOWS, PER_CPU_LRU> = LruHashMap::new();

/// TCP flows whose handshake is in progress (only the client's SYN seen) or that a client's
/// RST ended: a table of their own, so that a SYN flood churns this one and never pushes an
/// established connection out of `CONNTRACK`. A flow moves to `CONNTRACK` with the client's
/// first ACK. Not pinned: a handshake that loses its entry is steered again, to the same
/// backend while the backend set is unchanged.
#[btf_map]
static HALF_OPEN: LruHashMap<FlowKey, FlowValue, { limits::MAX_HALF_OPEN as usize }, PER_CPU_LRU> =
    LruHashMap::new();

/// Backend endpoint → the frontends it serves (see `lb_common::EndpointValue`).
#[btf_map]
static ENDPOINTS: HashMap<EndpointKey, EndpointValue, MAX_BACKENDS> = HashMap::new();

/// (client address, service) → backend, for ClientIP affinity.
#[btf_map]
static AFFINITY: LruHashMap<
    AffinityKey,
    AffinityValue,
    { limits::MAX_AFFINITY as usize },
    PER_CPU_LRU,
> = LruHashMap::new();

/// (service, client prefix) → allowed.
#[btf_map]
static SOURCE_RANGES: LpmTrie<SourceRangeData, u32, { limits::MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Addresses that are VIPs (for ICMP, fragments and ports no service listens on).
#[btf_map]
static VIPS: HashMap<VipKey, VipValue, MAX_SERVICES> = HashMap::new();

/// Counting pre-filter over VIP addresses: non-zero at `vip_filter_index(addr)` when some VIP
/// may have that address.
#[btf_map]
static VIP_FILTER: Array<u32, { limits::VIP_FILTER_SIZE as usize }> = Array::new();

#[btf_map]
static SERVICE_STATS: PerCpuArray<ServiceStats, MAX_SERVICES> = PerCpuArray::new();

#[btf_map]
static BACKEND_STATS: PerCpuArray<BackendStats, MAX_BACKENDS> = PerCpuArray::new();

#[btf_map]
static DATAPATH_STATS: PerCpuArray<DatapathStats, 1> = PerCpuArray::new();

/// Backend id → the FIB's answer for it, per CPU (see `lb_common::NextHop`).
#[btf_map]
static NEXTHOPS: PerCpuArray<NextHop, MAX_BACKENDS> = PerCpuArray::new();

/// Tail-call targets of `weir_xdp` (slot 0: `weir_xdp_sctp`, slot 1: `weir_xdp_snat`, slot 2:
/// `weir_xdp_neigh`, slot 3: `weir_xdp_shared`, slot 4: `weir_xdp` itself, where
/// `weir_xdp_shared` returns).
#[btf_map]
static XDP_TAILS: ProgramArray<5> = ProgramArray::new();

/// `weir_xdp` → `weir_xdp_shared` hand-over (see `shared::SharedScratch`).
#[btf_map]
static SHARED_SCRATCH: PerCpuArray<shared::SharedScratch, 1> = PerCpuArray::new();

/// Interfaces (ifindex) where weir answers ARP and Neighbor Solicitations for its announced
/// VIPs, with their MACs.
#[btf_map]
static L2_PORTS: HashMap<u32, L2Port, { limits::MAX_TX_PORTS as usize }> = HashMap::new();

/// Until when (`bpf_ktime_get_ns`) this node may answer for its VIPs: the agent pushes it
/// forward while it lives, so a node whose agent died stops answering when its peers take
/// over, even though its data plane stays attached and keeps forwarding.
#[btf_map]
static L2_LEASE: Array<u64, 1> = Array::new();

/// A fragmented reply's datagram (backend → client, identification) → what its first
/// fragment was translated to (see `revnat`).
#[btf_map]
static REVNAT_FRAGS: LruHashMap<FragKey, FragValue, { limits::MAX_REVNAT_FRAGS as usize }> =
    LruHashMap::new();

/// Working space of `revnat`'s fragment path: the key, kept off the stack.
#[btf_map]
static REVNAT_FRAG_KEY: PerCpuArray<FragKey, 1> = PerCpuArray::new();

/// Tail-call targets of `weir_tc_egress` (slot 0: `weir_tc_sctp`).
#[btf_map]
static TC_TAILS: ProgramArray<1> = ProgramArray::new();

/// `weir_xdp` → `weir_xdp_sctp` hand-over (see `lb_common::SctpScratch`).
#[btf_map]
static SCTP_SCRATCH: PerCpuArray<SctpScratch, 1> = PerCpuArray::new();

/// Reply of a source-NATed flow as it arrives (backend → node address and port) → the flow
/// (see `snat`).
#[btf_map]
static SNAT: LruHashMap<FlowKey, SnatValue, MAX_FLOWS, PER_CPU_LRU> = LruHashMap::new();

/// The node's source-NAT addresses and port range (one entry, written by the agent).
#[btf_map]
static SNAT_CONFIG: Array<SnatConfig, 1> = Array::new();

/// By backend id, per CPU: when a search of the backend endpoint's whole source-NAT range
/// last found no port free (`limits::SNAT_FULL_RETRY_NS`; not pinned).
#[btf_map]
static SNAT_FULL: PerCpuArray<u64, MAX_BACKENDS> = PerCpuArray::new();

/// Working space of `snat` (see `lb_common::SnatScratch`).
#[btf_map]
static SNAT_SCRATCH: PerCpuArray<SnatScratch, 1> = PerCpuArray::new();

/// Interfaces XDP may redirect to (those where weir's XDP program runs natively).
#[btf_map]
static TX_PORTS: DevMapHash<{ limits::MAX_TX_PORTS as usize }> = DevMapHash::new();

/// (socket cookie, backend) → the frontend the socket asked for (see `sock`).
#[btf_map]
static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue, MAX_FLOWS> = LruHashMap::new();

#[xdp]
pub fn weir_xdp(ctx: XdpContext) -> u32 {
    match parse::l3(ctx.data(), ctx.data_end()) {
        parse::L3Result::Ip(l3) => l4::handle(&ctx, &l3),
        // `Short` and `Fragment` come from the skb parse only.
        parse::L3Result::NotOurs | parse::L3Result::Short(_) | parse::L3Result::Fragment { .. } => {
            xdp_action::XDP_PASS
        }
        parse::L3Result::Neighbor => neigh::hand_over(&ctx),
        parse::L3Result::Drop {
            dst,
            family,
            reason,
        } => lookup::drop_if_vip(&dst, family, reason),
    }
}

#[classifier]
pub fn weir_tc_egress(ctx: TcContext) -> i32 {
    revnat::handle(&ctx)
}

#[xdp]
pub fn weir_xdp_sctp(ctx: XdpContext) -> u32 {
    sctp::xdp_program(&ctx)
}

#[xdp]
pub fn weir_xdp_snat(ctx: XdpContext) -> u32 {
    snat::program(&ctx)
}

#[xdp]
pub fn weir_xdp_neigh(ctx: XdpContext) -> u32 {
    neigh::program(&ctx)
}

#[xdp]
pub fn weir_xdp_shared(ctx: XdpContext) -> u32 {
    shared::program(&ctx)
}

#[classifier]
pub fn weir_tc_sctp(ctx: TcContext) -> i32 {
    sctp::tc_program(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn weir_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn weir_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn weir_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn weir_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn weir_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn weir_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn weir_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn weir_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, true)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
