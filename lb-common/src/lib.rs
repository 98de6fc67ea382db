//! Types shared by weir's eBPF programs (`lb-ebpf`) and its agent (`lb-agent`).
//!
//! Every map key and value is defined here, once. The rules that keep the two sides agreeing:
//! - `#[repr(C)]`, fixed-width integers only, explicit padding fields, and a compile-time size
//!   assertion next to each type. No `bool`, `enum` or `Option` crosses into a map.
//! - Addresses are four `u32` words holding the address bytes exactly as they stand in the packet
//!   (network byte order in memory). IPv4 addresses use the IPv4-mapped form `::ffff:a.b.c.d`;
//!   a `family` byte in every key keeps a mapped IPv6 address apart from an IPv4 one.
//! - Ports are stored in network byte order; the field names end in `_be`.
//! - Id 0 is invalid in every array-indexed map (maps start zeroed); service id 0's counters
//!   hold the drops that belong to no service.
//! - Drop reasons are append-only: a retired code keeps its number.
#![no_std]

pub mod hash;

/// IP protocol numbers the data plane handles.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Address families as stored in keys.
pub mod family {
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}

/// The first three words of an IPv4-mapped address (`::ffff:0:0/96`).
pub const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// An IPv4 address word (as read from the packet) in the mapped 16-byte form.
#[inline(always)]
pub const fn v4_mapped(word: u32) -> [u32; 4] {
    [
        V4_MAPPED_PREFIX[0],
        V4_MAPPED_PREFIX[1],
        V4_MAPPED_PREFIX[2],
        word,
    ]
}

/// Names of the maps in the eBPF object, used by the agent to find them.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const VIPS: &str = "VIPS";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const DATAPATH_STATS: &str = "DATAPATH_STATS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const NEXTHOPS: &str = "NEXTHOPS";
    pub const XDP_TAILS: &str = "XDP_TAILS";
    pub const TC_TAILS: &str = "TC_TAILS";
    pub const SCTP_SCRATCH: &str = "SCTP_SCRATCH";
    pub const SNAT: &str = "SNAT";
    pub const SNAT_CONFIG: &str = "SNAT_CONFIG";
    pub const SNAT_SCRATCH: &str = "SNAT_SCRATCH";
    pub const SNAT_FULL: &str = "SNAT_FULL";
    pub const L2_PORTS: &str = "L2_PORTS";
    pub const L2_LEASE: &str = "L2_LEASE";
    pub const REVNAT_FRAGS: &str = "REVNAT_FRAGS";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const HALF_OPEN: &str = "HALF_OPEN";

    /// The maps that hold state worth keeping when the agent restarts: pinned under bpffs,
    /// adopted by the next agent. The others (tail-call arrays, per-CPU scratch space) belong
    /// to one loaded program set.
    pub const PINNED: &[&str] = &[
        SERVICES,
        BACKENDS,
        MAGLEV,
        CONNTRACK,
        ENDPOINTS,
        AFFINITY,
        SOURCE_RANGES,
        VIPS,
        VIP_FILTER,
        SERVICE_STATS,
        BACKEND_STATS,
        DATAPATH_STATS,
        TX_PORTS,
        NEXTHOPS,
        SNAT,
        SNAT_CONFIG,
        L2_PORTS,
        L2_LEASE,
        REVNAT_FRAGS,
        SOCK_REVNAT,
    ];
}

