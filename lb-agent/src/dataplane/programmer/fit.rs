//! Which services fit the data plane's fixed limits, decided before anything is written, so
//! that one service that cannot fit never makes the whole change fail: it is left out (its
//! previous version, if it had one, stays programmed) and everything else is programmed.
//!
//! The limits: service ids (`dataplane.max_services`), backend ids (`dataplane.max_backends`),
//! source-range prefixes over all services ([`limits::MAX_SOURCE_RANGES`]) and the frontends
//! one backend endpoint may serve ([`MAX_ENDPOINT_FRONTENDS`]). A changed service holds its
//! old and new backends and ranges at once while it switches over, so it is counted with
//! both: what is admitted can be written in any order without running out.
//!
//! Whole services (every frontend of one name) are admitted or left out. Services already
//! programmed go first, in name order, then new ones: a new service never pushes out one that
//! is served.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use lb_common::limits::{self, MAX_ENDPOINT_FRONTENDS};
use serde::Serialize;

use super::Programmer;
use crate::model::{DesiredState, Frontend, Protocol, Scope, Service};

/// A service (all frontends of one name) that does not fit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeftOut {
    pub name: String,
    /// Which limit: `services`, `backends`, `source_ranges` or `endpoint_frontends`.
    pub limit: &'static str,
    /// What does not fit, and what to do about it.
    pub reason: String,
    /// Its previous version stays programmed (false: it is not served at all).
    pub kept_previous: bool,
}

/// What a group of services takes while it is written.
#[derive(Default)]
struct Demand {
    services: u64,
    backends: u64,
    ranges: u64,
    endpoints: BTreeMap<(SocketAddr, Protocol), usize>,
}

/// What the admitted services take.
#[derive(Default)]
struct Usage {
    services: u64,
    backends: u64,
    ranges: u64,
    endpoints: HashMap<(SocketAddr, Protocol), usize>,
}

impl Usage {
    /// Whether `d` fits on top (the limit it breaks and why when not).
    fn check(&self, d: &Demand, p: &Programmer) -> Result<(), (&'static str, String)> {
        let max_services = u64::from(p.service_ids.limit - 1);
        if self.services + d.services > max_services {
            return Err((
                "services",
                format!(
                    "its {} frontends do not fit: {} of dataplane.max_services ({max_services}) are taken; raise dataplane.max_services",
                    d.services, self.services
                ),
            ));
        }
        let max_backends = u64::from(p.backend_ids.limit - 1);
        if self.backends + d.backends > max_backends {
            return Err((
                "backends",
                format!(
                    "its {} backends do not fit: {} of dataplane.max_backends ({max_backends}) are taken; raise dataplane.max_backends",
                    d.backends, self.backends
                ),
            ));
        }
        let max_ranges = u64::from(limits::MAX_SOURCE_RANGES);
        if self.ranges + d.ranges > max_ranges {
            return Err((
                "source_ranges",
                format!(
                    "its {} source-range prefixes do not fit: the data plane holds {max_ranges} over all services and {} are taken; use fewer, wider ranges",
                    d.ranges, self.ranges
                ),
            ));
        }
        for ((addr, protocol), n) in &d.endpoints {
            let have = self
                .endpoints
                .get(&(*addr, *protocol))
                .copied()
                .unwrap_or(0);
            if have + n > MAX_ENDPOINT_FRONTENDS {
                return Err((
                    "endpoint_frontends",
                    format!(
                        "backend {addr}/{protocol} would serve {} frontends, and one endpoint may serve at most {MAX_ENDPOINT_FRONTENDS} (addresses × ports × node addresses that reach it)",
                        have + n
                    ),
                ));
            }
        }
        Ok(())
    }

    fn add(&mut self, d: &Demand) {
        self.services += d.services;
        self.backends += d.backends;
        self.ranges += d.ranges;
        for (k, n) in &d.endpoints {
            *self.endpoints.entry(*k).or_default() += n;
        }
    }

    fn sub(&mut self, d: &Demand) {
        self.services -= d.services;
        self.backends -= d.backends;
        self.ranges -= d.ranges;
        for (k, n) in &d.endpoints {
            if let Some(have) = self.endpoints.get_mut(k) {
                *have -= n;
            }
        }
    }
}

