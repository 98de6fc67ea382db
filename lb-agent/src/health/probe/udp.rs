//! `udp`: send `request` from a fresh socket and take the first reply. A reply must contain
//! `response` when one is set; an ICMP port unreachable fails at once (the connected socket
//! reports it as ECONNREFUSED); silence is a timeout, so a black-holed backend is down.

use crate::model::check::Probe;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::UdpSocket;

use super::tcp::{contains, preview};
use crate::health::state::{Failure, FailureKind};

pub async fn probe(target: SocketAddr, probe: &Probe) -> Result<(), Failure> {
    let local: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| Failure::io("bind", &e))?;
    socket
        .connect(target)
        .await
        .map_err(|e| Failure::io("connect", &e))?;
    let request = probe.request.as_deref().unwrap_or_default();
    socket
        .send(request.as_bytes())
        .await
        .map_err(|e| Failure::io("send", &e))?;
    let mut buf = vec![0u8; 65536];
    let n = socket
        .recv(&mut buf)
        .await
        .map_err(|e| Failure::io("receive", &e))?;
    let reply = &buf[..n];
    match &probe.response {
        Some(expected) if !contains(reply, expected.as_bytes()) => Err(Failure::new(
            FailureKind::BadResponse,
            format!("reply without {expected:?}: {:?}", preview(reply)),
        )),
        _ => Ok(()),
    }
}
