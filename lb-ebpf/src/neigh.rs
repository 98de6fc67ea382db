//! L2 announcement: ARP requests and IPv6 Neighbor Solicitations for a VIP this node announces
//! (`vip_flags::NEIGHBOR`), arriving on an interface of `L2_PORTS`, are answered in place
//! (`XDP_TX`) with that interface's MAC: no kernel address, no user-space round trip, and a
//! takeover is one map write. Untagged frames only; everything else goes on to the kernel.
//!
//! Answers stop when the agent's lease (`L2_LEASE`) runs out: a node whose agent died must not
//! keep answering next to the node that took its VIPs over.
//!
//! A program of its own (`weir_xdp_neigh`, tail-called by `weir_xdp`), so that the non-VIP
//! fast path pays one comparison for it.

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{VipKey, datapath_stat, family, proto, v4_mapped, vip_flags};

use crate::{
    L2_LEASE, L2_PORTS, VIPS, XDP_TAILS,
    parse::{EthHdr, Ipv6Hdr, ptr_at},
    stats,
};

/// Slot of `weir_xdp_neigh` in `XDP_TAILS`.
pub const SLOT: u32 = 2;

const ETH_P_ARP: u16 = 0x0806u16.to_be();
const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ARP_REQUEST: u16 = 1u16.to_be();
const ARP_REPLY: u16 = 2u16.to_be();
const ND_SOLICIT: u8 = 135;
const ND_ADVERT: u8 = 136;
/// The Target Link-Layer Address option (RFC 4861 §4.6.1).
const ND_OPT_TARGET_LL: u8 = 2;
/// A Neighbor Advertisement with the target link-layer address: IPv6 header, ICMPv6 header,
/// target, option.
const NA_ICMP_LEN: usize = 4 + 4 + 16 + 8;
const NA_FRAME_LEN: usize = 14 + 40 + NA_ICMP_LEN;

