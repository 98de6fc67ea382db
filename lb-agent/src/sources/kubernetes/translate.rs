//! Services, EndpointSlices and Nodes in; the desired state of this node's data plane out — a
//! pure function of full stores (level-triggered: lost or repeated watch events cannot leave
//! it wrong; [`Memo`] keeps each Service's result between runs without changing what comes
//! out), with kube-proxy's semantics:
//!
//! - Services of type LoadBalancer whose `spec.loadBalancerClass` is weir's, or unset when weir
//!   is the default class; their VIPs are the addresses in `status.loadBalancer.ingress` (the
//!   leader writes them; a Service without one is not served yet);
//! - as kube-proxy's replacement (`Options::all_types`), every Service but ExternalName and
//!   headless ones: cluster IPs for in-cluster clients (the socket hooks) by
//!   `internalTrafficPolicy`; every LoadBalancer's ingress addresses (but `ipMode: Proxy`
//!   ones), `externalIPs` and NodePorts on the node's addresses (`node.nodeport_addresses`)
//!   by `externalTrafficPolicy` for outside clients, and by every endpoint for in-cluster
//!   ones (kube-proxy's short-circuit); a frontend of both scopes when both get the same
//!   endpoints, else one of each (`model::Scope`); topology hints (`hints.forZones`,
//!   `hints.forNodes`) for cluster-wide traffic, with kube-proxy's rules for ignoring them;
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
//! - `sessionAffinity: ClientIP` with its timeout (default 3 hours), `loadBalancerSourceRanges`
//!   (LoadBalancer addresses from outside only, as with kube-proxy);
//! - a node labelled `node.kubernetes.io/exclude-from-external-load-balancers` serves nothing
//!   to outside clients (its in-cluster clients keep their cluster IPs);
//! - health checks from the Service's annotations (`crate::model::check::from_annotations`).
//!
//! A problem with one Service (a bad annotation, a bad source range, a VIP another Service
//! already serves on that port) is reported for it and never affects another Service.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service, ServiceSpec},
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
/// The cluster autoscaler's taint on a node it is about to remove.
pub const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// The node label of its zone (topology hints).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
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
    /// `node.kube_proxy_replacement`: every Service type (cluster IPs, NodePorts, external
    /// IPs, every LoadBalancer's addresses), not only weir's LoadBalancers.
    pub all_types: bool,
    /// The socket hooks are attached: frontends for the node's own processes and its pods.
    pub internal: bool,
    /// `node.nodeport_addresses` (empty: the Node's InternalIPs).
    pub nodeport_addresses: Vec<ipnet::IpNet>,
    /// This node's interface addresses, for `nodeport_addresses`.
    pub local_addresses: Vec<IpAddr>,
}

/// How external addresses reach other nodes' endpoints under `externalTrafficPolicy: Cluster`
/// (`Local` is this node's endpoints only).
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
    /// The backends of `desired`'s services, counted.
    pub backends: u64,
    /// By Service (`namespace/name`): what was left out and why.
    pub problems: BTreeMap<String, Vec<String>>,
    /// The node is excluded from external load balancing.
    pub excluded: bool,
    /// The node is on its way out (being deleted, or tainted `ToBeDeletedByClusterAutoscaler`):
    /// kube-proxy's `/healthz` turns 503 so that load balancers drain it.
    pub node_leaving: bool,
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

/// One endpoint of a Service port, of one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ep {
    addr: SocketAddr,
    /// On this node.
    local: bool,
    ready: bool,
    /// Serving and terminating: used when no endpoint of the set is ready.
    terminating: bool,
    /// `hints.forZones`, `hints.forNodes`.
    zones: BTreeSet<String>,
    nodes: BTreeSet<String>,
}

/// The endpoint conditions' rules: `ready` (unset means ready); the fallback set is `serving`
/// (unset: as ready) and `terminating`.
fn conditions(e: &k8s_openapi::api::discovery::v1::Endpoint) -> (bool, bool) {
    let c = e.conditions.clone().unwrap_or_default();
    let ready = c.ready.unwrap_or(true);
    let serving = c.serving.unwrap_or(ready);
    let terminating = c.terminating.unwrap_or(false);
    (ready, serving && terminating)
}

