//! Socket-level load balancing: cgroup v2 `sock_addr` hooks for the node's own processes and
//! its pods. A TCP or connected UDP socket gets a backend once, at `connect()`; an unconnected
//! UDP socket per datagram, at `sendmsg()`. The destination is rewritten before any packet
//! exists, so the flow is a plain connection to the backend: no per-packet translation, no
//! connection-table entry, no source NAT. `SOCK_REVNAT` remembers, per socket and backend, the
//! frontend the socket asked for, which `recvmsg()` (a UDP reply's source) and `getpeername()`
//! show instead of the backend.
//!
//! The services looked up are the `scope::INTERNAL` entries of `SERVICES`: the same backends,
//! Maglev tables and health as the XDP path, chosen by the socket's cookie (so one socket keeps
//! one backend) or, with ClientIP affinity, by its network namespace (a pod, or the node).

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    ServiceKey, SockRevKey, SockRevValue, V4_MAPPED_PREFIX, drop_reason, family, hash,
    netns_client, scope, v4_mapped,
};

use crate::{SOCK_REVNAT, lookup, stats};

/// What `connect()` or `sendmsg()` fails with when a service has no backend, as kube-proxy's
/// REJECT rule makes it.
const ECONNREFUSED: i32 = 111;

/// A hook's verdict: go on with the (possibly rewritten) address. The hooks never refuse an
/// address that is not a service's.
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

/// The address in the context: the destination (`connect`, `sendmsg`) or the peer (`recvmsg`,
/// `getpeername`), in the mapped form, with its family (an IPv6 socket's `::ffff:a.b.c.d` is
/// IPv4) and port.
#[inline(always)]
fn read(sa: *mut bpf_sock_addr, v6: bool) -> ([u32; 4], u8, u16) {
    // SAFETY: the context is valid for the program's run; the verifier allows 4-byte reads of
    // these fields.
    unsafe {
        let port_be = (*sa).user_port as u16;
        if !v6 {
            return (v4_mapped((*sa).user_ip4), family::V4, port_be);
        }
        let ip6 = core::ptr::addr_of!((*sa).user_ip6).cast::<u32>();
        let addr = [
            ip6.read_volatile(),
            ip6.add(1).read_volatile(),
            ip6.add(2).read_volatile(),
            ip6.add(3).read_volatile(),
        ];
        let fam = if addr[0] == V4_MAPPED_PREFIX[0]
            && addr[1] == V4_MAPPED_PREFIX[1]
            && addr[2] == V4_MAPPED_PREFIX[2]
        {
            family::V4
        } else {
            family::V6
        };
        (addr, fam, port_be)
    }
}

/// Writes `addr` and `port_be` into the context (an IPv4 address into an IPv6 socket's
/// context in the mapped form).
#[inline(always)]
fn write(sa: *mut bpf_sock_addr, v6: bool, addr: &[u32; 4], port_be: u16) {
    // SAFETY: as in `read`; the verifier allows 4-byte writes of these fields.
    unsafe {
        if v6 {
            let ip6 = core::ptr::addr_of_mut!((*sa).user_ip6).cast::<u32>();
            ip6.write_volatile(addr[0]);
            ip6.add(1).write_volatile(addr[1]);
            ip6.add(2).write_volatile(addr[2]);
            ip6.add(3).write_volatile(addr[3]);
        } else {
            core::ptr::addr_of_mut!((*sa).user_ip4).write_volatile(addr[3]);
        }
        core::ptr::addr_of_mut!((*sa).user_port).write_volatile(u32::from(port_be));
    }
}

/// `connect()` and `sendmsg()`: a service frontend becomes one of its backends.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let (addr, fam, port_be) = read(sa, v6);
    // SAFETY: as in `read`.
    let proto = unsafe { (*sa).protocol } as u8;
    let key = ServiceKey {
        addr,
        port_be,
        proto,
        family: fam,
        scope: scope::INTERNAL,
        _pad: [0; 3],
    };
    let Some(svc) = lookup::service(&key) else {
        return PROCEED;
    };
    // SAFETY: both helpers take the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let client = netns_client(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) });
    let Some((backend_id, b)) = lookup::pick_for(&svc, &client, || {
        hash::client_hash(&[(cookie >> 32) as u32, cookie as u32, 0, 0])
    }) else {
        stats::drop(svc.id, drop_reason::NO_BACKEND);
        // SAFETY: a plain helper call; the hook's error becomes this value.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    };
    if b.family != fam {
        // The agent never gives a frontend backends of another family.
        stats::drop(svc.id, drop_reason::NO_BACKEND);
        return REFUSE;
    }
    write(sa, v6, &b.addr, b.port_be);
    let rev_key = SockRevKey {
        cookie,
        addr: b.addr,
        port_be: b.port_be,
        family: fam,
        _pad: [0; 5],
    };
    let rev = SockRevValue {
        addr,
        port_be,
        _pad: 0,
        service_id: svc.id,
    };
    // A datagram socket sending again to the backend it already has: nothing new.
    if SOCK_REVNAT
        .get_ptr(rev_key)
        .is_some_and(|v| unsafe { *v } == rev)
    {
        return PROCEED;
    }
    let _ = SOCK_REVNAT.insert(rev_key, rev, 0);
    stats::new_flow(svc.id, backend_id);
    PROCEED
}

/// `recvmsg()` and `getpeername()`: a backend this socket was sent to shows as the frontend
/// the socket asked for.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let (addr, fam, port_be) = read(sa, v6);
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr,
        port_be,
        family: fam,
        _pad: [0; 5],
    };
    if let Some(v) = SOCK_REVNAT.get_ptr(key) {
        let v = unsafe { *v };
        write(sa, v6, &v.addr, v.port_be);
    }
    PROCEED
}
