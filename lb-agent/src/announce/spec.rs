//! What to announce and how, checked: the `announce` block of the node config, or (in
//! Kubernetes mode) the BGPPeer, BGPAdvertisement and L2Advertisement resources.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

/// `announce`: how this node makes its VIPs reachable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// This node's name among the announcing nodes (default: the host name).
    pub node_name: Option<String>,
    /// L2 mode: the interfaces where this node answers ARP and Neighbor Solicitations for
    /// the VIPs it owns (empty: no L2 announcement).
    pub l2_interfaces: Vec<String>,
    /// Liveness between the announcing nodes, which decides who owns each VIP (none: this
    /// node owns every VIP).
    pub gossip: Option<GossipConfig>,
    /// BGP mode (none: no BGP speaker).
    pub bgp: Option<BgpConfig>,
}

/// `announce.bgp`: a BGP speaker that advertises the VIPs this node can serve as /32 and
/// /128 routes with this node as the next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpConfig {
    /// The AS of the peers without their own `local_as`.
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Where passive peers connect to.
    pub listen_port: u16,
    pub bfd: BfdTimers,
    pub peers: Vec<BgpPeerConfig>,
    /// Which VIPs go to which peers, with which attributes (the standalone config has one:
    /// every VIP to every peer, with `communities`, `large_communities` and `local_pref`).
    pub advertisements: Vec<Advertisement>,
    /// Graceful restart's restart time (RFC 4724): how long the peers keep this node's routes
    /// while its agent restarts (the data plane forwards meanwhile). Zero: off.
    pub graceful_restart: Duration,
}

/// The default `announce.bgp.graceful_restart`.
pub const DEFAULT_GRACEFUL_RESTART: Duration = Duration::from_mins(2);

/// Which of the VIPs this node can serve are advertised to which peers, with which path
/// attributes. A VIP and peer that several advertisements cover get their attributes merged
/// ([`RouteAttrs::merge`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advertisement {
    /// None: every VIP.
    pub vips: Option<BTreeSet<IpAddr>>,
    /// Peer addresses; None: every peer.
    pub peers: Option<BTreeSet<IpAddr>>,
    pub attrs: RouteAttrs,
}

/// The path attributes a route carries beyond ORIGIN, AS_PATH and NEXT_HOP.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteAttrs {
    /// RFC 1997 communities (high 16 bits the AS, low 16 the value), sorted.
    pub communities: Vec<u32>,
    /// RFC 8092 large communities (global administrator, local data 1, local data 2), sorted.
    pub large_communities: Vec<(u32, u32, u32)>,
    /// LOCAL_PREF sent to internal peers (external peers never get it; default 100).
    pub local_pref: Option<u32>,
}

impl RouteAttrs {
    /// Both sets of communities, and the higher LOCAL_PREF.
    pub fn merge(&mut self, other: &Self) {
        self.communities.extend(&other.communities);
        self.communities.sort_unstable();
        self.communities.dedup();
        self.large_communities.extend(&other.large_communities);
        self.large_communities.sort_unstable();
        self.large_communities.dedup();
        self.local_pref = self.local_pref.max(other.local_pref);
    }
}

/// BFD (RFC 5880) timers: the interval this node sends at and wants to receive at once up,
/// and how many missed packets declare the peer down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BfdTimers {
    pub interval: Duration,
    pub multiplier: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpPeerConfig {
    pub address: IpAddr,
    pub remote_as: u32,
    /// This node's AS towards this peer (None: `announce.bgp.local_as`).
    pub local_as: Option<u32>,
    pub port: u16,
    /// TCP MD5 signature key (RFC 2385), read from `password_file`.
    pub password: Option<Secret>,
    /// Proposed hold time (0: no keepalives; else 3 s to 65535 s); the lower of both
    /// sides' applies.
    pub hold_time: Duration,
    /// Wait between connection attempts.
    pub connect_retry: Duration,
    pub bfd: bool,
    /// eBGP multihop: the TTL of the session's packets (external peers default to 1).
    pub multihop: Option<u8>,
    /// Wait for the peer to connect instead of connecting to it.
    pub passive: bool,
}

