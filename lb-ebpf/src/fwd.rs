//! Forwarding a rewritten packet: a FIB lookup, then an XDP redirect where the kernel knows the
//! next hop's MAC and the egress interface runs weir natively; otherwise the packet goes to the
//! kernel (XDP_PASS), which routes it and resolves the neighbour itself.
//!
//! The FIB's answer for a backend is cached per CPU for `NEXTHOP_TTL_NS` (a FIB lookup costs
//! more than everything else on the established path): a changed route or neighbour is seen
//! within that time. The cache is keyed by backend, so policy routing that depends on the
//! ingress interface is not supported on the redirect path.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action,
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use lb_common::{NextHop, datapath_stat, family, limits};

use crate::{
    NEXTHOPS, TX_PORTS, csum,
    parse::{EthHdr, Ipv4Hdr, Ipv6Hdr, L3, ptr_at},
    stats,
};

/// `struct bpf_fib_lookup` (include/uapi/linux/bpf.h), with the unions flattened to the
/// members used here.
#[repr(C)]
struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport: u16,
    dport: u16,
    tot_len: u16,
    ifindex: u32,
    /// IPv4 TOS in the low byte, or the IPv6 flow information.
    flowinfo: u32,
    src: [u32; 4],
    dst: [u32; 4],
    vlan: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}
const _: () = assert!(size_of::<FibParams>() == 64);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

#[inline(always)]
pub fn to_kernel() -> u32 {
    stats::datapath(datapath_stat::FWD_KERNEL);
    xdp_action::XDP_PASS
}

/// Forwards the packet described by `l3`, whose headers already carry the new destination:
/// backend `backend_id` of generation `generation` (whose next hop is cached per CPU).
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    l3: &L3,
    sport_be: u16,
    dport_be: u16,
    backend_id: u32,
    generation: u32,
) -> u32 {
    match next_hop(
        ctx,
        l3,
        sport_be,
        dport_be,
        cache_of(backend_id),
        generation,
    ) {
        Some(hop) => send(ctx, l3, &hop),
        None => to_kernel(),
    }
}

/// Backend `backend_id`'s next-hop cache slot (none for id 0).
#[inline(always)]
pub fn cache_of(backend_id: u32) -> Option<*mut NextHop> {
    if backend_id != 0 {
        NEXTHOPS.get_ptr_mut(backend_id)
    } else {
        None
    }
}

/// Where a packet goes out: interface, source and destination MACs.
pub struct Hop {
    pub ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// The next hop of the packet described by `l3`, whose headers already carry the new
/// destination, when XDP can send it itself: `None` for the kernel to route (tagged,
/// expiring, no route or neighbour). `cache` holds the FIB's last answer for this destination
/// (valid for `generation`, for `NEXTHOP_TTL_NS`, and for packets no longer than the one it
/// was asked for) and is refreshed when it does not.
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    l3: &L3,
    sport_be: u16,
    dport_be: u16,
    cache: Option<*mut NextHop>,
    generation: u32,
) -> Option<Hop> {
    // A tagged frame belongs to a VLAN device the FIB lookup does not see: let the kernel
    // route it.
    if l3.tagged {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let ttl = if l3.family == family::V6 {
        ptr_at::<Ipv6Hdr>(data, end, l3.off).map(|ip| unsafe { (*ip).hop_limit })
    } else {
        ptr_at::<Ipv4Hdr>(data, end, l3.off).map(|ip| unsafe { (*ip).ttl })
    };
    // The kernel answers an expiring packet with time-exceeded.
    if !matches!(ttl, Some(t) if t > 1) {
        return None;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match cache {
        Some(nh)
            if unsafe {
                (*nh).generation == generation
                    && (*nh).ifindex != 0
                    && now < (*nh).expires_ns
                    && l3.len <= (*nh).checked_len
            } =>
        unsafe {
            Some(Hop {
                ifindex: (*nh).ifindex,
                smac: (*nh).smac,
                dmac: (*nh).dmac,
            })
        },
        cache => {
            let p = fib_lookup(ctx, l3, sport_be, dport_be)?;
            if let Some(nh) = cache {
                unsafe {
                    *nh = NextHop {
                        expires_ns: now + limits::NEXTHOP_TTL_NS,
                        ifindex: p.ifindex,
                        generation,
                        checked_len: l3.len,
                        smac: p.smac,
                        dmac: p.dmac,
                        _pad: [0; 4],
                    };
                }
            }
            Some(Hop {
                ifindex: p.ifindex,
                smac: p.smac,
                dmac: p.dmac,
            })
        }
    }
}

/// Whether XDP may redirect to `ifindex` (weir runs there natively).
#[inline(always)]
pub fn can_redirect(ifindex: u32) -> bool {
    TX_PORTS.get(ifindex).is_some()
}

/// Sends the packet to `hop` by XDP redirect (the kernel forwards it when the interface
/// cannot take redirects).
#[inline(always)]
pub fn send(ctx: &XdpContext, l3: &L3, hop_to: &Hop) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let Some(eth) = ptr_at::<EthHdr>(data, end, 0) else {
        return to_kernel();
    };
    let eth = unsafe { &mut *eth };
    let (old_dst, old_src) = (eth.dst, eth.src);
    eth.dst = hop_to.dmac;
    eth.src = hop_to.smac;
    hop(data, end, l3, -1);
    match TX_PORTS.redirect(hop_to.ifindex, xdp_action::XDP_PASS as u64) {
        Ok(action) => {
            stats::datapath(datapath_stat::FWD_REDIRECT);
            action
        }
        Err(_) => {
            // The egress interface cannot take redirects: undo and let the kernel forward.
            eth.dst = old_dst;
            eth.src = old_src;
            hop(data, end, l3, 1);
            to_kernel()
        }
    }
}

/// Asks the FIB for the next hop of the packet's (new) destination; `None` unless it has one
/// with a known neighbour that the packet's size fits.
#[inline(always)]
fn fib_lookup(ctx: &XdpContext, l3: &L3, sport_be: u16, dport_be: u16) -> Option<FibParams> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let mut p: FibParams = unsafe { zeroed() };
    p.l4_protocol = l3.proto;
    p.sport = sport_be;
    p.dport = dport_be;
    p.tot_len = l3.len as u16;
    p.ifindex = ctx.ingress_ifindex() as u32;
    if l3.family == family::V6 {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(data, end, l3.off)? };
        p.family = AF_INET6;
        p.flowinfo = ip.vtcfl & 0x0fff_ffffu32.to_be();
        p.src = ip.saddr;
        p.dst = ip.daddr;
    } else {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(data, end, l3.off)? };
        p.family = AF_INET;
        p.flowinfo = ip.tos as u32;
        p.src[0] = ip.saddr;
        p.dst[0] = ip.daddr;
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            (&raw mut p).cast(),
            size_of::<FibParams>() as i32,
            0,
        )
    };
    (rc == BPF_FIB_LKUP_RET_SUCCESS).then_some(p)
}

/// Adds `delta` to the TTL / hop limit (fixing the IPv4 header checksum).
#[inline(always)]
fn hop(data: usize, end: usize, l3: &L3, delta: i8) {
    if l3.family == family::V6 {
        if let Some(ip) = ptr_at::<Ipv6Hdr>(data, end, l3.off) {
            unsafe { (*ip).hop_limit = (*ip).hop_limit.wrapping_add_signed(delta) };
        }
    } else if let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, l3.off) {
        let ip = unsafe { &mut *ip };
        let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl = ip.ttl.wrapping_add_signed(delta);
        let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.check = csum::replace2(ip.check, old, new);
    }
}
