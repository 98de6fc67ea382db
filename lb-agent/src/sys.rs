//! Sockets and interfaces: the system calls that std, tokio and socket2 do not cover, as safe
//! functions. With `dataplane::sys` (the `bpf()` batch calls), this is the only place where
//! the agent writes `unsafe`; every block says why it is sound.
#![allow(
    unsafe_code,
    reason = "the one module (with dataplane::sys) that wraps raw system calls"
)]

use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// A plain C value the kernel reads as bytes: no padding bytes, no pointers. Implemented for
/// the option values this module passes.
///
/// # Safety
/// Implementors are `#[repr(C)]` (or primitive) with every byte initialised.
unsafe trait OptionValue: Copy {}

// SAFETY: integers and arrays of them have no padding.
unsafe impl OptionValue for libc::c_int {}
// SAFETY: as above.
unsafe impl OptionValue for u32 {}
// SAFETY: as above.
unsafe impl OptionValue for [u32; 8] {}

fn setsockopt<T: OptionValue>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points at `size_of::<T>()` initialised bytes (OptionValue), which the
    // kernel only reads during the call; a bad descriptor or option is an error, not UB.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Drops received packets that were not sent with a TTL / hop limit of at least `min`
/// (`IP_MINTTL`, `IPV6_MINHOPCOUNT`: GTSM, RFC 5082).
pub fn set_min_ttl(fd: &impl AsRawFd, v4: bool, min: u8) -> io::Result<()> {
    let (level, name) = if v4 {
        (libc::IPPROTO_IP, libc::IP_MINTTL)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT)
    };
    setsockopt(fd, level, name, &libc::c_int::from(min))
}

/// `ICMP_FILTER` of a raw ICMPv4 socket: a set bit drops that type.
pub fn set_icmp_filter(fd: &impl AsRawFd, blocked: u32) -> io::Result<()> {
    const ICMP_FILTER: libc::c_int = 1;
    setsockopt(fd, libc::SOL_RAW, ICMP_FILTER, &blocked)
}

/// `ICMP6_FILTER` of a raw ICMPv6 socket: 256 bits, a set bit blocks that type.
pub fn set_icmp6_filter(fd: &impl AsRawFd, blocked: [u32; 8]) -> io::Result<()> {
    const ICMP6_FILTER: libc::c_int = 1;
    setsockopt(fd, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &blocked)
}

/// `struct tcp_md5sig` of linux/tcp.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; 80],
}

// SAFETY: repr(C); sockaddr_storage (128 bytes, 8-aligned) is followed by 1+1+2+4+80 bytes:
// no padding anywhere, and the value is built from zeroes.
unsafe impl OptionValue for TcpMd5Sig {}

/// Signs (and requires signatures on) this socket's TCP segments with `peer` (TCP MD5, RFC
/// 2385): an empty key removes the signature.
pub fn set_tcp_md5(fd: &impl AsRawFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    const _: () = assert!(size_of::<TcpMd5Sig>() == 128 + 8 + 80);
    if key.len() > 80 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TCP MD5 keys have at most 80 bytes",
        ));
    }
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let addr = socket2::SockAddr::from(SocketAddr::new(peer, 0));
    // SAFETY: SockAddr's storage is a sockaddr_storage of which `len` bytes are valid, and
    // `sig.addr` is a sockaddr_storage too.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr().cast::<u8>(),
            (&raw mut sig.addr).cast::<u8>(),
            addr.len() as usize,
        );
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig)
}

fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming interface `name`, and a socket to ask about it with.
fn ifreq(name: &str) -> io::Result<(OwnedFd, libc::ifreq)> {
    let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    // SAFETY: `ifreq` is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    Ok((fd, req))
}

/// The hardware address of interface `name` (in this network namespace).
pub fn interface_mac(name: &str) -> io::Result<[u8; 6]> {
    let (fd, mut req) = ifreq(name)?;
    // SAFETY: SIOCGIFHWADDR reads the name and writes the address into `req`, which lives
    // through the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `ifru_hwaddr` for SIOCGIFHWADDR.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

/// The flags of interface `name` (`IFF_*`).
pub fn interface_flags(name: &str) -> io::Result<libc::c_int> {
    let (fd, mut req) = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags into `req`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `ifru_flags` for SIOCGIFFLAGS.
    Ok(libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }))
}

/// The index of interface `name` (in this network namespace).
pub fn if_nametoindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i)
    }
}