/// A password: compared and cloned like a string, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Key bytes: compared and cloned, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes(..)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GossipConfig {
    pub listen: SocketAddr,
    /// The other announcing nodes' gossip addresses; None (Kubernetes mode only): every
    /// Node an L2Advertisement selects, at its InternalIP of `listen`'s family and
    /// `listen`'s port.
    pub peers: Option<Vec<SocketAddr>>,
    pub interval: Duration,
    pub dead_after: Duration,
    /// How long the other nodes hold this node alive, answering for its VIPs, while its
    /// agent restarts with the data plane staying (a stop with `keep_on_exit`): they take
    /// its VIPs over only when it is not back by then. A node that dies without saying so
    /// is dead after `dead_after` as always.
    pub restart_grace: Duration,
    /// The shared key the heartbeats are authenticated with (`key_file`); None: not
    /// authenticated (the agent warns).
    pub key: Option<SecretBytes>,
}

/// A large community `A:B:C` (RFC 8092).
pub fn parse_large_community(text: &str) -> Option<(u32, u32, u32)> {
    let parts: Vec<Option<u32>> = text.split(':').map(|p| p.parse().ok()).collect();
    match parts.as_slice() {
        [Some(a), Some(b), Some(c)] => Some((*a, *b, *c)),
        _ => None,
    }
}

impl BgpPeerConfig {
    /// What is wrong with this peer: (field, message); the field names are the config's
    /// (`password` is the key itself).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let usable_as = |a: u32| a != 0 && a != 23456;
        if self.address.is_unspecified() || self.address.is_multicast() {
            out.push(("address", format!("{} is not a peer address", self.address)));
        }
        if !usable_as(self.remote_as) {
            out.push((
                "remote_as",
                format!("{} is not a usable AS number", self.remote_as),
            ));
        }
        if let Some(a) = self.local_as.filter(|a| !usable_as(*a)) {
            out.push(("local_as", format!("{a} is not a usable AS number")));
        }
        if self.port == 0 {
            out.push(("port", "0 is not a port".into()));
        }
        let hold = self.hold_time;
        if hold.subsec_nanos() != 0
            || (hold != Duration::ZERO
                && (hold < Duration::from_secs(3) || hold > Duration::from_secs(65535)))
        {
            out.push((
                "hold_time",
                "must be 0 (no keepalives) or whole seconds from 3s to 65535s".into(),
            ));
        }
        if self.connect_retry < Duration::from_millis(100)
            || self.connect_retry > Duration::from_mins(10)
        {
            out.push(("connect_retry", "must be between 100ms and 10m".into()));
        }
        if self.multihop == Some(0) {
            out.push(("multihop", "is a TTL: 1 to 255".into()));
        }
        if self.bfd && self.multihop.is_some_and(|h| h > 1) {
            out.push((
                "bfd",
                "BFD here is single-hop (RFC 5881): not with multihop above 1".into(),
            ));
        }
        if let Some(Secret(key)) = &self.password
            && (key.is_empty() || key.len() > 80)
        {
            out.push((
                "password",
                format!("a TCP MD5 key has 1 to 80 bytes, this one {}", key.len()),
            ));
        }
        out
    }
}

/// A community `AS:VALUE` or a well-known name (RFC 1997).
pub fn parse_community(text: &str) -> Option<u32> {
    match text.to_ascii_lowercase().as_str() {
        "no-export" => return Some(0xFFFF_FF01),
        "no-advertise" => return Some(0xFFFF_FF02),
        "no-export-subconfed" => return Some(0xFFFF_FF03),
        _ => {}
    }
    let (a, v) = text.split_once(':')?;
    let a: u16 = a.parse().ok()?;
    let v: u16 = v.parse().ok()?;
    Some((u32::from(a) << 16) | u32::from(v))
}
