//! ICMP addressed to a VIP: echo requests are answered on the spot (XDP_TX); errors about a
//! flow (fragmentation needed / packet too big, unreachable, time exceeded) go on to the
//! flow's backend, rewritten so that the backend's stack matches them to its socket.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FlowKey, datapath_stat, drop_reason, family, proto};

use crate::{
    csum, fwd, lookup, nat, neigh,
    parse::{EthHdr, Ipv4Hdr, Ipv6Hdr, L3, Ports, ptr_at},
    stats,
};

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    rest: u32,
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;

/// TTL / hop limit of the echo replies weir sends.
const REPLY_TTL: u8 = 64;

#[inline(always)]
pub fn handle(ctx: &XdpContext, l3: &L3) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let Some(icmp) = ptr_at::<IcmpHdr>(data, end, l3.l4_off) else {
        return lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::MALFORMED);
    };
    let kind = unsafe { (*icmp).kind };
    let v6 = l3.family == family::V6;
    let (echo, reply) = if v6 {
        (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
    } else {
        (ICMP_ECHO, ICMP_ECHO_REPLY)
    };
    if kind == echo {
        if !lookup::is_vip(&l3.dst, l3.family) {
            return xdp_action::XDP_PASS;
        }
        echo_reply(data, end, l3, reply);
        stats::datapath(datapath_stat::ICMP_ECHO_REPLY);
        return xdp_action::XDP_TX;
    }
    if v6 && kind == ICMPV6_NEIGHBOR_SOLICIT {
        // Unicast (neighbour unreachability detection) to an announced VIP.
        return neigh::hand_over(ctx);
    }
    let error = if v6 {
        matches!(
            kind,
            ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED
        )
    } else {
        matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
    };
    if error {
        error_to_backend(ctx, l3)
    } else {
        lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::ICMP_UNSUPPORTED)
    }
}

/// Turns the echo request in place into its reply: addresses swapped, TTL reset, type set.
#[inline(always)]
fn echo_reply(data: usize, end: usize, l3: &L3, reply: u8) {
    if let Some(eth) = ptr_at::<EthHdr>(data, end, 0) {
        let eth = unsafe { &mut *eth };
        core::mem::swap(&mut eth.dst, &mut eth.src);
    }
    // Swapping source and destination leaves every checksum unchanged.
    if l3.family == family::V6 {
        if let Some(ip) = ptr_at::<Ipv6Hdr>(data, end, l3.off) {
            let ip = unsafe { &mut *ip };
            core::mem::swap(&mut ip.saddr, &mut ip.daddr);
            ip.hop_limit = REPLY_TTL;
        }
    } else if let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, l3.off) {
        let ip = unsafe { &mut *ip };
        core::mem::swap(&mut ip.saddr, &mut ip.daddr);
        let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl = REPLY_TTL;
        ip.check = csum::replace2(ip.check, old, u16::from_ne_bytes([ip.ttl, ip.proto]));
    }
    if let Some(icmp) = ptr_at::<IcmpHdr>(data, end, l3.l4_off) {
        let icmp = unsafe { &mut *icmp };
        let old = u16::from_ne_bytes([icmp.kind, icmp.code]);
        icmp.kind = reply;
        icmp.check = csum::replace2(icmp.check, old, u16::from_ne_bytes([icmp.kind, icmp.code]));
    }
}

/// The packet an ICMP error quotes: a reply of the flow (VIP:port → client:port).
struct Quoted {
    vip: [u32; 4],
    client: [u32; 4],
    /// Offset of the quoted IP header and of its layer-4 header.
    off: usize,
    l4_off: usize,
    proto: u8,
}

#[inline(always)]
fn quoted(data: usize, end: usize, l3: &L3) -> Option<Quoted> {
    let off = l3.l4_off + core::mem::size_of::<IcmpHdr>();
    if l3.family == family::V6 {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(data, end, off)? };
        Some(Quoted {
            vip: ip.saddr,
            client: ip.daddr,
            off,
            l4_off: off + core::mem::size_of::<Ipv6Hdr>(),
            proto: ip.nexthdr,
        })
    } else {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(data, end, off)? };
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ihl < core::mem::size_of::<Ipv4Hdr>() {
            return None;
        }
        Some(Quoted {
            vip: lb_common::v4_mapped(ip.saddr),
            client: lb_common::v4_mapped(ip.daddr),
            off,
            l4_off: off + ihl,
            proto: ip.proto,
        })
    }
}

