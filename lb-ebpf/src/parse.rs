//! Header parsing, shared by the XDP and TC programs. Offsets are from the start of the packet.
//!
//! The XDP side asks for the VIP pre-filter (`FILTER = true`): a packet whose destination is
//! certainly not a VIP is left alone after reading its IP destination and one array slot, and
//! malformed headers only matter (get dropped) when the packet is addressed to a VIP.
//!
//! An XDP frame is all in one buffer (weir's programs do not take multi-buffer frames, and
//! generic XDP linearizes the skb first), so `data_end` is the end of the packet. A TC
//! program gets an skb whose linear area (`data..data_end`) may hold only the headers, or
//! not even all of them: a TSO/GSO super-packet of 64 KB from a local socket, a GRO-merged
//! one, or a forwarded one whose payload sits in page fragments. The skb parse (`SKB = true`)
//! therefore checks lengths against the whole packet (`skb->len`) and reads only headers
//! directly; when a header lies past the linear area it answers `Short(n)`: pull the first
//! `n` bytes (`bpf_skb_pull_data`) and parse again. Everything past the headers is read and
//! written through the kernel's helpers, which handle non-linear skbs themselves.

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
    /// (skb parse only) A header needed lies past the linear area: the first `n` bytes must
    /// be pulled into it before the packet can be parsed.
    Short(u32),
    /// Not IP, or (with the filter) not addressed to a VIP: none of weir's business.
    NotOurs,
    /// An untagged ARP frame, or ICMPv6 to a link-local multicast address (a Neighbor
    /// Solicitation, maybe): for `neigh` (XDP only).
    Neighbor,
    /// (skb parse only) An IP fragment: `l3` describes it (`l4_off` and the ports mean
    /// something only in the first one, `first`); `id` is its datagram's identification.
    Fragment {
        l3: L3,
        id: u32,
        first: bool,
    },
    /// Unusable (malformed, fragment, ...) and addressed to `dst`: dropped if that is a VIP.
    Drop {
        dst: [u32; 4],
        family: u8,
        reason: u32,
    },
}

/// Where a packet's bytes are: `data..end` can be read directly. For an skb the packet is
/// `len` bytes long (`skb->len`), of which those past `end` are in page fragments. `len` is a
/// plain number: the verifier allows no packet pointer made from it.
#[derive(Clone, Copy)]
struct Bounds {
    data: usize,
    end: usize,
    len: usize,
}

impl Bounds {
    /// A `T` at `off` to read directly; `Err(Some(n))` when it lies inside the packet but past
    /// the linear area (`n` bytes must be pulled), `Err(None)` when the packet is too short.
    #[inline(always)]
    fn at<T, const SKB: bool>(&self, off: usize) -> Result<*mut T, Option<u32>> {
        match ptr_at::<T>(self.data, self.end, off) {
            Some(p) => Ok(p),
            None if SKB && off + size_of::<T>() <= self.len => {
                Err(Some((off + size_of::<T>()) as u32))
            }
            None => Err(None),
        }
    }

    /// Whether the packet holds `size` bytes from `off` (for an skb, not necessarily in the
    /// linear area).
    #[inline(always)]
    fn holds<const SKB: bool>(&self, off: usize, size: usize) -> bool {
        if SKB {
            off + size <= self.len
        } else {
            self.data + off + size <= self.end
        }
    }
}

/// Ethernet and up to two VLAN tags: (EtherType, offset of the payload, tagged).
#[inline(always)]
fn ethernet<const SKB: bool>(b: &Bounds) -> Result<(u16, usize, bool), Option<u32>> {
    let eth = b.at::<EthHdr, SKB>(0)?;
    let mut proto = unsafe { (*eth).proto };
    let mut off = size_of::<EthHdr>();
    let mut tagged = false;
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let vlan = b.at::<VlanHdr, SKB>(off)?;
        proto = unsafe { (*vlan).proto };
        off += size_of::<VlanHdr>();
        tagged = true;
    }
    Ok((proto, off, tagged))
}

/// Parses Ethernet/VLAN/IP for the XDP program (with the VIP pre-filter).
#[inline(always)]
pub fn l3(data: usize, end: usize) -> L3Result {
    let b = Bounds { data, end, len: 0 };
    parse::<true, false>(&b)
}

/// Parses Ethernet/VLAN/IP of a whole XDP frame (every IP packet).
#[inline(always)]
pub fn l3_any(data: usize, end: usize) -> Option<L3> {
    let b = Bounds { data, end, len: 0 };
    match parse::<false, false>(&b) {
        L3Result::Ip(l3) => Some(l3),
        _ => None,
    }
}

/// Parses Ethernet/VLAN/IP of an skb of `len` bytes (every IP packet) whose linear area is
/// `data..end`; for TCP, UDP and SCTP the ports must be in the linear area too. `Short(n)`
/// when they are not all there yet.
#[inline(always)]
pub fn l3_skb(data: usize, end: usize, len: u32) -> L3Result {
    let b = Bounds {
        data,
        end,
        len: len as usize,
    };
    let r = parse::<false, true>(&b);
    let l3 = match &r {
        L3Result::Ip(l3) => l3,
        L3Result::Fragment {
            l3, first: true, ..
        } => l3,
        _ => return r,
    };
    if matches!(
        l3.proto,
        lb_common::proto::TCP | lb_common::proto::UDP | lb_common::proto::SCTP
    ) && let Err(Some(n)) = b.at::<Ports, true>(l3.l4_off)
    {
        return L3Result::Short(n);
    }
    r
}