/// Version of the pinned maps' layout: their names, key and value types and what the values
/// mean. Bump it with any change to one of them: an agent never reads maps pinned by another
/// layout version as its own (it replaces them; see the agent's `dataplane::ebpf::pins`).
pub const LAYOUT_VERSION: u32 = 2;

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const XDP_INGRESS: &str = "weir_xdp";
    pub const TC_EGRESS: &str = "weir_tc_egress";
    /// Tail-called by `weir_xdp` (slot 0 of `XDP_TAILS`): recomputes an SCTP packet's CRC32c
    /// after DNAT and forwards it. A program of its own, so that the checksum loop is verified
    /// once instead of on every path that reaches it.
    pub const XDP_SCTP: &str = "weir_xdp_sctp";
    /// Tail-called by `weir_tc_egress` (slot 0 of `TC_TAILS`): the same after reverse NAT.
    pub const TC_SCTP: &str = "weir_tc_sctp";
    /// Tail-called by `weir_xdp` (slot 1 of `XDP_TAILS`): source NAT of flows to backends on
    /// other nodes and the translation of their replies. A program of its own for the
    /// verifier's sake, like `XDP_SCTP`: its port search is a loop.
    pub const XDP_SNAT: &str = "weir_xdp_snat";
    /// Tail-called by `weir_xdp` (slot 2 of `XDP_TAILS`): answers ARP requests and IPv6
    /// Neighbor Solicitations for the VIPs this node announces on L2.
    pub const XDP_NEIGH: &str = "weir_xdp_neigh";
    /// Tail-called by `weir_xdp` (slot 3 of `XDP_TAILS`): a new flow whose Maglev choice is an
    /// endpoint serving other frontends is steered clear of a connection the client already
    /// has there from the same address and port. Its own program for the verifier's sake: the
    /// check walks the endpoint's frontends for each candidate backend. It records the flow and
    /// tail-calls `weir_xdp` (slot 4), which sends the packet on.
    pub const XDP_SHARED: &str = "weir_xdp_shared";
    /// Socket-level load balancing (cgroup v2 `sock_addr` hooks, see `SOCK_REVNAT`): each
    /// (program, attach point) pair, in the order the agent attaches them.
    pub const SOCK: [(&str, &str); 8] = [
        ("weir_sock_connect4", "connect4"),
        ("weir_sock_connect6", "connect6"),
        ("weir_sock_sendmsg4", "sendmsg4"),
        ("weir_sock_sendmsg6", "sendmsg6"),
        ("weir_sock_recvmsg4", "recvmsg4"),
        ("weir_sock_recvmsg6", "recvmsg6"),
        ("weir_sock_getpeername4", "getpeername4"),
        ("weir_sock_getpeername6", "getpeername6"),
    ];
}

