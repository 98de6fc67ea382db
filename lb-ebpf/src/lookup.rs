//! Map lookups: is it a VIP, which service, is the client allowed, and which backend a flow
//! goes to (connection table, ClientIP affinity, Maglev).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_loop},
};
use lb_common::{
    AffinityKey, AffinityValue, BackendValue, EndpointKey, EndpointValue, FlowKey, FlowValue,
    ServiceKey, ServiceValue, SourceRangeData, VipKey, backend_flags, datapath_stat,
    endpoint_flags, flow_flags,
    hash::{client_hash, flow_hash},
    limits, proto, scope, service_flags, source_range_prefix, vip_filter_index,
};

use crate::{
    AFFINITY, BACKENDS, CONNTRACK, ENDPOINTS, HALF_OPEN, MAGLEV, SERVICES, SOURCE_RANGES,
    VIP_FILTER, VIPS, stats,
};

/// One inlined array read: false means `dst` is certainly not a VIP.
#[inline(always)]
pub fn maybe_vip(dst: &[u32; 4]) -> bool {
    matches!(VIP_FILTER.get(vip_filter_index(dst)), Some(n) if *n != 0)
}

#[inline(always)]
pub fn is_vip(dst: &[u32; 4], family: u8) -> bool {
    let key = VipKey {
        addr: *dst,
        family,
        _pad: [0; 3],
    };
    VIPS.get_ptr(key).is_some()
}

