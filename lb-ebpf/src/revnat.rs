//! Reverse NAT at TC egress: a reply from a backend to a client leaves with the VIP and port
//! as its source. The endpoint table names the frontends the backend serves; a reply is a
//! flow's when the connection table holds the client's flow to one of them on this backend
//! (no per-flow state beyond that entry). Headers are read directly but written only through
//! helpers: a direct write would make the verifier unclone every egress skb, including the
//! node's own traffic.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{
    EndpointFrontend, EndpointKey, FlowKey, datapath_stat, drop_reason, family, limits, proto,
};

use crate::{
    CONNTRACK, ENDPOINTS, nat,
    parse::{self, L3, Ports, ptr_at},
    sctp, stats,
};

/// Offsets of the source address in the IPv4 and IPv6 headers, and of the IPv4 checksum.
const V4_SADDR: usize = 12;
const V4_CHECK: usize = 10;
const V6_SADDR: usize = 8;
/// Bytes pulled into the linear area when the headers are not all there.
const PULL: u32 = 128;

#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let mut l3 = parse::l3_any(ctx.data(), ctx.data_end());
    if l3.is_none() && ctx.len() as usize > ctx.data_end() - ctx.data() {
        let _ = ctx.pull_data(PULL.min(ctx.len()));
        l3 = parse::l3_any(ctx.data(), ctx.data_end());
    }
    let Some(l3) = l3 else {
        return TC_ACT_OK;
    };
    if !matches!(l3.proto, proto::TCP | proto::UDP | proto::SCTP) {
        return TC_ACT_OK;
    }
    let Some(ports) = ptr_at::<Ports>(ctx.data(), ctx.data_end(), l3.l4_off) else {
        return TC_ACT_OK;
    };
    let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };
    let Some(rev) = reply_of(&l3, sport, dport) else {
        return TC_ACT_OK;
    };
    if rewrite_source(ctx, &l3, &rev.vip, sport, rev.vport_be).is_none() {
        stats::drop(rev.service_id, drop_reason::REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    stats::packet_out(rev.service_id, rev.backend_id, l3.len);
    stats::datapath(datapath_stat::REVNAT);
    if l3.proto == proto::SCTP && sport != rev.vport_be {
        return sctp::tc_checksum(ctx, rev.service_id);
    }
    TC_ACT_OK
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
    let count = unsafe { (*ep).count } as usize;
    for i in 0..limits::MAX_ENDPOINT_FRONTENDS {
        if i >= count {
            break;
        }
        let f = unsafe { (*ep).frontends[i] };
        let flow = FlowKey {
            src: l3.dst,
            dst: f.vip,
            sport_be: dport,
            dport_be: f.vport_be,
            proto: l3.proto,
            family: l3.family,
            _pad: [0; 2],
        };
        if let Some(ct) = CONNTRACK.get_ptr(flow)
            && unsafe { (*ct).backend_id } == f.backend_id
        {
            return Some(f);
        }
    }
    None
}

#[inline(always)]
fn rewrite_source(
    ctx: &TcContext,
    l3: &L3,
    vip: &[u32; 4],
    old_port: u16,
    port: u16,
) -> Option<()> {
    let v6 = l3.family == family::V6;
    let mut l4_check = nat::l4_checksum_offset(l3.proto).map(|off| l3.l4_off + off);
    let mut mangle = 0u64;
    if l3.proto == proto::UDP {
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
