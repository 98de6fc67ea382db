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

/// Signs (and requires signatures on) this socket's segments with `peer`: an empty key
/// removes the signature.
pub fn set_md5(fd: &impl AsRawFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    crate::sys::set_tcp_md5(fd, peer, key)
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
