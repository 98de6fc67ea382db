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

/// What the programmed services take (the programmer keeps it as it writes them).
#[derive(Clone, Debug, Default)]
pub(super) struct Usage {
    services: u64,
    backends: u64,
    ranges: u64,
    endpoints: HashMap<(SocketAddr, Protocol), usize>,
}

impl Usage {
    /// What `specs` (programmed services) take.
    pub(super) fn of<'a>(specs: impl IntoIterator<Item = &'a Service>) -> Self {
        let mut u = Self::default();
        for s in specs {
            u.add_spec(s);
        }
        u
    }

    /// A programmed service's share: one id, an id per backend, its ranges, one frontend
    /// for each of its endpoints.
    pub(super) fn add_spec(&mut self, s: &Service) {
        self.services += 1;
        self.backends += s.backends.len() as u64;
        self.ranges += s.source_ranges.len() as u64;
        for b in &s.backends {
            *self
                .endpoints
                .entry((b.addr, s.frontend.protocol))
                .or_default() += 1;
        }
    }

    pub(super) fn sub_spec(&mut self, s: &Service) {
        self.services -= 1;
        self.backends -= s.backends.len() as u64;
        self.ranges -= s.source_ranges.len() as u64;
        for b in &s.backends {
            let key = (b.addr, s.frontend.protocol);
            if let Some(n) = self.endpoints.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.endpoints.remove(&key);
                }
            }
        }
    }
}

/// What the admitted services take while fitting: a base (what is programmed, or nothing)
/// and the changes on top, so that fitting a few changed services does not copy the counts
/// of all the others.
struct Tally<'a> {
    base: &'a Usage,
    services: i64,
    backends: i64,
    ranges: i64,
    endpoints: HashMap<(SocketAddr, Protocol), i64>,
}

impl<'a> Tally<'a> {
    fn over(base: &'a Usage) -> Self {
        Self {
            base,
            services: 0,
            backends: 0,
            ranges: 0,
            endpoints: HashMap::new(),
        }
    }

    fn total(base: u64, delta: i64) -> u64 {
        base.saturating_add_signed(delta)
    }

    fn endpoint(&self, key: &(SocketAddr, Protocol)) -> usize {
        let base = self.base.endpoints.get(key).copied().unwrap_or(0);
        let delta = self.endpoints.get(key).copied().unwrap_or(0);
        (base as i64 + delta).max(0) as usize
    }

    /// Whether `d` fits on top (the limit it breaks and why when not).
    fn check(&self, d: &Demand, p: &Programmer) -> Result<(), (&'static str, String)> {
        let services = Self::total(self.base.services, self.services);
        let backends = Self::total(self.base.backends, self.backends);
        let ranges = Self::total(self.base.ranges, self.ranges);
        let max_services = u64::from(p.service_ids.limit - 1);
        if services + d.services > max_services {
            return Err((
                "services",
                format!(
                    "its {} frontends do not fit: {services} of dataplane.max_services ({max_services}) are taken; raise dataplane.max_services",
                    d.services
                ),
            ));
        }
        let max_backends = u64::from(p.backend_ids.limit - 1);
        if backends + d.backends > max_backends {
            return Err((
                "backends",
                format!(
                    "its {} backends do not fit: {backends} of dataplane.max_backends ({max_backends}) are taken; raise dataplane.max_backends",
                    d.backends
                ),
            ));
        }
        let max_ranges = u64::from(limits::MAX_SOURCE_RANGES);
        if ranges + d.ranges > max_ranges {
            return Err((
                "source_ranges",
                format!(
                    "its {} source-range prefixes do not fit: the data plane holds {max_ranges} over all services and {ranges} are taken; use fewer, wider ranges",
                    d.ranges
                ),
            ));
        }
        for (key, n) in &d.endpoints {
            let have = self.endpoint(key);
            if have + n > MAX_ENDPOINT_FRONTENDS {
                let (addr, protocol) = key;
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
        self.change(d, 1);
    }

    fn sub(&mut self, d: &Demand) {
        self.change(d, -1);
    }

    fn change(&mut self, d: &Demand, sign: i64) {
        self.services += sign * d.services as i64;
        self.backends += sign * d.backends as i64;
        self.ranges += sign * d.ranges as i64;
        for (k, n) in &d.endpoints {
            *self.endpoints.entry(*k).or_default() += sign * *n as i64;
        }
    }
}

/// The frontends taken while fitting: the programmed ones (but those released) and those
/// taken since.
struct Taken<'a> {
    programmed: Option<&'a BTreeMap<Frontend, super::ProgrammedService>>,
    released: BTreeSet<Frontend>,
    added: BTreeMap<Frontend, &'a str>,
}

impl<'a> Taken<'a> {
    fn take(&mut self, f: Frontend, name: &'a str) {
        self.added.insert(f, name);
    }

