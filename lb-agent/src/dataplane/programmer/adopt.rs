//! Carrying on from a previous agent's maps: the programmer's state rebuilt from what they
//! hold, so that the next apply is the usual diff and every id that flows, affinity entries
//! and counters carry keeps its meaning.
//!
//! The maps are the truth, whatever the previous agent was doing when it stopped: a service is
//! what `SERVICES` publishes; its backends are the `ENDPOINTS` frontends that name its id;
//! its table is read back from its page. Entries no published service refers to (written by
//! a change that never got published) are removed or cleared before anything else, and the
//! report says which. What the maps cannot say (a service's name, backend weights, health
//! checks) does not matter: the first apply compares tables and values, and writes only what
//! differs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use lb_common::{
    EndpointFrontend, ServiceKey, ServiceValue, SnatConfig, backend_flags, family, scope,
    service_flags, vip_filter_index, vip_flags,
};

use super::{ProgrammedBackend, ProgrammedService, Programmer, TableRef, endpoint_value, freed};
use crate::{
    dataplane::{
        DataplaneLimits, MapContents, MapError, MapWriter, endpoint_key, vip_key, words_addr,
    },
    model::{Backend, Frontend, Protocol, Scope, Service, SourceNat},
};

/// What adopting found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    /// Services carried on.
    pub services: usize,
    /// Entries left by an unfinished change, and what was done with them.
    pub repaired: Vec<String>,
    /// The VIPs the data plane answers ARP and Neighbor Solicitations for.
    pub announced: BTreeSet<IpAddr>,
}

fn protocol(number: u8) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .find(|p| p.number() == number)
}

