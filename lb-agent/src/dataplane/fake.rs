//! The data plane in memory, for tests: [`FakeMaps`] keeps what the kernel maps would hold,
//! logs the writes, can be told to fail, and dumps its contents as stable text;
//! [`FakeDataplane`] adds attachments, L2 ports and the lease around it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_common::{
    BackendValue, EndpointKey, EndpointValue, ServiceKey, ServiceValue, SnatConfig,
    SourceRangeData, VipKey, VipValue,
};

use super::{
    AttachedMode, Dataplane, DataplaneError, L2LeaseWriter, MapError, MapWriter,
    inspect::{Inspect, RawCounters, Trace},
    words_addr,
};
use crate::{LockExt as _, dataplane::XdpMode};

/// A [`Dataplane`] in memory. Attaching "succeeds" in the mode asked for (auto: native) unless
/// the interface is listed in `refuse`.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub maps: FakeMaps,
    /// Attached interfaces, in order.
    pub attached: Vec<(String, AttachedMode)>,
    /// Interfaces that refuse an attach.
    pub refuse: Vec<String>,
    /// L2 ports: interface → MAC.
    pub l2_ports: BTreeMap<String, [u8; 6]>,
    /// The last lease written, shared with the writers handed out.
    pub lease: Arc<Mutex<Option<Duration>>>,
    /// The maps are a previous agent's (adopted) rather than fresh.
    pub adopted: bool,
    /// The cgroup the socket hooks are attached to.
    pub cgroup: Option<std::path::PathBuf>,
}

impl FakeDataplane {
    /// The maps' dump, then the attachments and L2 ports.
    pub fn dump(&self) -> String {
        let mut out = self.maps.dump();
        for (iface, mode) in &self.attached {
            let _ = writeln!(out, "attached {iface} {}", mode.as_str());
        }
        for (iface, mac) in &self.l2_ports {
            let mac = mac.map(|b| format!("{b:02x}")).join(":");
            let _ = writeln!(out, "l2_port {iface} {mac}");
        }
        out
    }
}

impl Dataplane for FakeDataplane {
    fn maps(&mut self) -> &mut dyn MapWriter {
        &mut self.maps
    }

    fn attach_cgroup(&mut self, cgroup: &std::path::Path) -> Result<(), DataplaneError> {
        self.cgroup = Some(cgroup.to_path_buf());
        Ok(())
    }

    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<AttachedMode, DataplaneError> {
        if self.refuse.iter().any(|r| r == iface) {
            return Err(DataplaneError::Interface {
                iface: iface.to_string(),
                detail: "refused (fake)".into(),
            });
        }
        let mode = match mode {
            XdpMode::Generic => AttachedMode::Generic,
            XdpMode::Native | XdpMode::Auto => AttachedMode::Native,
        };
        self.attached.push((iface.to_string(), mode));
        Ok(mode)
    }

    fn detach_all(&mut self) {
        self.attached.clear();
    }

    fn add_l2_port(
        &mut self,
        iface: &str,
        _ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), DataplaneError> {
        self.l2_ports.insert(iface.to_string(), mac);
        Ok(())
    }

    fn l2_lease(&self) -> Result<Box<dyn L2LeaseWriter>, DataplaneError> {
        Ok(Box::new(FakeLease(self.lease.clone())))
    }

    fn inspector(&self) -> Result<Arc<dyn Inspect>, DataplaneError> {
        Ok(Arc::new(EmptyInspector))
    }

    fn start(&self) -> super::ebpf::Start {
        if self.adopted {
            super::ebpf::Start::Adopted
        } else {
            super::ebpf::Start::Unpinned
        }
    }

    fn previous_state(&self) -> Result<Option<super::MapContents>, MapError> {
        Ok(self.adopted.then(|| self.maps.contents()))
    }

    fn settle(&mut self) -> Vec<String> {
        Vec::new()
    }
}

struct FakeLease(Arc<Mutex<Option<Duration>>>);

