//! Source NAT for backends on other nodes (`externalTrafficPolicy: Cluster`): a flow to a
//! backend flagged `SNAT` leaves with this node's address and a port of the configured range
//! as its source, so that the backend's replies come back here; XDP turns them back into
//! VIP → client and forwards them.
//!
//! The `SNAT` table is keyed by the reply as it arrives (backend endpoint → node address and
//! port), one entry per flow. A port is chosen by hashing the client's flow into the range and
//! probing `SNAT_TRIES` ports from there; when none of them is free or expired, the whole
//! range is searched (`bpf_loop`), and when no port is free the longest-idle half-open one
//! (a SYN seen, no ACK) is taken: a new flow is refused only when every port of the backend
//! endpoint is held by a flow past its handshake. An entry is taken with
//! `BPF_NOEXIST`, so two CPUs never hand one (backend endpoint, port) to two flows. A port whose entry has been idle longer than
//! the protocol's idle time may be given to another flow (for TCP: 10 s once closed or while
//! only a SYN was seen, an hour once the client acknowledged); the flow's connection-table entry
//! remembers its port, and a packet of a flow whose entry is gone (evicted or taken) gets a
//! port again.
//!
//! The work happens in `weir_xdp_snat`, tail-called by `weir_xdp` once it has steered the
//! flow (or found a reply's entry): verified once, with a stack of its own. Keys and values
//! are built in the per-CPU scratch slot that also carries the hand-over.

// Keys are passed by reference into the scratch slot: by value they would be copied onto the
// stack, which is what the slot is for.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::cty::c_void;
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, xdp_action},
    helpers::{bpf_ktime_get_coarse_ns, bpf_loop},
    programs::XdpContext,
};
use lb_common::{
    FlowKey, SnatScratch, SnatValue, datapath_stat, drop_reason, family, hash::flow_hash, limits,
    proto, snat_mode, snat_tcp,
};

use crate::{
    BACKENDS, SNAT, SNAT_CONFIG, SNAT_FULL, SNAT_SCRATCH, XDP_TAILS, fwd, lookup,
    nat::{self, End},
    parse::{self, L3, Ports, ptr_at},
    stats,
};

/// Slot of `weir_xdp_snat` in `XDP_TAILS`.
pub const SLOT: u32 = 1;

/// This node's source-NAT address for `fam`, when it has one.
#[inline(always)]
fn node_addr(fam: u8) -> Option<[u32; 4]> {
    let cfg = SNAT_CONFIG.get(0)?;
    let a = if fam == family::V6 {
        cfg.addr6
    } else {
        cfg.addr4
    };
    if a == [0; 4] { None } else { Some(a) }
}

#[inline(always)]
fn scratch() -> Option<&'static mut SnatScratch> {
    SNAT_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// In `weir_xdp`: whether `l3` (ports `sport`, `dport`) is the reply of a source-NATed flow.
/// If so, it is handed to `weir_xdp_snat` and the verdict returned; `None` otherwise (the
/// node's own traffic, or a VIP that is also the node's address), for the VIP path to decide.
#[inline(always)]
pub fn reply(ctx: &XdpContext, l3: &L3, sport: u16, dport: u16) -> Option<u32> {
    if !matches!(l3.proto, proto::TCP | proto::UDP) {
        return None;
    }
    if node_addr(l3.family)? != l3.dst {
        return None;
    }
    let sc = scratch()?;
    sc.key = l3.flow(sport, dport);
    SNAT.get_ptr(&sc.key)?;
    sc.mode = snat_mode::REPLY;
    unsafe { XDP_TAILS.tail_call(ctx, SLOT) };
    // Unreachable unless the program is missing: the kernel routes the reply as it is.
    Some(xdp_action::XDP_PASS)
}

/// In `weir_xdp`: hands a packet of a flow steered to a source-NATed backend on to
/// `weir_xdp_snat` (before any rewrite); returns only if that fails.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    service_id: u32,
    backend_id: u32,
    generation: u32,
    port_be: u16,
) -> u32 {
    if let Some(sc) = scratch() {
        sc.mode = snat_mode::FORWARD;
        sc.service_id = service_id;
        sc.backend_id = backend_id;
        sc.backend_generation = generation;
        sc.port_be = port_be;
        unsafe { XDP_TAILS.tail_call(ctx, SLOT) };
    }
    stats::drop(service_id, drop_reason::SNAT_FAILED);
    xdp_action::XDP_DROP
}

