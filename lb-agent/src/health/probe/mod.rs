//! The checkers. Each probe is one attempt against one target, bounded by the probe's timeout
//! (the caller applies it). Raw sockets (ICMP, SCTP) are shared by all probes of a family: one
//! reader task per socket hands each answer to the probe waiting for it.

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
        match probe.kind {
            CheckKind::Ping => {
                let cell = if target.is_ipv4() {
                    &self.icmp4
                } else {
                    &self.icmp6
                };
                let pinger = cell
                    .get_or_try_init(|| async { icmp::Pinger::open(target.is_ipv4()) })
                    .await
                    .map_err(|e| Failure::io("opening the ICMP raw socket", &e))?;
                pinger.ping(target.ip()).await
            }
            CheckKind::Sctp => {
                let cell = if target.is_ipv4() {
                    &self.sctp4
                } else {
                    &self.sctp6
                };
                let initiator = cell
                    .get_or_try_init(|| async { sctp::Initiator::open(target.is_ipv4()) })
                    .await
                    .map_err(|e| Failure::io("opening the SCTP raw socket", &e))?;
                Box::pin(initiator.probe(target)).await
            }
            // Boxed: these futures are large (an HTTP client, a TLS handshake), and an unboxed
            // one would make every probe's future as large as the largest, to be allocated
            // and moved on every probe.
            CheckKind::Tcp if probe.handshake == Handshake::Half => {
                let cell = if target.is_ipv4() {
                    &self.syn4
                } else {
                    &self.syn6
                };
                let prober = cell
                    .get_or_try_init(|| async { syn::Prober::open(target.is_ipv4()) })
                    .await
                    .map_err(|e| Failure::io("opening the TCP raw socket", &e))?;
                prober.probe(target).await
            }
            CheckKind::Tcp => Box::pin(tcp::probe(target, probe)).await,
            CheckKind::Udp => {
                let cell = if target.is_ipv4() {
                    &self.udp4
                } else {
                    &self.udp6
                };
                let prober = cell
                    .get_or_try_init(|| async { udp::Prober::open(target.is_ipv4()) })
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