/// The endpoints of Service port `(name, protocol)` in `slices` of the family of `v4`, the
/// port found by name and protocol in each slice (an endpoint without a node name is another
/// node's). An address in several slices counts once, ready if any says so.
fn endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: Protocol,
    v4: bool,
    node: &str,
) -> Vec<Ep> {
    let family = if v4 { "IPv4" } else { "IPv6" };
    let mut out: BTreeMap<SocketAddr, Ep> = BTreeMap::new();
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
            let (ready, terminating) = conditions(e);
            let hints = e.hints.as_ref();
            let zones: BTreeSet<String> = hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect();
            let nodes: BTreeSet<String> = hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect();
            for a in &e.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                if ip.is_ipv4() != v4 {
                    continue;
                }
                let addr = SocketAddr::new(ip, port);
                let ep = out.entry(addr).or_insert_with(|| Ep {
                    addr,
                    local: e.node_name.as_deref() == Some(node),
                    ready,
                    terminating,
                    zones: zones.clone(),
                    nodes: nodes.clone(),
                });
                if ready && !ep.ready {
                    ep.ready = true;
                    ep.zones.clone_from(&zones);
                    ep.nodes.clone_from(&nodes);
                }
                ep.terminating |= terminating;
            }
        }
    }
    out.into_values().collect()
}

/// Which endpoints the topology hints leave to this node's cluster-wide traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Every endpoint.
    Any,
    /// Those hinted for this node (`trafficDistribution: PreferSameNode`).
    SameNode,
    /// Those hinted for this node's zone (`PreferClose`/`PreferSameZone`, topology-aware
    /// routing).
    SameZone,
}

/// kube-proxy's rules: the hints are used when every ready endpoint has one and at least one
/// is for this node (or its zone); otherwise they are ignored — an endpoint without a hint, a
/// node without a `topology.kubernetes.io/zone` label, or no endpoint for this zone means every
/// endpoint, so that no node is left without any.
fn topology(eps: &[Ep], node: &str, zone: Option<&str>) -> Topology {
    let ready = || eps.iter().filter(|e| e.ready);
    if ready().next().is_none() {
        return Topology::Any;
    }
    if ready().all(|e| !e.nodes.is_empty()) && ready().any(|e| e.nodes.contains(node)) {
        return Topology::SameNode;
    }
    if let Some(zone) = zone
        && ready().all(|e| !e.zones.is_empty())
        && ready().any(|e| e.zones.contains(zone))
    {
        return Topology::SameZone;
    }
    Topology::Any
}

/// The endpoints for traffic that may go to any node: the ready ones the topology allows,
/// else the serving and terminating ones anywhere.
fn cluster_endpoints<'a>(
    eps: &'a [Ep],
    topology: Topology,
    node: &str,
    zone: Option<&str>,
) -> Vec<&'a Ep> {
    let allowed = |e: &Ep| match topology {
        Topology::Any => true,
        Topology::SameNode => e.nodes.contains(node),
        Topology::SameZone => zone.is_some_and(|z| e.zones.contains(z)),
    };
    let ready: Vec<&Ep> = eps.iter().filter(|e| e.ready && allowed(e)).collect();
    if ready.is_empty() {
        eps.iter().filter(|e| e.terminating).collect()
    } else {
        ready
    }
}

/// This node's endpoints: the ready ones, else the serving and terminating ones.
fn local_endpoints(eps: &[Ep]) -> Vec<&Ep> {
    let ready: Vec<&Ep> = eps.iter().filter(|e| e.local && e.ready).collect();
    if ready.is_empty() {
        eps.iter().filter(|e| e.local && e.terminating).collect()
    } else {
        ready
    }
}

/// The backends of external addresses (a LoadBalancer address, an externalIP, a NodePort)
/// for clients outside the node, by `externalTrafficPolicy`.
fn external_backends(cluster: &[&Ep], local: &[&Ep], policy: Policy) -> Vec<Backend> {
    match policy {
        Policy::Local => plain(local),
        Policy::ClusterSnat => cluster
            .iter()
            .map(|e| {
                let b = Backend::new(e.addr, 1);
                if e.local { b } else { b.with_snat() }
            })
            .collect(),
        Policy::ClusterPreferLocal => {
            let here: Vec<&Ep> = cluster.iter().copied().filter(|e| e.local).collect();
            plain(if here.is_empty() { cluster } else { &here })
        }
    }
}

/// Backends reached directly (the socket hooks connect the client to the endpoint itself).
fn plain(eps: &[&Ep]) -> Vec<Backend> {
    eps.iter().map(|e| Backend::new(e.addr, 1)).collect()
}

