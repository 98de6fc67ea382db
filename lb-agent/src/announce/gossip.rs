//! Agent-to-agent liveness for L2 ownership, over UDP: every `interval` each agent sends a
//! heartbeat to every configured peer — its name, whether it can serve (eligible), and the
//! VIPs it answers for now — and a peer is alive while one of its heartbeats arrived within
//! `dead_after`. A full mesh among the announcing nodes (a handful): failure detection is
//! bounded by `dead_after` without SWIM's indirect probes, which pay off for hundreds of
//! members. The view is published only when it changes (a node comes or goes, or changes what
//! it claims).
//!
//! A datagram changes the view only when every check passes (otherwise it is counted by
//! reason, `wire::Reject`): it comes from a peer's address; its tag is the shared key's
//! (`announce.gossip.key_file`; without a key the tag is not checked and the agent warns at
//! start); it is newer than the last one accepted from that node's run (`seq`, strictly
//! increasing within a run; a new run of a node is known by its new `boot` nonce, and a run
//! seen before never comes back, so a clock stepping back cannot shut a node out and no clocks
//! are compared between nodes); the name and the address agree with what a live node already
//! speaks as;
//! and it echoes this node's current `boot` nonce (`echo`), which proves it was made after this
//! agent started: a datagram recorded earlier cannot be replayed into a restarted agent. A
//! peer echoes the nonce within one interval of hearing this node, so the view settles
//! `dead_after` after this node first speaks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{net::UdpSocket, sync::watch, time::Instant};
use tracing::{debug, info, warn};

pub mod wire;
use wire::{Key, Reject, Rejections};

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
    /// A random number the sender drew when its agent started.
    pub boot: u64,
    /// Strictly increasing within the sender's run (see the module docs).
    pub seq: u64,
    /// The `boot` of every node the sender has heard (authenticated and in order) from.
    #[serde(default)]
    pub echo: BTreeMap<String, u64>,
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
    /// Whether the heartbeats carry the shared key's tag.
    pub authenticated: bool,
    /// Datagrams that changed nothing since start, by reason (read when shown).
    #[serde(serialize_with = "live_counts")]
    pub rejected: Arc<Rejections>,
}

fn live_counts<S: serde::Serializer>(r: &Arc<Rejections>, s: S) -> Result<S::Ok, S::Error> {
    r.all().serialize(s)
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
    pub key: Key,
    /// Counts the rejected datagrams.
    pub rejections: Arc<Rejections>,
}

/// What this node knows of a sender whose datagrams it accepted.
#[derive(Debug)]
struct Sender {
    addr: SocketAddr,
    seq: u64,
    boot: u64,
    /// The nonces of its earlier runs (the last few): their datagrams are replays.
    earlier: std::collections::VecDeque<u64>,
}

/// How many earlier runs of a node are remembered.
const EARLIER_RUNS: usize = 16;

/// This agent's side of the heartbeats: its nonce and its sequence.
struct Me {
    boot: u64,
    seq: u64,
}

impl Me {
    fn new() -> Self {
        let mut b = [0u8; 8];
        // The nonce only needs to differ between starts; the clock backs up a failed draw.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
            b = wall_micros().to_ne_bytes();
        }
        Self {
            boot: u64::from_ne_bytes(b),
            seq: 0,
        }
    }

    /// The next sequence number: above the last (from the wall clock in microseconds, which
    /// only makes the numbers readable; a new run is told apart by its nonce).
    fn next(&mut self) -> u64 {
        self.seq = (self.seq + 1).max(wall_micros());
        self.seq
    }
}

fn wall_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The heartbeat in `datagram`, when `key` authenticates it.
pub(crate) fn decode(key: &Key, datagram: &[u8]) -> Result<Heartbeat, Reject> {
    let body = key.open(datagram)?;
    serde_json::from_slice(body).map_err(|_| Reject::Malformed)
}