/// Sends an ICMP error about a flow to the flow's backend: the outer destination becomes the
/// backend, and the quoted packet's source becomes the backend's address and port, with the
/// quoted IPv4 header checksum, the quoted TCP/UDP checksum (when quoted) and the ICMP
/// checksum kept right.
#[inline(always)]
fn error_to_backend(ctx: &XdpContext, l3: &L3) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let v6 = l3.family == family::V6;
    let Some(q) = quoted(data, end, l3) else {
        return lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::MALFORMED);
    };
    let Some(ports) = ptr_at::<Ports>(data, end, q.l4_off) else {
        return lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::MALFORMED);
    };
    let (vport, cport) = unsafe { ((*ports).src, (*ports).dst) };
    if !matches!(q.proto, proto::TCP | proto::UDP | proto::SCTP) {
        return lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::ICMP_UNSUPPORTED);
    }
    let Some(svc) = lookup::external_service(&q.vip, vport, q.proto, l3.family) else {
        return lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::ICMP_UNSUPPORTED);
    };
    let flow = FlowKey {
        src: q.client,
        dst: q.vip,
        sport_be: cport,
        dport_be: vport,
        proto: q.proto,
        family: l3.family,
        _pad: [0; 2],
    };
    let Some((backend_id, b)) = lookup::flow_backend(&svc, &flow) else {
        stats::drop(svc.id, drop_reason::NO_BACKEND);
        return xdp_action::XDP_DROP;
    };
    let Some(icmp) = ptr_at::<IcmpHdr>(data, end, l3.l4_off) else {
        return xdp_action::XDP_DROP;
    };
    let icmp = unsafe { &mut *icmp };
    let mut check = icmp.check;

    // Outer destination: VIP → backend.
    if v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(data, end, l3.off) else {
            return xdp_action::XDP_DROP;
        };
        unsafe { (*ip).daddr = b.addr };
        // ICMPv6 sums a pseudo-header with the outer addresses.
        check = csum::replace_addr(check, &l3.dst, &b.addr, true);
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, l3.off) else {
            return xdp_action::XDP_DROP;
        };
        let ip = unsafe { &mut *ip };
        ip.check = csum::replace4(ip.check, l3.dst[3], b.addr[3]);
        ip.daddr = b.addr[3];
    }

    // Quoted source address: VIP → backend.
    if v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(data, end, q.off) else {
            return xdp_action::XDP_DROP;
        };
        unsafe { (*ip).saddr = b.addr };
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, q.off) else {
            return xdp_action::XDP_DROP;
        };
        let ip = unsafe { &mut *ip };
        let old_check = ip.check;
        ip.check = csum::replace4(ip.check, q.vip[3], b.addr[3]);
        ip.saddr = b.addr[3];
        check = csum::replace2(check, old_check, ip.check);
    }
    check = csum::replace_addr(check, &q.vip, &b.addr, v6);

    // Quoted TCP/UDP checksum, when the error quotes that far.
    if let Some(off) = nat::l4_checksum_offset(q.proto)
        && let Some(c) = ptr_at::<u16>(data, end, q.l4_off + off)
    {
        let old = unsafe { *c };
        if !(q.proto == proto::UDP && old == 0 && !v6) {
            let new = csum::replace2(
                csum::replace_addr(old, &q.vip, &b.addr, v6),
                vport,
                b.port_be,
            );
            let new = if q.proto == proto::UDP {
                csum::udp_mangle0(new)
            } else {
                new
            };
            unsafe { *c = new };
            check = csum::replace2(check, old, new);
        }
    }

    // Quoted source port: VIP port → backend port.
    let Some(ports) = ptr_at::<Ports>(data, end, q.l4_off) else {
        return xdp_action::XDP_DROP;
    };
    unsafe { (*ports).src = b.port_be };
    check = csum::replace2(check, vport, b.port_be);
    icmp.check = check;

    stats::datapath(datapath_stat::ICMP_ERROR_TO_BACKEND);
    fwd::forward(ctx, l3, 0, 0, backend_id, b.generation)
}
