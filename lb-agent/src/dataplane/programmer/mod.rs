//! From desired state to map writes, applying only the difference.
//!
//! Ordering keeps every packet's view consistent:
//! - a new service is published (its `SERVICES` entry written) last, after its backends, table,
//!   source ranges and VIP entries;
//! - a changed service gets its new backends and a complete new table in a fresh table slot,
//!   then one `SERVICES` update switches to them; only then are removed backends cleared (their
//!   flows are steered again) and the old table dropped;
//! - a removed service is unpublished first, then cleaned up;
//! - the node's source-NAT settings are written before the services (whose backends may need
//!   them).
//!
//! A write that fails before the publishing write undoes what the service operation wrote, so
//! a service is either as it was or as desired. Backends kept across a change keep their ids,
//! so their flows stay on them.
//!
//! Ids (services, backends, tables) are reused oldest-freed-first and only after the fresh ones
//! run out, so a packet that read an id just before it was freed never meets its reuse. Backend
//! ids carry a generation, bumped on reuse, which flows remember.

mod adopt;
mod fit;

pub use adopt::AdoptReport;
pub use fit::LeftOut;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;
use lb_common::{
    BackendValue, EndpointFrontend, EndpointValue, ServiceKey, ServiceValue, SnatConfig,
    SourceRangeData, VipValue, backend_flags, endpoint_flags, limits,
    limits::MAX_ENDPOINT_FRONTENDS, service_flags, source_range_prefix, vip_filter_index,
};
use tracing::{debug, warn};

use super::{
    MapError, MapWriter, addr_words, backend_value, endpoint_key, maglev_key, service_keys, vip_key,
};
use crate::{
    dataplane::DataplaneLimits,
    maglev,
    model::{Backend, Change, DesiredState, Frontend, Protocol, Service, SourceNat},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("no free {what} (capacity {capacity}); {remedy}")]
    Full {
        what: &'static str,
        capacity: u32,
        remedy: &'static str,
    },
    #[error("backend {endpoint} would serve more than {MAX_ENDPOINT_FRONTENDS} frontends")]
    TooManyFrontends { endpoint: String },
    #[error("source NAT: {0}")]
    SourceNat(#[source] MapError),
    #[error("service {service}: {source}")]
    Map {
        service: String,
        #[source]
        source: MapError,
    },
}

/// What an apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
    /// Errors met after a service was switched over (clean-up writes); the service works,
    /// but something may be left behind.
    pub cleanup_errors: Vec<String>,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgrammedBackend {
    pub id: u32,
    pub generation: u32,
}

/// A service as programmed.
/// Where a service's Maglev table lives: `MAGLEV` page and first entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableRef {
    pub page: u32,
    pub offset: u32,
}

#[derive(Clone, Debug)]
pub struct ProgrammedService {
    pub spec: Arc<Service>,
    pub id: u32,
    pub table_ref: TableRef,
    pub backends: BTreeMap<SocketAddr, ProgrammedBackend>,
    /// A digest of the table as installed (slot → backend id, 0: no backend): a change that
    /// gives the same table writes none. The table itself is in the maps only (thousands of
    /// tables of thousands of slots would double their memory in the agent).
    pub table: TableDigest,
}

/// [`ProgrammedService::table`]: XXH3-64 of the slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableDigest(u64);

impl TableDigest {
    pub fn of(slots: &[u32]) -> Self {
        // Streamed through a small buffer: no copy of the whole table.
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = [0u8; 1024];
        for chunk in slots.chunks(buf.len() / 4) {
            for (b, s) in buf.chunks_exact_mut(4).zip(chunk) {
                b.copy_from_slice(&s.to_ne_bytes());
            }
            h.update(&buf[..chunk.len() * 4]);
        }
        Self(h.digest())
    }
}

impl ProgrammedService {
    /// Its `SERVICES` value.
    pub fn value(&self) -> ServiceValue {
        let mut flags = 0;
        if self.spec.affinity_timeout.is_some() {
            flags |= service_flags::AFFINITY;
        }
        if !self.spec.source_ranges.is_empty() {
            flags |= service_flags::SOURCE_RANGES;
        }
        if self.spec.node_address {
            flags |= service_flags::NODE_ADDRESS;
        }
        ServiceValue {
            id: self.id,
            table_page: self.table_ref.page,
            table_offset: self.table_ref.offset,
            table_size: self.spec.table_size,
            flags,
            affinity_timeout_s: self
                .spec
                .affinity_timeout
                .map_or(0, |t| t.as_secs().min(u64::from(u32::MAX)) as u32),
        }
    }
}

/// Ids `1..limit`, fresh ones first, then the oldest freed.
#[derive(Debug)]
struct IdPool {
    what: &'static str,
    remedy: &'static str,
    next: u32,
    limit: u32,
    free: VecDeque<u32>,
}

