//! The checkers. Each probe is one attempt against one target, bounded by the probe's timeout
//! (the caller applies it). The raw sockets (ICMP, SCTP, half-open TCP) and the UDP sockets are
//! shared by all probes of a family: one reader task per socket hands each answer to the probe
//! waiting for it. Full-handshake TCP and HTTP(S) probes make a connection each.

mod http;
mod icmp;
mod sctp;
mod syn;
mod tcp;
mod udp;

pub(crate) use http::status as http_status;
pub use http::{USER_AGENT_VALUE, load_ca};

use crate::model::check::{CheckKind, Handshake, Probe};
use std::{net::SocketAddr, sync::Arc};

use tokio::sync::OnceCell;

use super::state::{Failure, FailureKind};

/// Runs probes; holds the shared sockets and TLS settings.
#[derive(Default)]
pub struct Prober {
    icmp4: OnceCell<Arc<icmp::Pinger>>,
    icmp6: OnceCell<Arc<icmp::Pinger>>,
    sctp4: OnceCell<Arc<sctp::Initiator>>,
    sctp6: OnceCell<Arc<sctp::Initiator>>,
    syn4: OnceCell<Arc<syn::Prober>>,
    syn6: OnceCell<Arc<syn::Prober>>,
    udp4: OnceCell<Arc<udp::Prober>>,
    udp6: OnceCell<Arc<udp::Prober>>,
    tls: http::TlsConfigs,
}

impl Prober {
    pub fn new() -> Self {
        Self::default()
    }

    /// One probe of `target` (its port is ignored by `ping`), within `probe.timeout`.
    pub async fn probe(&self, target: SocketAddr, probe: &Probe) -> Result<(), Failure> {
        match tokio::time::timeout(probe.timeout, self.attempt(target, probe)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::new(
                FailureKind::Timeout,
                format!(
                    "no answer within {}",
                    humantime::format_duration(probe.timeout)
                ),
            )),
        }
    }

    async fn attempt(&self, target: SocketAddr, probe: &Probe) -> Result<(), Failure> {
        let v4 = target.is_ipv4();
        match probe.kind {
            CheckKind::Ping => {
                let pinger = family(&self.icmp4, &self.icmp6, v4, icmp::Pinger::open)
                    .await
                    .map_err(|e| Failure::io("opening the ICMP raw socket", &e))?;
                pinger.ping(target.ip()).await
            }
            CheckKind::Sctp => {
                let initiator = family(&self.sctp4, &self.sctp6, v4, sctp::Initiator::open)
                    .await
                    .map_err(|e| Failure::io("opening the SCTP raw socket", &e))?;
                Box::pin(initiator.probe(target)).await
            }
            CheckKind::Tcp if probe.handshake == Handshake::Half => {
                let prober = family(&self.syn4, &self.syn6, v4, syn::Prober::open)
                    .await
                    .map_err(|e| Failure::io("opening the TCP raw socket", &e))?;
                prober.probe(target).await
            }
            // Boxed: these futures are large (an HTTP client, a TLS handshake), and an unboxed
            // one would make every probe's future as large as the largest, to be allocated
            // and moved on every probe.
            CheckKind::Tcp => Box::pin(tcp::probe(target, probe)).await,
            CheckKind::Udp => {
                let prober = family(&self.udp4, &self.udp6, v4, udp::Prober::open)
                    .await
                    .map_err(|e| Failure::io("opening the UDP probe sockets", &e))?;
                prober.probe(target, probe).await
            }
            CheckKind::Http => Box::pin(http::probe(target, probe, None)).await,
            CheckKind::Https => {
                let config = self.tls.get(probe.ca_file.as_deref())?;
                Box::pin(http::probe(target, probe, Some(config))).await
            }
        }
    }
}

/// The shared sockets of one family, opened by the first probe that needs them.
async fn family<'a, T>(
    v4_cell: &'a OnceCell<Arc<T>>,
    v6_cell: &'a OnceCell<Arc<T>>,
    v4: bool,
    open: fn(bool) -> std::io::Result<Arc<T>>,
) -> std::io::Result<&'a Arc<T>> {
    let cell = if v4 { v4_cell } else { v6_cell };
    cell.get_or_try_init(|| async { open(v4) }).await
}

