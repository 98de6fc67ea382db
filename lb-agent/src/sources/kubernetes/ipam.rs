//! Address management for Services of type LoadBalancer: a pure allocator over the `IPPool`s.
//!
//! Invariants (checked by property tests):
//! - an address is held by one Service, or by several that share it: the same sharing key
//!   (`weir.dev/allow-shared-ip`) and pairwise disjoint (protocol, port) sets;
//! - every held address lies in a pool that allows its Service (namespace, labels), and in the
//!   pool the Service asked for, if it asked;
//! - a Service keeps its addresses while they still satisfy its request (no reshuffling when
//!   anything else changes, and none after a leader change: the new leader adopts what the
//!   Services' status says first);
//! - a failed request changes nothing; a released Service's addresses are free again.

use super::SpecError;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::crd::IPPoolSpec;
use crate::model::Protocol;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// An inclusive range of addresses of one family, as integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrRange {
    pub family: Family,
    pub first: u128,
    pub last: u128,
}

fn to_int(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_int(family: Family, n: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

impl AddrRange {
    /// `198.18.100.0/28`, `fd00::/120`, `198.18.100.10-198.18.100.20`, or one address.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let text = text.trim();
        if let Some((a, b)) = text.split_once('-') {
            let (a, b): (IpAddr, IpAddr) = (
                a.trim()
                    .parse()
                    .map_err(|_| SpecError::new(format!("{a:?} is not an address")))?,
                b.trim()
                    .parse()
                    .map_err(|_| SpecError::new(format!("{b:?} is not an address")))?,
            );
            if Family::of(a) != Family::of(b) {
                return Err(SpecError::new(format!("{text:?} mixes IPv4 and IPv6")));
            }
            let (first, last) = (to_int(a), to_int(b));
            if first > last {
                return Err(SpecError::new(format!(
                    "{text:?}: the first address is after the last"
                )));
            }
            return Ok(Self {
                family: Family::of(a),
                first,
                last,
            });
        }
        if let Ok(net) = text.parse::<ipnet::IpNet>() {
            if net.network() != net.addr() {
                return Err(SpecError::new(format!(
                    "{text:?} has host bits set (did you mean {}?)",
                    net.trunc()
                )));
            }
            return Ok(Self {
                family: Family::of(net.addr()),
                first: to_int(net.network()),
                last: to_int(net.broadcast()),
            });
        }
        let ip: IpAddr = text.parse().map_err(|_| {
            SpecError::new(format!(
                "{text:?} is neither a CIDR, a range (A-B) nor an address"
            ))
        })?;
        Ok(Self {
            family: Family::of(ip),
            first: to_int(ip),
            last: to_int(ip),
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family && (self.first..=self.last).contains(&to_int(ip))
    }

    fn len(&self) -> u128 {
        (self.last - self.first).saturating_add(1)
    }
}

/// A label selector, evaluated against a Service's labels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector(pub LabelSelector);

impl Selector {
    /// Whether `labels` match (`matchLabels` and every `matchExpressions` term).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let s = &self.0;
        let labels_ok = s
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v));
        let exprs_ok = s.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let have = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => have.is_some_and(|h| values.contains(h)),
                "NotIn" => have.is_none_or(|h| !values.contains(h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        });
        labels_ok && exprs_ok
    }

    /// Refuses operators the API server would refuse too.
    pub fn check(&self) -> Result<(), SpecError> {
        for e in self.0.match_expressions.iter().flatten() {
            let n = e.values.as_ref().map_or(0, Vec::len);
            match (e.operator.as_str(), n) {
                ("In" | "NotIn", 1..) | ("Exists" | "DoesNotExist", 0) => {}
                ("In" | "NotIn", 0) => {
                    return Err(SpecError::new(format!(
                        "selector {} {}: needs values",
                        e.key, e.operator
                    )));
                }
                ("Exists" | "DoesNotExist", _) => {
                    return Err(SpecError::new(format!(
                        "selector {} {}: takes no values",
                        e.key, e.operator
                    )));
                }
                (op, _) => {
                    return Err(SpecError::new(format!(
                        "selector {}: unknown operator {op:?}",
                        e.key
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A validated pool.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub name: String,
    pub ranges: Vec<AddrRange>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    /// Namespaces allowed (all, when empty).
    pub namespaces: Vec<String>,
    pub selector: Option<Selector>,
    /// Its IPPool's spec is invalid now: the addresses it gave out stay with their Services,
    /// and it gives out no new ones until the spec is fixed.
    pub frozen: bool,
}

impl Pool {
    /// Validates an `IPPool`'s spec; the error names the field.
    pub fn from_spec(name: &str, spec: &IPPoolSpec) -> Result<Self, SpecError> {
        if spec.addresses.is_empty() {
            return Err(SpecError::new("spec.addresses: empty"));
        }
        let ranges = spec
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| AddrRange::parse(a).map_err(|e| e.at(&format!("spec.addresses[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let alloc = spec.service_allocation.clone().unwrap_or_default();
        let selector = alloc.service_selector.map(Selector);
        if let Some(s) = &selector {
            s.check()
                .map_err(|e| e.at("spec.serviceAllocation.serviceSelector"))?;
        }
        Ok(Self {
            name: name.to_string(),
            ranges,
            auto_assign: spec.auto_assign,
            avoid_buggy_ips: spec.avoid_buggy_ips,
            namespaces: alloc.namespaces,
            selector,
            frozen: false,
        })
    }

    /// What an IPPool whose spec is invalid still holds: the ranges of `spec.addresses` that
    /// parse, frozen. (An allocator that knew the pool when it was valid keeps that version
    /// instead: see [`Allocator::set_pools`].)
    pub fn frozen(name: &str, spec: &IPPoolSpec) -> Self {
        Self {
            name: name.to_string(),
            ranges: spec
                .addresses
                .iter()
                .filter_map(|a| AddrRange::parse(a).ok())
                .collect(),
            auto_assign: false,
            avoid_buggy_ips: spec.avoid_buggy_ips,
            namespaces: Vec::new(),
            selector: None,
            frozen: true,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip)) && !self.buggy(ip)
    }

    fn buggy(&self, ip: IpAddr) -> bool {
        self.avoid_buggy_ips
            && matches!(ip, IpAddr::V4(a) if a.octets()[3] == 0 || a.octets()[3] == 255)
    }

    /// Whether the Service of `req` may take addresses from this pool.
    pub fn allows(&self, req: &Request) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&req.namespace))
            && self
                .selector
                .as_ref()
                .is_none_or(|s| s.matches(&req.labels))
    }

    /// Addresses of `family` the pool can hand out (buggy ones excluded).
    pub fn size(&self, family: Option<Family>) -> u128 {
        self.ranges
            .iter()
            .filter(|r| family.is_none_or(|f| f == r.family))
            .map(|r| {
                if self.avoid_buggy_ips && r.family == Family::V4 {
                    r.len() - count_last_octet(r, 0) - count_last_octet(r, 255)
                } else {
                    r.len()
                }
            })
            .fold(0u128, u128::saturating_add)
    }
}

/// How many addresses of an IPv4 range end in `octet`.
fn count_last_octet(r: &AddrRange, octet: u128) -> u128 {
    // Those x in [0, n] with x % 256 == octet.
    let upto = |n: u128| -> u128 { if n < octet { 0 } else { (n - octet) / 256 + 1 } };
    upto(r.last) - if r.first == 0 { 0 } else { upto(r.first - 1) }
}

/// What a Service asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `namespace/name`.
    pub service: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// One address per family, in this order (`spec.ipFamilies`).
    pub families: Vec<Family>,
    /// Addresses asked for by annotation (their families replace `families`).
    pub addresses: Vec<IpAddr>,
    /// The pool asked for by annotation.
    pub pool: Option<String>,
    /// The sharing key (`weir.dev/allow-shared-ip`).
    pub sharing: Option<String>,
    pub ports: BTreeSet<(Protocol, u16)>,
}

/// Why a request cannot be met. Nothing changes when one is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no IPPool named {0:?}")]
    NoSuchPool(String),
    #[error(
        "IPPool {0:?} has an invalid spec: it keeps the addresses it gave out and gives out no new ones until it is fixed"
    )]
    PoolFrozen(String),
    #[error("IPPool {pool:?} does not allow this Service (namespace or labels)")]
    PoolNotAllowed { pool: String },
    #[error("{ip} is in no IPPool{}", .pool.as_ref().map(|p| format!(" named {p:?}")).unwrap_or_default() )]
    NotInPool { ip: IpAddr, pool: Option<String> },
    #[error(
        "{ip} is in use by {by} and cannot be shared (sharing needs the same allow-shared-ip key on both and no common port)"
    )]
    InUse { ip: IpAddr, by: String },
    #[error("no free {family} address in {}", if .pools.is_empty() { "any IPPool that allows this Service".to_string() } else { format!("IPPool {}", .pools.join(", ")) })]
    Exhausted { family: Family, pools: Vec<String> },
    #[error("two addresses of the same family were asked for: {0:?}")]
    TwoOfAFamily(Vec<IpAddr>),
    #[error("no address family: the Service has no spec.ipFamilies")]
    NoFamily,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Holding {
    ips: Vec<IpAddr>,
    request: Request,
}

/// Pools and who holds which address.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocator {
    pools: BTreeMap<String, Pool>,
    held: BTreeMap<String, Holding>,
    by_ip: BTreeMap<IpAddr, BTreeSet<String>>,
}

