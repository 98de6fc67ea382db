//! The XDP path of a packet addressed to a VIP: service lookup, source ranges, steering,
//! counting, DNAT (and source NAT for backends on other nodes) and forwarding; and of a packet
//! addressed to the node's source-NAT address (a reply to translate back, or the node's own).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    BackendValue, backend_flags, datapath_stat, drop_reason, family, limits, proto, service_flags,
};

use crate::{
    fwd, icmp, lookup, nat,
    parse::{L3, Ports, ptr_at},
    sctp, shared, snat, stats,
};

#[inline(always)]
pub fn handle(ctx: &XdpContext, l3: &L3) -> u32 {
    match l3.proto {
        proto::TCP | proto::UDP | proto::SCTP => service(ctx, l3),
        proto::ICMP if l3.family == family::V4 => icmp::handle(ctx, l3),
        proto::ICMPV6 if l3.family == family::V6 => icmp::handle(ctx, l3),
        _ => lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::NO_SERVICE),
    }
}

#[inline(always)]
pub fn drop(service_id: u32, reason: u32) -> u32 {
    stats::drop(service_id, reason);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn service(ctx: &XdpContext, l3: &L3) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    // The fixed header must lie inside the IP packet: TCP 20, UDP 8, SCTP 12 bytes.
    let header = match l3.proto {
        proto::TCP => 20,
        proto::UDP => 8,
        _ => 12,
    };
    let l4_len = l3.len as usize - (l3.l4_off - l3.off);
    let Some(ports) = ptr_at::<Ports>(data, end, l3.l4_off) else {
        return lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::MALFORMED);
    };
    if l4_len < header {
        return lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::MALFORMED);
    }
    let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };
    if let Some(verdict) = snat::reply(ctx, l3, sport, dport) {
        return verdict;
    }
    let too_long = l3.proto == proto::SCTP && l4_len > limits::MAX_SCTP_LEN as usize;
    let flow = l3.flow(sport, dport);
    let flags = if l3.proto == proto::TCP {
        ptr_at::<u8>(data, end, l3.l4_off + 13).map_or(0, |f| unsafe { *f })
    } else {
        0
    };
    // An established flow needs one lookup; only new (or re-steered) flows look up the service.
    let (service_id, backend_id, backend, snat_port) = match lookup::established(&flow, flags) {
        lookup::Established::Hit(s, b, backend, port) => {
            if too_long {
                return drop(s, drop_reason::SCTP_TOO_LONG);
            }
            (s, b, backend, port)
        }
        other => {
            let Some(svc) = lookup::external_service(&l3.dst, dport, l3.proto, l3.family) else {
                return lookup::drop_if_vip(&l3.dst, l3.family, drop_reason::NO_SERVICE);
            };
            if svc.flags & service_flags::SOURCE_RANGES != 0
                && !lookup::source_allowed(svc.id, &l3.src)
            {
                return drop(svc.id, drop_reason::SOURCE_NOT_ALLOWED);
            }
            if too_long {
                return drop(svc.id, drop_reason::SCTP_TOO_LONG);
            }
            let stale = matches!(other, lookup::Established::Stale);
            let Some((b, backend)) = lookup::pick(&svc, &flow) else {
                return drop(svc.id, drop_reason::NO_BACKEND);
            };
            if lookup::may_clash(&svc, &flow, &backend) {
                // Returns only if the hand-over fails: then steered unchecked.
                shared::hand_over(ctx, flags, stale);
            }
            lookup::record(&svc, &flow, flags, stale, b, &backend);
            if stale {
                stats::datapath(datapath_stat::FLOW_RESTEERED);
            }
            (svc.id, b, backend, 0)
        }
    };
    deliver(ctx, l3, sport, service_id, backend_id, &backend, snat_port)
}

/// Sends a packet of a flow on to its backend: source NAT (for a backend on another node), or
/// DNAT, counting, and forwarding (an SCTP packet by way of its checksum program).
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    l3: &L3,
    sport: u16,
    service_id: u32,
    backend_id: u32,
    backend: &BackendValue,
    snat_port: u16,
) -> u32 {
    if backend.flags & backend_flags::SNAT != 0 {
        return snat::forward(ctx, service_id, backend_id, backend.generation, snat_port);
    }
    let Some(needs_crc) = nat::dnat(ctx, l3, &backend.addr, backend.port_be) else {
        return drop(service_id, drop_reason::MALFORMED);
    };
    stats::packet_in(service_id, backend_id, l3.len);
    if needs_crc {
        return sctp::xdp_checksum(ctx, service_id, backend_id, backend.generation);
    }
    fwd::forward(
        ctx,
        l3,
        sport,
        backend.port_be,
        backend_id,
        backend.generation,
    )
}