/// Queues the ICMP errors that datagrams sent from `fd` cause (`IP_RECVERR` /
/// `IPV6_RECVERR`) on its error queue, for `recv_error`; without it an unconnected UDP socket
/// never hears of them.
pub fn set_recv_err(fd: &impl AsRawFd, v4: bool) -> io::Result<()> {
    if v4 {
        setsockopt(fd, libc::SOL_IP, libc::IP_RECVERR, &1)
    } else {
        setsockopt(fd, libc::SOL_IPV6, libc::IPV6_RECVERR, &1)
    }
}

/// The oldest entry of `fd`'s error queue: the destination of the datagram that caused it and
/// the error (`ECONNREFUSED` for an ICMP port unreachable). `WouldBlock` when it is empty.
pub fn recv_error(fd: &impl AsRawFd) -> io::Result<(SocketAddr, io::Error)> {
    // SAFETY: all-zero bytes are a valid sockaddr_storage and msghdr (null pointers, zero lengths).
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut data = [0u8; 64];
    // u64s: the control buffer must be aligned for cmsghdr.
    let mut control = [0u64; 32];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: every pointer in `msg` points at a live local of the length given; the kernel
    // writes at most those lengths and reports what it wrote in the lengths.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &raw mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let to = match i32::from(name.ss_family) {
        libc::AF_INET => {
            // SAFETY: an AF_INET address is a sockaddr_in, which fits in the storage.
            let sin = unsafe { (&raw const name).cast::<libc::sockaddr_in>().read() };
            SocketAddr::new(
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()),
                u16::from_be(sin.sin_port),
            )
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address is a sockaddr_in6, which fits in the storage.
            let sin6 = unsafe { (&raw const name).cast::<libc::sockaddr_in6>().read() };
            SocketAddr::new(
                IpAddr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
            )
        }
        f => return Err(io::Error::other(format!("error queue: address family {f}"))),
    };
    // SAFETY: msg_control and msg_controllen describe the control data the kernel wrote; the
    // CMSG macros stay within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null cmsghdr from CMSG_FIRSTHDR/NXTHDR lies within the buffer.
        let c = unsafe { &*cmsg };
        if (c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_RECVERR)
            || (c.cmsg_level == libc::SOL_IPV6 && c.cmsg_type == libc::IPV6_RECVERR)
        {
            // SAFETY: these messages carry a sock_extended_err (ip(7)), read unaligned.
            let ee = unsafe {
                libc::CMSG_DATA(cmsg)
                    .cast::<libc::sock_extended_err>()
                    .read_unaligned()
            };
            return Ok((to, io::Error::from_raw_os_error(ee.ee_errno as i32)));
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    Err(io::Error::other("error queue: no extended error"))
}

/// Every address of every interface in this network namespace (`getifaddrs`).
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in (read unaligned: the list only
                // promises a sockaddr's alignment).
                let sin = unsafe { ifa.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned() };
                out.push(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6 (read unaligned, as above).
                let sin6 = unsafe { ifa.ifa_addr.cast::<libc::sockaddr_in6>().read_unaligned() };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// Sends `frame` (an Ethernet frame: destination MAC first) out of interface `ifindex` as it
/// is, on an `AF_PACKET` socket (`CAP_NET_RAW`).
pub fn send_frame(ifindex: u32, frame: &[u8]) -> io::Result<()> {
    if frame.len() < 14 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "shorter than an Ethernet header",
        ));
    }
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
    // SAFETY: `sockaddr_ll` is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `addr` are valid for the lengths given and outlive the call.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The first `n` bytes of `buf`, which a receive call reported as written.
///
/// # Panics
/// When `n` is larger than the buffer (a receive call never reports that).
pub fn received(buf: &[MaybeUninit<u8>], n: usize) -> &[u8] {
    let init = &buf[..n];
    // SAFETY: the receive call initialised these `n` bytes; MaybeUninit<u8> and u8 have the
    // same layout.
    unsafe { std::slice::from_raw_parts(init.as_ptr().cast(), n) }
}

/// `socket` registered with tokio's reactor.
pub fn async_fd(socket: socket2::Socket) -> io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    // SAFETY: the `Socket` owns its descriptor and moves into the AsyncFd, so the descriptor
    // stays open (and is not reused) for as long as it is registered.
    unsafe { tokio::io::unix::AsyncFd::register(socket) }.map_err(io::Error::from)
}

/// The magic number of the filesystem `path` is on (`statfs(2)`'s `f_type`).
#[allow(
    clippy::unnecessary_cast,
    reason = "f_type is not an i64 on every architecture"
)]
pub fn fs_type(path: &std::path::Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path; the kernel fills `st`, read only on success.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so `st` is initialised.
    Ok(unsafe { st.assume_init() }.f_type as i64)
}