impl IdPool {
    fn new(what: &'static str, limit: u32, remedy: &'static str) -> Self {
        Self {
            what,
            remedy,
            next: 1,
            limit,
            free: VecDeque::new(),
        }
    }

    fn alloc(&mut self) -> Result<u32, ApplyError> {
        if self.next < self.limit {
            self.next += 1;
            return Ok(self.next - 1);
        }
        self.free.pop_front().ok_or(ApplyError::Full {
            what: self.what,
            capacity: self.limit - 1,
            remedy: self.remedy,
        })
    }

    fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

/// Whether the service's address is a VIP of this node's (in `VIPS`): an address served to
/// clients outside that is not the node's own.
fn owns_vip(svc: &Service) -> bool {
    svc.frontend.scope.external() && !svc.node_address
}

/// Whether the service's address is one of the node's own served to clients outside (a
/// NodePort): in the VIP pre-filter, so that XDP looks its packets up, but not in `VIPS`, so
/// that every other packet to it (its other ports, ICMP, neighbour resolution) stays the
/// node's.
fn node_port(svc: &Service) -> bool {
    svc.frontend.scope.external() && svc.node_address
}

/// Writes undone when a service operation fails before it is published.
enum Undo {
    Backend(u32),
    /// A kept backend's previous value.
    Restore(u32, BackendValue),
    /// (endpoint, protocol, service id)
    Endpoint(SocketAddr, Protocol, u32),
    Table(TableRef),
    /// A `SERVICES` key written by an add.
    ServiceKey(ServiceKey),
    /// A `SERVICES` key's value before an update.
    ServiceValue(ServiceKey, ServiceValue),
    Range(u32, IpNet),
    Vip(IpAddr),
    NodeAddress(IpAddr),
    ServiceId(u32),
}

pub struct Programmer {
    seed: u64,
    services: BTreeMap<Frontend, ProgrammedService>,
    service_ids: IdPool,
    backend_ids: IdPool,
    pages: TablePages,
    /// Generation of each backend id, bumped when the id is given out.
    generations: Vec<u32>,
    /// Services per VIP address.
    vips: BTreeMap<IpAddr, u32>,
    /// NodePort services per node address (pre-filter only).
    node_addresses: BTreeMap<IpAddr, u32>,
    /// VIPs per pre-filter slot.
    filter: BTreeMap<u32, u32>,
    /// Reverse NAT's table: what each backend endpoint (address and port, with the frontend's
    /// protocol) serves.
    endpoints: BTreeMap<(SocketAddr, Protocol), Vec<EndpointFrontend>>,
    /// The source-NAT settings as programmed.
    source_nat: Option<SourceNat>,
    /// VIPs this node announces on L2 (answers ARP and Neighbor Solicitations for).
    announced: BTreeSet<IpAddr>,
    /// What `services` take of the data plane's limits.
    usage: fit::Usage,
    /// The maps hold what the last apply asked for (it succeeded, or nothing was applied
    /// yet): [`Programmer::fit`] then weighs only what changed since.
    synced: bool,
    /// The state the last apply brought the maps to (None: none yet, or it failed).
    last: Option<DesiredState>,
}

impl Programmer {
    pub fn new(limits: &DataplaneLimits, seed: u64) -> Self {
        Self {
            seed,
            services: BTreeMap::new(),
            service_ids: IdPool::new(
                "service id",
                limits.max_services,
                "raise dataplane.max_services",
            ),
            backend_ids: IdPool::new(
                "backend id",
                limits.max_backends,
                "raise dataplane.max_backends",
            ),
            pages: TablePages::default(),
            generations: vec![0; limits.max_backends as usize],
            vips: BTreeMap::new(),
            node_addresses: BTreeMap::new(),
            filter: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            source_nat: None,
            announced: BTreeSet::new(),
            usage: fit::Usage::default(),
            synced: true,
            last: None,
        }
    }

    /// Makes the data plane answer ARP and Neighbor Solicitations for exactly the VIPs of
    /// `vips` (those programmed now and those that will be), on the interfaces given to
    /// `Datapath::add_l2_port`. A VIP's flag is one map write: a takeover or a hand-over is
    /// seen by the next request. On error the VIPs written so far keep their new flag.
    pub fn set_announced(
        &mut self,
        vips: BTreeSet<IpAddr>,
        maps: &mut dyn MapWriter,
    ) -> Result<(), MapError> {
        for ip in self.vips.keys() {
            let (was, is) = (self.announced.contains(ip), vips.contains(ip));
            if was != is {
                maps.put_vip(
                    &vip_key(*ip),
                    &VipValue {
                        flags: vip_flags(is),
                    },
                )?;
            }
        }
        self.announced = vips;
        Ok(())
    }