#[inline(always)]
fn parse<const FILTER: bool, const SKB: bool>(b: &Bounds) -> L3Result {
    let (proto, off, tagged) = match ethernet::<SKB>(b) {
        Ok(r) => r,
        Err(Some(n)) => return L3Result::Short(n),
        Err(None) => return L3Result::NotOurs,
    };
    if proto == ETH_P_IP {
        v4::<FILTER, SKB>(b, off, tagged)
    } else if proto == ETH_P_IPV6 {
        v6::<FILTER, SKB>(b, off, tagged)
    } else if FILTER && proto == ETH_P_ARP && !tagged {
        L3Result::Neighbor
    } else {
        L3Result::NotOurs
    }
}

#[inline(always)]
fn v4<const FILTER: bool, const SKB: bool>(b: &Bounds, off: usize, tagged: bool) -> L3Result {
    let ip = match b.at::<Ipv4Hdr, SKB>(off) {
        Ok(ip) => ip,
        Err(Some(n)) => return L3Result::Short(n),
        Err(None) => return L3Result::NotOurs,
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
    let mut tot = u16::from_be(ip.tot_len) as usize;
    // BIG TCP: a GSO packet of more than 64 KB carries 0 as its length (the skb's length
    // counts; `gso_ipv4_max_size` above 65536 turns it on).
    if SKB && tot == 0 && b.len > off + 0xffff {
        tot = b.len - off;
    }
    // The whole IP packet must be there (in an skb, not necessarily in the linear area).
    if ip.vihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || tot < ihl || !b.holds::<SKB>(off, tot) {
        return drop(drop_reason::MALFORMED);
    }
    let l3 = L3 {
        off,
        l4_off: off + ihl,
        len: tot as u32,
        src: v4_mapped(ip.saddr),
        dst,
        family: family::V4,
        proto: ip.proto,
        tagged,
    };
    // More-fragments flag or a fragment offset: only the first fragment has the ports.
    if ip.frag_off & 0x3fffu16.to_be() != 0 {
        if SKB {
            return L3Result::Fragment {
                l3,
                id: u16::from_be(ip.id) as u32,
                first: ip.frag_off & 0x1fffu16.to_be() == 0,
            };
        }
        return drop(drop_reason::FRAGMENT);
    }
    L3Result::Ip(l3)
}

#[inline(always)]
fn v6<const FILTER: bool, const SKB: bool>(b: &Bounds, off: usize, tagged: bool) -> L3Result {
    let ip = match b.at::<Ipv6Hdr, SKB>(off) {
        Ok(ip) => ip,
        Err(Some(n)) => return L3Result::Short(n),
        Err(None) => return L3Result::NotOurs,
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
    let mut total = size_of::<Ipv6Hdr>() + u16::from_be(ip.payload_len) as usize;
    // BIG TCP, as for IPv4: payload length 0, no jumbo option (the kernel strips it).
    if SKB && total == size_of::<Ipv6Hdr>() && b.len > off + size_of::<Ipv6Hdr>() + 0xffff {
        total = b.len - off;
    }
    if (u32::from_be(ip.vtcfl) >> 28) != 6 || !b.holds::<SKB>(off, total) {
        return drop(drop_reason::MALFORMED);
    }
    let mut next = ip.nexthdr;
    let mut l4_off = off + size_of::<Ipv6Hdr>();
    for _ in 0..limits::MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = match b.at::<[u8; 2], SKB>(l4_off) {
                    Ok(ext) => ext,
                    Err(Some(n)) => return L3Result::Short(n),
                    Err(None) => return drop(drop_reason::MALFORMED),
                };
                let ext = unsafe { *ext };
                next = ext[0];
                l4_off += (ext[1] as usize + 1) * 8;
            }
            _ => break,
        }
    }
    match next {
        IPPROTO_FRAGMENT if SKB => return v6_fragment(b, l4_off, total, ip, tagged),
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

/// IPv6 Fragment header (RFC 8200, 4.5).
#[repr(C)]
struct Ipv6Frag {
    nexthdr: u8,
    _reserved: u8,
    /// Offset (13 bits, in 8-byte units), 2 reserved bits, the M flag.
    off_m: u16,
    id: u32,
}

/// (skb parse) An IPv6 fragment whose Fragment header is at `frag_off`.
#[inline(always)]
fn v6_fragment(b: &Bounds, frag_off: usize, total: usize, ip: &Ipv6Hdr, tagged: bool) -> L3Result {
    let off = frag_off - size_of::<Ipv6Hdr>();
    let frag = match b.at::<Ipv6Frag, true>(frag_off) {
        Ok(f) => unsafe { &*f },
        Err(Some(n)) => return L3Result::Short(n),
        Err(None) => return L3Result::NotOurs,
    };
    let l4_off = frag_off + size_of::<Ipv6Frag>();
    if l4_off > off + total {
        return L3Result::NotOurs;
    }
    L3Result::Fragment {
        l3: L3 {
            off,
            l4_off,
            len: total as u32,
            src: ip.saddr,
            dst: ip.daddr,
            family: family::V6,
            proto: frag.nexthdr,
            tagged,
        },
        id: u32::from_be(frag.id),
        first: frag.off_m & 0xfff8u16.to_be() == 0,
    }
}
