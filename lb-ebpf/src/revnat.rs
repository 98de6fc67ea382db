//! Reverse NAT at TC egress: a reply from a backend to a client leaves with the VIP and port
//! as its source. The endpoint table names the frontends the backend serves; a reply is a
//! flow's when the connection table holds the client's flow to one of them on this backend
//! (no per-flow state beyond that entry). Headers are read directly but written only through
//! helpers: a direct write would make the verifier unclone every egress skb, including the
//! node's own traffic.
//!
//! The skb may be anything the kernel hands to a device: non-linear (payload in page
//! fragments, as from a backend behind a bridge or a routed veth with scatter-gather), a
//! TSO/GSO super-packet of up to 64 KB (more with BIG TCP), GRO-merged, cloned, with a partial
//! (`CHECKSUM_PARTIAL`) or a complete checksum. Only the headers are read directly, pulled
//! into the linear area when they are not there; the checksum helpers know the skb's checksum
//! state (with a partial checksum they update the pseudo-header sum and leave the rest to the
//! device or to segmentation, which copies the rewritten headers into every segment).
//!
//! A reply the backend's stack fragmented (UDP larger than its MTU) carries its ports in the
//! first fragment only: that one is translated like any reply and remembered in
//! `REVNAT_FRAGS` by its datagram identification, and the later ones get the VIP as their
//! source from that entry.
//!
//! What may be a flow's reply and still leaves untranslated is counted by reason
//! (`datapath_stat::UNTRANSLATED_*`, `weir_dataplane_untranslated_total`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_loop,
    programs::TcContext,
};
use lb_common::{
    EndpointFrontend, EndpointKey, EndpointValue, FlowKey, FragValue, datapath_stat, drop_reason,
    endpoint_flags, family, limits, proto,
};

use crate::{
    ENDPOINTS, REVNAT_FRAG_KEY, REVNAT_FRAGS,
    lookup::{self, Standing},
    nat,
    parse::{self, L3, L3Result, Ports, ptr_at},
    sctp, stats,
};

/// Offsets of the source address in the IPv4 and IPv6 headers, and of the IPv4 checksum.
const V4_SADDR: usize = 12;
const V4_CHECK: usize = 10;
const V6_SADDR: usize = 8;
/// Bytes pulled into the linear area at least when a header lies past it: Ethernet, two VLAN
/// tags, IPv6 with extension headers and the ports, so that one pull is enough (a packet
/// whose headers reach further is counted as unreadable).
const PULL_HEADERS: u32 = 256;

#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let len = ctx.len();
    let mut r = parse::l3_skb(ctx.data(), ctx.data_end(), len);
    // Headers past the linear area (uncommon: stacks and drivers put them there) are pulled
    // into it: what the parse asked for, and at least `PULL_HEADERS`, so that headers further
    // on come along. The pull gives the skb a head of its own (a clone's is copied), which a
    // rewrite needs anyway.
    if let L3Result::Short(need) = r
        && ctx.pull_data(need.max(PULL_HEADERS).min(len)).is_ok()
    {
        r = parse::l3_skb(ctx.data(), ctx.data_end(), len);
    }
    match r {
        L3Result::Ip(l3) => reply(ctx, &l3),
        L3Result::Fragment { l3, id, first } => fragment(ctx, &l3, id, first),
        L3Result::Short(_) => {
            stats::datapath(datapath_stat::UNTRANSLATED_UNREADABLE);
            TC_ACT_OK
        }
        _ => TC_ACT_OK,
    }
}

/// The ports of `l3`'s TCP, UDP or SCTP packet (in the linear area: `l3_skb` saw to it).
#[inline(always)]
fn ports(ctx: &TcContext, l3: &L3) -> Option<(u16, u16)> {
    if !matches!(l3.proto, proto::TCP | proto::UDP | proto::SCTP) {
        return None;
    }
    let p = ptr_at::<Ports>(ctx.data(), ctx.data_end(), l3.l4_off)?;
    Some(unsafe { ((*p).src, (*p).dst) })
}

