//! VIP announcement in Kubernetes. BGP: the BGPPeers and BGPAdvertisements that select this
//! node, made into the same [`BgpConfig`] the config file gives (one model, two sources); the
//! node's router id is its IPv4 InternalIP (else ExternalIP, else a number derived from its
//! name); passive peers connect to port 179. L2: the addresses the L2Advertisements that
//! select this node give it, and the other selected nodes (the gossip peers).
//!
//! A resource with a problem is left out whole, with a message naming it and its field; the
//! rest applies.

use super::SpecError;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Node, Secret, Service},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::ResourceExt;

use super::{
    addresses,
    crd::{BGPAdvertisement, BGPPeer, IPPool, L2Advertisement, Selection},
    ipam::Selector,
    translate,
};
use crate::announce::{
    Advertisement, BfdTimers, BgpConfig, BgpPeerConfig, RouteAttrs, parse_community,
    parse_large_community,
};

/// What the BGP config is made from.
pub struct Inputs<'a> {
    pub node: &'a str,
    pub nodes: &'a [Arc<Node>],
    pub peers: &'a [BGPPeer],
    pub advertisements: &'a [BGPAdvertisement],
    pub l2_advertisements: &'a [L2Advertisement],
    pub pools: &'a [IPPool],
    pub services: &'a [Arc<Service>],
    /// The Secrets of the agents' namespace (passwords).
    pub secrets: &'a [Secret],
    pub default_class: bool,
}

/// Whether `selector` (a resource's `spec.nodeSelector`; absent: every node) selects a node
/// with `labels`; a malformed one selects nothing and says why in `problems`.
fn selects(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
    what: &str,
    problems: &mut Vec<String>,
) -> bool {
    match selector {
        None => true,
        Some(s) => {
            let s = Selector(s.clone());
            match s.check() {
                Ok(()) => s.matches(labels),
                Err(e) => {
                    problems.push(format!("{what}: spec.nodeSelector: {e}"));
                    false
                }
            }
        }
    }
}

/// The labels of node `name` (none while the API does not know it).
fn labels_of<'a>(nodes: &'a [Arc<Node>], name: &str) -> &'a BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    nodes
        .iter()
        .find(|n| n.name_any() == name)
        .map_or(&EMPTY, |n| n.labels())
}

/// This node's BGP config (None: no BGPPeer selects it) and the problems of the resources
/// left out.
pub fn config(i: &Inputs) -> (Option<BgpConfig>, Vec<String>) {
    let mut problems = Vec::new();
    let this = i.nodes.iter().find(|n| n.name_any() == i.node);
    let labels = labels_of(i.nodes, i.node);
    let selects = |s: &Option<LabelSelector>, what: &str, problems: &mut Vec<String>| {
        selects(s.as_ref(), labels, what, problems)
    };

    let mut peers: Vec<BgpPeerConfig> = Vec::new();
    let mut names: BTreeMap<String, IpAddr> = BTreeMap::new();
    let mut sorted: Vec<&BGPPeer> = i.peers.iter().collect();
    sorted.sort_by_key(|p| p.name_any());
    for p in sorted {
        let what = format!("BGPPeer {}", p.name_any());
        if !selects(&p.spec.node_selector, &what, &mut problems) {
            continue;
        }
        match peer(p, i.secrets) {
            Ok(c) => {
                if let Some(other) = peers.iter().find(|o| o.address == c.address) {
                    let other = names
                        .iter()
                        .find(|(_, a)| **a == other.address)
                        .map(|(n, _)| n.clone())
                        .unwrap_or_default();
                    problems.push(format!(
                        "{what}: spec.address: {} is BGPPeer {other}'s too",
                        c.address
                    ));
                    continue;
                }
                names.insert(p.name_any(), c.address);
                peers.push(c);
            }
            Err(e) => problems.push(format!("{what}: {e}")),
        }
    }
    let Some(first) = peers.first() else {
        return (None, problems);
    };
    let local_as = first.local_as.unwrap_or_default();

    let (pools, _) = addresses::pools(i.pools);
    let mut advertisements = Vec::new();
    let mut sorted: Vec<&BGPAdvertisement> = i.advertisements.iter().collect();
    sorted.sort_by_key(|a| a.name_any());
    for a in sorted {
        let what = format!("BGPAdvertisement {}", a.name_any());
        if !selects(&a.spec.selection.node_selector, &what, &mut problems) {
            continue;
        }
        match advertisement(a, &pools, &names, i) {
            Ok(ad) => advertisements.push(ad),
            Err(e) => problems.push(format!("{what}: {e}")),
        }
    }
    let config = BgpConfig {
        graceful_restart: crate::announce::DEFAULT_GRACEFUL_RESTART,
        local_as,
        router_id: router_id(this.map(|n| &**n), i.node),
        listen_port: 179,
        bfd: BfdTimers {
            interval: Duration::from_millis(100),
            multiplier: 3,
        },
        peers,
        advertisements,
    };
    (Some(config), problems)
}

