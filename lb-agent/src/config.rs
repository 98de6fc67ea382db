//! The standalone configuration file: the one place that reads it. Parsing (YAML, unknown
//! fields rejected) and validation are one conversion into a checked [`Config`]; an error
//! names the file, the field path and what is wrong, and nothing is applied.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    health::spec::{CheckKind, HealthCheck, RawHealthCheck},
    maglev,
    model::{Backend, DesiredState, Frontend, Protocol, Service, SourceNat},
};

/// The example configuration, also what `lb-agent run` uses when no `--config` is given: the
/// standalone lab's addresses (see `weir-lab demo`).
pub const DEFAULT_CONFIG: &str = include_str!("../../examples/standalone.yaml");
pub const DEFAULT_CONFIG_NAME: &str = "<embedded default config>";

/// Largest weight a backend may have.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Longest ClientIP affinity timeout (Kubernetes' limit for `timeoutSeconds`).
pub const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Affinity timeout when the block is given without one (Kubernetes' default).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    maglev: RawMaglev,
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    services: Vec<RawService>,
    announce: Option<RawAnnounce>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnnounce {
    node_name: Option<String>,
    l2: Option<RawL2>,
    gossip: Option<RawGossip>,
    bgp: Option<RawBgp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBgp {
    local_as: u32,
    router_id: Ipv4Addr,
    #[serde(default)]
    communities: Vec<String>,
    #[serde(default)]
    large_communities: Vec<String>,
    local_pref: Option<u32>,
    #[serde(default = "default_bgp_port")]
    listen_port: u16,
    #[serde(default)]
    bfd: RawBfdTimers,
    peers: Vec<RawBgpPeer>,
}

fn default_bgp_port() -> u16 {
    179
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBfdTimers {
    #[serde(default = "default_bfd_interval", with = "humantime_serde")]
    interval: Duration,
    #[serde(default = "default_bfd_multiplier")]
    multiplier: u8,
}

impl Default for RawBfdTimers {
    fn default() -> Self {
        Self {
            interval: default_bfd_interval(),
            multiplier: default_bfd_multiplier(),
        }
    }
}

fn default_bfd_interval() -> Duration {
    Duration::from_millis(100)
}

fn default_bfd_multiplier() -> u8 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBgpPeer {
    address: IpAddr,
    remote_as: u32,
    local_as: Option<u32>,
    #[serde(default = "default_bgp_port")]
    port: u16,
    password_file: Option<PathBuf>,
    #[serde(default = "default_hold_time", with = "humantime_serde")]
    hold_time: Duration,
    #[serde(default = "default_connect_retry", with = "humantime_serde")]
    connect_retry: Duration,
    #[serde(default)]
    bfd: bool,
    multihop: Option<u8>,
    #[serde(default)]
    passive: bool,
}

fn default_hold_time() -> Duration {
    Duration::from_secs(9)
}

fn default_connect_retry() -> Duration {
    Duration::from_secs(2)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGossip {
    listen: SocketAddr,
    peers: Option<Vec<SocketAddr>>,
    #[serde(default = "default_gossip_interval", with = "humantime_serde")]
    interval: Duration,
    #[serde(default = "default_gossip_dead_after", with = "humantime_serde")]
    dead_after: Duration,
}

fn default_gossip_interval() -> Duration {
    Duration::from_millis(100)
}

fn default_gossip_dead_after() -> Duration {
    Duration::from_millis(400)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawL2 {
    interfaces: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    interfaces: Vec<String>,
    #[serde(default)]
    xdp_mode: XdpMode,
    #[serde(default)]
    source_nat: RawSourceNat,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSourceNat {
    /// `first-last`.
    ports: Option<String>,
    ipv4: Option<std::net::Ipv4Addr>,
    ipv6: Option<std::net::Ipv6Addr>,
}

/// The source-NAT port range when none is configured: above Linux's default ephemeral range
/// (32768-60999), so that the node's own connections never use these ports.
pub const DEFAULT_SOURCE_NAT_PORTS: (u16, u16) = (61000, 65535);

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, generic mode otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: SocketAddr,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9300))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaglev {
    #[serde(default = "default_table_size")]
    table_size: u32,
    #[serde(default)]
    hash: MaglevHash,
    #[serde(default)]
    seed: u64,
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

fn default_table_size() -> u32 {
    16381
}

/// The Maglev permutation hash, named so that a future change is explicit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum MaglevHash {
    #[default]
    #[serde(rename = "xxh3-64")]
    Xxh3_64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    max_services: Option<u32>,
    max_backends: Option<u32>,
    conntrack_size: Option<u32>,
    affinity_size: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: IpAddr,
    port: u16,
    protocol: Protocol,
    #[serde(default)]
    backends: Vec<RawBackend>,
    #[serde(default)]
    source_ranges: Vec<IpNet>,
    session_affinity: Option<RawAffinity>,
    table_size: Option<u32>,
    health_check: Option<RawHealthCheck>,
    /// The backends' replies do not pass this node: source-NAT flows to them.
    #[serde(default)]
    source_nat: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: IpAddr,
    port: u16,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAffinity {
    #[serde(default = "default_affinity_timeout", with = "humantime_serde")]
    timeout: Duration,
}

fn default_affinity_timeout() -> Duration {
    DEFAULT_AFFINITY_TIMEOUT
}

/// A checked configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    pub admin: AdminConfig,
    pub maglev: MaglevConfig,
    pub dataplane: DataplaneLimits,
    pub desired: DesiredState,
    pub announce: AnnounceConfig,
}

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
}

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GossipConfig {
    pub listen: SocketAddr,
    /// The other announcing nodes' gossip addresses; None (Kubernetes mode only): every
    /// Node an L2Advertisement selects, at its InternalIP of `listen`'s family and
    /// `listen`'s port.
    pub peers: Option<Vec<SocketAddr>>,
    pub interval: Duration,
    pub dead_after: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// `node.source_nat`: the port range given to source-NATed flows and the node's addresses
    /// they leave with (in Kubernetes mode, by default this Node's InternalIP of each family).
    pub source_nat: SourceNat,
}

/// The first port of `range` that the node's own connections may also pick: inside the
/// ephemeral range (`net.ipv4.ip_local_port_range`, which also governs IPv6) and not listed
/// in `net.ipv4.ip_local_reserved_ports` (`reserved`, as the kernel prints it: `a-b,c,...`).
/// A reply to such a connection would be taken for a source-NATed flow's.
/// This network namespace's ephemeral port range and its reserved ports (the text of
/// `ip_local_reserved_ports`; empty when unreadable).
pub fn ephemeral_ports() -> Result<(u16, u16, String), ConfigError> {
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let text = std::fs::read_to_string(RANGE).map_err(|source| ConfigError::Host {
        what: RANGE,
        source,
    })?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return Err(ConfigError::Host {
            what: RANGE,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected contents {text:?}"),
            ),
        });
    };
    let reserved = std::fs::read_to_string(RESERVED).unwrap_or_default();
    Ok((lo, hi, reserved))
}

/// This host's name (the default node name among the announcing nodes).
pub fn host_name() -> Result<String, ConfigError> {
    const HOSTNAME: &str = "/proc/sys/kernel/hostname";
    std::fs::read_to_string(HOSTNAME)
        .map(|n| n.trim().to_string())
        .map_err(|source| ConfigError::Host {
            what: HOSTNAME,
            source,
        })
}

pub fn ephemeral_overlap(range: (u16, u16), ephemeral: (u16, u16), reserved: &str) -> Option<u16> {
    let reserved: Vec<(u16, u16)> = reserved
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
                None => part.parse().ok().map(|p| (p, p)),
            }
        })
        .collect();
    let lo = range.0.max(ephemeral.0);
    let hi = range.1.min(ephemeral.1);
    (lo..=hi).find(|p| !reserved.iter().any(|(a, b)| (*a..=*b).contains(p)))
}