/// `weir_xdp_snat`.
#[inline(always)]
pub fn program(ctx: &XdpContext) -> u32 {
    let Some(sc) = scratch() else {
        return xdp_action::XDP_DROP;
    };
    let (data, end) = (ctx.data(), ctx.data_end());
    let Some(l3) = parse::l3_any(data, end) else {
        return xdp_action::XDP_DROP;
    };
    let Some(ports) = ptr_at::<Ports>(data, end, l3.l4_off) else {
        return xdp_action::XDP_DROP;
    };
    if sc.mode == snat_mode::REPLY {
        return translate_reply(ctx, sc, &l3);
    }
    let service_id = sc.service_id;
    let fail = || {
        stats::drop(service_id, drop_reason::SNAT_FAILED);
        xdp_action::XDP_DROP
    };
    // Field by field: a struct literal would be built on the stack first.
    sc.flow.src = l3.src;
    sc.flow.dst = l3.dst;
    sc.flow.sport_be = unsafe { (*ports).src };
    sc.flow.dport_be = unsafe { (*ports).dst };
    sc.flow.proto = l3.proto;
    sc.flow.family = l3.family;
    sc.flow._pad = [0; 2];
    let (backend_id, generation) = (sc.backend_id, sc.backend_generation);
    let Some(backend) = BACKENDS.get(backend_id) else {
        return fail();
    };
    if backend.generation != generation {
        return fail();
    }
    let Some(node) = node_addr(l3.family) else {
        return fail();
    };
    sc.key.src = backend.addr;
    sc.key.dst = node;
    sc.key.sport_be = backend.port_be;
    sc.key.dport_be = sc.port_be;
    sc.key.proto = l3.proto;
    sc.key.family = l3.family;
    sc.key._pad = [0; 2];
    let old_port = sc.port_be;
    let flags = tcp_flags(ctx, &l3);
    sc.tcp_flags = flags;
    let port = port_for(sc);
    if port == 0 {
        return fail();
    }
    if port != old_port {
        lookup::set_snat_port(&sc.flow, port);
    }
    if flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        sc.key.dport_be = port;
        if let Some(v) = SNAT.get_ptr_mut(&sc.key) {
            track(unsafe { &mut *v }, flags, true, unsafe {
                bpf_ktime_get_coarse_ns()
            });
        }
    }
    if nat::rewrite(ctx, &l3, End::Dst, &backend.addr, backend.port_be).is_none() {
        stats::drop(service_id, drop_reason::MALFORMED);
        return xdp_action::XDP_DROP;
    }
    stats::packet_in(service_id, backend_id, l3.len);
    // A packet with the node's own address as its source is a martian to the kernel's input
    // path: source NAT only what XDP sends itself. Without a known next hop (neighbour not
    // resolved yet, or an egress interface weir does not run on) the packet goes to the
    // kernel destination-NATed only: the kernel resolves the neighbour on the way, and the
    // client's retransmission finds it.
    let Some(hop) = fwd::next_hop(
        ctx,
        &l3,
        sc.flow.sport_be,
        backend.port_be,
        fwd::cache_of(backend_id),
        generation,
    )
    .filter(|h| fwd::can_redirect(h.ifindex)) else {
        return fwd::to_kernel();
    };
    if nat::rewrite(ctx, &l3, End::Src, &node, port).is_none() {
        stats::drop(service_id, drop_reason::MALFORMED);
        return xdp_action::XDP_DROP;
    }
    fwd::send(ctx, &l3, &hop)
}

/// How long an entry must have been idle before its port may go to another flow.
#[inline(always)]
fn idle_ns(l4_proto: u8, tcp_state: u32) -> u64 {
    if l4_proto != proto::TCP {
        limits::SNAT_OTHER_IDLE_NS
    } else if snat_tcp::closed(tcp_state) {
        limits::SNAT_TCP_CLOSED_IDLE_NS
    } else if snat_tcp::half_open(tcp_state) {
        limits::SNAT_TCP_HALF_OPEN_IDLE_NS
    } else {
        limits::SNAT_TCP_IDLE_NS
    }
}

use lookup::tcp::{ACK as TCP_ACK, FIN as TCP_FIN, RST as TCP_RST, SYN as TCP_SYN, acks};

/// The TCP flags of `l3`'s packet (0 for other protocols).
#[inline(always)]
fn tcp_flags(ctx: &XdpContext, l3: &L3) -> u8 {
    if l3.proto != proto::TCP {
        return 0;
    }
    ptr_at::<u8>(ctx.data(), ctx.data_end(), l3.l4_off + 13).map_or(0, |f| unsafe { *f })
}

