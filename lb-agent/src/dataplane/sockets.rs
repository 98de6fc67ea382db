//! Connected UDP sockets follow their backend out of rotation. The socket hooks pick a backend
//! once, at `connect()`: a TCP connection to a backend that goes away breaks and the client
//! connects again, but a connected UDP socket would keep sending into the void (a DNS client's
//! socket to a dead CoreDNS pod). When a backend leaves an in-cluster UDP frontend, the
//! sockets the hooks connected to it through that frontend are closed (`SOCK_DESTROY`, as
//! Cilium does with `bpf_sock_destroy`): the owner's next call fails with `ECONNABORTED`, and
//! its next socket is balanced afresh. Sockets that asked for the backend's own address are
//! left alone (`SOCK_REVNAT` says which frontend, if any, a socket was sent through).
//!
//! Sockets live in network namespaces: the node's own, and each pod's (the `netns_dir`
//! where the container runtime names them, e.g. `/run/netns`); entering a pod's needs
//! `CAP_SYS_ADMIN`.

use std::{
    collections::BTreeSet,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tracing::{info, warn};

use super::inspect::Inspect;
use crate::{
    model::{Change, DesiredState, Protocol, Service},
    sys,
};

/// A backend that left an in-cluster UDP frontend's rotation: (backend, frontend).
pub type Left = (SocketAddr, SocketAddr);

/// The backends that left the rotation of an in-cluster UDP frontend between two programmed
/// states (a frontend that is gone takes all of its backends).
///
/// Only the services that differ between the two are looked at: a frontend the sockets
/// reach is one service's (frontends of overlapping scopes are refused), so an unchanged
/// service has the same pairs in both.
pub fn udp_left(before: &DesiredState, after: &DesiredState) -> BTreeSet<Left> {
    let changes = before.changes(after);
    let old: Vec<&Arc<Service>> = changes.iter().filter_map(Change::before).collect();
    let new: Vec<&Arc<Service>> = changes.iter().filter_map(Change::after).collect();
    let live = |services: &[&Arc<Service>]| {
        services
            .iter()
            .filter(|s| s.frontend.protocol == Protocol::Udp && s.frontend.scope.internal())
            .flat_map(|s| {
                let f = SocketAddr::new(s.frontend.vip, s.frontend.port);
                s.backends
                    .iter()
                    .filter(|b| b.share() > 0)
                    .map(move |b| (b.addr, f))
            })
            .collect::<BTreeSet<Left>>()
    };
    let now = live(&new);
    live(&old).difference(&now).copied().collect()
}

/// Closes the sockets of backends that left (see the module docs).
pub struct Terminator {
    inspector: Arc<dyn Inspect>,
    netns_dir: Option<PathBuf>,
}

impl Terminator {
    pub fn new(inspector: Arc<dyn Inspect>, netns_dir: Option<PathBuf>) -> Self {
        Self {
            inspector,
            netns_dir,
        }
    }

    /// Closes, in the background, the sockets connected through a frontend to a backend
    /// that `left` it.
    pub fn terminate(&self, left: BTreeSet<Left>) {
        if left.is_empty() {
            return;
        }
        let inspector = self.inspector.clone();
        let dir = self.netns_dir.clone();
        tokio::task::spawn_blocking(move || {
            let left: Vec<Left> = left.into_iter().collect();
            let mut closed = terminate_here(inspector.as_ref(), &left).unwrap_or_else(|e| {
                warn!(error = %e, "listing the node's UDP sockets");
                0
            });
            for ns in dir.as_deref().map(namespaces).unwrap_or_default() {
                let (i, l) = (inspector.clone(), left.clone());
                match sys::in_netns(&ns, move || terminate_here(i.as_ref(), &l)) {
                    Ok(n) => closed += n,
                    Err(e) => {
                        warn!(netns = %ns.display(), error = %e, "cannot close the namespace's UDP sockets to a backend that left (entering a namespace needs CAP_SYS_ADMIN)");
                    }
                }
            }
            if closed > 0 {
                info!(
                    sockets = closed,
                    backends = ?left.iter().map(|(b, _)| b.to_string()).collect::<Vec<_>>(),
                    "closed connected UDP sockets to backends out of rotation"
                );
            }
        });
    }
}

/// The namespace files in `dir`.
fn namespaces(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    out.sort();
    out
}

/// Closes, in this thread's network namespace, the sockets that `left` names.
fn terminate_here(inspector: &dyn Inspect, left: &[Left]) -> io::Result<usize> {
    let mut closed = 0;
    for v4 in [true, false] {
        for (s, id) in sys::udp_sockets(v4)? {
            let remote = SocketAddr::new(s.remote.ip().to_canonical(), s.remote.port());
            for (backend, frontend) in left.iter().filter(|(b, _)| *b == remote) {
                let through = inspector
                    .socket_frontend(s.cookie, *backend)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let through = through.map(|f| SocketAddr::new(f.ip().to_canonical(), f.port()));
                if through == Some(*frontend) {
                    match sys::destroy_udp(v4, &id) {
                        Ok(()) => closed += 1,
                        // Closed by its owner meanwhile.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e),
                    }
                    break;
                }
            }
        }
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, Scope, Service};

    use crate::dataplane::tests::{state, web};

    /// The cluster DNS: `web` made a UDP frontend of `scope` at 198.18.200.10:53.
    fn dns(scope: Scope, backends: &[(&str, u32)]) -> Service {
        let mut s = web(backends);
        s.name = "kube-system/kube-dns".into();
        s.frontend = Frontend {
            vip: "198.18.200.10".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
            scope,
        };
        s
    }

    #[test]
    fn backends_that_leave_an_in_cluster_udp_frontend() {
        let f: SocketAddr = "198.18.200.10:53".parse().unwrap();
        let before = state(vec![dns(
            Scope::Internal,
            &[("198.18.1.11:53", 1), ("198.18.1.12:53", 1)],
        )]);
        // Removed, or drained (weight 0): out of rotation.
        for after in [
            state(vec![dns(Scope::Internal, &[("198.18.1.11:53", 1)])]),
            state(vec![dns(
                Scope::Internal,
                &[("198.18.1.11:53", 1), ("198.18.1.12:53", 0)],
            )]),
        ] {
            assert_eq!(
                udp_left(&before, &after),
                BTreeSet::from([("198.18.1.12:53".parse().unwrap(), f)])
            );
        }
        // The frontend gone: every backend.
        assert_eq!(udp_left(&before, &state(vec![])).len(), 2);
        // Outside clients' frontends are XDP's (no sockets to close).
        let external = state(vec![dns(Scope::External, &[("198.18.1.11:53", 1)])]);
        assert!(udp_left(&external, &state(vec![])).is_empty());
    }
}