/// Compile-time capacities of the eBPF object. The agent may lower or raise the run-time ones
/// (services, backends, flows) at load time; these are the defaults.
pub mod limits {
    /// Default number of services (ids `1..MAX_SERVICES`).
    pub const MAX_SERVICES: u32 = 4096;
    /// Default number of backends over all services (ids `1..MAX_BACKENDS`).
    pub const MAX_BACKENDS: u32 = 65536;
    /// Default size of the connection table (and of the reverse-NAT table).
    pub const MAX_FLOWS: u32 = 262_144;
    /// Default size of the ClientIP affinity table.
    pub const MAX_AFFINITY: u32 = 65536;
    /// Size of the half-open table (`HALF_OPEN`) at the default connection table size: a
    /// quarter of it (the agent keeps that ratio, at least `MIN_HALF_OPEN`).
    pub const MAX_HALF_OPEN: u32 = MAX_FLOWS / 4;
    pub const MIN_HALF_OPEN: u32 = 1024;
    /// Default number of source-range prefixes over all services.
    pub const MAX_SOURCE_RANGES: u32 = 16384;
    /// Entries in the VIP pre-filter: 2^VIP_FILTER_BITS.
    pub const VIP_FILTER_BITS: u32 = 16;
    pub const VIP_FILTER_SIZE: u32 = 1 << VIP_FILTER_BITS;
    /// Largest Maglev table the data plane accepts.
    pub const MAX_TABLE_SIZE: u32 = 1_048_573;
    /// Entries of a Maglev table page (an inner map of `MAGLEV`). Tables of one size share a
    /// page: installing an inner map costs the kernel an RCU grace period (milliseconds), so
    /// pages are created rarely and tables are written into them.
    pub const TABLE_PAGE_ENTRIES: u32 = 1 << 20;
    /// Table pages (`MAGLEV`'s size).
    pub const MAX_TABLE_PAGES: u32 = 4096;
    /// Frontends (VIP, port, scope) one backend endpoint may serve: a Service's ClusterIP,
    /// its load-balancer address and its node ports on each node address, per Service port
    /// that targets the endpoint.
    pub const MAX_ENDPOINT_FRONTENDS: usize = 16;
    /// Interfaces that XDP may redirect to.
    pub const MAX_TX_PORTS: u32 = 64;
    /// IPv6 extension headers skipped before giving up.
    pub const MAX_IPV6_EXT_HEADERS: u32 = 4;
    /// Datagrams whose fragments reverse NAT follows at once (`REVNAT_FRAGS`).
    pub const MAX_REVNAT_FRAGS: u32 = 8192;
    /// Longest SCTP packet (common header and chunks) whose CRC32c the data plane recomputes.
    pub const MAX_SCTP_LEN: u32 = 1480;
    /// How long a cached FIB result for a backend is used before the FIB is asked again.
    pub const NEXTHOP_TTL_NS: u64 = 250_000_000;
    /// Source ports a new source-NATed flow tries first, from its hash, for a free or expired
    /// one; when none of them is, the whole range is searched, and then the longest-idle
    /// half-open port is taken.
    pub const SNAT_TRIES: u32 = 32;
    /// After a search of the whole range found no port of a backend endpoint free, new flows
    /// to it on that CPU skip the search for this long (they take a half-open port their
    /// first tries met, or are refused): a SYN flood must not make every packet walk the range
    /// (`SNAT_FULL`, by backend id).
    pub const SNAT_FULL_RETRY_NS: u64 = 100_000_000;
    /// A source-NAT port idle this long may be given to another flow: an open TCP
    /// connection's (one that vanished without FIN or RST), a closed one's (FIN both ways, or
    /// RST: time for the last ACK and retransmissions, like conntrack's TIME_WAIT/CLOSE), a
    /// half-open one's (below), and UDP's (conntrack's UDP timeout).
    pub const SNAT_TCP_IDLE_NS: u64 = 3600 * 1_000_000_000;
    pub const SNAT_TCP_CLOSED_IDLE_NS: u64 = 10 * 1_000_000_000;
    /// A half-open TCP flow's (only the client's SYN seen, like conntrack's SYN_SENT and
    /// SYN_RECV, but seconds: a SYN flood must not hold ports for an hour).
    pub const SNAT_TCP_HALF_OPEN_IDLE_NS: u64 = 10 * 1_000_000_000;
    pub const SNAT_OTHER_IDLE_NS: u64 = 30 * 1_000_000_000;
    /// How stale a source-NAT entry's last-used time may get before a packet refreshes it (so
    /// that busy flows write the shared entry about once a second, not on every packet).
    pub const SNAT_REFRESH_NS: u64 = 1_000_000_000;
}

/// Key of `SERVICES`: a frontend (VIP, port, protocol) as one path sees it (`scope`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
    /// `scope::*`: which path looks the frontend up. A service served on both paths has one
    /// entry of each scope, with the same value.
    pub scope: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<ServiceKey>() == 24);

/// `ServiceKey::scope`.
pub mod scope {
    /// Packets that arrive on the node's interfaces (XDP).
    pub const EXTERNAL: u8 = 1;
    /// Connections and datagrams of the node's own sockets and its pods' (the cgroup
    /// `sock_addr` hooks): the destination is translated before a packet exists.
    pub const INTERNAL: u8 = 2;
}

/// `ServiceValue::flags`.
pub mod service_flags {
    /// ClientIP session affinity: hash on the client address and remember the choice.
    pub const AFFINITY: u32 = 1;
    /// The service has an allow-list of source prefixes in `SOURCE_RANGES`.
    pub const SOURCE_RANGES: u32 = 2;
    /// The frontend's address is the node's own (a node port): it is no VIP (the node keeps
    /// its other ports, ICMP and neighbour resolution).
    pub const NODE_ADDRESS: u32 = 4;
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into `SERVICE_STATS` and the service part of `SOURCE_RANGES`/`AFFINITY` keys.
    pub id: u32,
    /// The table page (index into `MAGLEV`) and the table's first entry in it. A new table is
    /// written into a free region, then this value is replaced in one update, so a packet sees
    /// either the old (page, offset, size) or the new one.
    pub table_page: u32,
    pub table_offset: u32,
    /// Number of slots in the table (prime).
    pub table_size: u32,
    pub flags: u32,
    pub affinity_timeout_s: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 24);

