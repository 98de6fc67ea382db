//! The maps, typed, behind [`MapWriter`]: every write the programmer makes is one (or, for a
//! Maglev table, one batched) kernel update.

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{
        Array, ArrayOfMaps, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues,
        lpm_trie::Key, xdp::DevMapHash,
    },
};
use lb_common::{
    AffinityKey, AffinityValue, BackendStats, BackendValue, DatapathStats, EndpointKey,
    EndpointValue, FlowKey, FlowValue, L2Port, ServiceKey, ServiceStats, ServiceValue, SnatConfig,
    SnatValue, SockRevKey, SockRevValue, SourceRangeData, VipKey, VipValue, maps,
};

use crate::dataplane::{
    MapError, MapWriter,
    inspect::{self},
    sys,
};

use super::*;

/// The maps, typed.
pub struct EbpfMaps {
    pub(super) services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub(super) backends: Array<MapData, BackendValue>,
    pub(super) maglev: ArrayOfMaps<MapData, Array<MapData, u32>>,
    /// A second handle on `maglev`, to read which pages it holds.
    pub(super) maglev_raw: MapData,
    /// The table pages, by page id (kept to write into them).
    pub(super) pages: BTreeMap<u32, Array<MapData, u32>>,
    pub(super) source_ranges: LpmTrie<MapData, SourceRangeData, u32>,
    pub(super) vips: HashMap<MapData, VipKey, VipValue>,
    pub(super) vip_filter: Array<MapData, u32>,
    pub(super) service_stats: PerCpuArray<MapData, ServiceStats>,
    pub(super) backend_stats: PerCpuArray<MapData, BackendStats>,
    pub(super) datapath_stats: PerCpuArray<MapData, DatapathStats>,
    pub conntrack: HashMap<MapData, FlowKey, FlowValue>,
    /// TCP handshakes in progress and connections a client's RST ended (not pinned).
    pub half_open: HashMap<MapData, FlowKey, FlowValue>,
    pub(super) endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub snat: HashMap<MapData, FlowKey, SnatValue>,
    pub(super) sock_revnat: HashMap<MapData, SockRevKey, SockRevValue>,
    pub(super) snat_config: Array<MapData, SnatConfig>,
    pub(super) l2_ports: HashMap<MapData, u32, L2Port>,
    pub(super) l2_lease: Array<MapData, u64>,
    pub(super) tx_ports: DevMapHash<MapData>,
    pub(super) ncpus: usize,
    /// Second handles on the table pages, shared with inspectors: reading a page through the
    /// outer map's id would need CAP_SYS_ADMIN.
    pub(super) shared_pages: SharedPages,
    /// Where new table pages are pinned (a pinned data plane).
    pub(super) pins: Option<Pins>,
}

/// Table pages by page id, readable by inspectors.
pub(super) type SharedPages = std::sync::Arc<std::sync::Mutex<BTreeMap<u32, Map>>>;

pub(super) fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DataplaneError> {
    ebpf.take_map(name).ok_or(DataplaneError::Map {
        name,
        detail: "not in the eBPF object".into(),
    })
}

macro_rules! typed {
    ($ebpf:expr, $name:expr) => {
        take($ebpf, $name)?.try_into().map_err(map_err($name))?
    };
}