/// A whole (unfragmented) packet.
#[inline(always)]
fn reply(ctx: &TcContext, l3: &L3) -> i32 {
    let Some((sport, dport)) = ports(ctx, l3) else {
        return TC_ACT_OK;
    };
    let Some(rev) = reply_of(l3, sport, dport) else {
        return TC_ACT_OK;
    };
    // An SCTP packet whose CRC32c field is 0 leaves its checksum to the device or to
    // segmentation (CHECKSUM_PARTIAL: Linux's SCTP stack zeroes the field and sets the skb
    // up so), which compute it over the rewritten packet: it must stay 0. A complete
    // checksum that happens to be 0 (one packet in 2^32) would leave with 0 and be dropped
    // by the client.
    let crc_pending = l3.proto == proto::SCTP && ctx.load::<u32>(l3.l4_off + 8).ok() == Some(0);
    if rewrite_source(ctx, l3, &rev.vip, Some((sport, rev.vport_be))).is_none() {
        stats::drop(rev.service_id, drop_reason::REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    count(ctx, l3, rev.service_id, rev.backend_id);
    stats::datapath(datapath_stat::REVNAT);
    if l3.proto == proto::SCTP && sport != rev.vport_be && !crc_pending {
        return sctp::tc_checksum(ctx, rev.service_id);
    }
    TC_ACT_OK
}

/// A fragment of a datagram (identification `id`): the first one is translated like a whole
/// reply and leaves an entry for the others, which get the VIP from it. Rare, so a function
/// of its own with its own stack frame.
#[inline(never)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is passed by reference into its per-CPU slot: by value it would be copied onto the stack"
)]
fn fragment(ctx: &TcContext, l3: &L3, id: u32, first: bool) -> i32 {
    // The key in a per-CPU slot: on the stack it would push this frame and the caller's past
    // the verifier's 512 bytes.
    let Some(key) = REVNAT_FRAG_KEY.get_ptr_mut(0) else {
        return TC_ACT_OK;
    };
    let key = unsafe { &mut *key };
    // Field by field: a struct literal would be built on the stack first.
    key.src = l3.src;
    key.dst = l3.dst;
    key.id = id;
    key.proto = l3.proto;
    key.family = l3.family;
    key._pad = [0; 2];
    if !first {
        let Some(v) = REVNAT_FRAGS.get_ptr(&*key) else {
            return TC_ACT_OK;
        };
        let v = unsafe { *v };
        if rewrite_source(ctx, l3, &v.vip, None).is_none() {
            stats::drop(v.service_id, drop_reason::REWRITE_FAILED);
            return TC_ACT_SHOT;
        }
        stats::packet_out(v.service_id, v.backend_id, l3.len);
        stats::datapath(datapath_stat::REVNAT_FRAGMENT);
        return TC_ACT_OK;
    }
    let rev = match ports(ctx, l3) {
        Some((sport, dport)) => reply_of(l3, sport, dport).map(|r| (r, sport)),
        None => None,
    };
    let Some((rev, sport)) = rev else {
        // Not a flow's: an older datagram's entry with the same identification must not
        // rewrite this one's fragments.
        let _ = REVNAT_FRAGS.remove(&*key);
        return TC_ACT_OK;
    };
    if l3.proto == proto::SCTP {
        // Its CRC32c covers the whole datagram, which no fragment holds.
        let _ = REVNAT_FRAGS.remove(&*key);
        stats::datapath(datapath_stat::UNTRANSLATED_FRAGMENT);
        return TC_ACT_OK;
    }
    let value = FragValue {
        vip: rev.vip,
        service_id: rev.service_id,
        backend_id: rev.backend_id,
    };
    if REVNAT_FRAGS.insert(&*key, &value, 0).is_err() {
        stats::datapath(datapath_stat::UNTRANSLATED_FRAGMENT);
        return TC_ACT_OK;
    }
    // The TCP/UDP checksum covers the whole datagram and sits in this fragment: updating it
    // for the new address and port is exact.
    if rewrite_source(ctx, l3, &rev.vip, Some((sport, rev.vport_be))).is_none() {
        let _ = REVNAT_FRAGS.remove(&*key);
        stats::drop(rev.service_id, drop_reason::REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    stats::packet_out(rev.service_id, rev.backend_id, l3.len);
    stats::datapath(datapath_stat::REVNAT);
    stats::datapath(datapath_stat::REVNAT_FRAGMENT);
    TC_ACT_OK
}

/// Counts a translated reply: a GSO super-packet as the segments it leaves as, each with
/// its own copy of the headers.
#[inline(always)]
fn count(ctx: &TcContext, l3: &L3, service_id: u32, backend_id: u32) {
    let segs = unsafe { (*ctx.skb.skb).gso_segs };
    if segs <= 1 {
        stats::packet_out(service_id, backend_id, l3.len);
        return;
    }
    let l4_header = match l3.proto {
        proto::TCP => ctx
            .load::<u8>(l3.l4_off + 12)
            .map_or(20, |doff| ((doff >> 4) as u32) * 4),
        proto::UDP => 8,
        _ => 12,
    };
    let headers = (l3.l4_off - l3.off) as u32 + l4_header;
    let segs = segs.min(0xffff);
    stats::packets_out(
        service_id,
        backend_id,
        segs,
        l3.len as u64 + (segs - 1) as u64 * headers as u64,
    );
}

/// The frontend whose flow this packet (backend `l3.src`:`sport` → client `l3.dst`:`dport`)
/// replies to, if any.
#[inline(always)]
fn reply_of(l3: &L3, sport: u16, dport: u16) -> Option<EndpointFrontend> {
    let key = EndpointKey {
        addr: l3.src,
        port_be: sport,
        proto: l3.proto,
        family: l3.family,
    };
    let ep = ENDPOINTS.get_ptr(key)?;
    let count = unsafe { (*ep).count };
    let mut scan = ReplyScan {
        ep,
        flow: FlowKey {
            src: l3.dst,
            dst: [0; 4],
            sport_be: dport,
            dport_be: 0,
            proto: l3.proto,
            family: l3.family,
            _pad: [0; 2],
        },
        best: Standing::None as u32,
        at: 0,
    };
    if count == 1 {
        // An endpoint of one frontend (the common case): no walk.
        unsafe { reply_step(0, (&raw mut scan).cast()) };
    } else {
        // One client port may have flows through several frontends of this endpoint, one
        // 4-tuple here: the client's next connection from a port whose connection through
        // another frontend met the same backend (`TUPLE_CLASH_UNAVOIDABLE`). The walk is
        // `bpf_loop`'s, whose body the verifier checks once rather than once per frontend.
        let step: unsafe extern "C" fn(u64, *mut c_void) -> i64 = reply_step;
        unsafe {
            bpf_loop(
                count.min(limits::MAX_ENDPOINT_FRONTENDS as u32),
                step as *mut c_void,
                (&raw mut scan).cast(),
                0,
            )
        };
    }
    if scan.best == Standing::None as u32 {
        return None;
    }
    unsafe { &(*ep).frontends }.get(scan.at as usize).copied()
}

/// What `reply_step` reads and answers.
#[repr(C)]
struct ReplyScan {
    ep: *const EndpointValue,
    /// The client's flow, whose destination each step sets to a frontend's.
    flow: FlowKey,
    /// The best `Standing` so far (as u32), and the index of its frontend.
    best: u32,
    at: u32,
}

/// Frontend `i` of `reply_of`'s endpoint (a `bpf_loop` body; 1 stops the loop). The replies
/// go to the client's established flow, else to the one in its handshake, else to one that
/// is over (its client sent FIN or RST): a new connection takes over from an ended one, and a
/// SYN the backend answers for a live connection (a challenge ACK) goes to that one, whose
/// client ignores it, rather than to the new one, whose client would answer with an RST
/// that the backend would take for the live connection's.
unsafe extern "C" fn reply_step(i: u64, ctx: *mut c_void) -> i64 {
    let scan = unsafe { &mut *(ctx as *mut ReplyScan) };
    if i >= limits::MAX_ENDPOINT_FRONTENDS as u64 {
        return 1;
    }
    let f = unsafe { &(*scan.ep).frontends[i as usize] };
    if f.flags & endpoint_flags::INTERNAL != 0 {
        return 0;
    }
    scan.flow.dst = f.vip;
    scan.flow.dport_be = f.vport_be;
    // A handshake's reply (SYN-ACK) finds its flow in `HALF_OPEN`.
    let s = lookup::flow_on(&scan.flow, f.backend_id) as u32;
    if s > scan.best {
        scan.best = s;
        scan.at = i as u32;
    }
    (s == Standing::Established as u32) as i64
}

/// Rewrites the source of `l3`'s packet to `vip` and, with `ports` (old, new), its source
/// port, updating the checksums (a later fragment has no ports and no TCP/UDP checksum).
#[inline(always)]
fn rewrite_source(
    ctx: &TcContext,
    l3: &L3,
    vip: &[u32; 4],
    ports: Option<(u16, u16)>,
) -> Option<()> {
    let v6 = l3.family == family::V6;
    let mut l4_check = match ports {
        Some(_) => nat::l4_checksum_offset(l3.proto).map(|off| l3.l4_off + off),
        None => None,
    };
    let mut mangle = 0u64;
    if l3.proto == proto::UDP && l4_check.is_some() {
        mangle = BPF_F_MARK_MANGLED_0 as u64;
        // UDP over IPv4 without a checksum stays without one.
        if !v6 && ctx.load::<u16>(l3.l4_off + 6).ok()? == 0 {
            l4_check = None;
        }
    }
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangle | 4;
    if v6 {
        if let Some(off) = l4_check {
            for (old, new) in l3.src.iter().zip(vip) {
                ctx.l4_csum_replace(off, *old as u64, *new as u64, pseudo)
                    .ok()?;
            }
        }
        ctx.store(l3.off + V6_SADDR, vip, 0).ok()?;
    } else {
        ctx.l3_csum_replace(l3.off + V4_CHECK, l3.src[3] as u64, vip[3] as u64, 4)
            .ok()?;
        if let Some(off) = l4_check {
            ctx.l4_csum_replace(off, l3.src[3] as u64, vip[3] as u64, pseudo)
                .ok()?;
        }
        ctx.store(l3.off + V4_SADDR, &vip[3], 0).ok()?;
    }
    let Some((old_port, port)) = ports else {
        return Some(());
    };
    if let Some(off) = l4_check {
        ctx.l4_csum_replace(off, old_port as u64, port as u64, mangle | 2)
            .ok()?;
    }
    ctx.store(l3.l4_off, &port, 0).ok()?;
    if l3.proto == proto::SCTP && old_port != port {
        // Finished by `weir_tc_sctp`, which recomputes the CRC32c over the zeroed field.
        ctx.store(l3.l4_off + 8, &0u32, 0).ok()?;
    }
    Some(())
}