/// A connected UDP socket as `sock_diag` lists it: where it sends, and its cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    pub remote: SocketAddr,
    pub cookie: u64,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `TCP_ESTABLISHED`: a connected UDP socket's state.
const ESTABLISHED: u32 = 1;

/// A `sock_diag` netlink socket in this thread's network namespace.
fn sock_diag() -> io::Result<OwnedFd> {
    socket(libc::AF_NETLINK, libc::SOCK_DGRAM, libc::NETLINK_SOCK_DIAG)
}

fn nl_send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is valid for its length during the call.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn nl_recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length during the call.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// An `inet_diag_req_v2` for UDP of `family` in netlink message `kind` with `flags`.
fn diag_request(kind: u16, flags: u16, family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = 16 + 8 + SOCKID_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel's
    m.extend_from_slice(&[family, libc::IPPROTO_UDP as u8, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

fn sockid_addr(id: &[u8], family: u8, at: usize, port: u16) -> SocketAddr {
    let ip = if i32::from(family) == libc::AF_INET {
        IpAddr::from(<[u8; 4]>::try_from(&id[at..at + 4]).unwrap_or_default())
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&id[at..at + 16]).unwrap_or_default())
    };
    SocketAddr::new(ip, port)
}

/// Every connected UDP socket of `family` (`AF_INET`/`AF_INET6`) in this thread's network
/// namespace, with the raw `inet_diag_sockid` that names it to [`destroy_udp`].
pub fn udp_sockets(v4: bool) -> io::Result<Vec<(UdpSocket, [u8; SOCKID_LEN])>> {
    let family = if v4 { libc::AF_INET } else { libc::AF_INET6 } as u8;
    let fd = sock_diag()?;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    nl_send(
        &fd,
        &diag_request(
            SOCK_DIAG_BY_FAMILY,
            flags,
            family,
            1 << ESTABLISHED,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = nl_recv(&fd, &mut buf)?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap_or_default());
            if len < 16 || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink message",
                ));
            }
            match i32::from(kind) {
                libc::NLMSG_DONE => return Ok(out),
                libc::NLMSG_ERROR => {
                    let errno =
                        i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap_or_default());
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ if kind == SOCK_DIAG_BY_FAMILY && len >= 16 + 4 + SOCKID_LEN => {
                    let msg = &buf[at + 16..at + len];
                    let family = msg[0];
                    let id = &msg[4..4 + SOCKID_LEN];
                    let dport = u16::from_be_bytes([id[2], id[3]]);
                    let cookie = u64::from(u32::from_ne_bytes(
                        id[40..44].try_into().unwrap_or_default(),
                    )) | (u64::from(u32::from_ne_bytes(
                        id[44..48].try_into().unwrap_or_default(),
                    )) << 32);
                    out.push((
                        UdpSocket {
                            remote: sockid_addr(id, family, 20, dport),
                            cookie,
                        },
                        id.try_into().unwrap_or([0; SOCKID_LEN]),
                    ));
                }
                _ => {}
            }
            at += len.next_multiple_of(4);
        }
    }
}

/// Closes a UDP socket [`udp_sockets`] listed (`SOCK_DESTROY`): its owner's next call fails
/// with `ECONNABORTED`, and a new socket connects afresh.
pub fn destroy_udp(v4: bool, id: &[u8; SOCKID_LEN]) -> io::Result<()> {
    let family = if v4 { libc::AF_INET } else { libc::AF_INET6 } as u8;
    let fd = sock_diag()?;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    nl_send(
        &fd,
        &diag_request(SOCK_DESTROY, flags, family, 1 << ESTABLISHED, id),
    )?;
    let mut buf = [0u8; 256];
    let n = nl_recv(&fd, &mut buf)?;
    if n >= 20 && i32::from(u16::from_ne_bytes([buf[4], buf[5]])) == libc::NLMSG_ERROR {
        let errno = i32::from_ne_bytes(buf[16..20].try_into().unwrap_or_default());
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(-errno));
        }
    }
    Ok(())
}

/// Runs `f` on a thread in the network namespace at `path` (`setns`: `CAP_SYS_ADMIN`).
pub fn in_netns<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = std::fs::File::open(path)?;
    std::thread::spawn(move || {
        // SAFETY: `ns` is an open namespace file; setns only changes this thread, which ends
        // with `f`.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// Lowers the calling thread's priority to `nice` (Linux keeps a nice value per thread).
/// Lowering needs no privilege.
pub fn lower_thread_priority(nice: i32) -> io::Result<()> {
    // SAFETY: gettid takes no arguments; setpriority reads only its integer arguments, and
    // with PRIO_PROCESS and a thread id it changes that one thread.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