impl EbpfMaps {
    pub(super) fn take(ebpf: &mut Ebpf, pins: Option<Pins>) -> Result<Self, DataplaneError> {
        let ncpus = aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::Map {
            name: maps::SERVICE_STATS,
            detail: format!("{what}: {e}"),
        })?;
        let maglev = take(ebpf, maps::MAGLEV)?;
        let maglev_raw = match &maglev {
            Map::ArrayOfMaps(d) => reopen(d).map_err(map_err(maps::MAGLEV))?,
            _ => {
                return Err(DataplaneError::Map {
                    name: maps::MAGLEV,
                    detail: "not an array of maps".into(),
                });
            }
        };
        Ok(Self {
            services: typed!(ebpf, maps::SERVICES),
            backends: typed!(ebpf, maps::BACKENDS),
            maglev: maglev.try_into().map_err(map_err(maps::MAGLEV))?,
            maglev_raw,
            pages: BTreeMap::new(),
            source_ranges: typed!(ebpf, maps::SOURCE_RANGES),
            vips: typed!(ebpf, maps::VIPS),
            vip_filter: typed!(ebpf, maps::VIP_FILTER),
            service_stats: typed!(ebpf, maps::SERVICE_STATS),
            backend_stats: typed!(ebpf, maps::BACKEND_STATS),
            datapath_stats: typed!(ebpf, maps::DATAPATH_STATS),
            conntrack: typed!(ebpf, maps::CONNTRACK),
            half_open: typed!(ebpf, maps::HALF_OPEN),
            endpoints: typed!(ebpf, maps::ENDPOINTS),
            affinity: typed!(ebpf, maps::AFFINITY),
            snat: typed!(ebpf, maps::SNAT),
            sock_revnat: typed!(ebpf, maps::SOCK_REVNAT),
            snat_config: typed!(ebpf, maps::SNAT_CONFIG),
            l2_ports: typed!(ebpf, maps::L2_PORTS),
            l2_lease: typed!(ebpf, maps::L2_LEASE),
            tx_ports: typed!(ebpf, maps::TX_PORTS),
            ncpus,
            shared_pages: SharedPages::default(),
            pins,
        })
    }

    /// Opens the table pages a previous agent pinned, keeping those that `MAGLEV` holds (a
    /// page pinned just before that agent stopped, never installed, is removed).
    pub(super) fn open_pages(&mut self) -> Result<(), MapError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        let installed = self.installed_pages()?;
        for (page, path) in pins.pages() {
            let data = MapData::from_pin(&path).map_err(|e| err(maps::MAGLEV, "open page", e))?;
            let id = data
                .info()
                .map_err(|e| err(maps::MAGLEV, "page info", e))?
                .id();
            if installed.get(&page) != Some(&id) {
                tracing::info!(page, "removing a pinned table page MAGLEV does not hold");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let second = reopen(&data)
                .and_then(Map::from_map_data)
                .map_err(|e| err(maps::MAGLEV, "share table page", e))?;
            let inner = Map::from_map_data(data)
                .and_then(Array::try_from)
                .map_err(|e| err(maps::MAGLEV, "open page", e))?;
            self.shared_pages
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(page, second);
            self.pages.insert(page, inner);
        }
        Ok(())
    }

    /// `MAGLEV`'s slots: page → inner map id.
    fn installed_pages(&self) -> Result<BTreeMap<u32, u32>, MapError> {
        let n = lb_common::limits::MAX_TABLE_PAGES;
        Ok(read_array::<u32>(&self.maglev_raw, maps::MAGLEV, 0, n)?
            .into_iter()
            .collect())
    }

    /// What the maps hold, as the programmer reads it to adopt them.
    pub fn contents(&self) -> Result<MapContents, MapError> {
        let mut c = MapContents::default();
        for r in &self.services {
            c.services
                .push(r.map_err(|e| err(maps::SERVICES, "read", e))?);
        }
        let n = self.backends.len();
        for (id, b) in
            read_array::<BackendValue>(IterableMap::map(&self.backends), maps::BACKENDS, 0, n)?
        {
            if b.generation != 0 || b.flags != 0 {
                c.backends.insert(id, b);
            }
        }
        for (page, inner) in &self.pages {
            c.pages.insert(*page, inner.len());
        }
        for (_, v) in &c.services {
            let Some(page) = self.pages.get(&v.table_page) else {
                continue;
            };
            c.tables
                .insert(v.id, read_region(page, v.table_offset, v.table_size)?);
        }
        for r in &self.endpoints {
            c.endpoints
                .push(r.map_err(|e| err(maps::ENDPOINTS, "read", e))?);
        }
        for k in self.source_ranges.keys() {
            let k = k.map_err(|e| err(maps::SOURCE_RANGES, "read", e))?;
            c.source_ranges.push((k.prefix_len(), k.data()));
        }
        for r in &self.vips {
            c.vips.push(r.map_err(|e| err(maps::VIPS, "read", e))?);
        }
        let n = self.vip_filter.len();
        for (i, count) in
            read_array::<u32>(IterableMap::map(&self.vip_filter), maps::VIP_FILTER, 0, n)?
        {
            if count != 0 {
                c.vip_filter.insert(i, count);
            }
        }
        c.snat_config = self
            .snat_config
            .get(&0, 0)
            .map_err(|e| err(maps::SNAT_CONFIG, "read", e))?;
        Ok(c)
    }

    /// A reader of these maps with file descriptors of its own.
    pub fn inspector(&self) -> Result<EbpfInspector, DataplaneError> {
        fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
            name: &'static str,
            m: &MapData,
        ) -> Result<T, DataplaneError> {
            let data = reopen(m).map_err(map_err(name))?;
            Map::from_map_data(data)
                .and_then(T::try_from)
                .map_err(map_err(name))
        }
        Ok(EbpfInspector {
            services: typed(maps::SERVICES, IterableMap::map(&self.services))?,
            backends: typed(maps::BACKENDS, IterableMap::map(&self.backends))?,
            pages: self.shared_pages.clone(),
            source_ranges: typed(maps::SOURCE_RANGES, IterableMap::map(&self.source_ranges))?,
            service_stats: reopen(IterableMap::map(&self.service_stats))
                .map_err(map_err(maps::SERVICE_STATS))?,
            backend_stats: reopen(IterableMap::map(&self.backend_stats))
                .map_err(map_err(maps::BACKEND_STATS))?,
            datapath_stats: typed(maps::DATAPATH_STATS, IterableMap::map(&self.datapath_stats))?,
            conntrack: typed(maps::CONNTRACK, IterableMap::map(&self.conntrack))?,
            half_open: reopen(IterableMap::map(&self.half_open))
                .map_err(map_err(maps::HALF_OPEN))?,
            snat: reopen(IterableMap::map(&self.snat)).map_err(map_err(maps::SNAT))?,
            affinity: typed(maps::AFFINITY, IterableMap::map(&self.affinity))?,
            sock_revnat: typed(maps::SOCK_REVNAT, IterableMap::map(&self.sock_revnat))?,
            ncpus: self.ncpus,
        })
    }

    /// A service's counters, summed over CPUs.
    pub fn service_stats(&self, id: u32) -> Result<ServiceStats, MapError> {
        let per_cpu = self
            .service_stats
            .get(&id, 0)
            .map_err(|e| err(maps::SERVICE_STATS, "get", e))?;
        Ok(inspect::sum_service(per_cpu.iter().copied()))
    }

    /// A backend's counters, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats, MapError> {
        let per_cpu = self
            .backend_stats
            .get(&id, 0)
            .map_err(|e| err(maps::BACKEND_STATS, "get", e))?;
        Ok(inspect::sum_backend(per_cpu.iter().copied()))
    }

    /// The data plane's path counters, summed over CPUs.
    pub fn datapath_stats(&self) -> Result<DatapathStats, MapError> {
        let per_cpu = self
            .datapath_stats
            .get(&0, 0)
            .map_err(|e| err(maps::DATAPATH_STATS, "get", e))?;
        Ok(inspect::sum_datapath(per_cpu.iter().copied()))
    }

    fn zeroes<T: aya::Pod + Default>(&self) -> Result<PerCpuValues<T>, aya::maps::MapError> {
        PerCpuValues::try_from(vec![T::default(); self.ncpus]).map_err(aya::maps::MapError::from)
    }
}

