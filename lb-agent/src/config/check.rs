//! Raw config → checked [`Config`]: every problem found, with its field path, or the whole
//! config; never half of it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::{raw::*, *};
use crate::{
    announce::{
        Advertisement, AnnounceConfig, BfdTimers, BgpConfig, BgpPeerConfig, GossipConfig,
        RouteAttrs, Secret, SecretBytes, parse_community, parse_large_community,
    },
    dataplane::{DataplaneLimits, Pinning},
    maglev::{self, MaglevConfig},
    model::{
        Backend, DEFAULT_SOURCE_NAT_PORTS, DesiredState, Frontend, Protocol, Scope, Service,
        SourceNat,
        check::{CheckKind, HealthCheck, RawHealthCheck},
    },
};

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
        if b.graceful_restart > Duration::from_secs(4095) {
            self.fail(
                "announce.bgp.graceful_restart",
                format!(
                    "{} is too long (at most 4095s, RFC 4724's 12 bits)",
                    humantime::format_duration(b.graceful_restart)
                ),
            );
        }
        (self.problems.len() == before).then_some(BgpConfig {
            graceful_restart: b.graceful_restart,
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
    pub(super) fn check(self) -> Result<Config, Vec<Problem>> {
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
                    c.fail("node.source_nat.ports", e.to_string());
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

        let pin_defaults = Pinning::default();
        let pinning = Pinning {
            dir: self.dataplane.pin_dir.clone().unwrap_or(pin_defaults.dir),
            keep_on_exit: self
                .dataplane
                .keep_on_exit
                .unwrap_or(pin_defaults.keep_on_exit),
        };
        if !pinning.dir.is_absolute() {
            c.fail(
                "dataplane.pin_dir",
                format!("{} is not an absolute path", pinning.dir.display()),
            );
        }

        let socket_lb = self
            .node
            .socket_lb
            .enabled
            .unwrap_or(self.node.kube_proxy_replacement)
            .then(|| {
                self.node
                    .socket_lb
                    .cgroup
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CGROUP.into())
            });
        if let Some(cg) = &socket_lb
            && !cg.is_absolute()
        {
            c.fail(
                "node.socket_lb.cgroup",
                format!("{} is not an absolute path", cg.display()),
            );
        }
        if self.node.socket_lb.enabled == Some(false) && self.node.kube_proxy_replacement {
            c.fail(
                "node.socket_lb.enabled",
                "false, but node.kube_proxy_replacement needs the socket hooks (ClusterIP clients are on the node)",
            );
        }

        let mut nodeport_addresses = Vec::new();
        for (i, a) in self.node.nodeport_addresses.iter().enumerate() {
            match a.trim().parse::<ipnet::IpNet>() {
                Ok(n) => nodeport_addresses.push(n.trunc()),
                Err(_) => c.fail(
                    format!("node.nodeport_addresses[{i}]"),
                    format!("{a:?} is not a prefix (e.g. 198.18.0.0/15 or fd00::/8)"),
                ),
            }
        }
        if self.node.healthz_listen.is_some() && !self.node.kube_proxy_replacement {
            c.fail(
                "node.healthz_listen",
                "set, but the health endpoint is served with node.kube_proxy_replacement only (beside kube-proxy, kube-proxy serves it)",
            );
        }
        if let Some(m) = self.admin.metrics_listen {
            let l = self.admin.listen;
            let overlap = m.ip() == l.ip() || m.ip().is_unspecified() || l.ip().is_unspecified();
            if m.port() == l.port() && overlap {
                c.fail(
                    "admin.metrics_listen",
                    format!("{m} overlaps admin.listen {l}: give the metrics a port of their own"),
                );
            }
        }
        let healthz_listen = self.node.kube_proxy_replacement.then(|| {
            self.node.healthz_listen.unwrap_or_else(|| {
                DEFAULT_HEALTHZ_LISTEN
                    .parse()
                    .expect("the default healthz address parses")
            })
        });

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
            // A configured service serves clients outside the node and, with the socket hooks
            // attached, the node's own.
            let frontend = Frontend {
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
                scope: Scope::Both,
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
            if active as u64 > u64::from(table_size) {
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

            services.push(std::sync::Arc::new(Service {
                name: s.name,
                frontend,
                backends,
                source_ranges: ranges.into_iter().collect(),
                affinity_timeout,
                table_size,
                health_check,
                node_address: false,
            }));
        }
        if services.len() as u64 >= u64::from(limits.max_services) {
            c.fail(
                "services",
                format!(
                    "{} services do not fit dataplane.max_services ({}; id 0 is reserved)",
                    services.len(),
                    limits.max_services
                ),
            );
        }
        if backend_count as u64 >= u64::from(limits.max_backends) {
            c.fail("services", format!("{backend_count} backends do not fit dataplane.max_backends ({}; id 0 is reserved)", limits.max_backends));
        }
        let ranges: usize = services.iter().map(|s| s.source_ranges.len()).sum();
        if ranges > lb_common::limits::MAX_SOURCE_RANGES as usize {
            c.fail(
                "services",
                format!(
                    "{ranges} source-range prefixes do not fit: the data plane holds {} over all services",
                    lb_common::limits::MAX_SOURCE_RANGES
                ),
            );
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
                let key = g.key_file.as_ref().and_then(|path| {
                    let at = "announce.gossip.key_file";
                    match std::fs::read(path) {
                        Ok(mut bytes) => {
                            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                                bytes.pop();
                            }
                            if bytes.len() < 16 {
                                c.fail(at, format!("{}: {} bytes; the key needs at least 16 (make one with `head -c 32 /dev/urandom | base64 > {}`)", path.display(), bytes.len(), path.display()));
                                None
                            } else {
                                Some(SecretBytes(bytes))
                            }
                        }
                        Err(e) => {
                            c.fail(at, format!("{}: {e}", path.display()));
                            None
                        }
                    }
                });
                announce.gossip = Some(GossipConfig {
                    listen: g.listen,
                    peers: g.peers,
                    interval: g.interval,
                    dead_after: g.dead_after,
                    restart_grace: g.restart_grace,
                    key,
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
                kube_proxy_replacement: self.node.kube_proxy_replacement,
                netns_dir: socket_lb.as_ref().map(|_| {
                    self.node
                        .socket_lb
                        .netns_dir
                        .clone()
                        .unwrap_or_else(|| DEFAULT_NETNS_DIR.into())
                }),
                socket_lb,
                nodeport_addresses,
                healthz_listen,
            },
            admin: AdminConfig {
                listen: self.admin.listen,
                metrics_listen: self.admin.metrics_listen,
            },
            maglev: MaglevConfig {
                table_size: self.maglev.table_size,
                hash: self.maglev.hash,
                seed: self.maglev.seed,
            },
            dataplane: limits,
            pinning,
            desired: DesiredState {
                services: std::sync::Arc::new(services),
                source_nat: uses_source_nat.then_some(source_nat),
            },
            announce,
        })
    }
}

/// The first port of `range` that the node's own connections may also pick: inside the
/// ephemeral range (`net.ipv4.ip_local_port_range`, which also governs IPv6) and not listed
/// in `net.ipv4.ip_local_reserved_ports` (`reserved`, as the kernel prints it: `a-b,c,...`).
/// A reply to such a connection would be taken for a source-NATed flow's.
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

/// A port range that is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("{0:?} is not a port range such as 61000-65535")]
    Syntax(String),
    #[error("{0}: ports below 1024 are the node's own services'")]
    Privileged(String),
    #[error("{0}: the first port is above the last")]
    Reversed(String),
}

/// Parses `first-last` (inclusive, 1024..=65535, first <= last).
pub fn parse_port_range(text: &str) -> Result<(u16, u16), PortRangeError> {
    let bad = || PortRangeError::Syntax(text.to_string());
    let (a, b) = text.trim().split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a < 1024 {
        return Err(PortRangeError::Privileged(text.to_string()));
    }
    if a > b {
        return Err(PortRangeError::Reversed(text.to_string()));
    }
    Ok((a, b))
}
