//! The config file as written: serde structs, unknown fields rejected, defaults filled in.
//! [`super::check`] turns them into the checked [`super::Config`].

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use super::*;
use crate::{
    dataplane::XdpMode,
    maglev::MaglevHash,
    model::{Protocol, check::RawHealthCheck},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) node: RawNode,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) maglev: RawMaglev,
    #[serde(default)]
    pub(super) dataplane: RawDataplane,
    #[serde(default)]
    pub(super) services: Vec<RawService>,
    pub(super) announce: Option<RawAnnounce>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    pub(super) node_name: Option<String>,
    pub(super) l2: Option<RawL2>,
    pub(super) gossip: Option<RawGossip>,
    pub(super) bgp: Option<RawBgp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBgp {
    pub(super) local_as: u32,
    pub(super) router_id: Ipv4Addr,
    #[serde(default)]
    pub(super) communities: Vec<String>,
    #[serde(default)]
    pub(super) large_communities: Vec<String>,
    pub(super) local_pref: Option<u32>,
    #[serde(default = "default_bgp_port")]
    pub(super) listen_port: u16,
    #[serde(default)]
    pub(super) bfd: RawBfdTimers,
    #[serde(default = "default_graceful_restart", with = "humantime_serde")]
    pub(super) graceful_restart: Duration,
    pub(super) peers: Vec<RawBgpPeer>,
}

pub(super) fn default_graceful_restart() -> Duration {
    crate::announce::DEFAULT_GRACEFUL_RESTART
}

pub(super) fn default_bgp_port() -> u16 {
    179
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBfdTimers {
    #[serde(default = "default_bfd_interval", with = "humantime_serde")]
    pub(super) interval: Duration,
    #[serde(default = "default_bfd_multiplier")]
    pub(super) multiplier: u8,
}

impl Default for RawBfdTimers {
    fn default() -> Self {
        Self {
            interval: default_bfd_interval(),
            multiplier: default_bfd_multiplier(),
        }
    }
}

pub(super) fn default_bfd_interval() -> Duration {
    Duration::from_millis(100)
}

pub(super) fn default_bfd_multiplier() -> u8 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBgpPeer {
    pub(super) address: IpAddr,
    pub(super) remote_as: u32,
    pub(super) local_as: Option<u32>,
    #[serde(default = "default_bgp_port")]
    pub(super) port: u16,
    pub(super) password_file: Option<PathBuf>,
    #[serde(default = "default_hold_time", with = "humantime_serde")]
    pub(super) hold_time: Duration,
    #[serde(default = "default_connect_retry", with = "humantime_serde")]
    pub(super) connect_retry: Duration,
    #[serde(default)]
    pub(super) bfd: bool,
    pub(super) multihop: Option<u8>,
    #[serde(default)]
    pub(super) passive: bool,
}

pub(super) fn default_hold_time() -> Duration {
    Duration::from_secs(9)
}

pub(super) fn default_connect_retry() -> Duration {
    Duration::from_secs(2)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGossip {
    pub(super) listen: SocketAddr,
    pub(super) peers: Option<Vec<SocketAddr>>,
    #[serde(default = "default_gossip_interval", with = "humantime_serde")]
    pub(super) interval: Duration,
    #[serde(default = "default_gossip_dead_after", with = "humantime_serde")]
    pub(super) dead_after: Duration,
    #[serde(default = "default_restart_grace", with = "humantime_serde")]
    pub(super) restart_grace: Duration,
    /// The shared key of the heartbeats (at least 16 bytes; a trailing newline is not part
    /// of it).
    pub(super) key_file: Option<PathBuf>,
}

pub(super) fn default_restart_grace() -> Duration {
    Duration::from_secs(30)
}

pub(super) fn default_gossip_interval() -> Duration {
    Duration::from_millis(100)
}

pub(super) fn default_gossip_dead_after() -> Duration {
    Duration::from_millis(400)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawL2 {
    pub(super) interfaces: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) interfaces: Vec<String>,
    #[serde(default)]
    pub(super) xdp_mode: XdpMode,
    #[serde(default)]
    pub(super) source_nat: RawSourceNat,
    #[serde(default)]
    pub(super) kube_proxy_replacement: bool,
    #[serde(default)]
    pub(super) socket_lb: RawSocketLb,
    /// Prefixes (kube-proxy's `--nodeport-addresses`); empty: the Node's InternalIPs.
    #[serde(default)]
    pub(super) nodeport_addresses: Vec<String>,
    /// kube-proxy's health endpoint (`--healthz-bind-address`).
    pub(super) healthz_listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSocketLb {
    /// Default: `node.kube_proxy_replacement`.
    pub(super) enabled: Option<bool>,
    pub(super) cgroup: Option<PathBuf>,
    /// Where the pods' network namespaces are named (their connected UDP sockets to a
    /// backend out of rotation are closed).
    pub(super) netns_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSourceNat {
    /// `first-last`.
    pub(super) ports: Option<String>,
    pub(super) ipv4: Option<Ipv4Addr>,
    pub(super) ipv6: Option<std::net::Ipv6Addr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    pub(super) listen: SocketAddr,
    /// `/metrics`, `/livez` and `/readyz` only, for Prometheus and the kubelet.
    pub(super) metrics_listen: Option<SocketAddr>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            metrics_listen: None,
        }
    }
}

pub(super) fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9300))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMaglev {
    #[serde(default = "default_table_size")]
    pub(super) table_size: u32,
    #[serde(default)]
    pub(super) hash: MaglevHash,
    #[serde(default)]
    pub(super) seed: u64,
}

impl Default for RawMaglev {
    fn default() -> Self {
        Self {
            table_size: default_table_size(),
            hash: MaglevHash::default(),
            seed: 0,
        }
    }
}

pub(super) fn default_table_size() -> u32 {
    16381
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataplane {
    pub(super) max_services: Option<u32>,
    pub(super) max_backends: Option<u32>,
    pub(super) conntrack_size: Option<u32>,
    pub(super) affinity_size: Option<u32>,
    pub(super) pin_dir: Option<PathBuf>,
    pub(super) keep_on_exit: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: String,
    pub(super) vip: IpAddr,
    pub(super) port: u16,
    pub(super) protocol: Protocol,
    #[serde(default)]
    pub(super) backends: Vec<RawBackend>,
    #[serde(default)]
    pub(super) source_ranges: Vec<IpNet>,
    pub(super) session_affinity: Option<RawAffinity>,
    pub(super) table_size: Option<u32>,
    pub(super) health_check: Option<RawHealthCheck>,
    /// The backends' replies do not pass this node: source-NAT flows to them.
    #[serde(default)]
    pub(super) source_nat: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: IpAddr,
    pub(super) port: u16,
    #[serde(default = "default_weight")]
    pub(super) weight: u32,
}

pub(super) fn default_weight() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAffinity {
    #[serde(default = "default_affinity_timeout", with = "humantime_serde")]
    pub(super) timeout: Duration,
}

pub(super) fn default_affinity_timeout() -> Duration {
    DEFAULT_AFFINITY_TIMEOUT
}
