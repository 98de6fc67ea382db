//! Services, EndpointSlices and Nodes in; the desired state of this node's data plane out — a
//! pure function of full stores (level-triggered: lost or repeated watch events cannot leave
//! it wrong), with kube-proxy's semantics:
//!
//! - Services of type LoadBalancer whose `spec.loadBalancerClass` is weir's, or unset when weir
//!   is the default class; their VIPs are the addresses in `status.loadBalancer.ingress` (the
//!   leader writes them; a Service without one is not served yet);
//! - one model service per (VIP, port): several ports, and IPv4 and IPv6 VIPs of dual-stack
//!   Services, each get their own frontend under the one name `namespace/name`;
//! - backends from the Service's EndpointSlices of the VIP's family, the port found by the
//!   Service port's name and protocol in the slice (so named target ports are resolved as the
//!   endpoints controller resolved them); ready endpoints, or, when none is ready, the serving
//!   and terminating ones;
//! - `externalTrafficPolicy: Local`: only this node's endpoints; `Cluster`: every endpoint,
//!   flows to other nodes' endpoints source-NATed to this node's address (its InternalIP of
//!   the VIP's family, or `node.source_nat.ipv4`/`ipv6`) so that their replies come back
//!   through this node. Without such an address, and for SCTP (whose checksum the data plane
//!   does not redo for source NAT), this node's endpoints while it has any, else every
//!   endpoint, as before;
//! - `sessionAffinity: ClientIP` with its timeout (default 3 hours), `loadBalancerSourceRanges`;
//! - a node labelled `node.kubernetes.io/exclude-from-external-load-balancers` serves nothing;
//! - health checks from the Service's annotations (`crate::model::check::from_annotations`).
//!
//! A problem with one Service (a bad annotation, a bad source range, a VIP another Service
//! already serves on that port) is reported for it and never affects another Service.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    model::check::from_annotations,
    model::{self, Backend, DesiredState, Frontend, Protocol, SourceNat},
};

/// weir's `spec.loadBalancerClass`.
pub const CLASS: &str = "weir.dev/lb";
/// The label that keeps a node out of external load balancing.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kube-proxy's default ClientIP affinity timeout.
pub const DEFAULT_AFFINITY: Duration = Duration::from_hours(3);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// This node's name.
    pub node: String,
    /// Also serve LoadBalancer Services without a `loadBalancerClass`.
    pub default_class: bool,
    /// Maglev table size for every service.
    pub table_size: u32,
    /// The data plane's capacities (`dataplane.max_services`, `dataplane.max_backends`; id
    /// 0 is reserved in both).
    pub max_services: u32,
    pub max_backends: u32,
    /// `node.source_nat`: the port range, and addresses that override the Node's.
    pub source_nat: SourceNat,
}

/// Which endpoints a Service port gets, by `externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    /// This node's endpoints only.
    Local,
    /// Every endpoint; other nodes' source-NATed.
    ClusterSnat,
    /// This node's endpoints while it has any, else every endpoint (no source NAT possible).
    ClusterPreferLocal,
}

/// This node's source-NAT settings: the configured addresses, else the Node's first
/// InternalIP of each family; `None` without any address.
fn source_nat(node: Option<&Node>, configured: &SourceNat) -> Option<SourceNat> {
    let internal: Vec<IpAddr> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let nat = SourceNat {
        ipv4: configured.ipv4.or_else(|| {
            internal.iter().find_map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
        }),
        ipv6: configured.ipv6.or_else(|| {
            internal.iter().find_map(|a| match a {
                IpAddr::V6(a) => Some(*a),
                IpAddr::V4(_) => None,
            })
        }),
        ports: configured.ports,
    };
    (nat.ipv4.is_some() || nat.ipv6.is_some()).then_some(nat)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub desired: DesiredState,
    /// By Service (`namespace/name`): what was left out and why.
    pub problems: BTreeMap<String, Vec<String>>,
    /// The node is excluded from external load balancing.
    pub excluded: bool,
    /// `spec.healthCheckNodePort` of the Local-policy Services served here: port →
    /// `namespace/name`.
    pub health_node_ports: BTreeMap<u16, String>,
    /// BGP mode: this node's peers and advertisements (None: no BGPPeer selects it).
    pub bgp: Option<crate::announce::BgpConfig>,
    /// L2 mode: the addresses this node may answer for and the gossip peers.
    pub l2: super::announce::L2Plan,
    /// The BGPPeers, BGPAdvertisements and L2Advertisements left out, and why.
    pub announce_problems: Vec<String>,
}