/// The transport header of a packet read from a raw socket: IPv4 raw sockets deliver the IP
/// header too, IPv6 ones do not.
fn transport(v4: bool, data: &[u8]) -> Option<&[u8]> {
    if v4 {
        data.get((data.first()? & 0x0f) as usize * 4..)
    } else {
        Some(data)
    }
}

/// Claims a source port of `ports` (a range `span` long from `first`) that no probe of `ip`
/// waits on, the next of `next`'s sequence; its entry is `entry(n)` (n: the sequence number
/// drawn). None when 64 tries found none free.
fn claim_port<V>(
    waiting: &mut std::collections::HashMap<(std::net::IpAddr, u16), V>,
    ip: std::net::IpAddr,
    next: &std::sync::atomic::AtomicU32,
    (first, span): (u16, u32),
    entry: impl FnOnce(u32) -> V,
) -> Option<u16> {
    for _ in 0..64 {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = first + (n % span) as u16;
        if let std::collections::hash_map::Entry::Vacant(slot) = waiting.entry((ip, port)) {
            slot.insert(entry(n));
            return Some(port);
        }
    }
    None
}

/// A non-blocking socket shared by many probes, registered with tokio, with the task that reads
/// it; the task stops when this is dropped.
struct Shared {
    socket: Arc<tokio::io::unix::AsyncFd<socket2::Socket>>,
    reader: tokio::task::AbortHandle,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Shared {
    /// Opens a socket of the family (`v4`), `kind` and `protocol` (raw ones need CAP_NET_RAW),
    /// prepares it with `setup` (filters, options, bind) and starts `read(socket)` on it.
    fn open<F: Future<Output = ()> + Send + 'static>(
        v4: bool,
        kind: socket2::Type,
        protocol: socket2::Protocol,
        setup: impl FnOnce(&socket2::Socket) -> std::io::Result<()>,
        read: impl FnOnce(Arc<tokio::io::unix::AsyncFd<socket2::Socket>>) -> F,
    ) -> std::io::Result<Self> {
        let domain = if v4 {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let socket = socket2::Socket::new(domain, kind, Some(protocol))?;
        socket.set_nonblocking(true)?;
        setup(&socket)?;
        let socket = Arc::new(crate::sys::async_fd(socket)?);
        let reader = tokio::spawn(read(socket.clone())).abort_handle();
        Ok(Self { socket, reader })
    }

    /// Sends `bytes` to `to`, waiting while the socket's buffer is full.
    async fn send_to(&self, bytes: &[u8], to: &socket2::SockAddr) -> std::io::Result<()> {
        loop {
            let mut guard = self.socket.writable().await?;
            if let Ok(sent) = guard.try_io(|s| s.get_ref().send_to(bytes, to)) {
                return sent.map(drop);
            }
        }
    }
}

/// A probe's entry in its prober's table of probes waiting for an answer, removed when the
/// probe ends (answered, failed or timed out).
struct Waiting<'a, K: std::hash::Hash + Eq, V> {
    waiters: &'a std::sync::Mutex<std::collections::HashMap<K, V>>,
    key: K,
}

impl<K: std::hash::Hash + Eq, V> Drop for Waiting<'_, K, V> {
    fn drop(&mut self) {
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// Reads datagrams from a raw socket until it closes, handing each (bytes, sender address)
/// to `on_packet`. `what` names the protocol in debug logs.
async fn raw_recv_loop(
    socket: Arc<tokio::io::unix::AsyncFd<socket2::Socket>>,
    what: &'static str,
    mut on_packet: impl FnMut(&[u8], std::net::IpAddr),
) {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let Ok(mut guard) = socket.readable().await else {
            return;
        };
        loop {
            let (n, from) = match guard.try_io(|s| s.get_ref().recv_from(&mut buf)) {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "{what} receive");
                    break;
                }
                Err(_would_block) => break,
            };
            let data = crate::sys::received(&buf, n);
            if let Some(from) = from.as_socket().map(|a| a.ip()) {
                on_packet(data, from);
            }
        }
    }
}

#[cfg(test)]
mod tests;