impl L2LeaseWriter for FakeLease {
    fn extend(&mut self, lease: Duration) -> Result<(), MapError> {
        *self.0.locked() = Some(lease);
        Ok(())
    }
}

/// Reads nothing: zero counters, no flows.
struct EmptyInspector;

impl Inspect for EmptyInspector {
    fn counters(&self, services: u32, backends: u32) -> Result<RawCounters, MapError> {
        Ok(RawCounters {
            services: vec![Default::default(); services as usize],
            backends: vec![Default::default(); backends as usize],
            datapath: Default::default(),
        })
    }

    fn tables(&self) -> Result<Vec<crate::dataplane::inspect::TableFill>, MapError> {
        Ok(Vec::new())
    }

    fn trace(&self, _flow: &lb_common::FlowKey) -> Result<Trace, MapError> {
        Ok(Trace::NoService)
    }
}

#[derive(Debug, Default)]
pub struct FakeMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    /// Maglev table pages.
    pub pages: BTreeMap<u32, Vec<u32>>,
    /// (prefix length, service id, address words).
    pub source_ranges: std::collections::BTreeSet<(u32, u32, [u32; 4])>,
    pub vips: BTreeMap<VipKey, VipValue>,
    pub vip_filter: BTreeMap<u32, u32>,
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    pub snat_config: SnatConfig,
    /// Every write, in order, as `map op key`.
    pub log: Vec<String>,
    /// Fail the write whose log line starts with this (once), to test error paths.
    pub fail_on: Option<String>,
    /// Fail every write once the log holds this many (maps that stay broken).
    pub fail_after: Option<usize>,
    /// Sees every write's log line before it is carried out.
    pub observer: Option<Observer>,
}