impl Programmer {
    /// The programmer of maps that hold `contents` (a previous agent's), with the entries no
    /// published service refers to cleaned up through `maps`.
    pub fn adopt(
        limits: &DataplaneLimits,
        seed: u64,
        contents: &MapContents,
        maps: &mut dyn MapWriter,
    ) -> Result<(Self, AdoptReport), MapError> {
        let mut p = Self::new(limits, seed);
        let mut report = AdoptReport::default();
        for (id, b) in &contents.backends {
            if let Some(g) = p.generations.get_mut(*id as usize) {
                *g = b.generation;
            }
        }

        // Each service's members, from the reverse-NAT table.
        let mut members: BTreeMap<u32, Vec<(SocketAddr, u32)>> = BTreeMap::new();
        for (k, v) in &contents.endpoints {
            let addr = SocketAddr::new(words_addr(&k.addr, k.family), u16::from_be(k.port_be));
            for f in v.frontends.iter().take(v.count as usize) {
                members
                    .entry(f.service_id)
                    .or_default()
                    .push((addr, f.backend_id));
            }
        }
        let mut ranges: BTreeMap<u32, Vec<IpNet>> = BTreeMap::new();
        for (len, d) in &contents.source_ranges {
            if let Some(net) = range_net(*len, &d.addr) {
                ranges
                    .entry(u32::from_be(d.service_id_be))
                    .or_default()
                    .push(net);
            }
        }

        let mut used_backends = BTreeSet::new();
        for (key, value, scope) in published(contents, maps, &mut report)? {
            let Some(proto) = protocol(key.proto) else {
                for key in service_keys_of(&key, scope) {
                    maps.delete_service(&key)?;
                }
                report.repaired.push(format!(
                    "service id {}: unknown protocol, removed",
                    value.id
                ));
                continue;
            };
            let frontend = Frontend {
                vip: words_addr(&key.addr, key.family),
                port: u16::from_be(key.port_be),
                protocol: proto,
                scope,
            };
            let mut backends = BTreeMap::new();
            let mut spec_backends = Vec::new();
            for (addr, id) in members.get(&value.id).into_iter().flatten() {
                let b = contents
                    .backends
                    .get(id)
                    .copied()
                    .unwrap_or_else(|| freed(0));
                backends.insert(
                    *addr,
                    ProgrammedBackend {
                        id: *id,
                        generation: b.generation,
                    },
                );
                used_backends.insert(*id);
                spec_backends.push(Backend {
                    addr: *addr,
                    weight: 1,
                    available: b.flags & backend_flags::PRESENT != 0,
                    snat: b.flags & backend_flags::SNAT != 0,
                });
            }
            spec_backends.sort_by_key(|b| b.addr);
            let mut source_ranges = ranges.get(&value.id).cloned().unwrap_or_default();
            source_ranges.sort();
            let spec = Service {
                name: frontend.to_string(),
                frontend,
                backends: spec_backends,
                source_ranges,
                affinity_timeout: (value.flags & service_flags::AFFINITY != 0)
                    .then(|| Duration::from_secs(u64::from(value.affinity_timeout_s))),
                table_size: value.table_size,
                health_check: None,
                node_address: value.flags & service_flags::NODE_ADDRESS != 0,
            };
            p.services.insert(
                frontend,
                ProgrammedService {
                    spec: Arc::new(spec),
                    id: value.id,
                    table_ref: TableRef {
                        page: value.table_page,
                        offset: value.table_offset,
                    },
                    backends,
                    table: super::TableDigest::of(
                        contents
                            .tables
                            .get(&value.id)
                            .map_or(&[][..], Vec::as_slice),
                    ),
                },
            );
        }
        report.services = p.services.len();
        p.usage = super::fit::Usage::of(p.services.values().map(|s| &*s.spec));
        // The maps hold a previous agent's state, not one this programmer applied.
        p.synced = false;
        let services: BTreeSet<u32> = p.services.values().map(|s| s.id).collect();

        // Ids: fresh ones after the highest ever given out, the gaps below it free.
        let top = services.iter().max().copied().unwrap_or(0);
        p.service_ids.next = top + 1;
        p.service_ids.free = (1..=top).filter(|i| !services.contains(i)).collect();
        let top = contents.backends.keys().max().copied().unwrap_or(0);
        p.backend_ids.next = top.max(used_backends.iter().max().copied().unwrap_or(0)) + 1;
        p.backend_ids.free = (1..p.backend_ids.next)
            .filter(|i| !used_backends.contains(i))
            .collect();
        for (id, b) in &contents.backends {
            if b.flags != 0 && !used_backends.contains(id) {
                maps.put_backend(*id, &freed(b.generation))?;
                report
                    .repaired
                    .push(format!("backend id {id}: in no service, cleared"));
            }
        }

        adopt_pages(&mut p, contents);
        p.source_nat = source_nat(&contents.snat_config);
        adopt_vips(&mut p, contents, maps, &mut report)?;
        adopt_endpoints(&mut p, contents, &services, maps, &mut report)?;
        for (len, d) in &contents.source_ranges {
            let sid = u32::from_be(d.service_id_be);
            if !services.contains(&sid) {
                maps.delete_source_range(*len, d)?;
                report.repaired.push(format!(
                    "source range of service id {sid}: no such service, removed"
                ));
            }
        }
        report.announced.clone_from(&p.announced);
        Ok((p, report))
    }
}