    /// Programmed services, by frontend.
    pub fn services(&self) -> impl Iterator<Item = &ProgrammedService> {
        self.services.values()
    }

    /// The Maglev table of programmed service `p` (slot → backend id), as it was installed:
    /// made again from its spec and backend ids, as the install made it.
    pub fn table_of(&self, p: &ProgrammedService) -> Vec<u32> {
        self.table(&p.spec, &p.backends)
    }

    /// The programmed service of `frontend`.
    pub fn service(&self, frontend: &Frontend) -> Option<&ProgrammedService> {
        self.services.get(frontend)
    }

    /// Brings the maps from what was programmed to `desired`, touching only what differs.
    /// On error the services already handled stay changed, the failing one stays as it was,
    /// and the rest are untouched: apply the previous state again to roll back.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        maps: &mut dyn MapWriter,
    ) -> Result<ApplyReport, ApplyError> {
        let mut report = ApplyReport::default();
        let was_synced = std::mem::replace(&mut self.synced, false);
        // Table regions released by the previous apply may be written again: no packet still
        // reads them.
        self.pages.end_quarantine();
        if desired.source_nat != self.source_nat {
            self.set_source_nat(desired.source_nat, maps)
                .map_err(ApplyError::SourceNat)?;
        }
        // While the maps hold the last state applied, only what differs from it is looked
        // at; otherwise (a failed apply, adopted maps) every service is.
        let (gone, wanted): (Vec<Frontend>, Vec<Arc<Service>>) = match self.last.take() {
            Some(last) if was_synced => {
                let changes = last.changes(desired);
                let wanted: BTreeMap<Frontend, Arc<Service>> = changes
                    .iter()
                    .filter_map(|c| match c {
                        Change::Added(s) | Change::Changed(_, s) => {
                            Some((s.frontend, Arc::clone(s)))
                        }
                        Change::Removed(_) => None,
                    })
                    .collect();
                // A frontend that moves from one name to another is updated in place.
                let gone: BTreeSet<Frontend> = changes
                    .iter()
                    .filter_map(|c| match c {
                        Change::Removed(s) => Some(s.frontend),
                        _ => None,
                    })
                    .filter(|f| !wanted.contains_key(f))
                    .collect();
                (gone.into_iter().collect(), wanted.into_values().collect())
            }
            _ => {
                let wanted: BTreeMap<Frontend, &Arc<Service>> =
                    desired.services.iter().map(|s| (s.frontend, s)).collect();
                let gone = self
                    .services
                    .keys()
                    .filter(|f| !wanted.contains_key(f))
                    .copied()
                    .collect();
                (gone, wanted.into_values().cloned().collect())
            }
        };
        for f in gone {
            let name = self.remove(f, maps, &mut report.cleanup_errors)?;
            report.removed.push(name);
        }
        for svc in &wanted {
            match self.services.get(&svc.frontend) {
                None => {
                    self.add(svc, maps)?;
                    report.added.push(svc.name.clone());
                }
                Some(p) if p.spec != *svc => {
                    self.update(svc, maps, &mut report.cleanup_errors)?;
                    report.updated.push(svc.name.clone());
                }
                Some(_) => {}
            }
        }
        report.unchanged = desired.services.len() - report.added.len() - report.updated.len();
        // Debug builds (the tests) check that the maps hold exactly `desired`.
        #[cfg(debug_assertions)]
        {
            assert_eq!(self.services.len(), desired.services.len());
            for s in desired.services.iter() {
                assert!(self.services.get(&s.frontend).is_some_and(|p| p.spec == *s));
            }
        }
        self.last = Some(desired.clone());
        self.synced = true;
        Ok(report)
    }