/// Translates `services`, `slices` and `nodes` for this node: [`translate_with`] from scratch.
pub fn translate(
    services: &[Service],
    slices: &[impl std::borrow::Borrow<EndpointSlice>],
    nodes: &[Node],
    opts: &Options,
) -> Translation {
    let services: Vec<Arc<Service>> = services.iter().cloned().map(Arc::new).collect();
    let slices: Vec<Arc<EndpointSlice>> = slices
        .iter()
        .map(|s| Arc::new(std::borrow::Borrow::borrow(s).clone()))
        .collect();
    let nodes: Vec<Arc<Node>> = nodes.iter().cloned().map(Arc::new).collect();
    translate_with(&mut Memo::default(), &services, &slices, &nodes, opts)
}

/// Each Service's translation, kept from one translation to the next by the address of the
/// objects it was made from: the stores hold every object behind an `Arc` that a change
/// replaces, so a Service whose object, EndpointSlices and node did not change translates
/// to the very services it gave before (the same allocations, which the reconciler then
/// recognizes by their address). The result is the one a translation from scratch gives.
#[derive(Default)]
pub struct Memo {
    /// This node's object the entries were made with (by address), and the options.
    node: Option<Arc<Node>>,
    opts: Option<Options>,
    /// By the Service object's address.
    services: FastMap<usize, Memoized>,
    /// The address of each Service key's entry, in key order (the order of the result).
    order: BTreeMap<String, usize>,
    /// Each EndpointSlice's Service key (`namespace/name`), by the slice object's address.
    slices: FastMap<usize, (Arc<EndpointSlice>, Option<String>, u64)>,
    /// The slices' addresses by Service key, sorted.
    groups: FastMap<String, Vec<usize>>,
    /// Counts translations: entries not seen in one are dropped.
    round: u64,
    /// The last result, for a change that can patch it.
    last: Option<Last>,
}

/// What the last translation gave, with the totals its capacity check used.
struct Last {
    services: Arc<Vec<Arc<model::Service>>>,
    problems: BTreeMap<String, Vec<String>>,
    health_node_ports: BTreeMap<u16, String>,
    /// Services with a source-NATed backend.
    snat: usize,
    backends: u64,
    /// Services were left out for the data plane's capacity (positions are not known).
    dropped: bool,
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

struct Memoized {
    object: Arc<Service>,
    key: String,
    /// The addresses of its EndpointSlice objects, sorted.
    slices: Vec<usize>,
    /// Sorted by frontend.
    out: Vec<Arc<model::Service>>,
    /// By `out`: a backend of it is source-NATed.
    snat: Vec<bool>,
    /// By `out`: its place in the last result (None: refused, its frontend taken).
    at: Vec<Option<usize>>,
    problems: Vec<String>,
    round: u64,
    /// Its Service's EndpointSlices changed since it was made (a slice added or gone): the
    /// slices must be compared. Unmarked, they are the same (no lookup per Service).
    slices_changed: bool,
}

/// Marks the entry of Service `key` (if any) as having changed slices.
fn slices_changed(
    order: &BTreeMap<String, usize>,
    services: &mut FastMap<usize, Memoized>,
    key: &str,
) {
    if let Some(m) = order.get(key).and_then(|a| services.get_mut(a)) {
        m.slices_changed = true;
    }
}

fn address<T>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a) as usize
}

