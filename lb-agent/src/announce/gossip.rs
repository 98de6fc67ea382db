//! Agent-to-agent liveness for L2 ownership, over UDP: every `interval` each agent sends a
//! heartbeat to every configured peer — its name, whether it can serve (eligible), and the
//! VIPs it answers for now — and a peer is alive while one of its heartbeats arrived within
//! `dead_after`. A full mesh among the announcing nodes (a handful): failure detection is
//! bounded by `dead_after` without SWIM's indirect probes, which pay off for hundreds of
//! members. The view is published only when it changes (a node comes or goes, or changes what
//! it claims). Heartbeats are not authenticated: the gossip port belongs on the nodes'
//! own network.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{net::UdpSocket, sync::watch, time::Instant};
use tracing::{debug, info, warn};

/// One heartbeat datagram (JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heartbeat {
    pub node: String,
    /// This node can serve: data plane attached, announcing link up.
    pub eligible: bool,
    /// The VIPs it answers for now.
    pub claims: BTreeSet<IpAddr>,
    /// The VIPs it can serve (a backend in rotation); absent: every VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<BTreeSet<IpAddr>>,
    /// The sender's agent is restarting with its data plane staying (still answering for its
    /// claims): hold it alive as it is for this many milliseconds, unless it is heard again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarting_ms: Option<u64>,
}

/// What this node tells its peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    pub eligible: bool,
    pub claims: BTreeSet<IpAddr>,
    pub serving: BTreeSet<IpAddr>,
    /// Set when the agent stops with the data plane staying: the task sends one last
    /// heartbeat saying so (hold this node alive for that long) and ends.
    pub restarting: Option<Duration>,
}

/// The other nodes heard from within `dead_after`: name → (eligible, claims).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub alive: BTreeMap<String, (bool, BTreeSet<IpAddr>)>,
    /// What each live node said it can serve (a node not listed serves every VIP).
    pub serving: BTreeMap<String, BTreeSet<IpAddr>>,
    /// `dead_after` has passed since this node started listening: a peer not heard by now is
    /// dead, not just unheard yet. Until then this node takes nothing (a restarting node
    /// would otherwise answer next to the owner for the first heartbeat).
    pub settled: bool,
}

/// L2 mode as the admin API (`/api/v1/l2`) shows it.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Status {
    /// This node's name among the announcing nodes.
    pub node: String,
    /// Where the heartbeats go.
    pub peers: Vec<SocketAddr>,
    /// Whether the first `dead_after` has passed (before it this node takes nothing).
    pub settled: bool,
    /// The other nodes heard from, by name.
    pub alive: BTreeMap<String, Member>,
    /// The VIPs this node may answer for (absent: every VIP; Kubernetes mode: what the
    /// L2Advertisements give it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<BTreeSet<IpAddr>>,
    /// The VIPs this node answers for now.
    pub announced: BTreeSet<IpAddr>,
}

/// Another node as its heartbeats describe it.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Member {
    pub eligible: bool,
    /// The VIPs it answers for.
    pub claims: BTreeSet<IpAddr>,
    /// The VIPs it can serve (absent: every VIP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving: Option<BTreeSet<IpAddr>>,
}