    fn map_err(service: &Service) -> impl Fn(MapError) -> ApplyError + '_ {
        |source| ApplyError::Map {
            service: service.name.clone(),
            source,
        }
    }

    fn page_err(service: &Service) -> impl Fn(PageError) -> ApplyError + '_ {
        |e| match e {
            PageError::Full => ApplyError::Full {
                what: "Maglev table page",
                capacity: limits::MAX_TABLE_PAGES - 1,
                remedy: "use fewer distinct table sizes or smaller tables",
            },
            PageError::Map(source) => ApplyError::Map {
                service: service.name.clone(),
                source,
            },
        }
    }

    fn new_backend(
        &mut self,
        b: &Backend,
    ) -> Result<(ProgrammedBackend, BackendValue), ApplyError> {
        let id = self.backend_ids.alloc()?;
        let pb = ProgrammedBackend {
            id,
            generation: self.bump_generation(id),
        };
        Ok((pb, backend_value(b.addr, pb.generation, flags(b))))
    }

    /// Writes the node's source-NAT settings; its addresses join the VIP pre-filter, so that
    /// replies addressed to them reach the data plane's lookup. On error nothing changed.
    fn set_source_nat(
        &mut self,
        new: Option<SourceNat>,
        maps: &mut dyn MapWriter,
    ) -> Result<(), MapError> {
        let addrs = |s: Option<SourceNat>| -> Vec<IpAddr> {
            s.map(|s| {
                let v4 = s.ipv4.map(IpAddr::V4);
                let v6 = s.ipv6.map(IpAddr::V6);
                v4.into_iter().chain(v6).collect()
            })
            .unwrap_or_default()
        };
        let (old_addrs, new_addrs) = (addrs(self.source_nat), addrs(new));
        let mut value = SnatConfig::default();
        if let Some(n) = new {
            if let Some(a) = n.ipv4 {
                value.addr4 = addr_words(IpAddr::V4(a)).0;
            }
            if let Some(a) = n.ipv6 {
                value.addr6 = addr_words(IpAddr::V6(a)).0;
            }
            (value.port_min, value.port_max) = n.ports;
        }
        let mut added = Vec::new();
        for a in new_addrs.iter().filter(|a| !old_addrs.contains(a)) {
            if let Err(e) = self.filter_add(*a, 1, maps) {
                for a in added {
                    let _ = self.filter_add(a, -1, maps);
                }
                return Err(e);
            }
            added.push(*a);
        }
        if let Err(e) = maps.put_snat_config(&value) {
            for a in added {
                let _ = self.filter_add(a, -1, maps);
            }
            return Err(e);
        }
        self.source_nat = new;
        for a in old_addrs.iter().filter(|a| !new_addrs.contains(a)) {
            if let Err(e) = self.filter_add(*a, -1, maps) {
                // A stale filter slot only costs non-VIP packets to it one lookup.
                warn!(address = %a, error = %e, "source-NAT address left in the VIP pre-filter");
            }
        }
        Ok(())
    }

    /// Adds `delta` to the pre-filter count of `ip`'s slot.
    fn filter_add(
        &mut self,
        ip: IpAddr,
        delta: i32,
        maps: &mut dyn MapWriter,
    ) -> Result<(), MapError> {
        let index = vip_filter_index(&vip_key(ip).addr);
        let count = self.filter.get(&index).copied().unwrap_or(0);
        let next = count.saturating_add_signed(delta);
        maps.set_vip_filter(index, next)?;
        if next == 0 {
            self.filter.remove(&index);
        } else {
            self.filter.insert(index, next);
        }
        Ok(())
    }

    fn bump_generation(&mut self, id: u32) -> u32 {
        let g = &mut self.generations[id as usize];
        *g = g.wrapping_add(1);
        *g
    }

    /// The Maglev table of `svc` as backend ids.
    fn table(&self, svc: &Service, ids: &BTreeMap<SocketAddr, ProgrammedBackend>) -> Vec<u32> {
        let keys: Vec<String> = svc.backends.iter().map(|b| maglev_key(b.addr)).collect();
        let entries: Vec<maglev::Entry<'_>> = svc
            .backends
            .iter()
            .zip(&keys)
            .map(|(b, k)| maglev::Entry {
                key: k.as_bytes(),
                weight: b.share(),
            })
            .collect();
        maglev::build(&entries, svc.table_size, self.seed)
            .into_iter()
            .map(|i| {
                if i == maglev::EMPTY {
                    0
                } else {
                    ids[&svc.backends[i as usize].addr].id
                }
            })
            .collect()
    }

    fn add(&mut self, svc: &Arc<Service>, maps: &mut dyn MapWriter) -> Result<(), ApplyError> {
        let mut undo = Vec::new();
        match self.try_add(svc, maps, &mut undo) {
            Ok(p) => {
                debug!(service = %svc.name, id = p.id, table = ?p.table_ref, "service added");
                self.usage.add_spec(svc);
                self.services.insert(svc.frontend, p);
                Ok(())
            }
            Err(e) => {
                self.undo(undo, maps);
                Err(e)
            }
        }
    }

    fn try_add(
        &mut self,
        svc: &Arc<Service>,
        maps: &mut dyn MapWriter,
        undo: &mut Vec<Undo>,
    ) -> Result<ProgrammedService, ApplyError> {
        let err = Self::map_err(svc);
        let id = self.service_ids.alloc()?;
        undo.push(Undo::ServiceId(id));
        maps.reset_service_stats(id).map_err(&err)?;
        let mut backends = BTreeMap::new();
        for b in &svc.backends {
            let (pb, value) = self.new_backend(b)?;
            undo.push(Undo::Backend(pb.id));
            maps.reset_backend_stats(pb.id).map_err(&err)?;
            maps.put_backend(pb.id, &value).map_err(&err)?;
            backends.insert(b.addr, pb);
            self.endpoint_add(b.addr, svc, id, pb.id, maps)?;
            undo.push(Undo::Endpoint(b.addr, svc.frontend.protocol, id));
        }
        let table = self.table(svc, &backends);
        let table_ref = self
            .pages
            .alloc(svc.table_size, maps)
            .map_err(Self::page_err(svc))?;
        undo.push(Undo::Table(table_ref));
        maps.write_table(table_ref.page, table_ref.offset, &table)
            .map_err(&err)?;
        for r in &svc.source_ranges {
            undo.push(Undo::Range(id, *r));
            let (len, data) = source_range(id, r);
            maps.put_source_range(len, &data).map_err(&err)?;
        }
        if owns_vip(svc) {
            undo.push(Undo::Vip(svc.frontend.vip));
            self.vip_ref(svc.frontend.vip, maps).map_err(&err)?;
        }
        if node_port(svc) {
            undo.push(Undo::NodeAddress(svc.frontend.vip));
            self.node_ref(svc.frontend.vip, 1, maps).map_err(&err)?;
        }
        let p = ProgrammedService {
            spec: Arc::clone(svc),
            id,
            table_ref,
            backends,
            table: TableDigest::of(&table),
        };
        for key in service_keys(&svc.frontend) {
            undo.push(Undo::ServiceKey(key));
            maps.put_service(&key, &p.value()).map_err(&err)?;
        }
        Ok(p)
    }

    fn update(
        &mut self,
        svc: &Arc<Service>,
        maps: &mut dyn MapWriter,
        cleanup_errors: &mut Vec<String>,
    ) -> Result<(), ApplyError> {
        let Some(old) = self.services.get(&svc.frontend).cloned() else {
            return self.add(svc, maps);
        };
        let mut undo = Vec::new();
        let mut next = ProgrammedService {
            spec: Arc::clone(svc),
            id: old.id,
            table_ref: old.table_ref,
            backends: BTreeMap::new(),
            table: old.table,
        };
        if let Err(e) = self.try_update(&old, &mut next, maps, &mut undo) {
            self.undo(undo, maps);
            return Err(e);
        }

        // Switched over: clean up what the old version had.
        let mut note = |r: Result<(), MapError>| {
            if let Err(e) = r {
                warn!(service = %svc.name, error = %e, "clean-up after update failed");
                cleanup_errors.push(format!("service {}: {e}", svc.name));
            }
        };
        for (addr, pb) in &old.backends {
            if !next.backends.contains_key(addr) {
                note(maps.put_backend(pb.id, &freed(pb.generation)));
                note(self.endpoint_remove(*addr, svc.frontend.protocol, old.id, maps));
                self.backend_ids.release(pb.id);
            }
        }
        if owns_vip(&old.spec) && !owns_vip(svc) {
            note(self.vip_unref(svc.frontend.vip, maps));
        }
        if node_port(&old.spec) && !node_port(svc) {
            note(self.node_ref(svc.frontend.vip, -1, maps));
        }
        // Taken out of rotation: now that no table holds it, its flows are steered again.
        let was_available: BTreeMap<SocketAddr, bool> = old
            .spec
            .backends
            .iter()
            .map(|b| (b.addr, b.available))
            .collect();
        for b in svc.backends.iter().filter(|b| !b.available) {
            if was_available.get(&b.addr) == Some(&true)
                && let Some(pb) = next.backends.get(&b.addr)
            {
                note(maps.put_backend(pb.id, &backend_value(b.addr, pb.generation, 0)));
            }
        }
        if next.table_ref != old.table_ref {
            self.pages.release(old.table_ref);
        }
        for r in old
            .spec
            .source_ranges
            .iter()
            .filter(|r| !svc.source_ranges.contains(r))
        {
            let (len, data) = source_range(old.id, r);
            note(maps.delete_source_range(len, &data));
        }
        debug!(service = %svc.name, id = next.id, table = ?next.table_ref, "service updated");
        self.usage.sub_spec(&old.spec);
        self.usage.add_spec(svc);
        self.services.insert(svc.frontend, next);
        Ok(())
    }

    /// The part of an update before (and including) the switch-over write.
    fn try_update(
        &mut self,
        old: &ProgrammedService,
        next: &mut ProgrammedService,
        maps: &mut dyn MapWriter,
        undo: &mut Vec<Undo>,
    ) -> Result<(), ApplyError> {
        let svc = &old.spec;
        let new = next.spec.clone();
        let err = Self::map_err(&new);
        let was: BTreeMap<SocketAddr, &Backend> =
            svc.backends.iter().map(|b| (b.addr, b)).collect();
        for b in &new.backends {
            let before = was.get(&b.addr);
            match old.backends.get(&b.addr) {
                Some(pb)
                    if before
                        .is_some_and(|w| (b.available && !w.available) || b.snat != w.snat) =>
                {
                    // Back in rotation: a new generation, so that flows it had before it was
                    // taken out (steered elsewhere since, or dead) never return to it. Source
                    // NAT turned on or off: the same, since a flow's source cannot change
                    // under it.
                    let old_value =
                        backend_value(b.addr, pb.generation, before.map_or(0, |w| flags(w)));
                    let pb = ProgrammedBackend {
                        id: pb.id,
                        generation: self.bump_generation(pb.id),
                    };
                    undo.push(Undo::Restore(pb.id, old_value));
                    maps.put_backend(pb.id, &backend_value(b.addr, pb.generation, flags(b)))
                        .map_err(&err)?;
                    next.backends.insert(b.addr, pb);
                }
                Some(pb) => {
                    next.backends.insert(b.addr, *pb);
                }
                None => {
                    let (pb, value) = self.new_backend(b)?;
                    undo.push(Undo::Backend(pb.id));
                    maps.reset_backend_stats(pb.id).map_err(&err)?;
                    maps.put_backend(pb.id, &value).map_err(&err)?;
                    next.backends.insert(b.addr, pb);
                    self.endpoint_add(b.addr, &new, old.id, pb.id, maps)?;
                    undo.push(Undo::Endpoint(b.addr, new.frontend.protocol, old.id));
                }
            }
        }
        if svc.backends != new.backends || svc.table_size != new.table_size {
            let table = self.table(&new, &next.backends);
            next.table = TableDigest::of(&table);
            if next.table != old.table {
                next.table_ref = self
                    .pages
                    .alloc(new.table_size, maps)
                    .map_err(Self::page_err(&new))?;
                undo.push(Undo::Table(next.table_ref));
                maps.write_table(next.table_ref.page, next.table_ref.offset, &table)
                    .map_err(&err)?;
            }
        }
        for r in new
            .source_ranges
            .iter()
            .filter(|r| !svc.source_ranges.contains(r))
        {
            undo.push(Undo::Range(old.id, *r));
            let (len, data) = source_range(old.id, r);
            maps.put_source_range(len, &data).map_err(&err)?;
        }
        if owns_vip(&new) && !owns_vip(svc) {
            undo.push(Undo::Vip(new.frontend.vip));
            self.vip_ref(new.frontend.vip, maps).map_err(&err)?;
        }
        if node_port(&new) && !node_port(svc) {
            undo.push(Undo::NodeAddress(new.frontend.vip));
            self.node_ref(new.frontend.vip, 1, maps).map_err(&err)?;
        }
        if next.value() != old.value() {
            for key in service_keys(&new.frontend) {
                undo.push(Undo::ServiceValue(key, old.value()));
                maps.put_service(&key, &next.value()).map_err(&err)?;
            }
        }
        Ok(())
    }

    fn remove(
        &mut self,
        f: Frontend,
        maps: &mut dyn MapWriter,
        cleanup_errors: &mut Vec<String>,
    ) -> Result<String, ApplyError> {
        let Some(p) = self.services.get(&f) else {
            return Ok(String::new());
        };
        for key in service_keys(&f) {
            maps.delete_service(&key).map_err(Self::map_err(&p.spec))?;
        }
        let Some(p) = self.services.remove(&f) else {
            return Ok(String::new());
        };
        self.usage.sub_spec(&p.spec);
        let mut note = |r: Result<(), MapError>| {
            if let Err(e) = r {
                warn!(service = %p.spec.name, error = %e, "clean-up after removal failed");
                cleanup_errors.push(format!("service {}: {e}", p.spec.name));
            }
        };
        for (addr, pb) in &p.backends {
            note(maps.put_backend(pb.id, &freed(pb.generation)));
            note(self.endpoint_remove(*addr, f.protocol, p.id, maps));
            self.backend_ids.release(pb.id);
        }
        self.pages.release(p.table_ref);
        for r in &p.spec.source_ranges {
            let (len, data) = source_range(p.id, r);
            note(maps.delete_source_range(len, &data));
        }
        if owns_vip(&p.spec) {
            note(self.vip_unref(f.vip, maps));
        }
        if node_port(&p.spec) {
            note(self.node_ref(f.vip, -1, maps));
        }
        self.service_ids.release(p.id);
        debug!(service = %p.spec.name, id = p.id, "service removed");
        Ok(p.spec.name.clone())
    }

    /// Records that `addr` serves `svc`'s frontend as backend `backend_id` of service
    /// `service_id`.
    fn endpoint_add(
        &mut self,
        addr: SocketAddr,
        svc: &Service,
        service_id: u32,
        backend_id: u32,
        maps: &mut dyn MapWriter,
    ) -> Result<(), ApplyError> {
        let frontend = &svc.frontend;
        let key = (addr, frontend.protocol);
        let refs = self.endpoints.entry(key).or_default();
        if refs.len() >= MAX_ENDPOINT_FRONTENDS {
            return Err(ApplyError::TooManyFrontends {
                endpoint: format!("{addr}/{}", frontend.protocol),
            });
        }
        let (vip, _) = addr_words(frontend.vip);
        refs.push(EndpointFrontend {
            vip,
            vport_be: frontend.port.to_be(),
            flags: if frontend.scope.external() {
                0
            } else {
                endpoint_flags::INTERNAL
            },
            service_id,
            backend_id,
        });
        let value = endpoint_value(refs);
        if let Err(e) = maps.put_endpoint(&endpoint_key(addr, frontend.protocol), &value) {
            self.endpoint_forget(addr, frontend.protocol, service_id);
            return Err(ApplyError::Map {
                service: svc.name.clone(),
                source: e,
            });
        }
        Ok(())
    }

    fn endpoint_forget(
        &mut self,
        addr: SocketAddr,
        protocol: Protocol,
        service_id: u32,
    ) -> Option<&Vec<EndpointFrontend>> {
        let key = (addr, protocol);
        let refs = self.endpoints.get_mut(&key)?;
        refs.retain(|f| f.service_id != service_id);
        if refs.is_empty() {
            self.endpoints.remove(&key);
            return None;
        }
        self.endpoints.get(&key)
    }

    /// Records that `addr` no longer serves service `service_id`.
    fn endpoint_remove(
        &mut self,
        addr: SocketAddr,
        protocol: Protocol,
        service_id: u32,
        maps: &mut dyn MapWriter,
    ) -> Result<(), MapError> {
        let key = endpoint_key(addr, protocol);
        match self.endpoint_forget(addr, protocol, service_id) {
            Some(refs) => {
                let value = endpoint_value(refs);
                maps.put_endpoint(&key, &value)
            }
            None => maps.delete_endpoint(&key),
        }
    }

    fn vip_ref(&mut self, ip: IpAddr, maps: &mut dyn MapWriter) -> Result<(), MapError> {
        let n = self.vips.get(&ip).copied().unwrap_or(0);
        if n == 0 {
            let key = vip_key(ip);
            let flags = vip_flags(self.announced.contains(&ip));
            maps.put_vip(&key, &VipValue { flags })?;
            if let Err(e) = self.filter_add(ip, 1, maps) {
                let _ = maps.delete_vip(&key);
                return Err(e);
            }
        }
        self.vips.insert(ip, n + 1);
        Ok(())
    }

    /// Adds `delta` (±1) to the NodePort services of node address `ip`: in the pre-filter
    /// while it has any.
    fn node_ref(
        &mut self,
        ip: IpAddr,
        delta: i32,
        maps: &mut dyn MapWriter,
    ) -> Result<(), MapError> {
        let n = self.node_addresses.get(&ip).copied().unwrap_or(0);
        let next = n.saturating_add_signed(delta);
        if (n == 0) != (next == 0) {
            self.filter_add(ip, delta, maps)?;
        }
        if next == 0 {
            self.node_addresses.remove(&ip);
        } else {
            self.node_addresses.insert(ip, next);
        }
        Ok(())
    }

    fn vip_unref(&mut self, ip: IpAddr, maps: &mut dyn MapWriter) -> Result<(), MapError> {
        let n = self.vips.get(&ip).copied().unwrap_or(0);
        if n > 1 {
            self.vips.insert(ip, n - 1);
            return Ok(());
        }
        self.vips.remove(&ip);
        // Filter first: a stale filter slot only costs a lookup, a missing VIP entry drops
        // nothing either, so either order is safe; this one leaves no slot pointing nowhere.
        let r = self.filter_add(ip, -1, maps);
        maps.delete_vip(&vip_key(ip))?;
        r
    }

    fn undo(&mut self, undo: Vec<Undo>, maps: &mut dyn MapWriter) {
        for u in undo.into_iter().rev() {
            let r = match u {
                Undo::Endpoint(addr, protocol, id) => {
                    self.endpoint_remove(addr, protocol, id, maps)
                }
                Undo::ServiceKey(key) => maps.delete_service(&key),
                Undo::ServiceValue(key, value) => maps.put_service(&key, &value),
                Undo::Backend(id) => {
                    self.backend_ids.release(id);
                    maps.put_backend(id, &freed(self.generations[id as usize]))
                }
                Undo::Restore(id, value) => maps.put_backend(id, &value),
                Undo::Table(t) => {
                    self.pages.release(t);
                    Ok(())
                }
                Undo::Range(id, r) => {
                    let (len, data) = source_range(id, &r);
                    maps.delete_source_range(len, &data)
                }
                Undo::Vip(ip) => {
                    if self.vips.contains_key(&ip) {
                        self.vip_unref(ip, maps)
                    } else {
                        Ok(())
                    }
                }
                Undo::NodeAddress(ip) => {
                    if self.node_addresses.contains_key(&ip) {
                        self.node_ref(ip, -1, maps)
                    } else {
                        Ok(())
                    }
                }
                Undo::ServiceId(id) => {
                    self.service_ids.release(id);
                    Ok(())
                }
            };
            if let Err(e) = r {
                warn!(error = %e, "undoing a failed service change also failed");
            }
        }
    }
}