/// The node's IPv4 InternalIP, else its IPv4 ExternalIP, else a number from its name (a
/// router id only has to be unique in the AS and not zero).
pub fn router_id(node: Option<&Node>, name: &str) -> Ipv4Addr {
    let addresses = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref());
    for kind in ["InternalIP", "ExternalIP"] {
        let found = addresses
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == kind)
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        if let Some(ip) = found {
            return ip;
        }
    }
    // FNV-1a of the name.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    Ipv4Addr::from(h.max(1))
}

fn duration(field: &str, text: Option<&str>, default: Duration) -> Result<Duration, SpecError> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| SpecError::new(format!("spec.{field}: {t:?} is not a duration ({e})"))),
    }
}

/// One BGPPeer as a peer of this node.
fn peer(p: &BGPPeer, secrets: &[Secret]) -> Result<BgpPeerConfig, SpecError> {
    let s = &p.spec;
    let address: IpAddr = s.address.parse().map_err(|_| {
        SpecError::new(format!(
            "spec.address: {:?} is not an IP address",
            s.address
        ))
    })?;
    let password = match &s.password_secret {
        None => None,
        Some(r) => {
            let key = r.key.as_deref().unwrap_or("password");
            let secret = secrets
                .iter()
                .find(|x| x.name_any() == r.name)
                .ok_or_else(|| {
                    SpecError::new(format!(
                        "spec.passwordSecret: no Secret {:?} in the agents' namespace",
                        r.name
                    ))
                })?;
            let value = secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| b.0.clone())
                .or_else(|| {
                    secret
                        .string_data
                        .as_ref()
                        .and_then(|d| d.get(key))
                        .map(|t| t.clone().into_bytes())
                })
                .ok_or_else(|| {
                    SpecError::new(format!(
                        "spec.passwordSecret: Secret {:?} has no key {key:?}",
                        r.name
                    ))
                })?;
            let text = String::from_utf8(value).map_err(|_| {
                SpecError::new(format!(
                    "spec.passwordSecret: Secret {:?} key {key:?} is not text",
                    r.name
                ))
            })?;
            Some(crate::announce::Secret(
                text.trim_end_matches(['\n', '\r']).to_string(),
            ))
        }
    };
    let c = BgpPeerConfig {
        address,
        remote_as: s.remote_as,
        local_as: Some(s.local_as),
        port: s.port.unwrap_or(179),
        password,
        hold_time: duration("holdTime", s.hold_time.as_deref(), Duration::from_secs(9))?,
        connect_retry: duration(
            "connectRetry",
            s.connect_retry.as_deref(),
            Duration::from_secs(2),
        )?,
        bfd: s.bfd,
        multihop: s.multihop,
        passive: s.passive,
    };
    let problems: Vec<String> = c
        .problems()
        .into_iter()
        .map(|(field, m)| {
            let field = match field {
                "remote_as" => "remoteAS",
                "local_as" => "localAS",
                "hold_time" => "holdTime",
                "connect_retry" => "connectRetry",
                "password" => "passwordSecret",
                f => f,
            };
            format!("spec.{field}: {m}")
        })
        .collect();
    if problems.is_empty() {
        Ok(c)
    } else {
        Err(SpecError(problems))
    }
}

/// One BGPAdvertisement as this node applies it.
fn advertisement(
    a: &BGPAdvertisement,
    pools: &[super::ipam::Pool],
    peers: &BTreeMap<String, IpAddr>,
    i: &Inputs,
) -> Result<Advertisement, SpecError> {
    let s = &a.spec;
    let mut problems = Vec::new();
    let mut attrs = RouteAttrs {
        local_pref: s.local_pref,
        ..RouteAttrs::default()
    };
    for (n, c) in s.communities.iter().enumerate() {
        match parse_community(c) {
            Some(c) => attrs.communities.push(c),
            None => problems.push(format!("spec.communities[{n}]: {c:?} is not a community: AS:VALUE with both parts 0-65535, or no-export, no-advertise, no-export-subconfed")),
        }
    }
    for (n, c) in s.large_communities.iter().enumerate() {
        match parse_large_community(c) {
            Some(c) => attrs.large_communities.push(c),
            None => problems.push(format!(
                "spec.largeCommunities[{n}]: {c:?} is not a large community: A:B:C"
            )),
        }
    }
    attrs.merge(&RouteAttrs::default());
    let vips = selected_vips(&s.selection, pools, i).map_err(|e| problems.extend(e.0));
    if !problems.is_empty() {
        return Err(SpecError(problems));
    }
    let vips = vips.unwrap_or_default();
    // Named peers that do not select this node are not this node's to advertise to.
    let peer_set = (!s.peers.is_empty()).then(|| {
        s.peers
            .iter()
            .filter_map(|n| peers.get(n).copied())
            .collect::<BTreeSet<IpAddr>>()
    });
    Ok(Advertisement {
        vips,
        peers: peer_set,
        attrs,
    })
}

