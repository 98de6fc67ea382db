//! New flows to an endpoint that serves more than one frontend (two Services, or two ports of
//! one, with the same pods and target port), in a program of its own.
//!
//! Linux gives a client's connections to different destinations the same local port. Without
//! source NAT, two such connections through two frontends of one endpoint would be one
//! 4-tuple at the backend (client:port → endpoint), which takes the second SYN for the first
//! connection's; reverse NAT could not tell their replies apart either. kube-proxy escapes
//! this through conntrack's source-port remapping. Here the new flow goes to the next backend
//! of the service's Maglev table whose endpoint has no connection from that client address and
//! port (`lookup::clash_free`); with none (one backend), it goes where Maglev chose and is
//! counted (`TUPLE_CLASH_UNAVOIDABLE`). That is harmless when the other connection is over
//! (its client sent FIN or RST; the backend takes a SYN for a 4-tuple in TIME_WAIT when the
//! timestamps or the sequence number are newer): reverse NAT gives the 4-tuple's replies to
//! the new connection (`revnat::reply_of`). While the other connection still runs, the new
//! one cannot open (the backend answers its SYN for the live connection, and keeps that one):
//! only a source-port rewrite, with reverse state for it, would tell the two apart.
//!
//! `weir_xdp` hands over only new flows whose chosen endpoint is shared (one `ENDPOINTS`
//! lookup); the walk over the endpoint's frontends, for each candidate backend, is verified
//! here once instead of on every path of `weir_xdp` that steers a flow. This program records
//! the flow's entry and hands the packet back to `weir_xdp`, which finds the entry and sends
//! the packet on as any packet of an established flow.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FlowKey, datapath_stat, drop_reason};

use crate::{
    SHARED_SCRATCH, XDP_TAILS, l4, lookup,
    parse::{self, Ports, ptr_at},
    stats,
};

/// Slot of `weir_xdp_shared` in `XDP_TAILS`.
pub const SLOT: u32 = 3;
/// Slot of `weir_xdp` itself in `XDP_TAILS`, where `weir_xdp_shared` returns.
pub const INGRESS: u32 = 4;

/// `weir_xdp` → `weir_xdp_shared`: what the packet does not say.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SharedScratch {
    /// The TCP flags of the packet (0 for other protocols).
    pub tcp_flags: u32,
    /// The flow had an entry whose backend is gone (see `lookup::record`).
    pub stale: u32,
    /// Working space of `lookup::clashes`.
    pub other: FlowKey,
}

/// In `weir_xdp`: hands a new flow whose Maglev choice is a shared endpoint on to
/// `weir_xdp_shared` (before any rewrite); returns only if that fails.
#[inline(always)]
pub fn hand_over(ctx: &XdpContext, tcp_flags: u8, stale: bool) {
    if let Some(s) = SHARED_SCRATCH.get_ptr_mut(0) {
        unsafe {
            (*s).tcp_flags = tcp_flags as u32;
            (*s).stale = stale as u32;
        }
        unsafe { XDP_TAILS.tail_call(ctx, SLOT) };
    }
}

/// `weir_xdp_shared`: steers the flow clear of a clash, records it and sends it on.
#[inline(always)]
pub fn program(ctx: &XdpContext) -> u32 {
    let Some(s) = SHARED_SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    let s = unsafe { &mut *s };
    let (tcp_flags, stale) = (s.tcp_flags, s.stale);
    let (data, end) = (ctx.data(), ctx.data_end());
    let Some(l3) = parse::l3_any(data, end) else {
        return xdp_action::XDP_DROP;
    };
    let Some(ports) = ptr_at::<Ports>(data, end, l3.l4_off) else {
        return xdp_action::XDP_DROP;
    };
    let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };
    let flow = l3.flow(sport, dport);
    // `weir_xdp` found both a moment ago; the agent may have changed them since.
    let Some(svc) = lookup::external_service(&l3.dst, dport, l3.proto, l3.family) else {
        return lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::NO_SERVICE);
    };
    let Some((mut id, mut b)) = lookup::pick(&svc, &flow) else {
        return l4::drop(svc.id, drop_reason::NO_BACKEND);
    };
    if lookup::clashes(&flow, &b, &mut s.other) {
        match lookup::clash_free(&svc, &flow, id, &mut s.other) {
            Some((other, ob)) => {
                (id, b) = (other, ob);
                stats::datapath(datapath_stat::TUPLE_CLASH_AVOIDED);
            }
            None => stats::datapath(datapath_stat::TUPLE_CLASH_UNAVOIDABLE),
        }
    }
    let stale = stale != 0;
    lookup::record(&svc, &flow, tcp_flags as u8, stale, id, &b);
    if stale {
        stats::datapath(datapath_stat::FLOW_RESTEERED);
    }
    // Back to `weir_xdp`, which finds the flow's entry and sends the packet on (this program
    // would be verified with the whole forwarding path again). Should that fail, its new
    // entry is found at the packet's next pass; this one is dropped.
    unsafe { XDP_TAILS.tail_call(ctx, INGRESS) };
    l4::drop(svc.id, drop_reason::REWRITE_FAILED)
}