/// Translates the stores for this node, reusing what `memo` holds of every Service that did
/// not change. The objects are read where they are (the stores hold them behind `Arc`s): a
/// copy of every endpoint per change would cost more than the translation.
pub fn translate_with(
    memo: &mut Memo,
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    nodes: &[Arc<Node>],
    opts: &Options,
) -> Translation {
    let mut out = Translation::default();
    let this = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(opts.node.as_str()));
    if memo.node.as_ref().map(address) != this.map(address) || memo.opts.as_ref() != Some(opts) {
        // Every Service's translation depends on this node (its addresses, zone, labels)
        // and the options.
        memo.services.clear();
        memo.order.clear();
        memo.last = None;
        memo.node = this.cloned();
        memo.opts = Some(opts.clone());
    }
    memo.round += 1;
    let round = memo.round;
    let this = this.map(|n| &**n);
    let nat = source_nat(this, &opts.source_nat);
    out.node_leaving = this.is_some_and(|n| {
        n.metadata.deletion_timestamp.is_some()
            || n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_TAINT))
    });
    if this.is_some_and(|n| {
        n.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(EXCLUDE_LABEL))
    }) {
        out.excluded = true;
        // Only external load balancing leaves: in-cluster clients keep their Services.
        if !opts.all_types {
            return out;
        }
    }
    let here = Here {
        zone: this
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(ZONE_LABEL))
            .map(String::as_str),
        node_ports: node_port_addresses(this, opts),
        nat: nat.as_ref(),
        excluded: out.excluded,
    };
    // EndpointSlices by Service key: new ones join their group, gone ones leave it.
    let (mut seen, mut added) = (0, 0);
    for sl in slices {
        let addr = address(sl);
        if let Some(e) = memo.slices.get_mut(&addr) {
            e.2 = round;
            seen += 1;
            continue;
        }
        let key = sl
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|name| {
                let ns = sl.metadata.namespace.as_deref().unwrap_or("default");
                format!("{ns}/{name}")
            });
        if let Some(k) = &key {
            let group = memo.groups.entry(k.clone()).or_default();
            let at = group.partition_point(|a| *a < addr);
            group.insert(at, addr);
            slices_changed(&memo.order, &mut memo.services, k);
        }
        memo.slices.insert(addr, (Arc::clone(sl), key, round));
        added += 1;
    }
    let (groups, order, memoized) = (&mut memo.groups, &memo.order, &mut memo.services);
    // Every slice known before still there: nothing to drop (no pass over every slice).
    let gone = memo.slices.len().saturating_sub(seen + added);
    if gone > 0 {
        memo.slices.retain(|addr, (_, key, seen)| {
            if *seen == round {
                return true;
            }
            if let Some(k) = key
                && let Some(group) = groups.get_mut(k.as_str())
            {
                group.retain(|a| a != addr);
                if group.is_empty() {
                    groups.remove(k.as_str());
                }
                slices_changed(order, memoized, k);
            }
            false
        });
    }
    // Each served Service's translation: the one kept when its object and slices are the
    // same, else a new one.
    let mut fresh: Vec<Memoized> = Vec::new();
    let mut kept = 0;
    for svc in services.iter().filter(|s| served(s, opts)) {
        let key = match memo.services.get_mut(&address(svc)) {
            Some(m) => {
                let same = |m: &Memoized| {
                    memo.groups
                        .get(m.key.as_str())
                        .map_or(&[][..], Vec::as_slice)
                        == m.slices
                };
                debug_assert!(
                    m.slices_changed || same(m),
                    "{}: its slices changed unmarked",
                    m.key
                );
                if !m.slices_changed || same(m) {
                    m.round = round;
                    m.slices_changed = false;
                    kept += 1;
                    continue;
                }
                m.key.clone()
            }
            None => key(svc),
        };
        let addresses = memo.groups.get(key.as_str()).cloned().unwrap_or_default();
        let group: Vec<&EndpointSlice> = addresses.iter().map(|a| &*memo.slices[a].0).collect();
        let mut problems = Vec::new();
        let translated = service(
            svc,
            &key,
            (!group.is_empty()).then_some(&group),
            opts,
            &here,
            &mut problems,
        );
        let mut out: Vec<Arc<model::Service>> = translated.into_iter().map(Arc::new).collect();
        out.sort_by_key(|s| s.frontend);
        fresh.push(Memoized {
            object: Arc::clone(svc),
            key,
            slices: addresses,
            snat: out
                .iter()
                .map(|s| s.backends.iter().any(|b| b.snat))
                .collect(),
            at: Vec::new(),
            out,
            problems,
            round,
            slices_changed: false,
        });
    }
    if let Some((t, snat, backends)) = patch(memo, &fresh, kept, opts, &here, nat) {
        memo.last = Some(Last {
            services: Arc::clone(&t.desired.services),
            problems: t.problems.clone(),
            health_node_ports: t.health_node_ports.clone(),
            snat,
            backends,
            dropped: false,
        });
        // Each new entry takes its predecessor's places; only the predecessors go (no pass
        // over every entry).
        for mut m in fresh {
            let addr = address(&m.object);
            if let Some(old) = memo
                .order
                .insert(m.key.clone(), addr)
                .and_then(|a| memo.services.remove(&a))
            {
                m.at = old.at;
            }
            memo.services.insert(addr, m);
        }
        return Translation {
            backends,
            node_leaving: out.node_leaving,
            excluded: out.excluded,
            ..t
        };
    }
    for m in fresh {
        let addr = address(&m.object);
        memo.order.insert(m.key.clone(), addr);
        memo.services.insert(addr, m);
    }
    let order = &mut memo.order;
    memo.services.retain(|addr, m| {
        if m.round == round {
            return true;
        }
        if order.get(m.key.as_str()) == Some(addr) {
            order.remove(m.key.as_str());
        }
        false
    });
    let sorted = memo.order.values().map(|a| (*a, &memo.services[a]));
    // (address, port, protocol) → the scopes taken, and by which Service.
    // A frontend's address, port and protocol are held for outside clients, in-cluster ones
    // or both: at most two holders.
    type Holders<'a> = [Option<(model::Scope, &'a str)>; 2];
    let mut taken: FastMap<(IpAddr, u16, Protocol), Holders<'_>> = FastMap::default();
    taken.reserve(memo.services.len() * 2);
    let mut services = Vec::with_capacity(memo.services.len() * 2);
    let (mut snat, mut snat_services, mut backends) = (false, 0, 0u64);
    let mut places: Vec<(usize, Vec<Option<usize>>)> = Vec::with_capacity(memo.services.len());
    for (addr, m) in sorted {
        let mut at = vec![None; m.out.len()];
        let svc = &m.object;
        let name = m.key.as_str();
        let mut problems = m.problems.clone();
        if opts.all_types
            && !here.excluded
            && let Some(spec) = &svc.spec
            && spec.external_traffic_policy.as_deref() == Some("Local")
            && let Some(port) = spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
            && port != 0
            && !m.out.is_empty()
        {
            match out.health_node_ports.get(&port) {
                Some(other) => problems.push(format!(
                    "spec.healthCheckNodePort {port} is already served for {other}"
                )),
                None => {
                    out.health_node_ports.insert(port, name.to_string());
                }
            }
        }
        for (i, s) in m.out.iter().enumerate() {
            let f = s.frontend;
            let holders = taken.entry((f.vip, f.port, f.protocol)).or_default();
            if let Some((_, first)) = holders
                .iter()
                .flatten()
                .find(|(scope, _)| scope.overlaps(f.scope))
            {
                problems.push(format!("{f} is already served by {first}"));
                continue;
            }
            // Two holders never overlap, so a third cannot fit beside them.
            if let Some(free) = holders.iter_mut().find(|h| h.is_none()) {
                *free = Some((f.scope, name));
            }
            at[i] = Some(services.len());
            services.push(Arc::clone(s));
            backends += s.backends.len() as u64;
            snat |= m.snat[i];
            snat_services += usize::from(m.snat[i]);
        }
        if !problems.is_empty() {
            out.problems.insert(name.to_string(), problems);
        }
        places.push((addr, at));
    }
    for (addr, at) in places {
        if let Some(m) = memo.services.get_mut(&addr) {
            m.at = at;
        }
    }
    out.desired.services = Arc::new(services);
    // In name order (the keys are the names), each Service's frontends in order.
    debug_assert!(
        out.desired
            .services
            .is_sorted_by(|a, b| (&a.name, a.frontend) <= (&b.name, b.frontend))
    );
    let before_fit = out.desired.services.len();
    fit(&mut out, opts);
    if before_fit != out.desired.services.len() {
        // Services left out: look again at those that stay.
        snat = out
            .desired
            .services
            .iter()
            .any(|s| s.backends.iter().any(|b| b.snat));
        backends = out
            .desired
            .services
            .iter()
            .map(|s| s.backends.len() as u64)
            .sum();
    }
    out.backends = backends;
    if snat {
        out.desired.source_nat = nat;
    }
    memo.last = Some(Last {
        services: Arc::clone(&out.desired.services),
        problems: out.problems.clone(),
        health_node_ports: out.health_node_ports.clone(),
        snat: snat_services,
        backends,
        dropped: before_fit != out.desired.services.len(),
    });
    out
}