/// `namespace/name`.
pub fn key(svc: &Service) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Whether weir serves this Service at all.
pub fn wanted(svc: &Service, default_class: bool) -> bool {
    let Some(spec) = &svc.spec else {
        return false;
    };
    spec.type_.as_deref() == Some("LoadBalancer")
        && match spec.load_balancer_class.as_deref() {
            Some(c) => c == CLASS,
            None => default_class,
        }
}

fn protocol(p: Option<&str>) -> Result<Protocol, super::SpecError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(super::SpecError::new(format!(
            "protocol {other:?} is not supported"
        ))),
    }
}

/// An endpoint usable for new flows, by the EndpointSlice conditions' rules: `ready` (unset
/// means ready); the fallback set is `serving` (unset: as ready) and `terminating`.
fn conditions(e: &k8s_openapi::api::discovery::v1::Endpoint) -> (bool, bool) {
    let c = e.conditions.clone().unwrap_or_default();
    let ready = c.ready.unwrap_or(true);
    let serving = c.serving.unwrap_or(ready);
    let terminating = c.terminating.unwrap_or(false);
    (ready, serving && terminating)
}

/// The backends of Service port `(name, protocol)` in `slices`, for VIPs of the family of
/// `v4`, by `policy` (an endpoint without a node name is another node's).
fn backends(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: Protocol,
    v4: bool,
    node: &str,
    policy: Policy,
) -> Vec<Backend> {
    // (address, on this node)
    let mut ready = BTreeSet::new();
    let mut fallback = BTreeSet::new();
    let family = if v4 { "IPv4" } else { "IPv6" };
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && protocol(p.protocol.as_deref()).ok() == Some(proto)
        }) else {
            continue;
        };
        let Some(port) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for e in &slice.endpoints {
            let here = e.node_name.as_deref() == Some(node);
            if policy == Policy::Local && !here {
                continue;
            }
            let (is_ready, is_fallback) = conditions(e);
            for a in &e.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                if ip.is_ipv4() != v4 {
                    continue;
                }
                let addr = (SocketAddr::new(ip, port), here);
                if is_ready {
                    ready.insert(addr);
                } else if is_fallback {
                    fallback.insert(addr);
                }
            }
        }
    }
    let chosen = if ready.is_empty() { fallback } else { ready };
    let any_here = chosen.iter().any(|(_, here)| *here);
    chosen
        .into_iter()
        .filter(|(_, here)| *here || !any_here || policy != Policy::ClusterPreferLocal)
        .map(|(a, here)| {
            let b = Backend::new(a, 1);
            if here || policy != Policy::ClusterSnat {
                b
            } else {
                b.with_snat()
            }
        })
        .collect()
}

/// Translates the stores for this node.
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    nodes: &[Node],
    opts: &Options,
) -> Translation {
    let mut out = Translation::default();
    let this = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(opts.node.as_str()));
    let nat = source_nat(this, &opts.source_nat);
    if this.is_some_and(|n| {
        n.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(EXCLUDE_LABEL))
    }) {
        out.excluded = true;
        return out;
    }
    // EndpointSlices by Service key.
    let mut by_service: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let Some(name) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = s.metadata.namespace.as_deref().unwrap_or("default");
        by_service
            .entry(format!("{ns}/{name}"))
            .or_default()
            .push(s);
    }
    let mut sorted: Vec<&Service> = services
        .iter()
        .filter(|s| wanted(s, opts.default_class))
        .collect();
    sorted.sort_by_key(|s| key(s));
    let mut taken: BTreeMap<Frontend, String> = BTreeMap::new();
    for svc in sorted {
        let name = key(svc);
        let mut problems = Vec::new();
        let services = service(
            svc,
            &name,
            by_service.get(&name),
            opts,
            nat.as_ref(),
            &mut problems,
        );
        if let Some(spec) = &svc.spec
            && spec.external_traffic_policy.as_deref() == Some("Local")
            && let Some(port) = spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
            && port != 0
            && !services.is_empty()
        {
            match out.health_node_ports.get(&port) {
                Some(other) => problems.push(format!(
                    "spec.healthCheckNodePort {port} is already served for {other}"
                )),
                None => {
                    out.health_node_ports.insert(port, name.clone());
                }
            }
        }
        for s in services {
            if let Some(first) = taken.get(&s.frontend) {
                problems.push(format!("{} is already served by {first}", s.frontend));
                continue;
            }
            taken.insert(s.frontend, name.clone());
            out.desired.services.push(s);
        }
        if !problems.is_empty() {
            out.problems.insert(name, problems);
        }
    }
    out.desired
        .services
        .sort_by(|a, b| (&a.name, a.frontend).cmp(&(&b.name, b.frontend)));
    fit(&mut out, opts);
    if out
        .desired
        .services
        .iter()
        .any(|s| s.backends.iter().any(|b| b.snat))
    {
        out.desired.source_nat = nat;
    }
    out
}