/// A test's hook into the writes (to check what readers saw while they happened).
pub struct Observer(pub Box<dyn FnMut(&str) + Send>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl FakeMaps {
    fn record(&mut self, map: &'static str, line: String) -> Result<(), MapError> {
        if let Some(o) = &mut self.observer {
            (o.0)(&line);
        }
        let fails = |p: &Option<String>| p.as_ref().is_some_and(|p| line.starts_with(p.as_str()));
        let broken = self.fail_after.is_some_and(|n| self.log.len() >= n);
        if fails(&self.fail_on) || broken {
            if fails(&self.fail_on) {
                self.fail_on = None;
            }
            return Err(MapError {
                map,
                op: line,
                detail: "injected failure".into(),
            });
        }
        self.log.push(line);
        Ok(())
    }

    /// A service's table as packets would read it: `backend id:slots` for each backend.
    pub fn table_shares(&self, v: &ServiceValue) -> String {
        let Some(t) = self.table(v) else {
            return "missing".into();
        };
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for s in t {
            *counts.entry(*s).or_default() += 1;
        }
        counts
            .iter()
            .map(|(b, n)| format!("{b}:{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A service's table entries, read through (page, offset, size).
    pub fn table(&self, v: &ServiceValue) -> Option<&[u32]> {
        let page = self.pages.get(&v.table_page)?;
        page.get(v.table_offset as usize..(v.table_offset + v.table_size) as usize)
    }

    /// What the maps hold, as a previous agent's pinned maps would give it.
    pub fn contents(&self) -> super::MapContents {
        super::MapContents {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self
                .backends
                .iter()
                .filter(|(_, b)| b.generation != 0 || b.flags != 0)
                .map(|(id, b)| (*id, *b))
                .collect(),
            pages: self
                .pages
                .iter()
                .map(|(p, t)| (*p, t.len() as u32))
                .collect(),
            tables: self
                .services
                .values()
                .filter_map(|v| Some((v.id, self.table(v)?.to_vec())))
                .collect(),
            endpoints: self.endpoints.iter().map(|(k, v)| (*k, *v)).collect(),
            source_ranges: self
                .source_ranges
                .iter()
                .map(|(len, sid, addr)| {
                    (
                        *len,
                        SourceRangeData {
                            service_id_be: sid.to_be(),
                            addr: *addr,
                        },
                    )
                })
                .collect(),
            vips: self.vips.iter().map(|(k, v)| (*k, *v)).collect(),
            vip_filter: self
                .vip_filter
                .iter()
                .filter(|(_, n)| **n != 0)
                .map(|(i, n)| (*i, *n))
                .collect(),
            snat_config: self.snat_config,
        }
    }

    /// The contents, one line per entry, in a stable order.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.services {
            let vip = words_addr(&k.addr, k.family);
            let _ = writeln!(
                out,
                "service {} {} proto={} id={} size={} flags={} affinity={}s table {}",
                SocketAddr::new(vip, u16::from_be(k.port_be)),
                scope_name(k.scope),
                k.proto,
                v.id,
                v.table_size,
                v.flags,
                v.affinity_timeout_s,
                self.table_shares(v)
            );
        }
        for (id, b) in &self.backends {
            // A freed slot (no backend; its generation kept for the next agent) is nothing a
            // packet can use.
            if b.flags == 0 && b.family == 0 {
                continue;
            }
            let addr = SocketAddr::new(words_addr(&b.addr, b.family), u16::from_be(b.port_be));
            let _ = writeln!(
                out,
                "backend {id} {addr} gen={} flags={}",
                b.generation, b.flags
            );
        }
        for (len, sid, addr) in &self.source_ranges {
            let fam = if addr[..3] == lb_common::V4_MAPPED_PREFIX {
                lb_common::family::V4
            } else {
                lb_common::family::V6
            };
            let ip = words_addr(addr, fam);
            let bits = len - 32 - if fam == lb_common::family::V4 { 96 } else { 0 };
            let _ = writeln!(out, "source_range service={sid} {ip}/{bits}");
        }
        for (k, v) in &self.vips {
            let l2 = if v.flags & lb_common::vip_flags::NEIGHBOR != 0 {
                " l2"
            } else {
                ""
            };
            let _ = writeln!(out, "vip {}{l2}", words_addr(&k.addr, k.family));
        }
        for (k, v) in &self.endpoints {
            let addr = SocketAddr::new(words_addr(&k.addr, k.family), u16::from_be(k.port_be));
            let fronts: Vec<String> = v.frontends[..v.count as usize]
                .iter()
                .map(|f| {
                    let vip =
                        SocketAddr::new(words_addr(&f.vip, k.family), u16::from_be(f.vport_be));
                    format!("{vip} service={} backend={}", f.service_id, f.backend_id)
                })
                .collect();
            let _ = writeln!(
                out,
                "endpoint {addr} proto={} -> {}",
                k.proto,
                fronts.join(", ")
            );
        }
        if self.snat_config != SnatConfig::default() {
            let c = &self.snat_config;
            let addr = |w: &[u32; 4], fam| {
                if *w == [0; 4] {
                    "-".to_string()
                } else {
                    words_addr(w, fam).to_string()
                }
            };
            let _ = writeln!(
                out,
                "snat {} {} ports={}-{}",
                addr(&c.addr4, lb_common::family::V4),
                addr(&c.addr6, lb_common::family::V6),
                c.port_min,
                c.port_max
            );
        }
        for (i, n) in &self.vip_filter {
            if *n != 0 {
                let _ = writeln!(out, "vip_filter[{i}]={n}");
            }
        }
        out
    }
}

fn scope_name(scope: u8) -> &'static str {
    match scope {
        lb_common::scope::EXTERNAL => "external",
        lb_common::scope::INTERNAL => "internal",
        _ => "bad-scope",
    }
}

fn range_key(prefix_len: u32, d: &SourceRangeData) -> (u32, u32, [u32; 4]) {
    (prefix_len, u32::from_be(d.service_id_be), d.addr)
}

impl MapWriter for FakeMaps {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        self.record(
            "SERVICES",
            format!("services put id={} {}", value.id, scope_name(key.scope)),
        )?;
        self.services.insert(*key, *value);
        Ok(())
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        let id = self.services.get(key).map_or(0, |v| v.id);
        self.record(
            "SERVICES",
            format!("services delete id={id} {}", scope_name(key.scope)),
        )?;
        self.services.remove(key);
        Ok(())
    }

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        self.record(
            "BACKENDS",
            format!("backends put {id} flags={}", value.flags),
        )?;
        self.backends.insert(id, *value);
        Ok(())
    }

    fn create_table_page(&mut self, page: u32, entries: u32) -> Result<(), MapError> {
        self.record("MAGLEV", format!("maglev create page {page}"))?;
        self.pages.insert(page, vec![0; entries as usize]);
        Ok(())
    }

    fn write_table(&mut self, page: u32, offset: u32, slots: &[u32]) -> Result<(), MapError> {
        self.record("MAGLEV", format!("maglev write {page}+{offset}"))?;
        let p = self.pages.get_mut(&page).ok_or(MapError {
            map: "MAGLEV",
            op: "write".into(),
            detail: format!("no page {page}"),
        })?;
        p[offset as usize..offset as usize + slots.len()].copy_from_slice(slots);
        Ok(())
    }

    fn put_source_range(
        &mut self,
        prefix_len: u32,
        data: &SourceRangeData,
    ) -> Result<(), MapError> {
        self.record("SOURCE_RANGES", format!("source_ranges put {prefix_len}"))?;
        let key = range_key(prefix_len, data);
        // The kernel's trie holds MAX_SOURCE_RANGES entries.
        if self.source_ranges.len() >= lb_common::limits::MAX_SOURCE_RANGES as usize
            && !self.source_ranges.contains(&key)
        {
            return Err(MapError {
                map: "SOURCE_RANGES",
                op: "insert".into(),
                detail: "Argument list too long (os error 7)".into(),
            });
        }
        self.source_ranges.insert(key);
        Ok(())
    }

    fn delete_source_range(
        &mut self,
        prefix_len: u32,
        data: &SourceRangeData,
    ) -> Result<(), MapError> {
        self.record(
            "SOURCE_RANGES",
            format!("source_ranges delete {prefix_len}"),
        )?;
        self.source_ranges.remove(&range_key(prefix_len, data));
        Ok(())
    }

    fn put_vip(&mut self, key: &VipKey, value: &VipValue) -> Result<(), MapError> {
        self.record("VIPS", "vips put".into())?;
        self.vips.insert(*key, *value);
        Ok(())
    }

    fn delete_vip(&mut self, key: &VipKey) -> Result<(), MapError> {
        self.record("VIPS", "vips delete".into())?;
        self.vips.remove(key);
        Ok(())
    }

    fn put_snat_config(&mut self, value: &SnatConfig) -> Result<(), MapError> {
        self.record("SNAT_CONFIG", "snat_config set".into())?;
        self.snat_config = *value;
        Ok(())
    }

    fn set_vip_filter(&mut self, index: u32, count: u32) -> Result<(), MapError> {
        self.record("VIP_FILTER", format!("vip_filter set {index}={count}"))?;
        self.vip_filter.insert(index, count);
        Ok(())
    }

    fn put_endpoint(&mut self, key: &EndpointKey, value: &EndpointValue) -> Result<(), MapError> {
        self.record("ENDPOINTS", format!("endpoints put count={}", value.count))?;
        self.endpoints.insert(*key, *value);
        Ok(())
    }

    fn delete_endpoint(&mut self, key: &EndpointKey) -> Result<(), MapError> {
        self.record("ENDPOINTS", "endpoints delete".into())?;
        self.endpoints.remove(key);
        Ok(())
    }

    fn reset_service_stats(&mut self, id: u32) -> Result<(), MapError> {
        self.record("SERVICE_STATS", format!("service_stats reset {id}"))
    }

    fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapError> {
        self.record("BACKEND_STATS", format!("backend_stats reset {id}"))
    }
}