impl Allocator {
    /// Replaces the pools. Services whose addresses no longer fit lose them (they are
    /// returned, to be assigned again). A frozen pool (its spec became invalid) that was
    /// known valid keeps that valid version's ranges, frozen: what it gave out stays given.
    pub fn set_pools(&mut self, pools: impl IntoIterator<Item = Pool>) -> Vec<String> {
        let before = std::mem::take(&mut self.pools);
        self.pools = pools
            .into_iter()
            .map(|p| {
                let p = match before.get(&p.name) {
                    Some(known) if p.frozen => Pool {
                        frozen: true,
                        ..known.clone()
                    },
                    _ => p,
                };
                (p.name.clone(), p)
            })
            .collect();
        let orphans: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| !h.ips.iter().all(|ip| self.fits(*ip, &h.request)))
            .map(|(s, _)| s.clone())
            .collect();
        for s in &orphans {
            self.release(s);
        }
        orphans
    }

    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values()
    }

    /// The addresses `service` holds.
    pub fn held(&self, service: &str) -> Option<&[IpAddr]> {
        self.held.get(service).map(|h| h.ips.as_slice())
    }

    /// Every holder, for status and tests.
    pub fn holders(&self) -> impl Iterator<Item = (&str, &[IpAddr])> {
        self.held
            .iter()
            .map(|(s, h)| (s.as_str(), h.ips.as_slice()))
    }

    /// Addresses of `pool` in use (a shared one counts once).
    pub fn assigned_in(&self, pool: &str) -> u64 {
        let Some(p) = self.pools.get(pool) else {
            return 0;
        };
        self.by_ip.keys().filter(|ip| p.contains(**ip)).count() as u64
    }

    /// Frees `service`'s addresses.
    pub fn release(&mut self, service: &str) {
        if let Some(h) = self.held.remove(service) {
            for ip in h.ips {
                if let Some(users) = self.by_ip.get_mut(&ip) {
                    users.remove(service);
                    if users.is_empty() {
                        self.by_ip.remove(&ip);
                    }
                }
            }
        }
    }

    /// Gives `req.service` addresses: what it holds if that still fits the request, else
    /// `previous` (what its status says, from an earlier leader) if that fits, else new ones.
    /// On error nothing changes.
    pub fn assign(
        &mut self,
        req: &Request,
        previous: &[IpAddr],
    ) -> Result<Vec<IpAddr>, AllocError> {
        if let Some(h) = self.held.get(&req.service)
            && self.satisfies(&h.ips, req, Some(&req.service))
        {
            let ips = h.ips.clone();
            self.held.insert(
                req.service.clone(),
                Holding {
                    ips: ips.clone(),
                    request: req.clone(),
                },
            );
            return Ok(ips);
        }
        let ips = if !previous.is_empty() && self.satisfies(previous, req, Some(&req.service)) {
            previous.to_vec()
        } else {
            self.choose(req)?
        };
        self.release(&req.service);
        for ip in &ips {
            self.by_ip
                .entry(*ip)
                .or_default()
                .insert(req.service.clone());
        }
        self.held.insert(
            req.service.clone(),
            Holding {
                ips: ips.clone(),
                request: req.clone(),
            },
        );
        Ok(ips)
    }

    /// The families `req` needs, in order.
    fn families(req: &Request) -> Result<Vec<Family>, AllocError> {
        if !req.addresses.is_empty() {
            let fams: Vec<Family> = req.addresses.iter().map(|a| Family::of(*a)).collect();
            let unique: BTreeSet<_> = fams.iter().collect();
            if unique.len() != fams.len() {
                return Err(AllocError::TwoOfAFamily(req.addresses.clone()));
            }
            return Ok(fams);
        }
        if req.families.is_empty() {
            return Err(AllocError::NoFamily);
        }
        Ok(req.families.clone())
    }

    /// Whether `req` may keep `ip`: it lies in a pool `req` may use (the one it named, if it
    /// named one), or in a frozen pool, whose addresses stay with whoever holds them.
    fn fits(&self, ip: IpAddr, req: &Request) -> bool {
        self.pools.values().any(|p| {
            p.contains(ip)
                && (p.frozen || p.allows(req))
                && req.pool.as_ref().is_none_or(|n| *n == p.name)
        })
    }

    /// Whether `ip` may be newly given to `req`: as [`Self::fits`], frozen pools aside.
    fn fits_new(&self, ip: IpAddr, req: &Request) -> bool {
        self.pools.values().any(|p| {
            !p.frozen
                && p.contains(ip)
                && p.allows(req)
                && req.pool.as_ref().is_none_or(|n| *n == p.name)
        })
    }

    /// Whether `ip` may be held by `req` next to its current holders (other than `me`).
    fn shareable(&self, ip: IpAddr, req: &Request, me: Option<&String>) -> Result<(), AllocError> {
        for other in self.by_ip.get(&ip).into_iter().flatten() {
            if Some(other) == me {
                continue;
            }
            let o = &self.held[other].request;
            let ok = req.sharing.is_some()
                && req.sharing == o.sharing
                && req.ports.is_disjoint(&o.ports);
            if !ok {
                return Err(AllocError::InUse {
                    ip,
                    by: other.clone(),
                });
            }
        }
        Ok(())
    }

    fn satisfies(&self, ips: &[IpAddr], req: &Request, me: Option<&String>) -> bool {
        let Ok(families) = Self::families(req) else {
            return false;
        };
        let have: Vec<Family> = ips.iter().map(|ip| Family::of(*ip)).collect();
        have == families
            && (req.addresses.is_empty() || req.addresses == ips)
            && ips
                .iter()
                .all(|ip| self.fits(*ip, req) && self.shareable(*ip, req, me).is_ok())
    }

    /// The pools `req` may draw new addresses from, in name order.
    fn candidates(&self, req: &Request) -> Result<Vec<&Pool>, AllocError> {
        if let Some(name) = &req.pool {
            let p = self
                .pools
                .get(name)
                .ok_or_else(|| AllocError::NoSuchPool(name.clone()))?;
            if p.frozen {
                return Err(AllocError::PoolFrozen(name.clone()));
            }
            if !p.allows(req) {
                return Err(AllocError::PoolNotAllowed { pool: name.clone() });
            }
            return Ok(vec![p]);
        }
        Ok(self
            .pools
            .values()
            .filter(|p| p.auto_assign && !p.frozen && p.allows(req))
            .collect())
    }

    fn choose(&self, req: &Request) -> Result<Vec<IpAddr>, AllocError> {
        let families = Self::families(req)?;
        if !req.addresses.is_empty() {
            if req.pool.is_some() {
                // The named pool must exist and allow the Service.
                self.candidates(req)?;
            }
            for ip in &req.addresses {
                if !self.fits_new(*ip, req) {
                    return Err(AllocError::NotInPool {
                        ip: *ip,
                        pool: req.pool.clone(),
                    });
                }
                self.shareable(*ip, req, Some(&req.service))?;
            }
            return Ok(req.addresses.clone());
        }
        let pools = self.candidates(req)?;
        let mut out = Vec::new();
        for family in families {
            // A shared address first: one held by the same sharing key with no common port.
            let shared = req.sharing.as_ref().and_then(|_| {
                self.by_ip.keys().copied().find(|ip| {
                    Family::of(*ip) == family
                        && pools.iter().any(|p| p.contains(*ip))
                        && !self.by_ip[ip].contains(&req.service)
                        && self.shareable(*ip, req, Some(&req.service)).is_ok()
                })
            });
            let ip = shared.or_else(|| {
                pools
                    .iter()
                    .find_map(|p| self.first_free(p, family, &req.service))
            });
            out.push(ip.ok_or_else(|| AllocError::Exhausted {
                family,
                pools: req.pool.iter().cloned().collect(),
            })?);
        }
        Ok(out)
    }

    /// The lowest address of `family` in `pool` nobody else holds.
    fn first_free(&self, pool: &Pool, family: Family, me: &str) -> Option<IpAddr> {
        for r in pool.ranges.iter().filter(|r| r.family == family) {
            let mut n = r.first;
            loop {
                let ip = from_int(family, n);
                let free = self
                    .by_ip
                    .get(&ip)
                    .is_none_or(|users| users.iter().all(|u| u == me));
                if free && !pool.buggy(ip) {
                    return Some(ip);
                }
                if n == r.last {
                    break;
                }
                // Held addresses are few next to a range: this stops after at most as many
                // steps as there are holders.
                n += 1;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