/// `BackendValue::flags`.
pub mod backend_flags {
    /// The backend exists: flows already on it stay on it. A backend without this flag (removed,
    /// or unhealthy) sends its flows back through Maglev.
    pub const PRESENT: u8 = 1;
    /// The backend's replies do not pass this node on their own (an endpoint on another
    /// node): new flows to it get the node's address and a port of `SNAT_CONFIG`'s range as
    /// their source, and the replies are translated back in XDP (see `SnatValue`).
    pub const SNAT: u8 = 2;
}

/// Value of `BACKENDS`, indexed by backend id (unique per service and backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendValue {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    pub flags: u8,
    /// Bumped every time the id is given to a different backend; a flow remembers the
    /// generation it was steered with, so a reused id never inherits old flows.
    pub generation: u32,
}
const _: () = assert!(size_of::<BackendValue>() == 24);

/// A flow's 5-tuple as the client sends it (client → VIP): key of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Value of `CONNTRACK`: where the flow goes. The service id lets an established packet skip
/// the service lookup: a removed service clears its backends, which sends its flows back to
/// the full path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    pub backend_id: u32,
    pub backend_generation: u32,
    pub service_id: u32,
    /// The flow's source-NAT port (the node address is `SNAT_CONFIG`'s); 0: not source-NATed.
    pub snat_port_be: u16,
    /// `flow_flags::*`.
    pub flags: u16,
}

/// `FlowValue::flags`.
pub mod flow_flags {
    /// In `HALF_OPEN` because the connection is over (a client's RST), not because its
    /// handshake is in progress: it is not moved back to `CONNTRACK`.
    pub const CLOSING: u16 = 1;
    /// The client has sent FIN (a SYN on the entry clears it): the connection is ending. When
    /// the client's next connection from the same port through another frontend meets the
    /// same endpoint (see `TUPLE_CLASH_UNAVOIDABLE`), reverse NAT gives the replies to that
    /// one.
    pub const FIN: u16 = 2;
}
const _: () = assert!(size_of::<FlowValue>() == 16);

/// Key of `REVNAT_FRAGS`: a datagram that a backend's stack fragmented (backend → client,
/// its IP identification; 16 bits for IPv4, 32 for IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FragKey>() == 40);

/// Value of `REVNAT_FRAGS`: what the datagram's first fragment was translated to, for the
/// fragments after it (which carry no ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragValue {
    pub vip: [u32; 4],
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<FragValue>() == 24);

/// Key of `ENDPOINTS`: a backend endpoint as its replies carry it (source address, port and
/// protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<EndpointKey>() == 20);

/// A frontend an endpoint serves: what a reply's source becomes, and the ids that flows to it
/// carry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointFrontend {
    pub vip: [u32; 4],
    pub vport_be: u16,
    /// `endpoint_flags::*`.
    pub flags: u16,
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<EndpointFrontend>() == 28);

/// `EndpointFrontend::flags`.
pub mod endpoint_flags {
    /// The frontend is the socket hooks' only (`scope::INTERNAL`): its flows never pass
    /// reverse NAT, which skips it. Recorded all the same, as a member of its service.
    pub const INTERNAL: u16 = 1;
}

/// Value of `ENDPOINTS`, written by the agent with the services (no per-flow state): reverse NAT
/// rewrites a reply of endpoint E to client C when C's flow to one of E's frontends is in the
/// connection table on E's backend id. Replies of traffic that did not come through a VIP
/// (direct access to a backend) match no flow and leave untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    pub count: u32,
    pub _pad: u32,
    pub frontends: [EndpointFrontend; limits::MAX_ENDPOINT_FRONTENDS],
}
const _: () = assert!(size_of::<EndpointValue>() == 8 + 28 * limits::MAX_ENDPOINT_FRONTENDS);