pub(super) fn err(map: &'static str, op: &str, e: impl std::fmt::Display) -> MapError {
    MapError {
        map,
        op: op.to_string(),
        detail: e.to_string(),
    }
}

impl MapWriter for EbpfMaps {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| err(maps::SERVICES, "insert", e))
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.services
            .remove(key)
            .map_err(|e| err(maps::SERVICES, "remove", e))
    }

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        self.backends
            .set(id, value, 0)
            .map_err(|e| err(maps::BACKENDS, "set", e))
    }

    fn create_table_page(&mut self, page: u32, entries: u32) -> Result<(), MapError> {
        let inner = Array::<MapData, u32>::create(entries, BPF_F_INNER_MAP)
            .map_err(|e| err(maps::MAGLEV, "create table page", e))?;
        // Pinned before it is installed: a page MAGLEV holds is always one the next agent
        // finds (see `open_pages`).
        if let Some(pins) = &self.pins {
            let path = pins.page(page);
            let _ = std::fs::remove_file(&path);
            IterableMap::map(&inner)
                .pin(&path)
                .map_err(|e| err(maps::MAGLEV, "pin table page", e))?;
        }
        self.maglev
            .set(page, &inner, 0)
            .map_err(|e| err(maps::MAGLEV, "install table page", e))?;
        let second = reopen(IterableMap::map(&inner))
            .and_then(Map::from_map_data)
            .map_err(|e| err(maps::MAGLEV, "share table page", e))?;
        self.shared_pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(page, second);
        self.pages.insert(page, inner);
        Ok(())
    }

    fn write_table(&mut self, page: u32, offset: u32, slots: &[u32]) -> Result<(), MapError> {
        let inner = self.pages.get(&page).ok_or_else(|| MapError {
            map: maps::MAGLEV,
            op: "write table".into(),
            detail: format!("no page {page}"),
        })?;
        sys::update_batch(IterableMap::map(inner), offset, slots)
            .map_err(|e| err(maps::MAGLEV, "write table", e))
    }

    fn put_source_range(
        &mut self,
        prefix_len: u32,
        data: &SourceRangeData,
    ) -> Result<(), MapError> {
        self.source_ranges
            .insert(&Key::new(prefix_len, *data), 1, 0)
            .map_err(|e| err(maps::SOURCE_RANGES, "insert", e))
    }

    fn delete_source_range(
        &mut self,
        prefix_len: u32,
        data: &SourceRangeData,
    ) -> Result<(), MapError> {
        self.source_ranges
            .remove(&Key::new(prefix_len, *data))
            .map_err(|e| err(maps::SOURCE_RANGES, "remove", e))
    }

    fn put_vip(&mut self, key: &VipKey, value: &VipValue) -> Result<(), MapError> {
        self.vips
            .insert(key, value, 0)
            .map_err(|e| err(maps::VIPS, "insert", e))
    }

    fn delete_vip(&mut self, key: &VipKey) -> Result<(), MapError> {
        self.vips
            .remove(key)
            .map_err(|e| err(maps::VIPS, "remove", e))
    }

    fn put_snat_config(&mut self, value: &SnatConfig) -> Result<(), MapError> {
        self.snat_config
            .set(0, value, 0)
            .map_err(|e| err(maps::SNAT_CONFIG, "set", e))
    }

    fn set_vip_filter(&mut self, index: u32, count: u32) -> Result<(), MapError> {
        self.vip_filter
            .set(index, count, 0)
            .map_err(|e| err(maps::VIP_FILTER, "set", e))
    }

    fn put_endpoint(&mut self, key: &EndpointKey, value: &EndpointValue) -> Result<(), MapError> {
        self.endpoints
            .insert(key, value, 0)
            .map_err(|e| err(maps::ENDPOINTS, "insert", e))
    }

    fn delete_endpoint(&mut self, key: &EndpointKey) -> Result<(), MapError> {
        self.endpoints
            .remove(key)
            .map_err(|e| err(maps::ENDPOINTS, "remove", e))
    }

    fn reset_service_stats(&mut self, id: u32) -> Result<(), MapError> {
        let zero = self
            .zeroes()
            .map_err(|e| err(maps::SERVICE_STATS, "reset", e))?;
        self.service_stats
            .set(id, zero, 0)
            .map_err(|e| err(maps::SERVICE_STATS, "reset", e))
    }

    fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapError> {
        let zero = self
            .zeroes()
            .map_err(|e| err(maps::BACKEND_STATS, "reset", e))?;
        self.backend_stats
            .set(id, zero, 0)
            .map_err(|e| err(maps::BACKEND_STATS, "reset", e))
    }
}

