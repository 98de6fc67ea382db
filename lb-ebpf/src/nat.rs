//! Address and port rewrites in XDP, with the IPv4 header checksum and the TCP/UDP checksum
//! updated incrementally and SCTP's CRC32c recomputed: destination NAT (the VIP and port become
//! the backend's), source NAT (the client becomes the node, for backends on other nodes) and
//! both ends of a source-NATed reply.

use aya_ebpf::programs::XdpContext;
use lb_common::{family, proto};

use crate::{
    csum,
    parse::{Ipv4Hdr, Ipv6Hdr, L3, Ports, ptr_at},
};

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// Rewrites the destination of the packet described by `l3` to `addr`:`port_be`.
/// `Some(true)` when the packet is SCTP whose port changed: its checksum field is then zeroed
/// and `sctp::xdp_checksum_and_forward` must finish it.
#[inline(always)]
pub fn dnat(ctx: &XdpContext, l3: &L3, addr: &[u32; 4], port_be: u16) -> Option<bool> {
    rewrite(ctx, l3, End::Dst, addr, port_be)
}

/// Rewrites one end (`which`) of `l3`'s packet to `addr`:`port_be`; `l3` still describes the
/// packet as it arrived (the other end may have been rewritten already).
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    l3: &L3,
    which: End,
    addr: &[u32; 4],
    port_be: u16,
) -> Option<bool> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let old_addr = if which == End::Dst { &l3.dst } else { &l3.src };
    if l3.family == family::V6 {
        let ip = ptr_at::<Ipv6Hdr>(data, end, l3.off)?;
        unsafe {
            match which {
                End::Dst => (*ip).daddr = *addr,
                End::Src => (*ip).saddr = *addr,
            }
        };
    } else {
        let ip = ptr_at::<Ipv4Hdr>(data, end, l3.off)?;
        unsafe {
            (*ip).check = csum::replace4((*ip).check, old_addr[3], addr[3]);
            match which {
                End::Dst => (*ip).daddr = addr[3],
                End::Src => (*ip).saddr = addr[3],
            }
        }
    }
    let ports = ptr_at::<Ports>(data, end, l3.l4_off)?;
    let old_port = unsafe {
        match which {
            End::Dst => (*ports).dst,
            End::Src => (*ports).src,
        }
    };
    l4_checksum(data, end, l3, old_addr, addr, old_port, port_be)?;
    unsafe {
        match which {
            End::Dst => (*ports).dst = port_be,
            End::Src => (*ports).src = port_be,
        }
    };
    if l3.proto == proto::SCTP && old_port != port_be {
        let c = ptr_at::<u32>(data, end, l3.l4_off + 8)?;
        unsafe { *c = 0 };
        return Some(true);
    }
    Some(false)
}

/// Offset of the TCP/UDP checksum within its header.
#[inline(always)]
pub fn l4_checksum_offset(l4_proto: u8) -> Option<usize> {
    match l4_proto {
        proto::TCP => Some(16),
        proto::UDP => Some(6),
        _ => None,
    }
}

/// Updates the TCP/UDP checksum of `l3`'s packet after one address of the pseudo-header and
/// one port changed. SCTP has no pseudo-header (see `sctp_checksum`).
#[inline(always)]
fn l4_checksum(
    data: usize,
    end: usize,
    l3: &L3,
    old_addr: &[u32; 4],
    new_addr: &[u32; 4],
    old_port: u16,
    new_port: u16,
) -> Option<()> {
    let Some(off) = l4_checksum_offset(l3.proto) else {
        return Some(());
    };
    let v6 = l3.family == family::V6;
    let c = ptr_at::<u16>(data, end, l3.l4_off + off)?;
    let cur = unsafe { *c };
    if l3.proto == proto::UDP && cur == 0 && !v6 {
        // UDP over IPv4 without a checksum stays without one.
        return Some(());
    }
    let mut new = csum::replace2(
        csum::replace_addr(cur, old_addr, new_addr, v6),
        old_port,
        new_port,
    );
    if l3.proto == proto::UDP {
        new = csum::udp_mangle0(new);
    }
    unsafe { *c = new };
    Some(())
}