/// Checks a datagram from `from` against the sender table (see the module docs): the
/// heartbeat, and whether it echoes `boot` (only then may it change the view). Records the
/// sender when the heartbeat is authentic and in order.
fn accept(
    datagram: &[u8],
    from: SocketAddr,
    settings: &Settings,
    peers: &BTreeSet<SocketAddr>,
    boot: u64,
    senders: &mut BTreeMap<String, Sender>,
    alive: &BTreeMap<String, Heard>,
) -> Result<(Heartbeat, bool), Reject> {
    if !peers.contains(&from) {
        return Err(Reject::UnknownSender);
    }
    let b = decode(&settings.key, datagram)?;
    if b.node == settings.node {
        return Err(Reject::OwnName);
    }
    // One live node per address, one address per live node.
    let conflict = senders
        .iter()
        .any(|(name, s)| alive.contains_key(name) && ((s.addr == from) != (*name == b.node)));
    if conflict {
        return Err(Reject::NameConflict);
    }
    let mut earlier = std::collections::VecDeque::new();
    if let Some(s) = senders.get_mut(&b.node) {
        if (b.boot == s.boot && b.seq <= s.seq) || s.earlier.contains(&b.boot) {
            return Err(Reject::Replayed);
        }
        earlier = std::mem::take(&mut s.earlier);
        if b.boot != s.boot {
            // A new run of that node.
            earlier.push_back(s.boot);
            if earlier.len() > EARLIER_RUNS {
                earlier.pop_front();
            }
        }
    }
    senders.insert(
        b.node.clone(),
        Sender {
            addr: from,
            seq: b.seq,
            boot: b.boot,
            earlier,
        },
    );
    let fresh = b.echo.get(&settings.node) == Some(&boot);
    Ok((b, fresh))
}

/// Alive until, eligible, claims, serving.
type Heard = (Instant, bool, BTreeSet<IpAddr>, Option<BTreeSet<IpAddr>>);

/// Runs the heartbeats on `socket` until `local`'s sender is dropped.
pub async fn run(
    socket: UdpSocket,
    settings: Settings,
    mut local: watch::Receiver<Local>,
    view: watch::Sender<View>,
) {
    let mut heard: BTreeMap<String, Heard> = BTreeMap::new();
    let mut senders: BTreeMap<String, Sender> = BTreeMap::new();
    let mut me_wire = Me::new();
    let mut warned: [Option<Instant>; Reject::ALL.len()] = [None; Reject::ALL.len()];
    // Settled `dead_after` after this node first speaks: its peers echo its nonce (and so are
    // heard) from their first heartbeat after that.
    let mut settles: Option<Instant> = None;
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
                beat(&socket, &settings, me, &mut me_wire, &senders).await;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    let peers: BTreeSet<SocketAddr> = settings.peers.borrow().iter().copied().collect();
                    // An IPv4 peer heard on an IPv6 socket arrives as `::ffff:a.b.c.d`.
                    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                    // Senders whose address is no peer's any more are forgotten.
                    senders.retain(|_, s| peers.contains(&s.addr));
                    match accept(&buf[..n], from, &settings, &peers, me_wire.boot, &mut senders, &heard) {
                        Ok((b, true)) => {
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
                        Ok((b, false)) => {
                            debug!(node = %b.node, from = %from, "gossip: a heartbeat that does not echo this agent's nonce yet (the peer has not heard it): not applied");
                        }
                        Err(reason) => {
                            settings.rejections.count(reason);
                            // A warning per reason at most once a minute (a flood of forgeries
                            // must not flood the log); the counters have every one.
                            let last = &mut warned[reason as usize];
                            if last.is_none_or(|t| t.elapsed() >= Duration::from_mins(1)) {
                                *last = Some(Instant::now());
                                warn!(from = %from, reason = reason.name(), total = settings.rejections.get(reason), "gossip: datagram rejected (changes nothing; weir_gossip_rejected_total counts them)");
                            } else {
                                debug!(from = %from, reason = reason.name(), "gossip: datagram rejected");
                            }
                        }
                    }
                }
                Err(e) => debug!(error = %e, "gossip: receive failed"),
            },
            r = local.changed() => {
                if r.is_err() {
                    return;
                }
                let me = local.borrow_and_update().clone();
                if me.restarting.is_some() {
                    beat(&socket, &settings, me, &mut me_wire, &senders).await;
                    return;
                }
                if !spoken {
                    spoken = true;
                    settles = Some(Instant::now() + settings.dead_after);
                    beat(&socket, &settings, me, &mut me_wire, &senders).await;
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
            settled: settles.is_some_and(|t| now >= t),
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
async fn beat(
    socket: &UdpSocket,
    settings: &Settings,
    me: Local,
    wire: &mut Me,
    senders: &BTreeMap<String, Sender>,
) {
    let beat = Heartbeat {
        node: settings.node.clone(),
        eligible: me.eligible,
        claims: me.claims,
        serving: Some(me.serving),
        restarting_ms: me.restarting.map(|d| d.as_millis() as u64),
        boot: wire.boot,
        seq: wire.next(),
        echo: senders.iter().map(|(n, s)| (n.clone(), s.boot)).collect(),
    };
    let bytes = settings
        .key
        .seal(&serde_json::to_vec(&beat).expect("a heartbeat serializes"));
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