    fn release(&mut self, f: &Frontend, name: &str) {
        match self.added.get(f) {
            Some(n) if *n == name => {
                self.added.remove(f);
            }
            Some(_) => {}
            None => {
                if self
                    .programmed
                    .and_then(|p| p.get(f))
                    .is_some_and(|p| p.spec.name == name)
                {
                    self.released.insert(*f);
                }
            }
        }
    }

    /// The service of a taken frontend that a client could reach as well as `f`.
    fn overlapping(&self, f: &Frontend) -> Option<&'a str> {
        if let Some(name) = overlapping(&self.added, f) {
            return Some(name);
        }
        let first = Frontend {
            scope: Scope::Both,
            ..*f
        };
        self.programmed?
            .range(first..)
            .take_while(|(t, _)| (t.vip, t.port, t.protocol) == (f.vip, f.port, f.protocol))
            .find(|(t, _)| {
                t.overlaps(f) && !self.released.contains(t) && !self.added.contains_key(t)
            })
            .map(|(_, p)| p.spec.name.as_str())
    }
}

/// The services of `name` in `state` (sorted by name: one run).
fn group<'a>(state: &'a DesiredState, name: &str) -> &'a [Arc<Service>] {
    let from = state.services.partition_point(|s| s.name.as_str() < name);
    let to = from + state.services[from..].partition_point(|s| s.name == name);
    &state.services[from..to]
}

impl Programmer {
    /// `desired` with every service that does not fit the data plane's limits left out:
    /// replaced by its version in `previous` (what was applied last, programmed now) when it
    /// has one, else dropped. Services keep their order.
    ///
    /// What is programmed now is reserved first, so that keeping a previous version always
    /// fits; each service then trades its reservation for what its new version takes.
    ///
    /// While the maps hold what `previous` asked for (the last apply succeeded), only the
    /// services that differ from `previous` are weighed, against the usage the programmer
    /// keeps: the others are programmed as they are wanted and keep what they hold.
    pub fn fit(
        &self,
        desired: &DesiredState,
        previous: &DesiredState,
    ) -> (DesiredState, Vec<LeftOut>) {
        if !self.synced {
            return self.fit_all(desired, previous);
        }
        let fitted = self.fit_changes(desired, previous);
        #[cfg(debug_assertions)]
        assert_eq!(
            fitted,
            self.fit_all(desired, previous),
            "fitting the changes gives what fitting everything gives"
        );
        fitted
    }

    /// [`Programmer::fit`] of the names that differ between `previous` and `desired`.
    fn fit_changes(
        &self,
        desired: &DesiredState,
        previous: &DesiredState,
    ) -> (DesiredState, Vec<LeftOut>) {
        let changed = previous.changed_names(desired);
        if changed.is_empty() {
            return (desired.clone(), Vec::new());
        }
        let mut tally = Tally::over(&self.usage);
        let mut taken = Taken {
            programmed: Some(&self.services),
            released: BTreeSet::new(),
            added: BTreeMap::new(),
        };
        // What each name holds in the maps: its previous version's frontends.
        let held = |name: &str| -> Vec<&Arc<Service>> {
            group(previous, name)
                .iter()
                .filter_map(|s| self.services.get(&s.frontend).map(|p| &p.spec))
                .collect()
        };
        // Programmed services no longer wanted hold nothing.
        for name in &changed {
            if group(desired, name).is_empty() {
                let specs = held(name);
                tally.sub(&self.demand(&specs));
                for s in specs {
                    taken.release(&s.frontend, name);
                }
            }
        }
        let wanted = |n: &&str| !group(desired, n).is_empty();
        let programmed = |n: &&str| !held(n).is_empty();
        let order = changed
            .iter()
            .filter(|n| wanted(n) && programmed(n))
            .chain(changed.iter().filter(|n| wanted(n) && !programmed(n)));
        let mut admitted: BTreeSet<(&str, bool)> = BTreeSet::new();
        let mut left_out = Vec::new();
        for name in order {
            let group_now: Vec<&Arc<Service>> = group(desired, name).iter().collect();
            let group_before: Vec<&Arc<Service>> = group(previous, name).iter().collect();
            let specs = held(name);
            self.weigh(
                name,
                &group_now,
                (!specs.is_empty()).then_some(&specs),
                &group_before,
                (&mut tally, &mut taken),
                (&mut admitted, &mut left_out),
            );
        }
        if left_out.is_empty() {
            return (desired.clone(), left_out);
        }
        let fitted = assemble(desired, previous, |name, previous| {
            if previous {
                admitted.contains(&(name, true))
            } else {
                !changed.contains(name) || admitted.contains(&(name, false))
            }
        });
        (fitted, left_out)
    }