/// The published services: `SERVICES` entries by id, an external and an internal entry of
/// one id making one frontend of scope `Both`. An id published under two frontends (a change
/// that never finished) keeps the first; the other entries are removed.
fn published(
    contents: &MapContents,
    maps: &mut dyn MapWriter,
    report: &mut AdoptReport,
) -> Result<Vec<(ServiceKey, ServiceValue, Scope)>, MapError> {
    let mut by_id: BTreeMap<u32, Vec<(&ServiceKey, &ServiceValue)>> = BTreeMap::new();
    for (key, value) in &contents.services {
        by_id.entry(value.id).or_default().push((key, value));
    }
    let mut out = Vec::new();
    for (id, entries) in by_id {
        let (key, value) = entries[0];
        let same = |k: &ServiceKey| {
            ServiceKey {
                scope: key.scope,
                ..*k
            } == *key
        };
        let scopes: BTreeSet<u8> = entries
            .iter()
            .filter(|(k, v)| same(k) && *v == value)
            .map(|(k, _)| k.scope)
            .collect();
        let scope = match (
            scopes.contains(&scope::EXTERNAL),
            scopes.contains(&scope::INTERNAL),
        ) {
            (true, true) => Scope::Both,
            (false, true) => Scope::Internal,
            _ => Scope::External,
        };
        for (k, v) in &entries {
            if !(same(k) && *v == value)
                || !(k.scope == scope::EXTERNAL || k.scope == scope::INTERNAL)
            {
                maps.delete_service(k)?;
                report.repaired.push(format!(
                    "service id {id}: published twice, the second entry removed"
                ));
            }
        }
        out.push((*key, *value, scope));
    }
    Ok(out)
}

/// The keys of `key`'s frontend in `scope`.
fn service_keys_of(key: &ServiceKey, scope: Scope) -> Vec<ServiceKey> {
    let f = Frontend {
        vip: words_addr(&key.addr, key.family),
        port: u16::from_be(key.port_be),
        protocol: Protocol::Tcp,
        scope,
    };
    crate::dataplane::service_keys(&f)
        .map(|k| ServiceKey {
            proto: key.proto,
            ..k
        })
        .collect()
}

/// Table pages: each one's size class from the tables in it, the rest of it free; a page
/// with no table is blank (any size whose page has its number of entries may take it).
fn adopt_pages(p: &mut Programmer, contents: &MapContents) {
    let mut sizes: BTreeMap<u32, u32> = BTreeMap::new();
    let mut taken: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for s in p.services.values() {
        sizes.insert(s.table_ref.page, s.spec.table_size);
        taken
            .entry(s.table_ref.page)
            .or_default()
            .insert(s.table_ref.offset);
    }
    p.pages.created = contents.pages.keys().max().copied().unwrap_or(0);
    for (page, entries) in &contents.pages {
        let Some(size) = sizes.get(page).copied().filter(|s| *s > 0) else {
            p.pages.blank.insert(*page, *entries);
            continue;
        };
        p.pages.classes.entry(size).or_default().push(*page);
        let used = &taken[page];
        p.pages.free.insert(
            *page,
            (0..entries / size)
                .rev()
                .map(|i| i * size)
                .filter(|o| !used.contains(o))
                .collect(),
        );
    }
}

/// VIP entries: one per address served (added where missing, removed where no service has
/// the address), their L2 flag kept; the pre-filter's counts made exact.
fn adopt_vips(
    p: &mut Programmer,
    contents: &MapContents,
    maps: &mut dyn MapWriter,
    report: &mut AdoptReport,
) -> Result<(), MapError> {
    for s in p.services.values() {
        if super::owns_vip(&s.spec) {
            *p.vips.entry(s.spec.frontend.vip).or_default() += 1;
        } else if super::node_port(&s.spec) {
            *p.node_addresses.entry(s.spec.frontend.vip).or_default() += 1;
        }
    }
    let mut present = BTreeSet::new();
    for (k, v) in &contents.vips {
        let ip = words_addr(&k.addr, k.family);
        if p.vips.contains_key(&ip) {
            present.insert(ip);
            if v.flags & vip_flags::NEIGHBOR != 0 {
                p.announced.insert(ip);
            }
        } else {
            maps.delete_vip(k)?;
            report
                .repaired
                .push(format!("VIP {ip}: no service, removed"));
        }
    }
    let missing: Vec<IpAddr> = p
        .vips
        .keys()
        .filter(|ip| !present.contains(ip))
        .copied()
        .collect();
    for ip in missing {
        maps.put_vip(&vip_key(ip), &lb_common::VipValue { flags: 0 })?;
        report.repaired.push(format!("VIP {ip}: missing, added"));
    }
    let snat_addrs = p.source_nat.map_or_else(Vec::new, |s| {
        let v4 = s.ipv4.map(IpAddr::V4);
        let v6 = s.ipv6.map(IpAddr::V6);
        v4.into_iter().chain(v6).collect()
    });
    let mut filter: BTreeMap<u32, u32> = BTreeMap::new();
    for ip in p
        .vips
        .keys()
        .chain(p.node_addresses.keys())
        .chain(&snat_addrs)
    {
        *filter
            .entry(vip_filter_index(&vip_key(*ip).addr))
            .or_default() += 1;
    }
    let slots: BTreeSet<u32> = filter
        .keys()
        .chain(contents.vip_filter.keys())
        .copied()
        .collect();
    for slot in slots {
        let (want, have) = (
            filter.get(&slot).copied().unwrap_or(0),
            contents.vip_filter.get(&slot).copied().unwrap_or(0),
        );
        if want != have {
            maps.set_vip_filter(slot, want)?;
            report
                .repaired
                .push(format!("VIP pre-filter slot {slot}: {have} → {want}"));
        }
    }
    p.filter = filter;
    Ok(())
}