/// Parses `first-last` (inclusive, 1024..=65535, first <= last).
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{text:?} is not a port range such as 61000-65535");
    let (a, b) = text.trim().split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a < 1024 {
        return Err(format!(
            "{text}: ports below 1024 are the node's own services'"
        ));
    }
    if a > b {
        return Err(format!("{text}: the first port is above the last"));
    }
    Ok((a, b))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevConfig {
    pub table_size: u32,
    pub hash: MaglevHash,
    pub seed: u64,
}

/// Capacities of the data plane's maps, fixed when the programs are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneLimits {
    pub max_services: u32,
    pub max_backends: u32,
    pub conntrack_size: u32,
    pub affinity_size: u32,
}

impl Default for DataplaneLimits {
    fn default() -> Self {
        use lb_common::limits;
        Self {
            max_services: limits::MAX_SERVICES,
            max_backends: limits::MAX_BACKENDS,
            conntrack_size: limits::MAX_FLOWS,
            affinity_size: limits::MAX_AFFINITY,
        }
    }
}

/// One thing wrong with a config, at a field path such as `services[1].backends[0].port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join(&format!("\n{file}: ")))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
    /// A valid config that does not fit here (the mode, the node's sysctls).
    #[error("{0}")]
    Refused(String),
    /// A fact of the host that could not be read.
    #[error("{what}: {source}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } | Self::Refused(_) | Self::Host { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    /// The embedded default configuration.
    pub fn default_config() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME)
    }

    /// Parses and checks `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            file: file.to_string(),
            problems,
        };
        let raw: RawConfig = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(
            text,
        ))
        .map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "(top level)".into()
            } else {
                path
            };
            // serde_yaml already starts its message with the path (of the map, for an
            // unknown field, where the path names the field).
            let message = e.into_inner().to_string();
            let message = match message.split_once(": ") {
                Some((prefix, rest)) if path.starts_with(prefix) => rest.to_string(),
                _ => message,
            };
            invalid(vec![Problem { path, message }])
        })?;
        raw.check().map_err(invalid)
    }
}