/// The addresses of the Services weir serves that `ipPools` (by name; empty: any) and
/// `serviceSelector` (absent: any) select; None when neither narrows anything.
fn selected_vips(
    selection: &Selection,
    pools: &[super::ipam::Pool],
    i: &Inputs,
) -> Result<Option<BTreeSet<IpAddr>>, SpecError> {
    let ip_pools = &selection.ip_pools;
    let mut problems = Vec::new();
    let mut in_pools = Vec::new();
    for (n, name) in ip_pools.iter().enumerate() {
        match pools.iter().find(|p| &p.name == name) {
            Some(p) => in_pools.push(p),
            None => problems.push(format!("spec.ipPools[{n}]: no valid IPPool {name:?}")),
        }
    }
    let services = match &selection.service_selector {
        None => None,
        Some(sel) => {
            let sel = Selector(sel.clone());
            match sel.check() {
                Ok(()) => Some(sel),
                Err(e) => {
                    problems.push(format!("spec.serviceSelector: {e}"));
                    None
                }
            }
        }
    };
    if !problems.is_empty() {
        return Err(SpecError(problems));
    }
    if ip_pools.is_empty() && services.is_none() {
        return Ok(None);
    }
    Ok(Some(
        i.services
            .iter()
            .filter(|svc| translate::wanted(svc, i.default_class))
            .filter(|svc| {
                services
                    .as_ref()
                    .is_none_or(|sel| sel.matches(svc.labels()))
            })
            .flat_map(|svc| addresses::status_ips(svc))
            .filter(|ip| ip_pools.is_empty() || in_pools.iter().any(|p| p.contains(*ip)))
            .collect(),
    ))
}

/// L2 mode in Kubernetes: what the L2Advertisements give this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L2Plan {
    /// The addresses this node may answer for (None: every address).
    pub vips: Option<BTreeSet<IpAddr>>,
    /// The InternalIPs of the other nodes an L2Advertisement selects: the gossip peers.
    pub peers: Vec<IpAddr>,
}

/// This node's L2 plan and the problems of the L2Advertisements left out. No
/// L2Advertisement selecting this node: it answers for nothing.
pub fn l2(i: &Inputs) -> (L2Plan, Vec<String>) {
    let mut problems = Vec::new();
    let (pools, _) = addresses::pools(i.pools);
    let mut sorted: Vec<&L2Advertisement> = i.l2_advertisements.iter().collect();
    sorted.sort_by_key(|a| a.name_any());
    let mut mine: Option<BTreeSet<IpAddr>> = Some(BTreeSet::new());
    let mut nodes: BTreeSet<String> = BTreeSet::new();
    for a in sorted {
        let what = format!("L2Advertisement {}", a.name_any());
        let vips = match selected_vips(&a.spec.selection, &pools, i) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{what}: {e}"));
                continue;
            }
        };
        let mut bad = Vec::new();
        let selected: Vec<String> = i
            .nodes
            .iter()
            .filter(|n| {
                selects(
                    a.spec.selection.node_selector.as_ref(),
                    n.labels(),
                    &what,
                    &mut bad,
                )
            })
            .map(|n| n.name_any())
            .collect();
        if let Some(b) = bad.into_iter().next() {
            problems.push(b);
            continue;
        }
        nodes.extend(selected);
        let here = selects(
            a.spec.selection.node_selector.as_ref(),
            labels_of(i.nodes, i.node),
            &what,
            &mut Vec::new(),
        );
        if here {
            mine = match (mine, vips) {
                (Some(m), Some(v)) => Some(&m | &v),
                _ => None,
            };
        }
    }
    let peers = i
        .nodes
        .iter()
        .filter(|n| nodes.contains(&n.name_any()) && n.name_any() != i.node)
        .flat_map(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
        })
        .collect();
    (L2Plan { vips: mine, peers }, problems)
}

#[cfg(test)]
mod tests;
