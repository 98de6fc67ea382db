//! `tcp`: connect; optionally send `request` and wait for a reply containing `response`.

use crate::model::check::Probe;
use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

use crate::health::state::{Failure, FailureKind};

/// Largest reply read while looking for `response`.
const MAX_REPLY: usize = 64 * 1024;

/// A connection for a probe. It closes with a reset (SO_LINGER 0), as HAProxy's checks do:
/// thousands of probes a second would otherwise leave as many sockets in TIME_WAIT here.
pub async fn connect(target: SocketAddr) -> Result<TcpStream, Failure> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| Failure::io("socket", &e))?;
    // Linger 0 never blocks: close sends a reset at once.
    socket2::SockRef::from(&socket)
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| Failure::io("SO_LINGER", &e))?;
    let stream = socket
        .connect(target)
        .await
        .map_err(|e| Failure::io("connect", &e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

pub async fn probe(target: SocketAddr, probe: &Probe) -> Result<(), Failure> {
    let mut stream = connect(target).await?;
    if let Some(request) = &probe.request {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| Failure::io("sending the request", &e))?;
    }
    let Some(expected) = &probe.response else {
        return Ok(());
    };
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| Failure::io("reading the reply", &e))?;
        if n == 0 {
            return Err(Failure::new(
                FailureKind::BadResponse,
                format!(
                    "closed after {} bytes without {expected:?}: {:?}",
                    reply.len(),
                    preview(&reply)
                ),
            ));
        }
        reply.extend_from_slice(&buf[..n]);
        if contains(&reply, expected.as_bytes()) {
            return Ok(());
        }
        if reply.len() >= MAX_REPLY {
            return Err(Failure::new(
                FailureKind::BadResponse,
                format!("no {expected:?} in the first {MAX_REPLY} bytes"),
            ));
        }
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// The start of a reply, for messages.
pub fn preview(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned();
    if b.len() > 64 { s + "…" } else { s }
}