/// Where a config came from: a file path, or the embedded default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

impl Source {
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.load_with_fingerprint().map(|(c, _)| c)
    }

    /// The config and the bytes it was parsed from (what [`fingerprint`](Self::fingerprint)
    /// compares), read once so that the two always match.
    pub fn load_with_fingerprint(&self) -> Result<(Config, Option<Vec<u8>>), ConfigError> {
        match self {
            Self::File(p) => {
                let file = p.display().to_string();
                let bytes = std::fs::read(p).map_err(|source| ConfigError::Read {
                    file: file.clone(),
                    source,
                })?;
                let text = String::from_utf8_lossy(&bytes);
                Ok((Config::parse(&text, &file)?, Some(bytes)))
            }
            Self::Embedded => Ok((Config::default_config()?, None)),
        }
    }

    /// The file's current bytes, to notice changes (the embedded default never changes).
    pub fn fingerprint(&self) -> Option<Vec<u8>> {
        match self {
            Self::File(p) => std::fs::read(p).ok(),
            Self::Embedded => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Embedded => f.write_str(DEFAULT_CONFIG_NAME),
        }
    }
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn fail(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn table_size(&mut self, path: &str, m: u32) {
        if !maglev::is_prime(m) {
            self.fail(path, format!("{m} is not a prime number (Maglev needs a prime table size, e.g. 16381 or 65537)"));
        } else if m > lb_common::limits::MAX_TABLE_SIZE {
            self.fail(
                path,
                format!("{m} is larger than {}", lb_common::limits::MAX_TABLE_SIZE),
            );
        }
    }
}