/// Keeps what fits the data plane, whole Services in name order, and reports the rest: one
/// Service too many must not keep every other change from being programmed.
fn fit(out: &mut Translation, opts: &Options) {
    let (mut frontends, mut backends) = (0u64, 0u64);
    let mut dropped: BTreeSet<String> = BTreeSet::new();
    let mut names: Vec<String> = out
        .desired
        .services
        .iter()
        .map(|s| s.name.clone())
        .collect();
    names.dedup();
    for name in names {
        let group = out.desired.services.iter().filter(|s| s.name == name);
        let (f, b) = group.fold((0u64, 0u64), |(f, b), s| {
            (f + 1, b + s.backends.len() as u64)
        });
        if frontends + f < u64::from(opts.max_services)
            && backends + b < u64::from(opts.max_backends)
        {
            frontends += f;
            backends += b;
        } else {
            dropped.insert(name);
        }
    }
    if dropped.is_empty() {
        return;
    }
    out.desired.services.retain(|s| !dropped.contains(&s.name));
    for name in dropped {
        out.problems.entry(name).or_default().push(format!(
            "not served: the data plane is full ({frontends} frontends and {backends} backends \
             programmed; raise dataplane.max_services ({}) or dataplane.max_backends ({}))",
            opts.max_services, opts.max_backends
        ));
    }
}

/// The model services of one Kubernetes Service.
fn service(
    svc: &Service,
    name: &str,
    slices: Option<&Vec<&EndpointSlice>>,
    opts: &Options,
    nat: Option<&SourceNat>,
    problems: &mut Vec<String>,
) -> Vec<model::Service> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let vips: Vec<IpAddr> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref())
        .filter_map(|ip| {
            if let Ok(ip) = ip.parse() {
                Some(ip)
            } else {
                problems.push(format!(
                    "status.loadBalancer.ingress: {ip:?} is not an IP address"
                ));
                None
            }
        })
        .collect();
    if vips.is_empty() {
        return Vec::new();
    }
    let mut source_ranges = Vec::new();
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        if let Ok(net) = r.trim().parse::<ipnet::IpNet>() {
            source_ranges.push(net.trunc());
        } else {
            // Refusing the Service is safer than serving it to everyone.
            problems.push(format!(
                "spec.loadBalancerSourceRanges[{i}]: {r:?} is not a CIDR; the Service is not served until it is fixed"
            ));
            return Vec::new();
        }
    }
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(DEFAULT_AFFINITY, Duration::from_secs)
    });
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let empty = Vec::new();
    let slices = slices.unwrap_or(&empty);
    let mut out = Vec::new();
    let mut checks: BTreeMap<Protocol, Option<model::check::HealthCheck>> = BTreeMap::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let proto = match protocol(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(e) => {
                problems.push(format!("spec.ports[{i}]: {e}"));
                continue;
            }
        };
        let Ok(port) = u16::try_from(p.port) else {
            problems.push(format!("spec.ports[{i}].port: {} is out of range", p.port));
            continue;
        };
        let check = checks
            .entry(proto)
            .or_insert_with(|| match from_annotations(&annotations, proto) {
                Ok(c) => c,
                Err(errors) => {
                    for e in errors {
                        problems.push(format!(
                            "annotation {e}; the Service is served without a health check"
                        ));
                    }
                    None
                }
            })
            .clone();
        for vip in &vips {
            let ranges: Vec<ipnet::IpNet> = source_ranges
                .iter()
                .filter(|n| n.addr().is_ipv4() == vip.is_ipv4())
                .copied()
                .collect();
            if !source_ranges.is_empty() && ranges.is_empty() {
                // Source ranges of the other family only: nobody of this family may connect.
                problems.push(format!(
                    "no loadBalancerSourceRanges of {vip}'s family: {vip} is not served"
                ));
                continue;
            }
            out.push(model::Service {
                name: name.to_string(),
                frontend: Frontend {
                    vip: *vip,
                    port,
                    protocol: proto,
                    scope: model::Scope::Both,
                },
                backends: backends(
                    slices,
                    p.name.as_deref().unwrap_or(""),
                    proto,
                    vip.is_ipv4(),
                    &opts.node,
                    if local {
                        Policy::Local
                    } else if proto != Protocol::Sctp
                        && nat.and_then(|n| n.address_for(*vip)).is_some()
                    {
                        Policy::ClusterSnat
                    } else {
                        Policy::ClusterPreferLocal
                    },
                ),
                source_ranges: {
                    let mut r = ranges;
                    r.sort();
                    r.dedup();
                    r
                },
                affinity_timeout: affinity,
                table_size: opts.table_size,
                health_check: check.clone(),
                node_address: false,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests;