/// Value of `SNAT_CONFIG` (one entry): the node's addresses that source-NATed flows leave
/// with, and the port range given out (host byte order, inclusive). A zero address: no source
/// NAT for that family (flows to `SNAT` backends of it are dropped as `SNAT_FAILED`). The
/// range must lie outside the node's ephemeral ports (`net.ipv4.ip_local_port_range`): a
/// packet from a backend endpoint to a port of the range is taken for a reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatConfig {
    pub addr4: [u32; 4],
    pub addr6: [u32; 4],
    pub port_min: u16,
    pub port_max: u16,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SnatConfig>() == 40);

/// Value of `SNAT`, whose key is the `FlowKey` of a reply as it arrives: backend endpoint →
/// node address and source-NAT port. One entry per source-NATed flow, written when the flow is
/// steered; the reply becomes VIP → client with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatValue {
    pub client: [u32; 4],
    pub vip: [u32; 4],
    pub client_port_be: u16,
    pub vport_be: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// TCP: `snat_tcp::*` bits seen on the flow (a SYN from the client clears them).
    pub tcp_state: u32,
    /// `bpf_ktime_get_coarse_ns()` when a packet of the flow last passed (refreshed at most
    /// every `limits::SNAT_REFRESH_NS`, and when the TCP state changes).
    pub last_ns: u64,
    /// The FIB's answer for the flow's replies (to the client), cached as `NEXTHOPS` caches
    /// a backend's (valid while `ifindex` is set and it has not expired).
    pub reply_hop: NextHop,
}

/// `SnatValue::tcp_state`.
pub mod snat_tcp {
    /// FIN from the client.
    pub const FIN_FORWARD: u32 = 1;
    /// FIN from the backend.
    pub const FIN_REPLY: u32 = 2;
    pub const RST: u32 = 4;
    /// The client acknowledged (an ACK without SYN from the client): the handshake is done.
    pub const ACKED: u32 = 8;
    /// The connection is over: its port may be given away after `SNAT_TCP_CLOSED_IDLE_NS`.
    pub const fn closed(state: u32) -> bool {
        state & RST != 0 || state & (FIN_FORWARD | FIN_REPLY) == FIN_FORWARD | FIN_REPLY
    }
    /// Only a SYN so far (a handshake in progress, or a spoofed SYN that never completes):
    /// its port may be given away after `SNAT_TCP_HALF_OPEN_IDLE_NS`.
    pub const fn half_open(state: u32) -> bool {
        state & (ACKED | RST | FIN_FORWARD | FIN_REPLY) == 0
    }
}
const _: () = assert!(size_of::<SnatValue>() == 96);

/// Per-CPU slot 0 of `SNAT_SCRATCH`: what `weir_xdp` hands to `weir_xdp_snat` across the tail
/// call, and that program's working space (a source-NAT entry's key and value: the BPF stack
/// is 512 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatScratch {
    /// The client's flow (client → VIP) being source-NATed.
    pub flow: FlowKey,
    pub key: FlowKey,
    pub value: SnatValue,
    /// `snat_mode::*`.
    pub mode: u32,
    /// For `FORWARD`: the flow's service, backend (id and generation) and its current port
    /// (0: none yet).
    pub service_id: u32,
    pub backend_id: u32,
    pub backend_generation: u32,
    pub port_be: u16,
    /// For `FORWARD`: the packet's TCP flags (0 for UDP).
    pub tcp_flags: u8,
    pub _pad: [u8; 5],
    /// The port search's state: the range (first port, size), where the flow's hash starts
    /// it, and the port found (network order, 0: none yet).
    pub port_min: u32,
    pub port_range: u32,
    pub port_start: u32,
    pub found_be: u16,
    /// The longest-idle half-open port met by the first tries (0: none) and its last use.
    pub half_open_be: u16,
    pub half_open_ns: u64,
    pub now: u64,
}
const _: () = assert!(size_of::<SnatScratch>() == 232);