/// The verdict for a packet weir cannot forward: dropped and counted (as no service's) when it
/// is addressed to a VIP, otherwise left to the kernel.
#[inline(always)]
pub fn drop_if_vip(dst: &[u32; 4], family: u8, reason: u32) -> u32 {
    if is_vip(dst, family) {
        stats::drop(0, reason);
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[inline(always)]
pub fn service(key: &ServiceKey) -> Option<ServiceValue> {
    SERVICES.get_ptr(key).map(|v| unsafe { *v })
}

/// The service of the frontend a packet from outside (`scope::EXTERNAL`) is addressed to.
#[inline(always)]
pub fn external_service(
    vip: &[u32; 4],
    port_be: u16,
    proto: u8,
    family: u8,
) -> Option<ServiceValue> {
    service(&ServiceKey {
        addr: *vip,
        port_be,
        proto,
        family,
        scope: scope::EXTERNAL,
        _pad: [0; 3],
    })
}

#[inline(always)]
pub fn source_allowed(service_id: u32, src: &[u32; 4]) -> bool {
    let key = aya_ebpf::btf_maps::lpm_trie::Key::new(
        source_range_prefix(128),
        SourceRangeData {
            service_id_be: service_id.to_be(),
            addr: *src,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// The backend `id` if it still exists with the generation a flow remembers.
#[inline(always)]
fn live_backend(id: u32, generation: u32) -> Option<BackendValue> {
    let b = unsafe { *BACKENDS.get_ptr(id)? };
    if b.flags & backend_flags::PRESENT != 0 && b.generation == generation && id != 0 {
        Some(b)
    } else {
        None
    }
}

/// The Maglev table's choice for hash `h`.
#[inline(always)]
pub fn maglev(svc: &ServiceValue, h: u32) -> Option<(u32, BackendValue)> {
    if svc.table_size == 0 {
        return None;
    }
    let slot = svc.table_offset + h % svc.table_size;
    let id = *MAGLEV.get_value(svc.table_page, &slot)?;
    if id == 0 {
        return None;
    }
    let b = unsafe { *BACKENDS.get_ptr(id)? };
    if b.flags & backend_flags::PRESENT == 0 {
        return None;
    }
    Some((id, b))
}

/// What the connection table says about a flow.
pub enum Established {
    /// The flow's backend lives: (service id, backend id, backend, source-NAT port).
    Hit(u32, u32, BackendValue, u16),
    /// The flow's backend is gone: it must be steered again.
    Stale,
    Miss,
}

/// TCP flags, as `tcp_flags` reads them.
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;

    /// A connection's first packet: SYN without ACK.
    #[inline(always)]
    pub const fn opens(f: u8) -> bool {
        f & (SYN | ACK | RST) == SYN
    }

    /// A client's packet past the handshake: ACK without SYN or RST.
    #[inline(always)]
    pub const fn acks(f: u8) -> bool {
        f & (ACK | SYN | RST) == ACK
    }
}

/// The connection-table entry of `flow` (TCP flags `flags`, 0 for other protocols): in
/// `CONNTRACK`, else in `HALF_OPEN`, where a handshake's entry moves to `CONNTRACK` with the
/// client's first ACK, and where a client's RST moves an established one.
#[inline(always)]
pub fn established(flow: &FlowKey, flags: u8) -> Established {
    let ct = match CONNTRACK.get_ptr_mut(flow) {
        Some(p) => {
            let ct = unsafe { *p };
            if flags & (tcp::FIN | tcp::SYN) != 0 {
                ending(p, ct.flags, flags);
            }
            if flags & tcp::RST != 0 {
                // Over: its entry goes where a flood pushes out entries first.
                let closing = FlowValue {
                    flags: ct.flags | flow_flags::CLOSING,
                    ..ct
                };
                let _ = HALF_OPEN.insert(flow, closing, 0);
                let _ = CONNTRACK.remove(flow);
            }
            ct
        }
        None => {
            if flow.proto != proto::TCP {
                return Established::Miss;
            }
            let Some(h) = HALF_OPEN.get_ptr(flow) else {
                return Established::Miss;
            };
            let h = unsafe { *h };
            if h.flags & flow_flags::CLOSING == 0 && tcp::acks(flags) {
                let promoted = FlowValue {
                    flags: h.flags | ((flags & tcp::FIN) as u16 * flow_flags::FIN),
                    ..h
                };
                let _ = CONNTRACK.insert(flow, promoted, 0);
                let _ = HALF_OPEN.remove(flow);
                stats::datapath(datapath_stat::FLOW_PROMOTED);
            }
            h
        }
    };
    match live_backend(ct.backend_id, ct.backend_generation) {
        Some(b) => Established::Hit(ct.service_id, ct.backend_id, b, ct.snat_port_be),
        None => Established::Stale,
    }
}

/// Marks an established entry (at `p`, flags `now`) as ending when the client's packet
/// (TCP flags `flags`, FIN or SYN among them) carries FIN, and as not ending when it opens a
/// connection again with the same key. Only FIN and SYN packets get here: the fast path does
/// not write.
#[inline(always)]
fn ending(p: *mut FlowValue, now: u16, flags: u8) {
    let then = if tcp::opens(flags) {
        now & !flow_flags::FIN
    } else if flags & tcp::FIN != 0 {
        now | flow_flags::FIN
    } else {
        now
    };
    if then != now {
        unsafe { (*p).flags = then };
    }
}

/// How a flow stands on a backend (see `flow_on`), in the order reverse NAT prefers them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Standing {
    /// No entry on that backend.
    None,
    /// Over: its client sent FIN or RST.
    Ended,
    /// In its handshake (`HALF_OPEN`).
    Opening,
    /// Established and not ending.
    Established,
}

/// How `flow` stands on backend `backend_id` (its entry in `CONNTRACK` or `HALF_OPEN`).
#[inline(always)]
pub fn flow_on(flow: &FlowKey, backend_id: u32) -> Standing {
    let ended = flow_flags::FIN | flow_flags::CLOSING;
    if let Some(ct) = CONNTRACK.get_ptr(flow)
        && unsafe { (*ct).backend_id } == backend_id
    {
        return if unsafe { (*ct).flags } & ended == 0 {
            Standing::Established
        } else {
            Standing::Ended
        };
    }
    if flow.proto != proto::TCP {
        return Standing::None;
    }
    match HALF_OPEN.get_ptr(flow) {
        Some(h) if unsafe { (*h).backend_id } == backend_id => {
            if unsafe { (*h).flags } & ended == 0 {
                Standing::Opening
            } else {
                Standing::Ended
            }
        }
        _ => Standing::None,
    }
}

/// The entry of `flow` in `CONNTRACK` or `HALF_OPEN`, for reading.
#[inline(always)]
pub fn flow_entry(flow: &FlowKey) -> Option<FlowValue> {
    if let Some(ct) = CONNTRACK.get_ptr(flow) {
        return Some(unsafe { *ct });
    }
    if flow.proto == proto::TCP
        && let Some(h) = HALF_OPEN.get_ptr(flow)
    {
        return Some(unsafe { *h });
    }
    None
}

/// Backend for a flow without a usable connection-table entry: the affinity entry while it is
/// fresh and its backend lives, else Maglev.
#[inline(always)]
pub fn pick(svc: &ServiceValue, flow: &FlowKey) -> Option<(u32, BackendValue)> {
    pick_for(svc, &flow.src, || {
        flow_hash(
            &flow.src,
            &flow.dst,
            flow.sport_be,
            flow.dport_be,
            flow.proto,
        )
    })
}

/// The backend for a new flow of `client`: with ClientIP affinity the client's entry while it
/// is fresh and its backend lives, else Maglev on the client's hash (remembered); without,
/// Maglev on `hash()`.
#[inline(always)]
pub fn pick_for(
    svc: &ServiceValue,
    client: &[u32; 4],
    hash: impl FnOnce() -> u32,
) -> Option<(u32, BackendValue)> {
    if svc.flags & service_flags::AFFINITY == 0 {
        return maglev(svc, hash());
    }
    let key = AffinityKey {
        client: *client,
        service_id: svc.id,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(a) = AFFINITY.get_ptr_mut(key) {
        let a = unsafe { &mut *a };
        if now.wrapping_sub(a.last_used_ns) <= svc.affinity_timeout_s as u64 * 1_000_000_000
            && let Some(b) = live_backend(a.backend_id, a.backend_generation)
        {
            a.last_used_ns = now;
            stats::datapath(datapath_stat::AFFINITY_HIT);
            return Some((a.backend_id, b));
        }
    }
    let (id, b) = maglev(svc, client_hash(client))?;
    let value = AffinityValue {
        backend_id: id,
        backend_generation: b.generation,
        last_used_ns: now,
    };
    let _ = AFFINITY.insert(key, value, 0);
    Some((id, b))
}

/// Remembers where a flow without a live connection-table entry was steered (`id`, `b`) in
/// the connection table, whose entry also tells reverse NAT that the replies are the flow's
/// (a source-NATed flow's port is added by `snat`). `stale`: the flow had an entry whose
/// backend is gone (in either table), which is replaced.
#[inline(always)]
pub fn record(
    svc: &ServiceValue,
    flow: &FlowKey,
    flags: u8,
    stale: bool,
    id: u32,
    b: &BackendValue,
) {
    let ct = FlowValue {
        backend_id: id,
        backend_generation: b.generation,
        service_id: svc.id,
        snat_port_be: 0,
        flags: 0,
    };
    // A TCP handshake waits in `HALF_OPEN` for the client's ACK; anything else (UDP, SCTP, a
    // TCP flow met mid-stream) is established at once.
    if flow.proto == proto::TCP && tcp::opens(flags) {
        if stale {
            // Its old entry must not hide this one from the lookups that read CONNTRACK first.
            let _ = CONNTRACK.remove(flow);
        }
        let _ = HALF_OPEN.insert(flow, ct, 0);
        stats::datapath(datapath_stat::FLOW_HALF_OPEN);
    } else {
        if stale {
            let _ = HALF_OPEN.remove(flow);
        }
        let _ = CONNTRACK.insert(flow, ct, 0);
    }
    stats::new_flow(svc.id, id);
}

/// Whether a new flow of service `svc` steered to `b` must be checked for a clash (see
/// `clashes`): its service has no ClientIP affinity (which keeps its backend), and `b`'s
/// endpoint serves another frontend. One lookup. Source-NATed flows are checked too: a
/// packet that XDP cannot send out itself goes to the kernel destination-NATed only, with the
/// client's address and port (see `snat`).
#[inline(always)]
pub fn may_clash(svc: &ServiceValue, flow: &FlowKey, b: &BackendValue) -> bool {
    svc.flags & service_flags::AFFINITY == 0
        && endpoint(flow, b).is_some_and(|ep| unsafe { (*ep).count } >= 2)
}

#[inline(always)]
fn endpoint(flow: &FlowKey, b: &BackendValue) -> Option<*const EndpointValue> {
    let key = EndpointKey {
        addr: b.addr,
        port_be: b.port_be,
        proto: flow.proto,
        family: flow.family,
    };
    ENDPOINTS.get_ptr(key)
}

/// How many further slots of a service's Maglev table a flow whose choice clashes tries.
pub const CLASH_STEPS: u32 = 16;

/// Whether the client of `flow` (its address and port) has a connection on endpoint `b`
/// through another frontend of it: the same 4-tuple at the backend. A connection closed by the
/// client's RST does not count; a source-NATed one does (its packets may reach the backend
/// with the client's address, see `may_clash`). `other` is working space for the other
/// frontends' flow keys (kept off the stack). The frontends are walked by `bpf_loop`, whose
/// body the verifier checks once rather than once per frontend, and this is a function of its
/// own for the same reason.
#[inline(never)]
pub fn clashes(flow: &FlowKey, b: &BackendValue, other: &mut FlowKey) -> bool {
    let Some(ep) = endpoint(flow, b) else {
        return false;
    };
    let count = unsafe { (*ep).count };
    *other = *flow;
    let mut scan = ClashScan {
        ep,
        other,
        found: 0,
    };
    let step: unsafe extern "C" fn(u64, *mut c_void) -> i64 = clash_step;
    unsafe {
        bpf_loop(
            count.min(limits::MAX_ENDPOINT_FRONTENDS as u32),
            step as *mut c_void,
            (&raw mut scan).cast(),
            0,
        )
    };
    scan.found != 0
}

/// What `clash_step` reads and answers.
#[repr(C)]
struct ClashScan {
    ep: *const EndpointValue,
    /// The new flow's key, whose destination each step sets to a frontend's.
    other: *mut FlowKey,
    found: u64,
}

/// `bpf_loop` body of `clashes`: frontend `i` of the endpoint. 1 stops the loop.
unsafe extern "C" fn clash_step(i: u64, ctx: *mut c_void) -> i64 {
    let scan = unsafe { &mut *(ctx as *mut ClashScan) };
    if i >= limits::MAX_ENDPOINT_FRONTENDS as u64 {
        return 1;
    }
    let f = unsafe { &(*scan.ep).frontends[i as usize] };
    let other = unsafe { &mut *scan.other };
    // The new flow's own frontend (between steps `other` holds the flow's own key).
    if f.flags & endpoint_flags::INTERNAL != 0
        || (f.vip == other.dst && f.vport_be == other.dport_be)
    {
        return 0;
    }
    let (vip, vport) = (other.dst, other.dport_be);
    other.dst = f.vip;
    other.dport_be = f.vport_be;
    let clash = flow_entry(other)
        .is_some_and(|e| e.backend_id == f.backend_id && e.flags & flow_flags::CLOSING == 0);
    other.dst = vip;
    other.dport_be = vport;
    if clash {
        scan.found = 1;
        return 1;
    }
    0
}

/// The backend of the next `CLASH_STEPS` slots of the table after `flow`'s own whose endpoint
/// has no clashing connection (see `clashes`), other than `taken`; None when there is none
/// (one backend, or every one of them clashes).
#[inline(always)]
pub fn clash_free(
    svc: &ServiceValue,
    flow: &FlowKey,
    taken: u32,
    other: &mut FlowKey,
) -> Option<(u32, BackendValue)> {
    let h = flow_hash(
        &flow.src,
        &flow.dst,
        flow.sport_be,
        flow.dport_be,
        flow.proto,
    );
    for step in 1..=CLASH_STEPS {
        if let Some((id, b)) = maglev(svc, h.wrapping_add(step))
            && id != taken
            && !clashes(flow, &b, other)
        {
            return Some((id, b));
        }
    }
    None
}

/// The backend an existing flow is on (or would be steered to), without creating state: for
/// ICMP errors about the flow.
#[inline(always)]
pub fn flow_backend(svc: &ServiceValue, flow: &FlowKey) -> Option<(u32, BackendValue)> {
    if let Some(ct) = flow_entry(flow)
        && let Some(b) = live_backend(ct.backend_id, ct.backend_generation)
    {
        return Some((ct.backend_id, b));
    }
    let h = if svc.flags & service_flags::AFFINITY != 0 {
        client_hash(&flow.src)
    } else {
        flow_hash(
            &flow.src,
            &flow.dst,
            flow.sport_be,
            flow.dport_be,
            flow.proto,
        )
    };
    maglev(svc, h)
}

/// Records a flow's new source-NAT port (its entry was lost or taken and a port taken again).
#[inline(always)]
pub fn set_snat_port(flow: &FlowKey, port_be: u16) {
    if let Some(ct) = CONNTRACK.get_ptr_mut(flow) {
        unsafe { (*ct).snat_port_be = port_be };
    } else if let Some(h) = HALF_OPEN.get_ptr_mut(flow) {
        unsafe { (*h).snat_port_be = port_be };
    }
}