/// Table slots: twice the services, so that a changed table can be written beside the one
/// packets are using.
/// Maglev table pages: inner maps of `MAGLEV`, each holding tables of one size. Creating a page
/// costs the kernel an RCU grace period, so pages are created once and then written into. A
/// released region becomes reusable at the next apply (a packet holds a table reference for
/// microseconds, an apply takes longer than that).
#[derive(Debug, Default)]
struct TablePages {
    /// Pages created so far (page ids 1..=created).
    created: u32,
    /// Table size → pages holding tables of that size.
    classes: BTreeMap<u32, Vec<u32>>,
    /// Page → free table offsets.
    free: BTreeMap<u32, Vec<u32>>,
    quarantine: Vec<TableRef>,
    /// Pages that hold no table, of no size yet (a previous agent's, adopted): page → entries.
    blank: BTreeMap<u32, u32>,
}

impl TablePages {
    fn alloc(&mut self, size: u32, maps: &mut dyn MapWriter) -> Result<TableRef, PageError> {
        for &page in self.classes.get(&size).into_iter().flatten() {
            if let Some(offset) = self.free.get_mut(&page).and_then(Vec::pop) {
                return Ok(TableRef { page, offset });
            }
        }
        let entries = limits::TABLE_PAGE_ENTRIES.max(size);
        let page = if let Some(&page) = self
            .blank
            .iter()
            .find(|(_, n)| **n == entries)
            .map(|(p, _)| p)
        {
            self.blank.remove(&page);
            page
        } else {
            if self.created + 1 >= limits::MAX_TABLE_PAGES {
                return Err(PageError::Full);
            }
            let page = self.created + 1;
            maps.create_table_page(page, entries)
                .map_err(PageError::Map)?;
            self.created = page;
            page
        };
        let tables = entries / size;
        // Hand out low offsets first.
        self.free
            .insert(page, (1..tables).rev().map(|i| i * size).collect());
        self.classes.entry(size).or_default().push(page);
        Ok(TableRef { page, offset: 0 })
    }