    /// [`Programmer::fit`] of every service, when the maps may not hold what `previous`
    /// asked for.
    fn fit_all(
        &self,
        desired: &DesiredState,
        previous: &DesiredState,
    ) -> (DesiredState, Vec<LeftOut>) {
        fn groups(state: &DesiredState) -> BTreeMap<&str, Vec<&Arc<Service>>> {
            let mut g: BTreeMap<&str, Vec<&Arc<Service>>> = BTreeMap::new();
            for s in state.services.iter() {
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

        let nothing = Usage::default();
        let mut tally = Tally::over(&nothing);
        let mut taken = Taken {
            programmed: None,
            released: BTreeSet::new(),
            added: BTreeMap::new(),
        };
        for (name, specs) in programmed.iter().filter(|(n, _)| wanted.contains_key(*n)) {
            tally.add(&self.demand(specs));
            for s in specs {
                taken.take(s.frontend, name);
            }
        }
        let mut admitted: BTreeSet<(&str, bool)> = BTreeSet::new();
        let mut left_out = Vec::new();
        for name in order {
            self.weigh(
                name,
                &wanted[name],
                programmed.get(name),
                before.get(name).map_or(&[][..], Vec::as_slice),
                (&mut tally, &mut taken),
                (&mut admitted, &mut left_out),
            );
        }
        let fitted = assemble(desired, previous, |name, previous| {
            admitted.contains(&(name, previous))
        });
        (fitted, left_out)
    }

    /// Admits the services of `name`: `group` (its new version) if it fits, else `before`
    /// (its previous version) if it has one programmed (`held`), else nothing; records
    /// which in `admitted` (`(name, true)`: the previous version) and why in `left_out`.
    fn weigh<'a>(
        &self,
        name: &'a str,
        group: &[&'a Arc<Service>],
        held: Option<&Vec<&'a Arc<Service>>>,
        before: &[&'a Arc<Service>],
        (tally, taken): (&mut Tally<'_>, &mut Taken<'a>),
        (admitted, left_out): (&mut BTreeSet<(&'a str, bool)>, &mut Vec<LeftOut>),
    ) {
        // Programmed as it is wanted: its reservation is what it takes, and nothing
        // admitted before it could overlap what it holds.
        if held.is_some_and(|specs| {
            specs.len() == group.len()
                && group.iter().all(|s| {
                    self.services
                        .get(&s.frontend)
                        .is_some_and(|p| p.spec == **s)
                })
        }) {
            admitted.insert((name, false));
            return;
        }
        // Its reservation is traded for the new version, or kept when that does not fit.
        let reserved = held.map(|specs| self.demand(specs));
        if let Some(r) = &reserved {
            tally.sub(r);
            for s in held.into_iter().flatten() {
                taken.release(&s.frontend, name);
            }
        }
        let demand = self.demand(group);
        let outcome = match group.iter().find_map(|s| {
            taken
                .overlapping(&s.frontend)
                .map(|other| (s.frontend, other))
        }) {
            Some((f, other)) => Err((
                "services",
                format!("{f} is still served by the previous version of {other}"),
            )),
            None => tally.check(&demand, self),
        };
        let Err((limit, reason)) = outcome else {
            tally.add(&demand);
            for s in group {
                taken.take(s.frontend, name);
            }
            admitted.insert((name, false));
            return;
        };
        let kept = reserved.is_some() && !before.is_empty();
        if kept {
            tally.add(&self.demand(before));
            for s in before {
                taken.take(s.frontend, name);
            }
            admitted.insert((name, true));
        }
        left_out.push(LeftOut {
            name: name.to_string(),
            limit,
            reason,
            kept_previous: kept,
        });
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

/// The services of `desired` and of `previous` that `admitted(name, from_previous)` lets
/// through, in order.
fn assemble(
    desired: &DesiredState,
    previous: &DesiredState,
    admitted: impl Fn(&str, bool) -> bool,
) -> DesiredState {
    let mut services: Vec<Arc<Service>> = desired
        .services
        .iter()
        .filter(|s| admitted(&s.name, false))
        .chain(previous.services.iter().filter(|s| admitted(&s.name, true)))
        .cloned()
        .collect();
    services.sort_by(|a, b| (&a.name, a.frontend).cmp(&(&b.name, b.frontend)));
    DesiredState {
        services: Arc::new(services),
        source_nat: desired.source_nat,
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