impl Programmer {
    /// `desired` with every service that does not fit the data plane's limits left out:
    /// replaced by its version in `previous` (what was applied last, programmed now) when it
    /// has one, else dropped. Services keep their order.
    ///
    /// What is programmed now is reserved first, so that keeping a previous version always
    /// fits; each service then trades its reservation for what its new version takes.
    pub fn fit(
        &self,
        desired: &DesiredState,
        previous: &DesiredState,
    ) -> (DesiredState, Vec<LeftOut>) {
        fn groups(state: &DesiredState) -> BTreeMap<&str, Vec<&Arc<Service>>> {
            let mut g: BTreeMap<&str, Vec<&Arc<Service>>> = BTreeMap::new();
            for s in &state.services {
                g.entry(s.name.as_str()).or_default().push(s);
            }
            g
        }
        let (wanted, before) = (groups(desired), groups(previous));
        let mut programmed: BTreeMap<&str, Vec<&Arc<Service>>> = BTreeMap::new();
        for p in self.services.values() {
            programmed
                .entry(p.spec.name.as_str())
                .or_default()
                .push(&p.spec);
        }
        let order = wanted
            .keys()
            .filter(|n| programmed.contains_key(*n))
            .chain(wanted.keys().filter(|n| !programmed.contains_key(*n)));

        let mut usage = Usage::default();
        let mut taken: BTreeMap<Frontend, &str> = BTreeMap::new();
        for (name, specs) in programmed.iter().filter(|(n, _)| wanted.contains_key(*n)) {
            usage.add(&self.demand(specs));
            taken.extend(specs.iter().map(|s| (s.frontend, *name)));
        }
        let mut admitted: BTreeSet<(&str, bool)> = BTreeSet::new();
        let mut left_out = Vec::new();
        for name in order {
            let group = &wanted[name];
            // Programmed as it is wanted: its reservation is what it takes, and nothing
            // admitted before it could overlap what it holds.
            if programmed.get(name).is_some_and(|specs| {
                specs.len() == group.len()
                    && group.iter().all(|s| {
                        self.services
                            .get(&s.frontend)
                            .is_some_and(|p| p.spec == **s)
                    })
            }) {
                admitted.insert((name, false));
                continue;
            }
            // Its reservation is traded for the new version, or kept when that does not fit.
            let reserved = programmed.get(name).map(|specs| self.demand(specs));
            if let Some(r) = &reserved {
                usage.sub(r);
                for s in &programmed[name] {
                    if taken.get(&s.frontend) == Some(name) {
                        taken.remove(&s.frontend);
                    }
                }
            }
            let demand = self.demand(group);
            let outcome = match group
                .iter()
                .find_map(|s| overlapping(&taken, &s.frontend).map(|other| (s.frontend, other)))
            {
                Some((f, other)) => Err((
                    "services",
                    format!("{f} is still served by the previous version of {other}"),
                )),
                None => usage.check(&demand, self),
            };
            let Err((limit, reason)) = outcome else {
                usage.add(&demand);
                taken.extend(group.iter().map(|s| (s.frontend, *name)));
                admitted.insert((name, false));
                continue;
            };
            let kept = reserved.is_some() && before.contains_key(name);
            if kept {
                let old = &before[name];
                usage.add(&self.demand(old));
                taken.extend(old.iter().map(|s| (s.frontend, *name)));
                admitted.insert((name, true));
            }
            left_out.push(LeftOut {
                name: (*name).to_string(),
                limit,
                reason,
                kept_previous: kept,
            });
        }
        let services = desired
            .services
            .iter()
            .filter(|s| admitted.contains(&(s.name.as_str(), false)))
            .chain(
                previous
                    .services
                    .iter()
                    .filter(|s| admitted.contains(&(s.name.as_str(), true))),
            )
            .cloned();
        let mut services: Vec<Arc<Service>> = services.collect();
        services.sort_by(|a, b| (&a.name, a.frontend).cmp(&(&b.name, b.frontend)));
        (
            DesiredState {
                services,
                source_nat: desired.source_nat,
            },
            left_out,
        )
    }

    /// What `group` takes while it is written: for a frontend programmed now, the union of
    /// its old and new backends and ranges.
    fn demand(&self, group: &[&Arc<Service>]) -> Demand {
        let mut d = Demand::default();
        for s in group {
            let old = self.services.get(&s.frontend).map(|p| &p.spec);
            let backends: BTreeSet<SocketAddr> = s
                .backends
                .iter()
                .chain(old.iter().flat_map(|o| o.backends.iter()))
                .map(|b| b.addr)
                .collect();
            let ranges = s
                .source_ranges
                .iter()
                .chain(old.iter().flat_map(|o| o.source_ranges.iter()))
                .collect::<BTreeSet<_>>()
                .len();
            d.services += 1;
            d.backends += backends.len() as u64;
            d.ranges += ranges as u64;
            for addr in backends {
                *d.endpoints.entry((addr, s.frontend.protocol)).or_default() += 1;
            }
        }
        d
    }
}

/// The service of a frontend in `taken` that a client could reach as well as `f`. Frontends
/// order by address, port and protocol before scope: the candidates are neighbours.
fn overlapping<'a>(taken: &BTreeMap<Frontend, &'a str>, f: &Frontend) -> Option<&'a str> {
    let first = Frontend {
        scope: Scope::Both,
        ..*f
    };
    taken
        .range(first..)
        .take_while(|(t, _)| (t.vip, t.port, t.protocol) == (f.vip, f.port, f.protocol))
        .find(|(t, _)| t.overlaps(f))
        .map(|(_, name)| *name)
}
