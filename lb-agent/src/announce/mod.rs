//! Making the VIPs reachable. L2 mode: the data plane answers ARP requests and Neighbor
//! Solicitations for the VIPs this node owns (`dataplane::Programmer::set_announced`); this
//! module finds each L2 interface's MAC and sends the gratuitous ARP / unsolicited Neighbor
//! Advertisement that moves a VIP's neighbour entries to this node when it takes the VIP.

pub mod bfd;
pub mod bgp;
pub mod gossip;
pub mod l2;

/// 75–100 % of `d`: the jitter of BGP's connect retry (RFC 4271 §10) and of BFD's
/// transmissions (RFC 5880 §6.8.7), so that peers do not fall into step.
pub(crate) fn jitter(d: std::time::Duration) -> std::time::Duration {
    use std::hash::BuildHasher as _;
    let r = std::hash::RandomState::new().hash_one(std::time::Instant::now()) % 250;
    d.mul_f64(0.75 + r as f64 / 1000.0)
}