/// Reverse NAT's table: the frontends of published services kept, the others removed.
fn adopt_endpoints(
    p: &mut Programmer,
    contents: &MapContents,
    services: &BTreeSet<u32>,
    maps: &mut dyn MapWriter,
    report: &mut AdoptReport,
) -> Result<(), MapError> {
    for (k, v) in &contents.endpoints {
        let Some(proto) = protocol(k.proto) else {
            maps.delete_endpoint(k)?;
            continue;
        };
        let addr = SocketAddr::new(words_addr(&k.addr, k.family), u16::from_be(k.port_be));
        let all = &v.frontends[..(v.count as usize).min(v.frontends.len())];
        let kept: Vec<EndpointFrontend> = all
            .iter()
            .filter(|f| services.contains(&f.service_id))
            .copied()
            .collect();
        if kept.len() != all.len() {
            report.repaired.push(format!(
                "backend {addr}/{proto}: {} frontends of no service, removed",
                all.len() - kept.len()
            ));
            if kept.is_empty() {
                maps.delete_endpoint(&endpoint_key(addr, proto))?;
            } else {
                maps.put_endpoint(&endpoint_key(addr, proto), &endpoint_value(&kept))?;
            }
        }
        if !kept.is_empty() {
            p.endpoints.insert((addr, proto), kept);
        }
    }
    Ok(())
}

/// The source-NAT settings `SNAT_CONFIG` holds (None: never written).
fn source_nat(c: &SnatConfig) -> Option<SourceNat> {
    if *c == SnatConfig::default() {
        return None;
    }
    let v4 = (c.addr4 != [0; 4]).then(|| words_addr(&c.addr4, family::V4));
    let v6 = (c.addr6 != [0; 4]).then(|| words_addr(&c.addr6, family::V6));
    Some(SourceNat {
        ipv4: match v4 {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        },
        ipv6: match v6 {
            Some(IpAddr::V6(a)) => Some(a),
            _ => None,
        },
        ports: (c.port_min, c.port_max),
    })
}

/// The prefix of a `SOURCE_RANGES` key (its length counts the 32 bits of the service id
/// first; IPv4 addresses are mapped into IPv6).
fn range_net(len: u32, addr: &[u32; 4]) -> Option<IpNet> {
    let bits = len.checked_sub(32)?;
    let v4 = addr[..3] == lb_common::V4_MAPPED_PREFIX && bits >= 96;
    if v4 {
        let ip = words_addr(addr, family::V4);
        IpNet::new(ip, u8::try_from(bits - 96).ok()?).ok()
    } else {
        let ip = words_addr(addr, family::V6);
        IpNet::new(ip, u8::try_from(bits).ok()?).ok()
    }
}
