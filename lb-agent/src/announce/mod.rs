//! Making the VIPs reachable. L2 mode: the data plane answers ARP requests and Neighbor
//! Solicitations for the VIPs this node owns (`dataplane::Programmer::set_announced`); this
//! module finds each L2 interface's MAC and sends the gratuitous ARP / unsolicited Neighbor
//! Advertisement that moves a VIP's neighbour entries to this node when it takes the VIP.

pub mod bfd;
pub mod bgp;
pub mod gossip;
pub mod l2;
