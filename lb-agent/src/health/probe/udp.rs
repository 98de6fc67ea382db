//! `udp`: send `request` and take the first reply from the target's address and port. A reply
//! must contain `response` when one is set; an ICMP port unreachable fails at once (read from
//! the socket's error queue, `IP_RECVERR`); silence is a timeout, so a black-holed backend is
//! down.
//!
//! All probes of a family share a few unconnected sockets, each with one reader task: a probe
//! is one `sendto` and its share of a `recvfrom`, where a socket of its own cost a socket, a
//! bind, a connect, its event registration and its close. The probes of one target rotate
//! over the sockets from one interval to the next, so that a late reply to an earlier probe
//! (after its timeout) arrives at a socket where nothing waits for that target and is dropped,
//! as it was when each probe had a socket of its own.

use crate::LockExt as _;
use std::{
    collections::HashMap,
    hash::BuildHasher as _,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Instant,
};

use socket2::{Protocol, SockAddr, Socket, Type};
use tokio::{
    io::{Interest, Ready, unix::AsyncFd},
    sync::oneshot,
};

use super::tcp::{contains, preview};
use crate::health::state::{Failure, FailureKind};
use crate::model::check::Probe;

/// Sockets per family.
const SOCKETS: usize = 4;

/// A reply's bytes, or the error the target's answer caused.
type Answer = Result<Vec<u8>, Failure>;
/// (target address, port) → the probe waiting for it on this socket.
type Waiters = Mutex<HashMap<(IpAddr, u16), oneshot::Sender<Answer>>>;

struct Shared {
    socket: super::Shared,
    waiting: Arc<Waiters>,
}

pub struct Prober {
    sockets: Vec<Shared>,
    random: std::hash::RandomState,
    epoch: Instant,
}

impl Prober {
    pub fn open(v4: bool) -> io::Result<Arc<Self>> {
        let sockets = (0..SOCKETS)
            .map(|_| -> io::Result<Shared> {
                let any: SocketAddr = if v4 {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let waiting: Arc<Waiters> = Arc::default();
                let socket = super::Shared::open(
                    v4,
                    Type::DGRAM,
                    Protocol::UDP,
                    |s| {
                        crate::sys::set_recv_err(s, v4)?;
                        s.bind(&any.into())
                    },
                    |s| read_loop(s, waiting.clone()),
                )?;
                Ok(Shared { socket, waiting })
            })
            .collect::<io::Result<_>>()?;
        Ok(Arc::new(Self {
            sockets,
            random: std::hash::RandomState::new(),
            epoch: Instant::now(),
        }))
    }

    pub async fn probe(&self, target: SocketAddr, probe: &Probe) -> Result<(), Failure> {
        let key = (target.ip(), target.port());
        // This interval's socket for the target, or the next one free of a probe of it (two
        // checks of one target with different requests).
        let tick = self.epoch.elapsed().as_nanos() / probe.interval.as_nanos().max(1);
        let first = (u128::from(self.random.hash_one(key)) + tick) as usize;
        let (shared, rx) = (0..SOCKETS)
            .find_map(|i| {
                let shared = &self.sockets[(first + i) % SOCKETS];
                let mut w = shared.waiting.locked();
                if w.contains_key(&key) {
                    return None;
                }
                let (tx, rx) = oneshot::channel();
                w.insert(key, tx);
                Some((shared, rx))
            })
            .ok_or_else(|| {
                Failure::new(
                    FailureKind::Error,
                    "every UDP probe socket already waits for this target",
                )
            })?;
        let _waiting = super::Waiting {
            waiters: &shared.waiting,
            key,
        };
        let request = probe.request.as_deref().unwrap_or_default();
        let to = SockAddr::from(target);
        // A send reports (and clears) the socket's pending error, which an ICMP error for
        // another probe's datagram may have left (its probe reads it from the error queue):
        // sent again, only this datagram's own error remains.
        let mut tries = 0;
        loop {
            match shared.socket.send_to(request.as_bytes(), &to).await {
                Ok(()) => break,
                Err(e) if tries >= 3 => return Err(Failure::io("send", &e)),
                Err(_) => tries += 1,
            }
        }
        let reply = match rx.await {
            Ok(r) => r?,
            Err(_) => return Err(Failure::new(FailureKind::Error, "the UDP reader stopped")),
        };
        match &probe.response {
            Some(expected) if !contains(&reply, expected.as_bytes()) => Err(Failure::new(
                FailureKind::BadResponse,
                format!("reply without {expected:?}: {:?}", preview(&reply)),
            )),
            _ => Ok(()),
        }
    }
}

/// Hands each datagram, and each error an earlier datagram caused, to the probe waiting for
/// its sender (or destination).
async fn read_loop(socket: Arc<AsyncFd<Socket>>, waiting: Arc<Waiters>) {
    let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 65536];
    let answer = |from: SocketAddr, a: Answer| {
        if let Some(tx) = waiting.locked().remove(&(from.ip(), from.port())) {
            let _ = tx.send(a);
        }
    };
    loop {
        let Ok(mut guard) = socket.ready(Interest::READABLE | Interest::ERROR).await else {
            return;
        };
        let mut errors = 0;
        loop {
            match socket.get_ref().recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(from) = from.as_socket() {
                        answer(from, Ok(crate::sys::received(&buf, n).to_vec()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The socket's pending error (an ICMP error, also on the error queue, which is
                // read below; reporting it clears it), then the datagrams behind it.
                Err(e) => {
                    errors += 1;
                    if errors > 64 {
                        tracing::debug!(error = %e, "UDP receive");
                        break;
                    }
                }
            }
        }
        loop {
            match crate::sys::recv_error(socket.get_ref()) {
                Ok((to, e)) => answer(to, Err(Failure::io("receive", &e))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP error queue");
                    break;
                }
            }
        }
        guard.clear_ready_matching(Ready::READABLE | Ready::ERROR);
    }
}
