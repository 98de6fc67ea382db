//! The session's TCP sockets: TCP MD5 signatures (RFC 2385), the TTL of eBGP (1 unless
//! multihop), and the listener for passive peers.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
};

use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::announce::BgpPeerConfig;

/// `struct tcp_md5sig` of linux/tcp.h.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; 80],
}

/// Signs (and requires signatures on) this socket's segments with `peer`: an empty key
/// removes the signature.
pub fn set_md5(fd: &impl AsRawFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > 80 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TCP MD5 keys have at most 80 bytes",
        ));
    }
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let addr = socket2::SockAddr::from(SocketAddr::new(peer, 0));
    // SAFETY: SockAddr's storage is a sockaddr_storage of `len` valid bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr().cast::<u8>(),
            (&raw mut sig.addr).cast::<u8>(),
            addr.len() as usize,
        );
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: a valid fd and a pointer to a struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&raw const sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Connects to an active peer with its password, TTL and the network-control DSCP.
pub async fn connect(to: SocketAddr, peer: &BgpPeerConfig) -> io::Result<TcpStream> {
    let sock = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(key) = &peer.password {
        set_md5(&sock, peer.address, key.0.as_bytes())?;
    }
    if peer.address.is_ipv4() {
        SockRef::from(&sock).set_tos_v4(0xc0)?;
    }
    sock.connect(to).await
}

/// The TTL of the session's packets: `multihop` when set, else 1 for external peers
/// (directly connected) and the system default for internal ones. Set on the connected
/// stream: the handshake goes out with the default TTL either way.
pub fn set_ttl(stream: &TcpStream, peer: &BgpPeerConfig, internal: bool) -> io::Result<()> {
    let ttl = match peer.multihop {
        Some(h) => u32::from(h),
        None if internal => return Ok(()),
        None => 1,
    };
    let s = SockRef::from(stream);
    if peer.address.is_ipv4() {
        s.set_ttl_v4(ttl)
    } else {
        s.set_unicast_hops_v6(ttl)
    }
}

/// The listener of one family for the passive peers, with their passwords.
pub fn listen(v4: bool, port: u16, passive: &[&BgpPeerConfig]) -> io::Result<TcpListener> {
    let (sock, any) = if v4 {
        (TcpSocket::new_v4()?, IpAddr::from([0u8; 4]))
    } else {
        (TcpSocket::new_v6()?, IpAddr::from([0u16; 8]))
    };
    if !v4 {
        SockRef::from(&sock).set_only_v6(true)?;
    }
    sock.set_reuseaddr(true)?;
    for p in passive {
        if let Some(key) = &p.password {
            set_md5(&sock, p.address, key.0.as_bytes())?;
        }
    }
    sock.bind(SocketAddr::new(any, port))?;
    sock.listen(16)
}