#[repr(C)]
struct ArpHdr {
    htype: u16,
    ptype: u16,
    hlen: u8,
    plen: u8,
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// In `weir_xdp`: hands an ARP frame or a Neighbor Solicitation to `weir_xdp_neigh`; returns
/// only if that fails (the kernel gets the frame).
#[inline(always)]
pub fn hand_over(ctx: &XdpContext) -> u32 {
    unsafe { XDP_TAILS.tail_call(ctx, SLOT) };
    xdp_action::XDP_PASS
}

/// The MAC weir answers with on the frame's ingress interface, if it announces there (and
/// its agent's lease runs).
#[inline(always)]
fn port_mac(ctx: &XdpContext) -> Option<[u8; 6]> {
    let until = *L2_LEASE.get(0)?;
    if unsafe { bpf_ktime_get_ns() } > until {
        return None;
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    unsafe { L2_PORTS.get(ifindex) }.map(|p| p.mac)
}

#[inline(always)]
fn announced(addr: [u32; 4], fam: u8) -> bool {
    let key = VipKey {
        addr,
        family: fam,
        _pad: [0; 3],
    };
    matches!(unsafe { VIPS.get(key) }, Some(v) if v.flags & vip_flags::NEIGHBOR != 0)
}

/// `weir_xdp_neigh`.
#[inline(always)]
pub fn program(ctx: &XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let Some(eth) = ptr_at::<EthHdr>(data, end, 0) else {
        return xdp_action::XDP_PASS;
    };
    match unsafe { (*eth).proto } {
        ETH_P_ARP => arp(ctx).unwrap_or(xdp_action::XDP_PASS),
        ETH_P_IPV6 => ndp(ctx).unwrap_or(xdp_action::XDP_PASS),
        _ => xdp_action::XDP_PASS,
    }
}

/// An ARP request for an announced VIP becomes the reply, sent back where it came from.
#[inline(always)]
fn arp(ctx: &XdpContext) -> Option<u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let eth = unsafe { &mut *ptr_at::<EthHdr>(data, end, 0)? };
    let a = unsafe { &mut *ptr_at::<ArpHdr>(data, end, 14)? };
    if a.htype != 1u16.to_be()
        || a.ptype != ETH_P_IP
        || a.hlen != 6
        || a.plen != 4
        || a.op != ARP_REQUEST
        // A gratuitous ARP announces the sender's own address: nothing to answer.
        || a.spa == a.tpa
    {
        return None;
    }
    if !announced(v4_mapped(u32::from_ne_bytes(a.tpa)), family::V4) {
        return None;
    }
    let mac = port_mac(ctx)?;
    eth.dst = eth.src;
    eth.src = mac;
    a.op = ARP_REPLY;
    let vip = a.tpa;
    a.tha = a.sha;
    a.tpa = a.spa;
    a.sha = mac;
    a.spa = vip;
    stats::datapath(datapath_stat::ARP_REPLY);
    Some(xdp_action::XDP_TX)
}

/// A Neighbor Solicitation for an announced VIP becomes a solicited Neighbor Advertisement
/// with the interface's MAC as the target link-layer address (RFC 4861 §7.2.4); one from an
/// unspecified source (duplicate address detection) is answered to all nodes, unsolicited.
#[inline(always)]
fn ndp(ctx: &XdpContext) -> Option<u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = unsafe { &*ptr_at::<Ipv6Hdr>(data, end, 14)? };
    // Neighbor Discovery messages come with hop limit 255 (RFC 4861 §7.1.1).
    if ip.nexthdr != proto::ICMPV6 || ip.hop_limit != 255 {
        return None;
    }
    let icmp = ptr_at::<[u8; 8]>(data, end, 54)?;
    if unsafe { (*icmp)[0] } != ND_SOLICIT || unsafe { (*icmp)[1] } != 0 {
        return None;
    }
    if (u16::from_be(ip.payload_len) as usize) < 24 {
        return None;
    }
    let target = unsafe { *ptr_at::<[u32; 4]>(data, end, 62)? };
    if !announced(target, family::V6) {
        return None;
    }
    let mac = port_mac(ctx)?;
    let requester_mac = unsafe { (*ptr_at::<EthHdr>(data, end, 0)?).src };
    let src = ip.saddr;
    let dad = src == [0; 4];
    let (dst, dst_mac, flags) = if dad {
        // ff02::1, 33:33:00:00:00:01; Override only.
        (
            [
                u32::from_ne_bytes([0xff, 0x02, 0, 0]),
                0,
                0,
                u32::from_ne_bytes([0, 0, 0, 1]),
            ],
            [0x33, 0x33, 0, 0, 0, 1],
            0x20u8,
        )
    } else {
        // Solicited and Override.
        (src, requester_mac, 0x60u8)
    };
    // Make the frame exactly a Neighbor Advertisement long.
    let delta = NA_FRAME_LEN as i32 - (end - data) as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, delta) } != 0 {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let eth = unsafe { &mut *ptr_at::<EthHdr>(data, end, 0)? };
    eth.dst = dst_mac;
    eth.src = mac;
    eth.proto = ETH_P_IPV6;
    let ip = unsafe { &mut *ptr_at::<Ipv6Hdr>(data, end, 14)? };
    ip.vtcfl = 0x6000_0000u32.to_be();
    ip.payload_len = (NA_ICMP_LEN as u16).to_be();
    ip.nexthdr = proto::ICMPV6;
    ip.hop_limit = 255;
    ip.saddr = target;
    ip.daddr = dst;
    let na = unsafe { &mut *ptr_at::<[u8; NA_ICMP_LEN]>(data, end, 54)? };
    *na = [0; NA_ICMP_LEN];
    na[0] = ND_ADVERT;
    na[4] = flags;
    for (i, w) in target.iter().enumerate() {
        na[8 + i * 4..12 + i * 4].copy_from_slice(&w.to_ne_bytes());
    }
    na[24] = ND_OPT_TARGET_LL;
    na[25] = 1;
    na[26..32].copy_from_slice(&mac);
    let sum = checksum(&target, &dst, na);
    na[2..4].copy_from_slice(&sum.to_be_bytes());
    stats::datapath(datapath_stat::NEIGHBOR_ADVERT);
    Some(xdp_action::XDP_TX)
}

/// The ICMPv6 checksum of `msg` from `src` to `dst` (RFC 4443 §2.3), in host order.
#[inline(always)]
fn checksum(src: &[u32; 4], dst: &[u32; 4], msg: &[u8; NA_ICMP_LEN]) -> u16 {
    let halves = |w: u32| {
        let b = w.to_ne_bytes();
        u16::from_be_bytes([b[0], b[1]]) as u32 + u16::from_be_bytes([b[2], b[3]]) as u32
    };
    let mut sum: u32 = 0;
    for i in 0..4 {
        sum += halves(src[i]) + halves(dst[i]);
    }
    sum += NA_ICMP_LEN as u32 + proto::ICMPV6 as u32;
    for i in 0..NA_ICMP_LEN / 2 {
        sum += u16::from_be_bytes([msg[2 * i], msg[2 * i + 1]]) as u32;
    }
    // Two folds bring any 32-bit sum into 16 bits (a loop would make the verifier walk it).
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