/// `spec.healthCheckNodePort` of a Service whose outside clients get only this node's
/// endpoints (when it has frontends here), as the translation serves it.
fn health_port(svc: &Service, opts: &Options, here: &Here<'_>) -> Option<u16> {
    let spec = svc.spec.as_ref()?;
    (opts.all_types && !here.excluded && spec.external_traffic_policy.as_deref() == Some("Local"))
        .then_some(())?;
    spec.health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

/// The last result with `fresh`'s services in the places of the versions they replace, when
/// that is the result a full pass would give: no Service came or went, and every changed
/// Service kept its frontends, its problems and its health-check node port (so no frontend
/// changes hands), and the whole still fits the data plane.
fn patch(
    memo: &Memo,
    fresh: &[Memoized],
    kept: usize,
    opts: &Options,
    here: &Here<'_>,
    nat: Option<SourceNat>,
) -> Option<(Translation, usize, u64)> {
    let last = memo.last.as_ref()?;
    if last.dropped || kept + fresh.len() != memo.order.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(fresh.len());
    let (mut backends, mut snat) = (last.backends, last.snat);
    for f in fresh {
        let old = memo.services.get(memo.order.get(f.key.as_str())?)?;
        if old.out.len() != f.out.len()
            || old
                .out
                .iter()
                .zip(&f.out)
                .any(|(a, b)| a.frontend != b.frontend)
            || old.problems != f.problems
            || health_port(&old.object, opts, here) != health_port(&f.object, opts, here)
            || old.at.len() != f.out.len()
        {
            return None;
        }
        for (k, at) in old.at.iter().enumerate() {
            if at.is_some() {
                backends =
                    backends - old.out[k].backends.len() as u64 + f.out[k].backends.len() as u64;
                snat = snat - usize::from(old.snat[k]) + usize::from(f.snat[k]);
            }
        }
        pairs.push((old, f));
    }
    if last.services.len() as u64 >= u64::from(opts.max_services)
        || backends >= u64::from(opts.max_backends)
    {
        return None;
    }
    let mut services: Vec<Arc<model::Service>> = (*last.services).clone();
    for (old, f) in pairs {
        for (k, at) in old.at.iter().enumerate() {
            if let Some(i) = at {
                services[*i] = Arc::clone(&f.out[k]);
            }
        }
    }
    let mut t = Translation {
        problems: last.problems.clone(),
        health_node_ports: last.health_node_ports.clone(),
        ..Translation::default()
    };
    t.desired.services = Arc::new(services);
    t.desired.source_nat = if snat > 0 { nat } else { None };
    Some((t, snat, backends))
}

/// What the translation needs to know about this node.
struct Here<'a> {
    /// Its `topology.kubernetes.io/zone` label.
    zone: Option<&'a str>,
    /// The addresses its NodePorts are served on.
    node_ports: Vec<IpAddr>,
    nat: Option<&'a SourceNat>,
    /// Labelled out of external load balancing: only in-cluster clients are served.
    excluded: bool,
}

