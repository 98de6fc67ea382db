//! An in-memory [`MapWriter`] for tests: it keeps what the kernel maps would hold, counts the
//! writes, can be told to fail, and dumps its contents as stable text.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use lb_common::{
    BackendValue, EndpointKey, EndpointValue, ServiceKey, ServiceValue, SnatConfig,
    SourceRangeData, VipKey, VipValue,
};

use super::{MapError, MapWriter, words_addr};

#[derive(Debug, Default)]
pub struct FakeMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    /// Maglev table pages.
    pub pages: BTreeMap<u32, Vec<u32>>,
    /// (prefix length, service id, address words).
    pub source_ranges: BTreeMap<(u32, u32, [u32; 4]), ()>,
    pub vips: BTreeMap<VipKey, VipValue>,
    pub vip_filter: BTreeMap<u32, u32>,
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    pub snat_config: SnatConfig,
    /// Every write, in order, as `map op key`.
    pub log: Vec<String>,
    /// Fail the write whose log line starts with this (once), to test error paths.
    pub fail_on: Option<String>,
}

impl FakeMaps {
    fn record(&mut self, map: &'static str, line: String) -> Result<(), MapError> {
        if let Some(prefix) = &self.fail_on
            && line.starts_with(prefix.as_str())
        {
            self.fail_on = None;
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

    /// The contents, one line per entry, in a stable order.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.services {
            let vip = words_addr(&k.addr, k.family);
            let _ = writeln!(
                out,
                "service {} proto={} id={} size={} flags={} affinity={}s table {}",
                SocketAddr::new(vip, u16::from_be(k.port_be)),
                k.proto,
                v.id,
                v.table_size,
                v.flags,
                v.affinity_timeout_s,
                self.table_shares(v)
            );
        }
        for (id, b) in &self.backends {
            if b.flags == 0 && b.generation == 0 {
                continue;
            }
            let addr = SocketAddr::new(words_addr(&b.addr, b.family), u16::from_be(b.port_be));
            let _ = writeln!(
                out,
                "backend {id} {addr} gen={} flags={}",
                b.generation, b.flags
            );
        }
        for (len, sid, addr) in self.source_ranges.keys() {
            let fam = if addr[..3] == lb_common::V4_MAPPED_PREFIX {
                lb_common::family::V4
            } else {
                lb_common::family::V6
            };
            let ip = words_addr(addr, fam);
            let bits = len - 32 - if fam == lb_common::family::V4 { 96 } else { 0 };
            let _ = writeln!(out, "source_range service={sid} {ip}/{bits}");
        }
        for k in self.vips.keys() {
            let _ = writeln!(out, "vip {}", words_addr(&k.addr, k.family));
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

fn range_key(prefix_len: u32, d: &SourceRangeData) -> (u32, u32, [u32; 4]) {
    (prefix_len, u32::from_be(d.service_id_be), d.addr)
}

impl MapWriter for FakeMaps {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        self.record("SERVICES", format!("services put id={}", value.id))?;
        self.services.insert(*key, *value);
        Ok(())
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        let id = self.services.get(key).map_or(0, |v| v.id);
        self.record("SERVICES", format!("services delete id={id}"))?;
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
        self.source_ranges.insert(range_key(prefix_len, data), ());
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