/// `SnatScratch::mode`.
pub mod snat_mode {
    /// A client's packet to a source-NATed backend: take (or keep) a port, rewrite, forward.
    pub const FORWARD: u32 = 1;
    /// A reply found in `SNAT` (its key in `SnatScratch::key`): translate back and forward.
    pub const REPLY: u32 = 2;
}

/// Key of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityKey {
    pub client: [u32; 4],
    pub service_id: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 20);

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub backend_generation: u32,
    /// `bpf_ktime_get_ns()` of the last new flow steered by this entry.
    pub last_used_ns: u64,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

/// Data part of the `SOURCE_RANGES` LPM key. The prefix length counts the 32 bits of the
/// service id first, so one trie holds every service's allow-list.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRangeData {
    /// Big-endian, so that the trie compares its most significant bit first.
    pub service_id_be: u32,
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<SourceRangeData>() == 20);

/// LPM prefix length of a source range of `bits` bits (over the 128-bit mapped address).
pub const fn source_range_prefix(bits_in_128: u32) -> u32 {
    32 + bits_in_128
}

/// Key of `VIPS`: an address that is a VIP, whatever its ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<VipKey>() == 20);

/// `VipValue::flags`.
pub mod vip_flags {
    /// This node announces the VIP on L2: ARP requests and Neighbor Solicitations for it that
    /// arrive on an `L2_PORTS` interface are answered with that interface's MAC.
    pub const NEIGHBOR: u32 = 1;
}

/// Value of `L2_PORTS` (key: ifindex): an interface where weir answers for its VIPs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Port {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<L2Port>() == 8);

/// Value of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipValue {
    pub flags: u32,
}
const _: () = assert!(size_of::<VipValue>() == 4);

/// Per-CPU value of `NEXTHOPS`, indexed by backend id: the FIB's answer for the backend, so
/// that established traffic does not ask the FIB for every packet. Valid while `generation`
/// is the backend's, `expires_ns` (coarse monotonic clock) has not passed, and the packet is
/// no longer than `checked_len` (the length the FIB's MTU check passed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub expires_ns: u64,
    pub ifindex: u32,
    pub generation: u32,
    pub checked_len: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<NextHop>() == 40);

/// Per-CPU slot 0 of `SCTP_SCRATCH`: what `weir_xdp` hands to `weir_xdp_sctp` across the tail
/// call (the rest it reads from the packet again).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SctpScratch {
    pub backend_id: u32,
    pub backend_generation: u32,
}
const _: () = assert!(size_of::<SctpScratch>() == 8);

/// Index of `addr` in `VIP_FILTER`, a counting pre-filter that lets non-VIP packets pass after
/// one inlined array read instead of a hash lookup. Fibonacci hashing of the folded address:
/// one multiply, on the path of every packet the node receives.
#[inline(always)]
pub const fn vip_filter_index(addr: &[u32; 4]) -> u32 {
    (addr[0] ^ addr[1] ^ addr[2] ^ addr[3]).wrapping_mul(0x9E37_79B1)
        >> (32 - limits::VIP_FILTER_BITS)
}

/// Drop reasons: append-only, a retired code keeps its number.
pub mod drop_reason {
    /// Truncated or inconsistent headers on a packet addressed to a VIP.
    pub const MALFORMED: u32 = 1;
    /// An IP fragment addressed to a VIP (its ports are not in every fragment).
    pub const FRAGMENT: u32 = 2;
    /// Addressed to a VIP on a port or protocol no service listens on.
    pub const NO_SERVICE: u32 = 3;
    /// The client address is outside the service's source ranges.
    pub const SOURCE_NOT_ALLOWED: u32 = 4;
    /// The service has no backend to send a new flow to.
    pub const NO_BACKEND: u32 = 5;
    /// ICMP to a VIP that is neither an echo request nor an error about a known service.
    pub const ICMP_UNSUPPORTED: u32 = 6;
    /// SCTP packet longer than the data plane recomputes a CRC32c for.
    pub const SCTP_TOO_LONG: u32 = 7;
    /// More IPv6 extension headers than the data plane skips.
    pub const IPV6_EXT_HEADERS: u32 = 8;
    /// A reply matched a flow but could not be rewritten (the kernel refused the change).
    pub const REWRITE_FAILED: u32 = 9;
    /// The SCTP checksum program could not be reached or could not finish.
    pub const SCTP_CHECKSUM: u32 = 10;
    /// A new flow to a backend on another node found no free source-NAT port (or the node has
    /// no source-NAT address of the flow's family).
    pub const SNAT_FAILED: u32 = 11;