/// The addresses NodePorts are served on: with `node.nodeport_addresses`, this node's
/// interface and Node addresses inside those prefixes (kube-proxy's `--nodeport-addresses`);
/// without, the Node's InternalIPs (kube-proxy's `primary`).
fn node_port_addresses(node: Option<&Node>, opts: &Options) -> Vec<IpAddr> {
    let node_addresses = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten();
    let mut out: Vec<IpAddr> = if opts.nodeport_addresses.is_empty() {
        node_addresses
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect()
    } else {
        node_addresses
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .chain(opts.local_addresses.iter().copied())
            .filter(|a| opts.nodeport_addresses.iter().any(|n| n.contains(a)))
            .collect()
    };
    out.sort();
    out.dedup();
    out
}

/// Whether weir serves any part of this Service: with `all_types` every Service with a
/// cluster IP, external IPs or a LoadBalancer status (ExternalName and headless Services are
/// DNS only); otherwise weir's LoadBalancers.
fn served(svc: &Service, opts: &Options) -> bool {
    if !opts.all_types {
        return wanted(svc, opts.default_class);
    }
    svc.spec
        .as_ref()
        .is_some_and(|s| s.type_.as_deref() != Some("ExternalName"))
}

/// Keeps what fits the data plane, whole Services in name order, and reports the rest: one
/// Service too many must not keep every other change from being programmed.
fn fit(out: &mut Translation, opts: &Options) {
    let (mut frontends, mut backends) = (0u64, 0u64);
    let mut dropped: BTreeSet<String> = BTreeSet::new();
    // The services are sorted by name: a Service's frontends are one run.
    for group in out.desired.services.chunk_by(|a, b| a.name == b.name) {
        let (f, b) = group.iter().fold((0u64, 0u64), |(f, b), s| {
            (f + 1, b + s.backends.len() as u64)
        });
        if frontends + f < u64::from(opts.max_services)
            && backends + b < u64::from(opts.max_backends)
        {
            frontends += f;
            backends += b;
        } else {
            dropped.insert(group[0].name.clone());
        }
    }
    if dropped.is_empty() {
        return;
    }
    Arc::make_mut(&mut out.desired.services).retain(|s| !dropped.contains(&s.name));
    for name in dropped {
        out.problems.entry(name).or_default().push(format!(
            "not served: the data plane is full ({frontends} frontends and {backends} backends \
             programmed; raise dataplane.max_services ({}) or dataplane.max_backends ({}))",
            opts.max_services, opts.max_backends
        ));
    }
}

