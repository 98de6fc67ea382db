//! Header parsing, shared by the XDP and TC programs. Offsets are from the start of the packet.
//!
//! The XDP side asks for the VIP pre-filter (`FILTER = true`): a packet whose destination is
//! certainly not a VIP is left alone after reading its IP destination and one array slot, and
//! malformed headers only matter (get dropped) when the packet is addressed to a VIP.

use core::mem::size_of;

use lb_common::{FlowKey, drop_reason, family, limits, v4_mapped};

use crate::lookup;

const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8u16.to_be();
const ETH_P_ARP: u16 = 0x0806u16.to_be();
/// The first word of link-local multicast addresses (`ff02::/16`, where solicited-node
/// addresses are), as it stands in the packet.
const FF02: u32 = u32::from_ne_bytes([0xff, 0x02, 0, 0]);

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtcfl: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

/// The first four bytes of TCP, UDP and SCTP headers.
#[repr(C)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// A pointer to a `T` at `off`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(data: usize, end: usize, off: usize) -> Option<*mut T> {
    if data + off + size_of::<T>() > end {
        return None;
    }
    Some((data + off) as *mut T)
}

/// An IP packet's layer-3 facts.
pub struct L3 {
    /// Offset of the IP header.
    pub off: usize,
    /// Offset of the layer-4 header (after IPv4 options / IPv6 extension headers).
    pub l4_off: usize,
    /// Length of the IP packet (header and payload) as its header says; Ethernet padding and
    /// trailers beyond it are not part of it.
    pub len: u32,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub family: u8,
    /// Layer-4 protocol.
    pub proto: u8,
    /// The frame carried 802.1Q/802.1ad tags.
    pub tagged: bool,
}

impl L3 {
    /// The packet's 5-tuple with its ports `sport`, `dport` (as they stand in the packet).
    #[inline(always)]
    pub fn flow(&self, sport: u16, dport: u16) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            sport_be: sport,
            dport_be: dport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

pub enum L3Result {
    Ip(L3),
    /// Not IP, or (with the filter) not addressed to a VIP: none of weir's business.
    NotOurs,
    /// An untagged ARP frame, or ICMPv6 to a link-local multicast address (a Neighbor
    /// Solicitation, maybe): for `neigh` (XDP only).
    Neighbor,
    /// Unusable (malformed, fragment, ...) and addressed to `dst`: dropped if that is a VIP.
    Drop {
        dst: [u32; 4],
        family: u8,
        reason: u32,
    },
}

/// Ethernet and up to two VLAN tags: (EtherType, offset of the payload, tagged).
#[inline(always)]
fn ethernet(data: usize, end: usize) -> Option<(u16, usize, bool)> {
    let eth = ptr_at::<EthHdr>(data, end, 0)?;
    let mut proto = unsafe { (*eth).proto };
    let mut off = size_of::<EthHdr>();
    let mut tagged = false;
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let vlan = ptr_at::<VlanHdr>(data, end, off)?;
        proto = unsafe { (*vlan).proto };
        off += size_of::<VlanHdr>();
        tagged = true;
    }
    Some((proto, off, tagged))
}

/// Parses Ethernet/VLAN/IP for the XDP program (with the VIP pre-filter).
#[inline(always)]
pub fn l3(data: usize, end: usize) -> L3Result {
    parse::<true>(data, end)
}

/// Parses Ethernet/VLAN/IP for the TC program (every IP packet).
#[inline(always)]
pub fn l3_any(data: usize, end: usize) -> Option<L3> {
    match parse::<false>(data, end) {
        L3Result::Ip(l3) => Some(l3),
        _ => None,
    }
}

#[inline(always)]
fn parse<const FILTER: bool>(data: usize, end: usize) -> L3Result {
    let Some((proto, off, tagged)) = ethernet(data, end) else {
        return L3Result::NotOurs;
    };
    if proto == ETH_P_IP {
        v4::<FILTER>(data, end, off, tagged)
    } else if proto == ETH_P_IPV6 {
        v6::<FILTER>(data, end, off, tagged)
    } else if FILTER && proto == ETH_P_ARP && !tagged {
        L3Result::Neighbor
    } else {
        L3Result::NotOurs
    }
}

#[inline(always)]
fn v4<const FILTER: bool>(data: usize, end: usize, off: usize, tagged: bool) -> L3Result {
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, off) else {
        return L3Result::NotOurs;
    };
    let ip = unsafe { &*ip };
    let dst = v4_mapped(ip.daddr);
    if FILTER && !lookup::maybe_vip(&dst) {
        return L3Result::NotOurs;
    }
    let drop = |reason| L3Result::Drop {
        dst,
        family: family::V4,
        reason,
    };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let tot = u16::from_be(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || tot < ihl || data + off + tot > end {
        return drop(drop_reason::MALFORMED);
    }
    // More-fragments flag or a fragment offset: only the first fragment has the ports.
    if ip.frag_off & 0x3fffu16.to_be() != 0 {
        return drop(drop_reason::FRAGMENT);
    }
    L3Result::Ip(L3 {
        off,
        l4_off: off + ihl,
        len: tot as u32,
        src: v4_mapped(ip.saddr),
        dst,
        family: family::V4,
        proto: ip.proto,
        tagged,
    })
}

#[inline(always)]
fn v6<const FILTER: bool>(data: usize, end: usize, off: usize, tagged: bool) -> L3Result {
    let Some(ip) = ptr_at::<Ipv6Hdr>(data, end, off) else {
        return L3Result::NotOurs;
    };
    let ip = unsafe { &*ip };
    let dst = ip.daddr;
    if FILTER && dst[0] == FF02 && ip.nexthdr == lb_common::proto::ICMPV6 && !tagged {
        return L3Result::Neighbor;
    }
    if FILTER && !lookup::maybe_vip(&dst) {
        return L3Result::NotOurs;
    }
    let drop = |reason| L3Result::Drop {
        dst,
        family: family::V6,
        reason,
    };
    let total = size_of::<Ipv6Hdr>() + u16::from_be(ip.payload_len) as usize;
    if (u32::from_be(ip.vtcfl) >> 28) != 6 || data + off + total > end {
        return drop(drop_reason::MALFORMED);
    }
    let mut next = ip.nexthdr;
    let mut l4_off = off + size_of::<Ipv6Hdr>();
    for _ in 0..limits::MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some(ext) = ptr_at::<[u8; 2]>(data, end, l4_off) else {
                    return drop(drop_reason::MALFORMED);
                };
                let ext = unsafe { *ext };
                next = ext[0];
                l4_off += (ext[1] as usize + 1) * 8;
            }
            _ => break,
        }
    }
    match next {
        IPPROTO_FRAGMENT => return drop(drop_reason::FRAGMENT),
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
            return drop(drop_reason::IPV6_EXT_HEADERS);
        }
        _ => {}
    }
    if l4_off > off + total {
        return drop(drop_reason::MALFORMED);
    }
    L3Result::Ip(L3 {
        off,
        l4_off,
        len: total as u32,
        src: ip.saddr,
        dst,
        family: family::V6,
        proto: next,
        tagged,
    })
}