    /// Number of counter slots per service (room for codes to be appended).
    pub const SLOTS: usize = 16;

    /// Metric label of a reason code.
    pub const fn name(code: u32) -> &'static str {
        match code {
            MALFORMED => "malformed",
            FRAGMENT => "fragment",
            NO_SERVICE => "no_service",
            SOURCE_NOT_ALLOWED => "source_not_allowed",
            NO_BACKEND => "no_backend",
            ICMP_UNSUPPORTED => "icmp_unsupported",
            SCTP_TOO_LONG => "sctp_too_long",
            IPV6_EXT_HEADERS => "ipv6_ext_headers",
            REWRITE_FAILED => "rewrite_failed",
            SCTP_CHECKSUM => "sctp_checksum",
            SNAT_FAILED => "snat_failed",
            _ => "unknown",
        }
    }

    /// Every defined code, for exporters.
    pub const ALL: [u32; 11] = [
        MALFORMED,
        FRAGMENT,
        NO_SERVICE,
        SOURCE_NOT_ALLOWED,
        NO_BACKEND,
        ICMP_UNSUPPORTED,
        SCTP_TOO_LONG,
        IPV6_EXT_HEADERS,
        REWRITE_FAILED,
        SCTP_CHECKSUM,
        SNAT_FAILED,
    ];
}

/// Per-CPU value of `SERVICE_STATS`, indexed by service id (id 0: drops of no service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Client → backend packets and bytes (IP header included).
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Backend → client packets and bytes, counted at reverse NAT.
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
    pub drops: [u64; drop_reason::SLOTS],
}
const _: () = assert!(size_of::<ServiceStats>() == 8 * (5 + drop_reason::SLOTS));

/// Per-CPU value of `BACKEND_STATS`, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
}
const _: () = assert!(size_of::<BackendStats>() == 40);