/// Records a client's (`forward`) or backend's TCP flags in entry `v`: FIN and RST mark the
/// connection's end (its port is given away sooner), a client's SYN starts it over (the
/// client reused its port).
#[inline(always)]
fn track(v: &mut SnatValue, flags: u8, forward: bool, now: u64) {
    let mut state = v.tcp_state;
    if forward && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        state = 0;
    }
    if flags & TCP_FIN != 0 {
        state |= if forward {
            snat_tcp::FIN_FORWARD
        } else {
            snat_tcp::FIN_REPLY
        };
    }
    if flags & TCP_RST != 0 {
        state |= snat_tcp::RST;
    }
    if state != v.tcp_state {
        v.tcp_state = state;
        v.last_ns = now;
    }
}

/// Whether source-NAT entry `v` is the flow's.
#[inline(always)]
fn same_flow(v: &SnatValue, flow: &FlowKey) -> bool {
    v.client == flow.src
        && v.vip == flow.dst
        && v.client_port_be == flow.sport_be
        && v.vport_be == flow.dport_be
}

/// The port the flow in `sc` leaves with (`sc.key` is its reply key with the hand-over's
/// port): that port while the flow's entry is still its own (refreshing its time), else a
/// newly taken one; 0 when every port is held by an open flow. Not inlined, and working in
/// the scratch slot only (which `bpf_loop`'s callback reads too).
#[inline(never)]
fn port_for(sc: &mut SnatScratch) -> u16 {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if sc.port_be != 0
        && let Some(v) = SNAT.get_ptr_mut(&sc.key)
    {
        let v = unsafe { &mut *v };
        if v.backend_id == sc.backend_id && same_flow(v, &sc.flow) {
            if acks(sc.tcp_flags) && v.tcp_state & snat_tcp::ACKED == 0 {
                // The handshake completes: the port is the flow's for the long idle time.
                v.tcp_state |= snat_tcp::ACKED;
                v.last_ns = now;
            } else if now.wrapping_sub(v.last_ns) > limits::SNAT_REFRESH_NS {
                v.last_ns = now;
            }
            return sc.port_be;
        }
    }
    if sc.flow.proto == proto::SCTP {
        // Not translated (its checksum covers the ports): the agent never asks for it.
        return 0;
    }
    let Some(cfg) = SNAT_CONFIG.get(0) else {
        return 0;
    };
    let (min, max) = (cfg.port_min as u32, cfg.port_max as u32);
    if min == 0 || max < min {
        return 0;
    }
    let f = &sc.flow;
    sc.port_start = flow_hash(&f.src, &f.dst, f.sport_be, f.dport_be, f.proto).rotate_left(16);
    sc.port_min = min;
    sc.port_range = max - min + 1;
    sc.found_be = 0;
    sc.half_open_be = 0;
    sc.half_open_ns = u64::MAX;
    sc.now = now;
    // Field by field: a struct literal would be built on the stack first.
    sc.value.client = sc.flow.src;
    sc.value.vip = sc.flow.dst;
    sc.value.client_port_be = sc.flow.sport_be;
    sc.value.vport_be = sc.flow.dport_be;
    sc.value.service_id = sc.service_id;
    sc.value.backend_id = sc.backend_id;
    // A flow met mid-stream (its entry was lost) is past its handshake.
    sc.value.tcp_state = if acks(sc.tcp_flags) {
        snat_tcp::ACKED
    } else {
        0
    };
    sc.value.reply_hop.ifindex = 0;
    sc.value.last_ns = now;

    // The first tries, from the flow's hash (`bpf_loop`: its callback is verified once,
    // whatever the count).
    let tries = sc.port_range.min(limits::SNAT_TRIES);
    if search_ports(tries) {
        return sc.found_be;
    }
    // None of them free or expired: search the whole range for one, unless a search for
    // this backend endpoint on this CPU found none a moment ago (a SYN flood must not make
    // every packet walk the range).
    // (A backend id reused within that time may skip one search: a new flow then takes a
    // half-open port or is refused once.)
    let full = SNAT_FULL.get_ptr_mut(sc.backend_id);
    if sc.port_range > tries
        && !full.is_some_and(|t| now.wrapping_sub(unsafe { *t }) < limits::SNAT_FULL_RETRY_NS)
    {
        stats::datapath(datapath_stat::SNAT_RANGE_SEARCH);
        if search_ports(sc.port_range) {
            return sc.found_be;
        }
        if let Some(t) = full {
            unsafe { *t = now };
        }
    }
    // No port free: the longest-idle half-open flow met gives its port up (like conntrack's
    // early drop of unconfirmed entries), so that a SYN flood holding the range with
    // handshakes that never complete cannot keep real clients out.
    if take_half_open(sc) {
        return sc.found_be;
    }
    0
}

/// Tries the flow's first `n` ports from its hash start (`try_port`); whether one was taken.
#[inline(always)]
fn search_ports(n: u32) -> bool {
    unsafe { bpf_loop(n, search as *mut c_void, core::ptr::null_mut(), 0) };
    scratch().is_some_and(|sc| sc.found_be != 0)
}

