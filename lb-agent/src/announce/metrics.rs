//! The announcers' metrics.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::Status;
use crate::LockExt as _;

/// `weir_gossip_members_alive`: in L2 mode with gossip, the other nodes heard from;
/// `weir_bgp_session_up`, `weir_bgp_routes_advertised`, `weir_bgp_sessions_established_total`,
/// `weir_bfd_session_up`: one series per configured peer; `weir_announce_resource_problems`:
/// the announcement resources left out (Kubernetes mode). Read at scrape time from the status
/// `status` gives (the published snapshot's).
struct AnnounceCollector<F>(F);

impl<F> std::fmt::Debug for AnnounceCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnnounceCollector")
    }
}

/// Registers the announcers' metrics, read from `status` at each scrape.
pub fn register(registry: &mut Registry, status: impl Fn() -> Status + Send + Sync + 'static) {
    registry.register_collector(Box::new(AnnounceCollector(status)));
}

impl<F: Fn() -> Status + Send + Sync + 'static> Collector for AnnounceCollector<F> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = (self.0)();
        if let Some(n) = status.l2.as_ref().map(|s| s.alive.len()) {
            let m = encoder.encode_descriptor(
                "gossip_members_alive",
                "Other announcing nodes whose heartbeats arrive (L2 mode)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(n as i64).encode(m)?;
        }
        if let Some(l2) = status.l2.as_ref() {
            let mut m = encoder.encode_descriptor(
                "gossip_rejected",
                "Gossip datagrams that changed nothing, by reason (unknown_sender, malformed, bad_tag, replayed, name_conflict, own_name)",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in l2.rejected.all() {
                ConstCounter::new(n).encode(m.encode_family(&[("reason", reason)])?)?;
            }
        }
        let peers = status.bgp.locked().clone();
        let problems = status.problems.len();
        if problems > 0 || !peers.is_empty() {
            let m = encoder.encode_descriptor(
                "announce_resource_problems",
                "BGPPeers, BGPAdvertisements and L2Advertisements left out for a problem in their spec (see the agent's log and /api/v1/bgp)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(problems as i64).encode(m)?;
        }
        if peers.is_empty() {
            return Ok(());
        }
        let label = |p: &super::bgp::PeerStatus| p.address.to_string();
        let mut m = encoder.encode_descriptor(
            "bgp_session_up",
            "1 while the BGP session with the peer is Established, else 0",
            None,
            MetricType::Gauge,
        )?;
        for p in &peers {
            let up = p.state == super::bgp::State::Established;
            ConstGauge::new(i64::from(up))
                .encode(m.encode_family(&[("peer", label(p).as_str())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "bgp_routes_advertised",
            "VIP routes (/32, /128) advertised to the peer and not withdrawn",
            None,
            MetricType::Gauge,
        )?;
        for p in &peers {
            ConstGauge::new(p.advertised.len() as i64)
                .encode(m.encode_family(&[("peer", label(p).as_str())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "bgp_sessions_established",
            "Times the BGP session with the peer reached Established",
            None,
            MetricType::Counter,
        )?;
        for p in &peers {
            ConstCounter::new(p.established)
                .encode(m.encode_family(&[("peer", label(p).as_str())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "bfd_session_up",
            "1 while the BFD session with the peer is Up, else 0 (peers with BFD only)",
            None,
            MetricType::Gauge,
        )?;
        for p in &peers {
            if let Some(state) = p.bfd {
                let up = state == super::bfd::State::Up;
                ConstGauge::new(i64::from(up))
                    .encode(m.encode_family(&[("peer", label(p).as_str())])?)?;
            }
        }
        Ok(())
    }
}