/// An address of a Service and the clients it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Address {
    /// A cluster IP: in-cluster clients (the socket hooks), `internalTrafficPolicy`.
    Cluster(IpAddr),
    /// A LoadBalancer ingress address (`loadBalancerSourceRanges` apply) or an external IP:
    /// outside clients by `externalTrafficPolicy`, in-cluster ones by the cluster's endpoints.
    External { ip: IpAddr, ranges: bool },
    /// This node's address for the NodePorts.
    Node(IpAddr),
}

impl Address {
    const fn ip(self) -> IpAddr {
        match self {
            Self::Cluster(ip) | Self::External { ip, .. } | Self::Node(ip) => ip,
        }
    }
}

/// Parses the addresses of one kind, reporting the bad ones.
fn parse_ips<'a>(
    what: &str,
    ips: impl Iterator<Item = &'a str>,
    problems: &mut Vec<String>,
) -> Vec<IpAddr> {
    ips.filter_map(|ip| {
        let parsed = ip.parse().ok();
        if parsed.is_none() {
            problems.push(format!("{what}: {ip:?} is not an IP address"));
        }
        parsed
    })
    .collect()
}

/// The addresses of a Service that this node serves.
fn addresses(
    svc: &Service,
    spec: &ServiceSpec,
    opts: &Options,
    here: &Here<'_>,
    problems: &mut Vec<String>,
) -> Vec<Address> {
    let mut out = Vec::new();
    let lb = spec.type_.as_deref() == Some("LoadBalancer");
    if lb && (opts.all_types || wanted(svc, opts.default_class)) {
        // An address whose load balancer proxies (`ipMode: Proxy`) reaches the node as a
        // NodePort: kube-proxy leaves it alone.
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref());
        out.extend(
            parse_ips("status.loadBalancer.ingress", ingress, problems)
                .into_iter()
                .map(|ip| Address::External { ip, ranges: true }),
        );
    }
    if !opts.all_types {
        return out;
    }
    let external = spec.external_ips.iter().flatten().map(String::as_str);
    out.extend(
        parse_ips("spec.externalIPs", external, problems)
            .into_iter()
            .map(|ip| Address::External { ip, ranges: false }),
    );
    let cluster: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let cluster = parse_ips(
        "spec.clusterIPs",
        cluster
            .into_iter()
            .filter(|ip| !ip.is_empty() && *ip != "None"),
        problems,
    );
    // NodePorts for the Service's families: spec.ipFamilies, else its cluster IPs', else IPv4.
    let mut families: Vec<bool> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(true),
            "IPv6" => Some(false),
            _ => None,
        })
        .collect();
    if families.is_empty() {
        families = cluster.iter().map(IpAddr::is_ipv4).collect();
    }
    if families.is_empty() {
        families.push(true);
    }
    out.extend(cluster.into_iter().map(Address::Cluster));
    if matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")) {
        out.extend(
            here.node_ports
                .iter()
                .filter(|a| families.contains(&a.is_ipv4()))
                .map(|a| Address::Node(*a)),
        );
    }
    if here.excluded {
        // `node.kubernetes.io/exclude-from-external-load-balancers`: in-cluster clients only.
        out.retain(|a| matches!(a, Address::Cluster(_)));
    }
    out
}