impl Checker {
    /// Checks `announce.bgp`; passwords are read now, so that `lb-agent check` finds an
    /// unreadable one.
    fn bgp(&mut self, b: RawBgp) -> Option<BgpConfig> {
        let before = self.problems.len();
        if b.local_as == 0 || b.local_as == 23456 {
            self.fail(
                "announce.bgp.local_as",
                format!("{} is not a usable AS number", b.local_as),
            );
        }
        if b.router_id.is_unspecified() {
            self.fail("announce.bgp.router_id", "0.0.0.0 is not a router id");
        }
        let mut communities = Vec::new();
        for (i, text) in b.communities.iter().enumerate() {
            match parse_community(text) {
                Some(c) => communities.push(c),
                None => self.fail(
                    format!("announce.bgp.communities[{i}]"),
                    format!("{text:?} is not a community: AS:VALUE with both parts 0-65535, or no-export, no-advertise, no-export-subconfed"),
                ),
            }
        }
        let mut large_communities = Vec::new();
        for (i, text) in b.large_communities.iter().enumerate() {
            match parse_large_community(text) {
                Some(c) => large_communities.push(c),
                None => self.fail(
                    format!("announce.bgp.large_communities[{i}]"),
                    format!(
                        "{text:?} is not a large community: three numbers 0-4294967295 as A:B:C"
                    ),
                ),
            }
        }
        if b.peers.is_empty() {
            self.fail("announce.bgp.peers", "at least one peer is needed");
        }
        if b.bfd.interval < Duration::from_millis(10) || b.bfd.interval > Duration::from_secs(10) {
            self.fail("announce.bgp.bfd.interval", "must be between 10ms and 10s");
        }
        if !(2..=50).contains(&b.bfd.multiplier) {
            self.fail("announce.bgp.bfd.multiplier", "must be between 2 and 50");
        }
        let mut seen = BTreeSet::new();
        let mut peers = Vec::new();
        for (i, p) in b.peers.into_iter().enumerate() {
            let at = |f: &str| format!("announce.bgp.peers[{i}].{f}");
            if !seen.insert(p.address) {
                self.fail(at("address"), format!("{} is listed twice", p.address));
            }
            let mut password_problem = None;
            let password = p
                .password_file
                .as_ref()
                .and_then(|path| match std::fs::read_to_string(path) {
                    Ok(text) => Some(Secret(text.trim_end_matches(['\n', '\r']).to_string())),
                    Err(e) => {
                        password_problem = Some(format!("{}: {e}", path.display()));
                        None
                    }
                });
            let peer = BgpPeerConfig {
                address: p.address,
                remote_as: p.remote_as,
                local_as: p.local_as,
                port: p.port,
                password,
                hold_time: p.hold_time,
                connect_retry: p.connect_retry,
                bfd: p.bfd,
                multihop: p.multihop,
                passive: p.passive,
            };
            for (field, message) in peer.problems() {
                let message = match (field, &p.password_file) {
                    ("password", Some(path)) => format!("{}: {message}", path.display()),
                    _ => message,
                };
                let field = if field == "password" {
                    "password_file"
                } else {
                    field
                };
                self.fail(at(field), message);
            }
            if let Some(m) = password_problem {
                self.fail(at("password_file"), m);
            }
            peers.push(peer);
        }
        communities.sort_unstable();
        communities.dedup();
        large_communities.sort_unstable();
        large_communities.dedup();
        (self.problems.len() == before).then_some(BgpConfig {
            local_as: b.local_as,
            router_id: b.router_id,
            advertisements: vec![Advertisement {
                vips: None,
                peers: None,
                attrs: RouteAttrs {
                    communities,
                    large_communities,
                    local_pref: b.local_pref,
                },
            }],
            listen_port: b.listen_port,
            bfd: BfdTimers {
                interval: b.bfd.interval,
                multiplier: b.bfd.multiplier,
            },
            peers,
        })
    }

    /// Checks a `health_check` block; a CA bundle must be readable and hold a certificate now,
    /// not at the first probe.
    fn health_check(&mut self, at: &str, raw: RawHealthCheck) -> Option<HealthCheck> {
        match raw.check() {
            Ok(hc) => {
                if let Some(path) = &hc.probe.ca_file
                    && hc.probe.kind == CheckKind::Https
                    && let Err(e) = crate::health::probe::load_ca(path)
                {
                    self.fail(format!("{at}.ca_file"), format!("{}: {e}", path.display()));
                    return None;
                }
                Some(hc)
            }
            Err(problems) => {
                for p in problems {
                    self.fail(format!("{at}.{}", p.key), p.message);
                }
                None
            }
        }
    }
}