/// Slots of the single per-CPU `DATAPATH_STATS` entry: what the data plane did, by path.
pub mod datapath_stat {
    /// Rewritten packets sent out by XDP redirect after a FIB lookup.
    pub const FWD_REDIRECT: usize = 0;
    /// Rewritten packets handed to the kernel to route (no neighbour, no redirect port, ...).
    pub const FWD_KERNEL: usize = 1;
    /// ICMP echo replies sent for a VIP.
    pub const ICMP_ECHO_REPLY: usize = 2;
    /// ICMP errors about a flow sent on to its backend.
    pub const ICMP_ERROR_TO_BACKEND: usize = 3;
    /// Flows whose backend was gone and that were steered again through Maglev.
    pub const FLOW_RESTEERED: usize = 4;
    /// New flows steered by a ClientIP affinity entry.
    pub const AFFINITY_HIT: usize = 5;
    /// Replies rewritten by reverse NAT.
    pub const REVNAT: usize = 6;
    /// Replies of source-NATed flows translated back in XDP.
    pub const SNAT_REPLY: usize = 7;
    /// ARP requests for an announced VIP answered.
    pub const ARP_REPLY: usize = 8;
    /// Neighbor Solicitations for an announced VIP answered.
    pub const NEIGHBOR_ADVERT: usize = 9;
    /// IP fragments of replies rewritten by reverse NAT (the first one of each datagram is
    /// also counted in `REVNAT`).
    pub const REVNAT_FRAGMENT: usize = 10;
    /// Untranslated (`UNTRANSLATED_*`): packets that may belong to a flow and left with the
    /// backend's address, or the node's source-NAT address, as they came. Every one of them is
    /// a reply the client cannot match to its connection, so each should stay at 0.
    ///
    /// Reverse NAT could not read the packet's headers: the kernel refused to pull them
    /// into the skb's linear area. Whether it was a flow's reply is unknown.
    pub const UNTRANSLATED_UNREADABLE: usize = 11;
    /// A fragment of a flow's reply that reverse NAT cannot rewrite: SCTP (its CRC32c covers
    /// every fragment), or a later fragment whose first fragment went out untranslated.
    pub const UNTRANSLATED_FRAGMENT: usize = 12;
    /// A reply of a source-NATed flow whose entry went away between the lookup and the
    /// rewrite (evicted or taken by another flow).
    pub const UNTRANSLATED_SNAT_GONE: usize = 13;
    /// New TCP flows that entered `HALF_OPEN` (a SYN without ACK).
    pub const FLOW_HALF_OPEN: usize = 14;
    /// Half-open flows that completed their handshake and moved to `CONNTRACK`.
    pub const FLOW_PROMOTED: usize = 15;
    /// Source-NAT ports given to a new flow, by where they came from: never used (or gone
    /// from the table), idle past their protocol's time, or taken from a half-open flow (only
    /// when no free or expired port was found: a SYN flood's entries go first).
    pub const SNAT_PORT_FREE: usize = 16;
    pub const SNAT_PORT_EXPIRED: usize = 17;
    pub const SNAT_PORT_HALF_OPEN: usize = 18;
    /// Searches of a backend endpoint's whole source-port range (its first tries were all
    /// held by open flows).
    pub const SNAT_RANGE_SEARCH: usize = 19;
    /// New flows (keeping the client's address) whose Maglev choice was an endpoint where the
    /// client already had a connection from the same address and port through another
    /// frontend (the same 4-tuple at the backend): steered to another backend of the table
    /// (`AVOIDED`), or sent there all the same when none was free of such a connection
    /// (`UNAVOIDABLE`: one backend, or all of them; that connection fails).
    pub const TUPLE_CLASH_AVOIDED: usize = 20;
    pub const TUPLE_CLASH_UNAVOIDABLE: usize = 21;
    pub const SLOTS: usize = 32;
    /// The `UNTRANSLATED_*` slots with their metric label.
    pub const UNTRANSLATED: [(usize, &str); 3] = [
        (UNTRANSLATED_UNREADABLE, "unreadable"),
        (UNTRANSLATED_FRAGMENT, "fragment"),
        (UNTRANSLATED_SNAT_GONE, "snat_entry_gone"),
    ];
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathStats {
    pub counters: [u64; datapath_stat::SLOTS],
}
const _: () = assert!(size_of::<DatapathStats>() == 256);

/// Key of `SOCK_REVNAT`: a socket (its cookie) and a backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<SockRevKey>() == 32);

/// Value of `SOCK_REVNAT`: the frontend the socket asked for, which `recvmsg` and
/// `getpeername` show it instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub _pad: u16,
    pub service_id: u32,
}
const _: () = assert!(size_of::<SockRevValue>() == 24);

/// The "client address" of a socket for ClientIP affinity in the socket hooks: its network
/// namespace's cookie (a pod, or the node itself) under `ffff:ffff:ffff:ffff::/64`, inside
/// the multicast range, which no packet's source address can be.
#[inline(always)]
pub const fn netns_client(netns_cookie: u64) -> [u32; 4] {
    [
        u32::MAX,
        u32::MAX,
        (netns_cookie >> 32) as u32,
        netns_cookie as u32,
    ]
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] with fixed-width integer fields and explicit padding,
    // so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointFrontend {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SourceRangeData {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for DatapathStats {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for SctpScratch {}
    unsafe impl aya::Pod for SnatConfig {}
    unsafe impl aya::Pod for SnatValue {}
    unsafe impl aya::Pod for SnatScratch {}
    unsafe impl aya::Pod for L2Port {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
}
