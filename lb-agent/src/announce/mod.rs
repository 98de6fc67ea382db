//! Making the VIPs reachable. [`Announcer`] owns it all and is fed what the published snapshot
//! says this node programs and can serve ([`Serving`]).
//! - L2 mode: the data plane answers ARP requests and Neighbor Solicitations for the VIPs this
//!   node owns (`dataplane::Programmer::set_announced`); [`l2`] finds each L2 interface's MAC
//!   and sends the gratuitous ARP / unsolicited Neighbor Advertisement that moves a VIP's
//!   neighbour entries to this node when it takes the VIP; [`gossip`] decides who owns which.
//! - BGP mode: [`bgp`] advertises the VIPs this node can serve, [`bfd`] detects a dead path.

mod announcer;
pub mod bfd;
pub mod bgp;
pub mod gossip;
pub mod l2;
pub mod metrics;
mod spec;

use std::{collections::BTreeSet, net::IpAddr};

pub use announcer::{AnnounceError, Announcer};

pub use spec::{
    Advertisement, AnnounceConfig, BfdTimers, BgpConfig, BgpPeerConfig, DEFAULT_GRACEFUL_RESTART,
    GossipConfig, RouteAttrs, Secret, SecretBytes, parse_community, parse_large_community,
};

/// What this node programs and can serve, as the published snapshot says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Serving {
    /// Every programmed VIP.
    pub all: BTreeSet<IpAddr>,
    /// The VIPs of a service that sends new flows to a backend now.
    pub servable: BTreeSet<IpAddr>,
}

/// What the announcers show (the admin API's `/api/v1/l2` and `/api/v1/bgp`, the metrics).
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// L2 mode with gossip.
    pub l2: Option<gossip::Status>,
    /// Every BGP peer's session: a live table, which the sessions update as they change.
    pub bgp: bgp::Peers,
    /// Kubernetes mode: the announcement resources left out, and why.
    pub problems: Vec<String>,
}

/// 75–100 % of `d`: the jitter of BGP's connect retry (RFC 4271 §10) and of BFD's
/// transmissions (RFC 5880 §6.8.7), so that peers do not fall into step.
pub(crate) fn jitter(d: std::time::Duration) -> std::time::Duration {
    use std::hash::BuildHasher as _;
    let r = std::hash::RandomState::new().hash_one(std::time::Instant::now()) % 250;
    d.mul_f64(0.75 + r as f64 / 1000.0)
}