/// Interface names as the kernel allows them (IFNAMSIZ - 1 bytes, no '/', ':' or whitespace).
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Service names: what standalone configs and Kubernetes (`namespace/name`) produce.
fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

fn family_name(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

impl RawConfig {
    fn check(self) -> Result<Config, Vec<Problem>> {
        let mut c = Checker {
            problems: Vec::new(),
        };

        if self.node.interfaces.is_empty() {
            c.fail("node.interfaces", "at least one interface is needed");
        }
        let mut seen_if = BTreeSet::new();
        for (i, name) in self.node.interfaces.iter().enumerate() {
            if !valid_ifname(name) {
                c.fail(
                    format!("node.interfaces[{i}]"),
                    format!("{name:?} is not a valid interface name"),
                );
            } else if !seen_if.insert(name) {
                c.fail(
                    format!("node.interfaces[{i}]"),
                    format!("{name} is listed twice"),
                );
            }
        }

        c.table_size("maglev.table_size", self.maglev.table_size);

        let raw_nat = &self.node.source_nat;
        let source_nat = SourceNat {
            ports: match raw_nat.ports.as_deref().map(parse_port_range) {
                None => DEFAULT_SOURCE_NAT_PORTS,
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    c.fail("node.source_nat.ports", e);
                    DEFAULT_SOURCE_NAT_PORTS
                }
            },
            ipv4: raw_nat.ipv4,
            ipv6: raw_nat.ipv6,
        };
        for (field, ip) in [
            ("node.source_nat.ipv4", raw_nat.ipv4.map(IpAddr::V4)),
            ("node.source_nat.ipv6", raw_nat.ipv6.map(IpAddr::V6)),
        ] {
            if let Some(ip) = ip
                && (ip.is_unspecified() || ip.is_multicast() || ip.is_loopback())
            {
                c.fail(
                    field,
                    format!("{ip} cannot be the node's source-NAT address"),
                );
            }
        }
        let mut uses_source_nat = false;

        let defaults = DataplaneLimits::default();
        let limits = DataplaneLimits {
            max_services: self.dataplane.max_services.unwrap_or(defaults.max_services),
            max_backends: self.dataplane.max_backends.unwrap_or(defaults.max_backends),
            conntrack_size: self
                .dataplane
                .conntrack_size
                .unwrap_or(defaults.conntrack_size),
            affinity_size: self
                .dataplane
                .affinity_size
                .unwrap_or(defaults.affinity_size),
        };
        for (field, value, min) in [
            ("dataplane.max_services", limits.max_services, 2),
            ("dataplane.max_backends", limits.max_backends, 2),
            ("dataplane.conntrack_size", limits.conntrack_size, 1024),
            ("dataplane.affinity_size", limits.affinity_size, 1024),
        ] {
            if value < min {
                c.fail(field, format!("{value} is too small (at least {min})"));
            } else if value > 1 << 24 {
                c.fail(field, format!("{value} is too large (at most {})", 1 << 24));
            }
        }

        let mut names = BTreeMap::new();
        let mut frontends = BTreeMap::new();
        // Frontends per backend endpoint (reverse NAT's table holds a few per endpoint).
        let mut served: BTreeMap<(SocketAddr, Protocol), usize> = BTreeMap::new();
        let mut services = Vec::with_capacity(self.services.len());
        let mut backend_count = 0usize;
        for (i, s) in self.services.into_iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            if !valid_service_name(&s.name) {
                c.fail(
                    at("name"),
                    format!(
                        "{:?} is not a valid name (letters, digits, '-', '_', '.', '/')",
                        s.name
                    ),
                );
            } else if let Some(first) = names.insert(s.name.clone(), i) {
                c.fail(
                    at("name"),
                    format!("{} is already the name of services[{first}]", s.name),
                );
            }
            if s.port == 0 {
                c.fail(at("port"), "must be between 1 and 65535");
            }
            let frontend = Frontend {
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
            };
            if let Some(first) = frontends.insert(frontend, i) {
                c.fail(
                    at("vip"),
                    format!("{frontend} is already used by services[{first}]"),
                );
            }
            if s.vip.is_unspecified() || s.vip.is_multicast() || s.vip.is_loopback() {
                c.fail(at("vip"), format!("{} cannot be a VIP", s.vip));
            }

            let table_size = s.table_size.unwrap_or(self.maglev.table_size);
            if s.table_size.is_some() {
                c.table_size(&at("table_size"), table_size);
            }

            let mut backends = Vec::with_capacity(s.backends.len());
            let mut seen = BTreeMap::new();
            for (j, b) in s.backends.iter().enumerate() {
                let bat = |field: &str| format!("services[{i}].backends[{j}].{field}");
                if !same_family(b.address, s.vip) {
                    c.fail(
                        bat("address"),
                        format!(
                            "{} is {} but the VIP {} is {}",
                            b.address,
                            family_name(b.address),
                            s.vip,
                            family_name(s.vip)
                        ),
                    );
                }
                if b.address.is_unspecified() || b.address.is_multicast() {
                    c.fail(bat("address"), format!("{} cannot be a backend", b.address));
                }
                if b.port == 0 {
                    c.fail(bat("port"), "must be between 1 and 65535");
                }
                if b.weight > MAX_WEIGHT {
                    c.fail(
                        bat("weight"),
                        format!("{} is larger than {MAX_WEIGHT}", b.weight),
                    );
                }
                let addr = SocketAddr::new(b.address, b.port);
                let n = served.entry((addr, s.protocol)).or_default();
                *n += 1;
                if *n == lb_common::limits::MAX_ENDPOINT_FRONTENDS + 1 {
                    c.fail(
                        bat("address"),
                        format!(
                            "{addr}/{} would serve more than {} frontends (the most one backend endpoint may serve)",
                            s.protocol,
                            lb_common::limits::MAX_ENDPOINT_FRONTENDS
                        ),
                    );
                }
                if let Some(first) = seen.insert(addr, j) {
                    c.fail(
                        bat("address"),
                        format!("{addr} is already services[{i}].backends[{first}]"),
                    );
                }
                let backend = Backend::new(addr, b.weight);
                backends.push(if s.source_nat {
                    backend.with_snat()
                } else {
                    backend
                });
            }
            if s.source_nat {
                uses_source_nat = true;
                let family = if s.vip.is_ipv4() { "ipv4" } else { "ipv6" };
                if source_nat.address_for(s.vip).is_none() {
                    c.fail(
                        at("source_nat"),
                        format!(
                            "needs node.source_nat.{family}: the node address {} flows leave with",
                            family_name(s.vip)
                        ),
                    );
                }
                if s.protocol == Protocol::Sctp {
                    c.fail(at("source_nat"), "is not available for SCTP");
                }
            }
            backends.sort();
            backend_count += backends.len();
            let active = backends.iter().filter(|b| b.weight > 0).count();
            if active as u64 > table_size as u64 {
                c.fail(
                    at("backends"),
                    format!("{active} backends do not fit a Maglev table of {table_size} slots (use a table at least 100 times the number of backends)"),
                );
            }

            let mut ranges = BTreeSet::new();
            for (j, r) in s.source_ranges.iter().enumerate() {
                if !same_family(r.addr(), s.vip) {
                    c.fail(
                        format!("services[{i}].source_ranges[{j}]"),
                        format!(
                            "{r} is {} but the VIP {} is {}",
                            family_name(r.addr()),
                            s.vip,
                            family_name(s.vip)
                        ),
                    );
                }
                ranges.insert(r.trunc());
            }

            let affinity_timeout = match s.session_affinity {
                None => None,
                Some(a) if a.timeout.is_zero() || a.timeout > MAX_AFFINITY_TIMEOUT => {
                    c.fail(
                        at("session_affinity.timeout"),
                        format!(
                            "{} is outside 1s..24h",
                            humantime::format_duration(a.timeout)
                        ),
                    );
                    None
                }
                Some(a) if a.timeout.subsec_nanos() != 0 => {
                    c.fail(at("session_affinity.timeout"), "must be whole seconds");
                    None
                }
                Some(a) => Some(a.timeout),
            };

            let health_check = s
                .health_check
                .and_then(|raw| c.health_check(&at("health_check"), raw));

            services.push(Service {
                name: s.name,
                frontend,
                backends,
                source_ranges: ranges.into_iter().collect(),
                affinity_timeout,
                table_size,
                health_check,
            });
        }
        if services.len() as u64 >= limits.max_services as u64 {
            c.fail(
                "services",
                format!(
                    "{} services do not fit dataplane.max_services ({}; id 0 is reserved)",
                    services.len(),
                    limits.max_services
                ),
            );
        }
        if backend_count as u64 >= limits.max_backends as u64 {
            c.fail("services", format!("{backend_count} backends do not fit dataplane.max_backends ({}; id 0 is reserved)", limits.max_backends));
        }

        let mut announce = AnnounceConfig::default();
        if let Some(a) = self.announce {
            if let Some(name) = &a.node_name
                && (name.is_empty() || name.len() > 253 || name.chars().any(char::is_whitespace))
            {
                c.fail(
                    "announce.node_name",
                    format!("{name:?} is not a valid node name"),
                );
            }
            announce.node_name = a.node_name;
            if let Some(l2) = a.l2 {
                if l2.interfaces.is_empty() {
                    c.fail("announce.l2.interfaces", "at least one interface is needed");
                }
                let mut seen = BTreeSet::new();
                for (i, name) in l2.interfaces.iter().enumerate() {
                    let at = format!("announce.l2.interfaces[{i}]");
                    if !self.node.interfaces.contains(name) {
                        c.fail(
                            at,
                            format!(
                                "{name} is not in node.interfaces (weir answers ARP and \
                                 Neighbor Solicitations where its XDP program runs)"
                            ),
                        );
                    } else if !seen.insert(name) {
                        c.fail(at, format!("{name} is listed twice"));
                    }
                }
                announce.l2_interfaces = l2.interfaces;
            }
            if let Some(g) = a.gossip {
                if announce.l2_interfaces.is_empty() {
                    c.fail(
                        "announce.gossip",
                        "decides who answers on L2: it needs announce.l2",
                    );
                }
                if g.peers.as_ref().is_some_and(Vec::is_empty) {
                    c.fail("announce.gossip.peers", "at least one peer is needed");
                }
                for (i, p) in g.peers.iter().flatten().enumerate() {
                    if *p == g.listen {
                        c.fail(
                            format!("announce.gossip.peers[{i}]"),
                            format!("{p} is this node's own listen address"),
                        );
                    }
                }
                if g.interval < Duration::from_millis(10) || g.interval > Duration::from_secs(10) {
                    c.fail("announce.gossip.interval", "must be between 10ms and 10s");
                }
                if g.dead_after < g.interval * 2 {
                    c.fail(
                        "announce.gossip.dead_after",
                        "must be at least twice the interval (one lost heartbeat must not kill a node)",
                    );
                }
                announce.gossip = Some(GossipConfig {
                    listen: g.listen,
                    peers: g.peers,
                    interval: g.interval,
                    dead_after: g.dead_after,
                });
            }

            if let Some(b) = a.bgp {
                announce.bgp = c.bgp(b);
            }
        }

        if !c.problems.is_empty() {
            return Err(c.problems);
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Config {
            node: NodeConfig {
                interfaces: self.node.interfaces,
                xdp_mode: self.node.xdp_mode,
                source_nat,
            },
            admin: AdminConfig {
                listen: self.admin.listen,
            },
            maglev: MaglevConfig {
                table_size: self.maglev.table_size,
                hash: self.maglev.hash,
                seed: self.maglev.seed,
            },
            dataplane: limits,
            desired: DesiredState {
                services,
                source_nat: uses_source_nat.then_some(source_nat),
            },
            announce,
        })
    }
}

/// An RFC 1997 community: `AS:VALUE` or a well-known name.
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
            || self.connect_retry > Duration::from_secs(600)
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

#[cfg(test)]
mod tests;