/// Up to `count` entries of array (or array of maps) `map` from index `from`, in one batch:
/// (index, value) of those present.
fn read_array<V: aya::Pod>(
    map: &MapData,
    name: &'static str,
    from: u32,
    count: u32,
) -> Result<Vec<(u32, V)>, MapError> {
    let n = count as usize;
    let (mut keys, mut values) = (vec![0u8; n * 4], vec![0u8; n * size_of::<V>()]);
    let mut cursor = 0;
    let (got, _) = sys::lookup_batch(
        map,
        from.checked_sub(1),
        &mut cursor,
        &mut keys,
        &mut values,
        count,
    )
    .map_err(|e| err(name, "read", e))?;
    Ok((0..got as usize)
        .map(|i| {
            (
                sys::read_value::<u32>(&keys[i * 4..]),
                sys::read_value::<V>(&values[i * size_of::<V>()..]),
            )
        })
        .collect())
}

/// Entries `offset..offset + size` of a table page.
fn read_region(page: &Array<MapData, u32>, offset: u32, size: u32) -> Result<Vec<u32>, MapError> {
    let entries = read_array::<u32>(IterableMap::map(page), maps::MAGLEV, offset, size)?;
    if entries.len() != size as usize {
        return Err(err(
            maps::MAGLEV,
            "read table",
            format!("{} of {size} entries at {offset}", entries.len()),
        ));
    }
    Ok(entries.into_iter().map(|(_, v)| v).collect())
}

/// A second handle on a map: a duplicated file descriptor.
pub(super) fn reopen(m: &MapData) -> Result<MapData, aya::maps::MapError> {
    let fd = m.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error,
        })
    })?;
    MapData::from_fd(fd)
}
