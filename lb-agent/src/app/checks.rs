//! What the agent refuses before it touches anything: a config that does not fit the mode, a
//! source-NAT port range the node's own connections may use, a reload that changes what only
//! a restart can.

use crate::config::{Config, ConfigError, Source};

/// Refuses a config that does not fit the mode (`kubernetes`: Services come from the API).
pub fn mode(source: &Source, config: &Config, kubernetes: bool) -> Result<(), ConfigError> {
    let refuse = |detail: &str| Err(ConfigError::Refused(format!("{source}: {detail}")));
    if kubernetes && !config.desired.services.is_empty() {
        return refuse(
            "services: with --kubernetes the services come from Kubernetes; the config file \
             carries node settings only (remove the services list)",
        );
    }
    if kubernetes && !config.announce.l2_interfaces.is_empty() && config.announce.gossip.is_none() {
        return refuse(
            "announce.l2: in Kubernetes mode every node would answer for every address; add \
             announce.gossip (its peers default to the Nodes the L2Advertisements select)",
        );
    }
    if !kubernetes
        && let Some(g) = &config.announce.gossip
        && g.peers.is_none()
    {
        return refuse(
            "announce.gossip.peers: needed in standalone mode (only Kubernetes mode finds the \
             other nodes by itself)",
        );
    }
    if kubernetes && config.announce.bgp.is_some() {
        return refuse(
            "announce.bgp: in Kubernetes mode BGP comes from the BGPPeer and \
             BGPAdvertisement resources (weir.dev/v1alpha1); remove it from the node config",
        );
    }
    // Kubernetes mode source-NATs flows to other nodes' endpoints whenever the Node has an
    // address; standalone mode when a service asks for it.
    if kubernetes || config.desired.source_nat.is_some() {
        source_nat_ports(config.node.source_nat.ports)
            .map_err(|e| ConfigError::Refused(format!("{source}: {e}")))?;
    }
    Ok(())
}

/// Refuses a source-NAT port range that the node's own connections may use (this network
/// namespace's `ip_local_port_range` and `ip_local_reserved_ports`).
pub fn source_nat_ports(ports: (u16, u16)) -> Result<(), ConfigError> {
    let (lo, hi, reserved) = crate::config::ephemeral_ports()?;
    if let Some(port) = crate::config::ephemeral_overlap(ports, (lo, hi), &reserved) {
        return Err(ConfigError::Refused(format!(
            "node.source_nat.ports {}-{} overlaps the node's ephemeral ports \
             (net.ipv4.ip_local_port_range {lo}-{hi}; port {port} is not in \
             net.ipv4.ip_local_reserved_ports): the node's own connections could take a port \
             whose replies weir would translate. Choose a range outside it, or reserve it with \
             sysctl net.ipv4.ip_local_reserved_ports",
            ports.0, ports.1
        )));
    }
    Ok(())
}

/// The first field that differs and can only change with a restart (the programs' attachment,
/// map capacities, the admin listener, the Maglev hash and seed every node must share).
pub fn restart_only_change(old: &Config, new: &Config) -> Option<&'static str> {
    if old.node.interfaces != new.node.interfaces {
        Some("node.interfaces")
    } else if old.node.xdp_mode != new.node.xdp_mode {
        Some("node.xdp_mode")
    } else if old.admin != new.admin {
        Some("admin.listen/admin.metrics_listen")
    } else if old.dataplane != new.dataplane || old.pinning != new.pinning {
        Some("dataplane")
    } else if old.maglev.hash != new.maglev.hash || old.maglev.seed != new.maglev.seed {
        Some("maglev.hash/maglev.seed")
    } else if old.announce.node_name != new.announce.node_name
        || old.announce.l2_interfaces != new.announce.l2_interfaces
        || old.announce.gossip != new.announce.gossip
    {
        // BGP changes apply peer by peer (`Announcer::sync_bgp`).
        Some("announce")
    } else {
        None
    }
}