/// One step of `search_ports` (`bpf_loop`'s callback): 1 stops it.
extern "C" fn search(i: u64, _ctx: *mut c_void) -> i64 {
    match scratch() {
        Some(sc) => i64::from(try_port(sc, i as u32)),
        None => 1,
    }
}

/// Takes the longest-idle half-open port the search met, if any (`sc.found_be`).
#[inline(always)]
fn take_half_open(sc: &mut SnatScratch) -> bool {
    if sc.half_open_be == 0 {
        return false;
    }
    sc.key.dport_be = sc.half_open_be;
    if SNAT.insert(&sc.key, &sc.value, BPF_ANY as u64).is_err() {
        return false;
    }
    stats::datapath(datapath_stat::SNAT_PORT_HALF_OPEN);
    sc.found_be = sc.half_open_be;
    true
}

/// Tries the flow's `i`-th port from its hash start (`sc.key` is its reply key, `sc.value`
/// its new entry): takes it when no flow has it, when it is the flow's own (its connection
/// table entry was lost), or when its holder has been idle past its protocol's time; then
/// `sc.found_be` is the port. Otherwise remembers it in `sc.half_open_*` when it is the
/// longest-idle half-open TCP port so far.
#[inline(always)]
fn try_port(sc: &mut SnatScratch, i: u32) -> bool {
    // Checked where the compiler can see it: a division's panic path would end the
    // callback without an exit, which the verifier refuses.
    let Some(offset) = sc.port_start.wrapping_add(i).checked_rem(sc.port_range) else {
        return true;
    };
    let port_be = ((sc.port_min + offset) as u16).to_be();
    sc.key.dport_be = port_be;
    // Looked up first: an insert into a full LRU map takes a node (evicting the least
    // recently used entry) even when it then fails for an existing key.
    let Some(old) = SNAT.get_ptr(&sc.key) else {
        if SNAT.insert(&sc.key, &sc.value, BPF_NOEXIST as u64).is_ok() {
            sc.found_be = port_be;
            stats::datapath(datapath_stat::SNAT_PORT_FREE);
            return true;
        }
        // Another CPU took it in between.
        return false;
    };
    let (state, last) = unsafe { ((*old).tcp_state, (*old).last_ns) };
    let own = same_flow(unsafe { &*old }, &sc.flow);
    if own || sc.now.wrapping_sub(last) > idle_ns(sc.flow.proto, state) {
        // Replaced in one update.
        if SNAT.insert(&sc.key, &sc.value, BPF_ANY as u64).is_ok() {
            sc.found_be = port_be;
            stats::datapath(datapath_stat::SNAT_PORT_EXPIRED);
            return true;
        }
        return false;
    }
    if sc.flow.proto == proto::TCP && snat_tcp::half_open(state) && last < sc.half_open_ns {
        sc.half_open_be = port_be;
        sc.half_open_ns = last;
    }
    false
}

/// A reply whose entry `weir_xdp` found (key in the scratch slot): VIP → client, forwarded.
#[inline(always)]
fn translate_reply(ctx: &XdpContext, sc: &mut SnatScratch, l3: &L3) -> u32 {
    let Some(v) = SNAT.get_ptr_mut(&sc.key) else {
        // Gone since (evicted or taken): the kernel has it as it is.
        stats::datapath(datapath_stat::UNTRANSLATED_SNAT_GONE);
        return xdp_action::XDP_PASS;
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let v = unsafe { &mut *v };
    if now.wrapping_sub(v.last_ns) > limits::SNAT_REFRESH_NS {
        v.last_ns = now;
    }
    let flags = tcp_flags(ctx, l3);
    if flags & (TCP_FIN | TCP_RST) != 0 {
        track(v, flags, false, now);
    }
    let (service_id, backend_id, vport, cport) =
        (v.service_id, v.backend_id, v.vport_be, v.client_port_be);
    if nat::rewrite(ctx, l3, End::Src, &v.vip, vport).is_none()
        || nat::rewrite(ctx, l3, End::Dst, &v.client, cport).is_none()
    {
        stats::drop(service_id, drop_reason::MALFORMED);
        return xdp_action::XDP_DROP;
    }
    stats::packet_out(service_id, backend_id, l3.len);
    stats::datapath(datapath_stat::SNAT_REPLY);
    // The flow's own next-hop cache: its client does not change. The entry is shared by the
    // CPUs, but one flow's replies come in on one receive queue, and a refresh rewrites the
    // same answer unless the route changed.
    match fwd::next_hop(ctx, l3, vport, cport, Some(&raw mut v.reply_hop), 0) {
        Some(hop) => fwd::send(ctx, l3, &hop),
        None => fwd::to_kernel(),
    }
}