/// The model services of one Kubernetes Service.
fn service(
    svc: &Service,
    name: &str,
    slices: Option<&Vec<&EndpointSlice>>,
    opts: &Options,
    here: &Here<'_>,
    problems: &mut Vec<String>,
) -> Vec<model::Service> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let addresses = addresses(svc, spec, opts, here, problems);
    if addresses.is_empty() {
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
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
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
        let node_port = p
            .node_port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0);
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
        let port_name = p.name.as_deref().unwrap_or("");
        // Endpoints, by family, on first use.
        let mut sets: BTreeMap<bool, Sets> = BTreeMap::new();
        for address in &addresses {
            let ip = address.ip();
            let sets = sets.entry(ip.is_ipv4()).or_insert_with(|| {
                let eps = endpoints(slices, port_name, proto, ip.is_ipv4(), &opts.node);
                let topology = topology(&eps, &opts.node, here.zone);
                let cluster = cluster_endpoints(&eps, topology, &opts.node, here.zone);
                let local = local_endpoints(&eps);
                let policy = if external_local {
                    Policy::Local
                } else if proto != Protocol::Sctp
                    && here.nat.and_then(|n| n.address_for(ip)).is_some()
                {
                    Policy::ClusterSnat
                } else {
                    Policy::ClusterPreferLocal
                };
                Sets {
                    external: external_backends(&cluster, &local, policy),
                    cluster: plain(&cluster),
                    local: plain(&local),
                }
            });
            // (frontend port, backends for outside clients, for in-cluster clients)
            let (fport, external, internal) = match *address {
                Address::Cluster(_) => (
                    port,
                    None,
                    Some(if internal_local {
                        &sets.local
                    } else {
                        &sets.cluster
                    }),
                ),
                Address::External { .. } => (port, Some(&sets.external), Some(&sets.cluster)),
                Address::Node(_) => match node_port {
                    Some(n) => (n, Some(&sets.external), Some(&sets.cluster)),
                    None => continue,
                },
            };
            let internal = internal.filter(|_| opts.internal);
            let mut external = external;
            let mut ranges: Vec<ipnet::IpNet> = Vec::new();
            if matches!(address, Address::External { ranges: true, .. }) {
                ranges = source_ranges
                    .iter()
                    .filter(|n| n.addr().is_ipv4() == ip.is_ipv4())
                    .copied()
                    .collect();
                ranges.sort();
                ranges.dedup();
                if !source_ranges.is_empty() && ranges.is_empty() {
                    // Source ranges of the other family only: nobody of this family may
                    // connect from outside.
                    problems.push(format!(
                        "no loadBalancerSourceRanges of {ip}'s family: {ip} is not served to outside clients"
                    ));
                    external = None;
                }
            }
            let template = model::Service {
                name: name.to_string(),
                frontend: Frontend {
                    vip: ip,
                    port: fport,
                    protocol: proto,
                    scope: model::Scope::Both,
                },
                backends: Vec::new(),
                source_ranges: ranges,
                affinity_timeout: affinity,
                table_size: opts.table_size,
                health_check: check.clone(),
                node_address: matches!(address, Address::Node(_)),
            };
            out.extend(scoped(template, external, internal));
        }
    }
    out
}

/// The backend sets of one Service port and family.
struct Sets {
    /// For outside clients, by `externalTrafficPolicy`.
    external: Vec<Backend>,
    /// Every node's (by the topology hints).
    cluster: Vec<Backend>,
    /// This node's.
    local: Vec<Backend>,
}

/// One frontend of both scopes when both client kinds get the same backends (source NAT
/// aside: the socket hooks connect to the endpoint itself), else one of each.
fn scoped(
    template: model::Service,
    external: Option<&Vec<Backend>>,
    internal: Option<&Vec<Backend>>,
) -> Vec<model::Service> {
    let with = |scope, backends: &Vec<Backend>| {
        let mut s = template.clone();
        s.frontend.scope = scope;
        s.backends.clone_from(backends);
        if scope == model::Scope::Internal {
            s.source_ranges.clear();
        }
        s
    };
    match (external, internal) {
        (Some(e), Some(i))
            if e.len() == i.len() && e.iter().zip(i).all(|(a, b)| a.addr == b.addr) =>
        {
            vec![with(model::Scope::Both, e)]
        }
        (Some(e), Some(i)) => vec![
            with(model::Scope::External, e),
            with(model::Scope::Internal, i),
        ],
        (Some(e), None) => vec![with(model::Scope::External, e)],
        (None, Some(i)) => vec![with(model::Scope::Internal, i)],
        (None, None) => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