impl View {
    /// The members as [`Status`] lists them.
    pub fn members(&self) -> BTreeMap<String, Member> {
        self.alive
            .iter()
            .map(|(n, (eligible, claims))| {
                (
                    n.clone(),
                    Member {
                        eligible: *eligible,
                        claims: claims.clone(),
                        serving: self.serving.get(n).cloned(),
                    },
                )
            })
            .collect()
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    /// Where the heartbeats go (changes as nodes come and go in Kubernetes mode).
    pub peers: watch::Receiver<Vec<SocketAddr>>,
    pub interval: Duration,
    pub dead_after: Duration,
}

/// Runs the heartbeats on `socket` until `local`'s sender is dropped.
pub async fn run(
    socket: UdpSocket,
    settings: Settings,
    mut local: watch::Receiver<Local>,
    view: watch::Sender<View>,
) {
    /// Alive until, eligible, claims, serving.
    type Heard = (Instant, bool, BTreeSet<IpAddr>, Option<BTreeSet<IpAddr>>);
    let mut heard: BTreeMap<String, Heard> = BTreeMap::new();
    let settles = Instant::now() + settings.dead_after;
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 65536];
    // Silent until the agent first says what this node is: a heartbeat saying "not eligible,
    // no claims" would make the others take over the VIPs of a node whose restarted agent is
    // still programming its first state (they hold it alive as it was meanwhile).
    let mut spoken = false;
    loop {
        tokio::select! {
            _ = tick.tick(), if spoken => {
                let me = local.borrow().clone();
                beat(&socket, &settings, me).await;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => match serde_json::from_slice::<Heartbeat>(&buf[..n]) {
                    Ok(b) if b.node != settings.node => {
                        if !heard.contains_key(&b.node) {
                            info!(node = %b.node, from = %from, "gossip: peer alive");
                        }
                        let hold = b.restarting_ms.map_or(settings.dead_after, |ms| {
                            let hold = Duration::from_millis(ms).max(settings.dead_after);
                            info!(node = %b.node, hold = ?hold, "gossip: peer restarting with its data plane staying; held alive as it is");
                            hold
                        });
                        heard.insert(b.node, (Instant::now() + hold, b.eligible, b.claims, b.serving));
                    }
                    Ok(_) => warn!(from = %from, "gossip: a heartbeat with this node's own name"),
                    Err(e) => debug!(from = %from, error = %e, "gossip: not a heartbeat"),
                },
                Err(e) => debug!(error = %e, "gossip: receive failed"),
            },
            r = local.changed() => {
                if r.is_err() {
                    return;
                }
                let me = local.borrow_and_update().clone();
                if me.restarting.is_some() {
                    beat(&socket, &settings, me).await;
                    return;
                }
                if !spoken {
                    spoken = true;
                    beat(&socket, &settings, me).await;
                }
                continue;
            }
        }
        let now = Instant::now();
        heard.retain(|node, (until, _, _, _)| {
            let alive = now <= *until;
            if !alive {
                info!(node = %node, "gossip: peer dead (no heartbeat within dead_after)");
            }
            alive
        });
        let next = View {
            alive: heard
                .iter()
                .map(|(n, (_, e, c, _))| (n.clone(), (*e, c.clone())))
                .collect(),
            serving: heard
                .iter()
                .filter_map(|(n, (_, _, _, s))| Some((n.clone(), s.clone()?)))
                .collect(),
            settled: now >= settles,
        };
        view.send_if_modified(|v| {
            if *v == next {
                false
            } else {
                *v = next;
                true
            }
        });
    }
}

/// Sends this node's heartbeat to every peer.
async fn beat(socket: &UdpSocket, settings: &Settings, me: Local) {
    let beat = Heartbeat {
        node: settings.node.clone(),
        eligible: me.eligible,
        claims: me.claims,
        serving: Some(me.serving),
        restarting_ms: me.restarting.map(|d| d.as_millis() as u64),
    };
    let bytes = serde_json::to_vec(&beat).expect("a heartbeat serializes");
    let peers = settings.peers.borrow().clone();
    for peer in &peers {
        if let Err(e) = socket.send_to(&bytes, peer).await {
            debug!(peer = %peer, error = %e, "gossip: heartbeat not sent");
        }
    }
}

/// The rendezvous rank of `node` for `vip`: the eligible node with the highest rank owns it
/// (ties by name), so every node that sees the same members picks the same owner, and a node
/// leaving or joining moves only the VIPs it owns or takes.
pub fn rank(node: &str, vip: IpAddr) -> u64 {
    let mut key = node.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(vip.to_string().as_bytes());
    xxhash_rust::xxh3::xxh3_64(&key)
}

/// The VIPs of `vips` this node (`me`) answers for, given the others it hears from: those it
/// ranks first for among the eligible nodes that can serve them (`serving`: this node's), except
/// while another live node still claims one (that node stops within a heartbeat once it sees
/// it is not the owner: the hand-over never has two nodes answering), and nothing before the
/// view has settled.
pub fn owned(
    me: &str,
    eligible: bool,
    serving: &BTreeSet<IpAddr>,
    view: &View,
    vips: &BTreeSet<IpAddr>,
) -> BTreeSet<IpAddr> {
    if !eligible || !view.settled {
        return BTreeSet::new();
    }
    vips.iter()
        .copied()
        .filter(|vip| {
            if !serving.contains(vip) {
                return false;
            }
            let first = view
                .alive
                .iter()
                .filter(|(n, (e, _))| *e && view.serving.get(*n).is_none_or(|s| s.contains(vip)))
                .map(|(n, _)| n.as_str())
                .chain(std::iter::once(me))
                .max_by_key(|n| (rank(n, *vip), *n));
            first == Some(me)
                && !view
                    .alive
                    .iter()
                    .any(|(n, (_, claims))| n != me && claims.contains(vip))
        })
        .collect()
}

#[cfg(test)]
mod tests;
