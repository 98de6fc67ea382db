//! SCTP's CRC32c after a port change, in programs of their own. The checksum loop is the
//! largest thing the verifier walks; inside `weir_xdp` it was walked again for every path that
//! reached it, and unrelated changes pushed the program past the verifier's budget. Here it is
//! verified once per program. The main programs rewrite the packet, zero the checksum field and
//! tail-call these.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    programs::{TcContext, XdpContext},
};
use lb_common::{SctpScratch, drop_reason, proto};

use crate::{
    SCTP_SCRATCH, TC_TAILS, XDP_TAILS, csum, fwd,
    parse::{self, L3, L3Result, Ports, ptr_at},
    stats,
};

/// Slot of the checksum programs in `XDP_TAILS` / `TC_TAILS`.
pub const CHECKSUM: u32 = 0;

/// Hands a DNATed SCTP packet on to `weir_xdp_sctp`; returns only if that fails.
#[inline(always)]
pub fn xdp_checksum(ctx: &XdpContext, service_id: u32, backend_id: u32, generation: u32) -> u32 {
    if let Some(s) = SCTP_SCRATCH.get_ptr_mut(0) {
        unsafe {
            *s = SctpScratch {
                backend_id,
                backend_generation: generation,
            }
        };
        unsafe { XDP_TAILS.tail_call(ctx, CHECKSUM) };
    }
    stats::drop(service_id, drop_reason::SCTP_CHECKSUM);
    xdp_action::XDP_DROP
}

/// Hands a reverse-NATed SCTP reply on to `weir_tc_sctp`; returns only if that fails.
#[inline(always)]
pub fn tc_checksum(ctx: &TcContext, service_id: u32) -> i32 {
    unsafe { TC_TAILS.tail_call(ctx, CHECKSUM) };
    stats::drop(service_id, drop_reason::SCTP_CHECKSUM);
    TC_ACT_SHOT
}

/// The CRC32c of the SCTP part of `l3`'s packet (checksum field already zeroed).
#[inline(always)]
fn crc_of<C: csum::LoadBytes>(ctx: &C, l3: Option<L3>) -> Option<(L3, u32)> {
    let l3 = l3?;
    if l3.proto != proto::SCTP {
        return None;
    }
    let len = l3.len as usize - (l3.l4_off - l3.off);
    let crc = csum::sctp_crc32c(ctx, l3.l4_off, len)?;
    Some((l3, crc))
}

/// `weir_xdp_sctp`: the CRC32c of the (already rewritten) packet, then forwarding.
#[inline(always)]
pub fn xdp_program(ctx: &XdpContext) -> u32 {
    let fail = || {
        stats::drop(0, drop_reason::SCTP_CHECKSUM);
        xdp_action::XDP_DROP
    };
    let Some(s) = SCTP_SCRATCH.get_ptr(0) else {
        return fail();
    };
    let s = unsafe { *s };
    let Some((l3, crc)) = crc_of(ctx, parse::l3_any(ctx.data(), ctx.data_end())) else {
        return fail();
    };
    let (data, end) = (ctx.data(), ctx.data_end());
    let (Some(c), Some(ports)) = (
        ptr_at::<u32>(data, end, l3.l4_off + 8),
        ptr_at::<Ports>(data, end, l3.l4_off),
    ) else {
        return fail();
    };
    unsafe { *c = crc };
    let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };
    fwd::forward(ctx, &l3, sport, dport, s.backend_id, s.backend_generation)
}

/// `weir_tc_sctp`: the CRC32c of the (already rewritten) reply, which may be non-linear
/// (the checksum is read through `bpf_skb_load_bytes`).
#[inline(always)]
pub fn tc_program(ctx: &TcContext) -> i32 {
    let fail = || {
        stats::drop(0, drop_reason::SCTP_CHECKSUM);
        TC_ACT_SHOT
    };
    let l3 = match parse::l3_skb(ctx.data(), ctx.data_end(), ctx.len()) {
        L3Result::Ip(l3) => Some(l3),
        _ => None,
    };
    let Some((l3, crc)) = crc_of(ctx, l3) else {
        return fail();
    };
    if ctx.store(l3.l4_off + 8, &crc, 0).is_err() {
        return fail();
    }
    TC_ACT_OK
}