    fn release(&mut self, t: TableRef) {
        self.quarantine.push(t);
    }

    fn end_quarantine(&mut self) {
        for t in self.quarantine.drain(..) {
            self.free.entry(t.page).or_default().push(t.offset);
        }
    }
}

#[derive(Debug)]
enum PageError {
    Full,
    Map(MapError),
}

/// The flags of a VIP's `VIPS` entry.
fn vip_flags(announced: bool) -> u32 {
    if announced {
        lb_common::vip_flags::NEIGHBOR
    } else {
        0
    }
}

/// The flags of a backend's `BACKENDS` entry.
fn flags(b: &Backend) -> u8 {
    let mut f = 0;
    if b.available {
        f |= backend_flags::PRESENT;
    }
    if b.snat {
        f |= backend_flags::SNAT;
    }
    f
}

fn endpoint_value(refs: &[EndpointFrontend]) -> EndpointValue {
    let mut v = EndpointValue {
        count: refs.len() as u32,
        ..EndpointValue::default()
    };
    v.frontends[..refs.len()].copy_from_slice(refs);
    v
}

fn source_range(service_id: u32, net: &IpNet) -> (u32, SourceRangeData) {
    let (addr, _) = addr_words(net.network());
    let bits = match net {
        IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
        IpNet::V6(n) => u32::from(n.prefix_len()),
    };
    (
        source_range_prefix(bits),
        SourceRangeData {
            service_id_be: service_id.to_be(),
            addr,
        },
    )
}

/// A freed backend slot: no backend (its flows are steered again), the last generation kept
/// so that an agent adopting the maps knows which generations flows may still carry.
fn freed(generation: u32) -> BackendValue {
    BackendValue {
        generation,
        ..BackendValue::zeroed()
    }
}

/// Zeroed map values.
trait Zeroed {
    fn zeroed() -> Self;
}

impl Zeroed for BackendValue {
    fn zeroed() -> Self {
        Self {
            addr: [0; 4],
            port_be: 0,
            family: 0,
            flags: 0,
            generation: 0,
        }
    }
}
