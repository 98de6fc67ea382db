//! The kernel data plane: weir's eBPF object loaded with aya, its programs attached to the
//! configured interfaces, and its maps behind [`MapWriter`].

use std::os::fd::AsFd as _;

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues,
        ProgramArray, lpm_trie::Key, xdp::DevMapHash,
    },
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode, tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
};
use lb_common::{
    AffinityKey, AffinityValue, BackendStats, BackendValue, DatapathStats, EndpointKey,
    EndpointValue, FlowKey, FlowValue, L2Port, ServiceKey, ServiceStats, ServiceValue, SnatConfig,
    SnatValue, SourceRangeData, VipKey, VipValue, backend_flags, drop_reason, maps, programs,
    service_flags,
};
use tracing::{info, warn};

use super::{
    AttachedMode, Dataplane, L2LeaseWriter, MapError, MapWriter,
    inspect::{self, Inspect, RawCounters, Trace, Via},
    sys,
};
use crate::dataplane::{DataplaneLimits, XdpMode};

/// The eBPF object, built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// `BPF_F_INNER_MAP`: inner Maglev tables may differ in size from the template.
const BPF_F_INNER_MAP: u32 = 1 << 12;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("interface {iface}: {detail}")]
    Interface { iface: String, detail: String },
}

struct Attachment {
    iface: String,
    ifindex: u32,
    mode: AttachedMode,
    xdp: XdpLinkId,
    tc: SchedClassifierLinkId,
}

/// The loaded programs and maps. Dropping it detaches everything it attached.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: EbpfMaps,
    attached: Vec<Attachment>,
    /// Held open: the kernel empties a program array when its last user-space reference goes.
    _tails: [ProgramArray<MapData>; 2],
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        name,
        detail: e.to_string(),
    }
}

impl Datapath {
    /// Loads the object with the map capacities of `limits` and verifies both programs.
    /// Nothing is attached yet.
    pub fn load(limits: &DataplaneLimits) -> Result<Self, DataplaneError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::SERVICES, limits.max_services)
            .map_max_entries(maps::VIPS, limits.max_services)
            .map_max_entries(maps::SERVICE_STATS, limits.max_services)
            .map_max_entries(maps::BACKENDS, limits.max_backends)
            .map_max_entries(maps::BACKEND_STATS, limits.max_backends)
            .map_max_entries(maps::NEXTHOPS, limits.max_backends)
            .map_max_entries(maps::CONNTRACK, limits.conntrack_size)
            .map_max_entries(maps::SNAT, limits.conntrack_size)
            .map_max_entries(maps::ENDPOINTS, limits.max_backends)
            .map_max_entries(maps::AFFINITY, limits.affinity_size)
            .load(OBJECT)
            .map_err(DataplaneError::Load)?;
        let load_err = |name| move |source| DataplaneError::Program { name, source };
        for name in [
            programs::XDP_INGRESS,
            programs::XDP_SCTP,
            programs::XDP_SNAT,
            programs::XDP_NEIGH,
        ] {
            let p: &mut Xdp = program_mut(&mut ebpf, name)?;
            p.load().map_err(load_err(name))?;
        }
        for name in [programs::TC_EGRESS, programs::TC_SCTP] {
            let p: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            p.load().map_err(load_err(name))?;
        }
        let tails = [
            tail_array(
                &mut ebpf,
                maps::XDP_TAILS,
                &[programs::XDP_SCTP, programs::XDP_SNAT, programs::XDP_NEIGH],
            )?,
            tail_array(&mut ebpf, maps::TC_TAILS, &[programs::TC_SCTP])?,
        ];
        let maps = EbpfMaps::take(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            attached: Vec::new(),
            _tails: tails,
        })
    }

    /// The XDP program (for BPF_PROG_TEST_RUN).
    pub fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(programs::XDP_INGRESS)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Datapath::load")
    }

    /// The TC program (for BPF_PROG_TEST_RUN).
    pub fn tc(&self) -> &SchedClassifier {
        self.ebpf
            .program(programs::TC_EGRESS)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Datapath::load")
    }

    /// Attaches XDP (ingress) and TC (egress) to `iface`. With native XDP the interface also
    /// becomes a redirect target. On error nothing stays attached to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<AttachedMode, DataplaneError> {
        let ifindex = ifindex(iface)?;
        let iface_err = |detail: String| DataplaneError::Interface {
            iface: iface.to_string(),
            detail,
        };
        let xdp: &mut Xdp = program_mut(&mut self.ebpf, programs::XDP_INGRESS)?;
        let (xdp_link, attached) = match mode {
            XdpMode::Native => (
                xdp.attach(iface, AyaXdpMode::Driver)
                    .map_err(|e| iface_err(format!("native XDP: {e}")))?,
                AttachedMode::Native,
            ),
            XdpMode::Generic => (
                xdp.attach(iface, AyaXdpMode::Skb)
                    .map_err(|e| iface_err(format!("generic XDP: {e}")))?,
                AttachedMode::Generic,
            ),
            XdpMode::Auto => match xdp.attach(iface, AyaXdpMode::Driver) {
                Ok(l) => (l, AttachedMode::Native),
                Err(native) => {
                    warn!(iface, error = %native, "native XDP refused; using generic XDP");
                    (
                        xdp.attach(iface, AyaXdpMode::Skb).map_err(|e| {
                            iface_err(format!("XDP: native: {native}; generic: {e}"))
                        })?,
                        AttachedMode::Generic,
                    )
                }
            },
        };
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, programs::TC_EGRESS)?;
        let tc_link = match tc.attach(iface, TcAttachType::Egress) {
            Ok(l) => l,
            Err(e) => {
                let xdp: &mut Xdp = program_mut(&mut self.ebpf, programs::XDP_INGRESS)?;
                let _ = xdp.detach(xdp_link);
                return Err(iface_err(format!("TC egress: {e}")));
            }
        };
        if attached == AttachedMode::Native
            && let Err(e) = self.maps.tx_ports.insert(ifindex, ifindex, None, 0)
        {
            // Still correct without it: forwarded packets then go through the kernel.
            warn!(iface, error = %e, "cannot make the interface an XDP redirect target");
        }
        self.attached.push(Attachment {
            iface: iface.to_string(),
            ifindex,
            mode: attached,
            xdp: xdp_link,
            tc: tc_link,
        });
        Ok(attached)
    }

    /// Lets XDP redirect to `ifindex` without attaching to it (BPF_PROG_TEST_RUN and the
    /// traffic generator use this; `attach` does it for native interfaces).
    pub fn add_redirect_port(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.maps
            .tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| DataplaneError::Map {
                name: maps::TX_PORTS,
                detail: e.to_string(),
            })
    }

    /// A writer of the L2 lease with a file descriptor of its own, for a task that keeps it
    /// running while the agent lives.
    pub fn l2_lease(&self) -> Result<L2Lease, DataplaneError> {
        let data = reopen(self.maps.l2_lease.map()).map_err(map_err(maps::L2_LEASE))?;
        let map = Map::from_map_data(data)
            .and_then(Array::try_from)
            .map_err(map_err(maps::L2_LEASE))?;
        Ok(L2Lease(map))
    }

    /// Answers ARP and Neighbor Solicitations for announced VIPs on interface `ifindex`, with
    /// `mac` (the interface's address).
    pub fn add_l2_port(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<(), DataplaneError> {
        self.maps
            .l2_ports
            .insert(ifindex, L2Port { mac, _pad: [0; 2] }, 0)
            .map_err(|e| DataplaneError::Map {
                name: maps::L2_PORTS,
                detail: e.to_string(),
            })
    }

    /// How many instructions the verifier walked for each program (the kernel's budget is one
    /// million per program).
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        [
            programs::XDP_INGRESS,
            programs::XDP_SCTP,
            programs::XDP_SNAT,
            programs::XDP_NEIGH,
            programs::TC_EGRESS,
            programs::TC_SCTP,
        ]
        .into_iter()
        .map(|name| {
            let n = self
                .ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .and_then(|i| i.verified_instruction_count());
            (name, n)
        })
        .collect()
    }

    /// Interfaces with their attach mode.
    pub fn attachments(&self) -> Vec<(String, AttachedMode)> {
        self.attached
            .iter()
            .map(|a| (a.iface.clone(), a.mode))
            .collect()
    }

    /// Detaches both programs from every interface, logging each.
    pub fn detach_all(&mut self) {
        for a in std::mem::take(&mut self.attached) {
            let _ = self.maps.tx_ports.remove(a.ifindex);
            if let Ok(xdp) = program_mut::<Xdp>(&mut self.ebpf, programs::XDP_INGRESS) {
                match xdp.detach(a.xdp) {
                    Ok(()) => info!(iface = %a.iface, "XDP program detached"),
                    Err(e) => warn!(iface = %a.iface, error = %e, "detaching XDP failed"),
                }
            }
            if let Ok(tc) = program_mut::<SchedClassifier>(&mut self.ebpf, programs::TC_EGRESS) {
                match tc.detach(a.tc) {
                    Ok(()) => info!(iface = %a.iface, "TC program detached"),
                    Err(e) => warn!(iface = %a.iface, error = %e, "detaching TC failed"),
                }
            }
        }
    }
}

impl Dataplane for Datapath {
    fn maps(&mut self) -> &mut dyn MapWriter {
        &mut self.maps
    }

    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<AttachedMode, DataplaneError> {
        Datapath::attach(self, iface, mode)
    }

    fn detach_all(&mut self) {
        Datapath::detach_all(self);
    }

    fn add_l2_port(
        &mut self,
        _iface: &str,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), DataplaneError> {
        Datapath::add_l2_port(self, ifindex, mac)
    }

    fn l2_lease(&self) -> Result<Box<dyn L2LeaseWriter>, DataplaneError> {
        Ok(Box::new(Datapath::l2_lease(self)?))
    }

    fn inspector(&self) -> Result<std::sync::Arc<dyn Inspect>, DataplaneError> {
        Ok(std::sync::Arc::new(self.maps.inspector()?))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(DataplaneError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    p.try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// The program array `map` with `program` (loaded) in slot 0.
fn tail_array(
    ebpf: &mut Ebpf,
    map: &'static str,
    slots: &[&'static str],
) -> Result<ProgramArray<MapData>, DataplaneError> {
    let mut array: ProgramArray<MapData> = take(ebpf, map)?.try_into().map_err(map_err(map))?;
    for (slot, program) in slots.iter().enumerate() {
        let fd = tail_fd(ebpf, program)?;
        array.set(slot as u32, &fd, 0).map_err(map_err(map))?;
    }
    Ok(array)
}

fn tail_fd(ebpf: &Ebpf, program: &'static str) -> Result<aya::programs::ProgramFd, DataplaneError> {
    ebpf.program(program)
        .ok_or(DataplaneError::Program {
            name: program,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|source| DataplaneError::Program {
            name: program,
            source,
        })
}

pub fn ifindex(iface: &str) -> Result<u32, DataplaneError> {
    let err = |detail: &str| DataplaneError::Interface {
        iface: iface.to_string(),
        detail: detail.to_string(),
    };
    crate::sys::if_nametoindex(iface).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => err("invalid name"),
        _ => err("no such interface"),
    })
}

/// The maps, typed.
pub struct EbpfMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, BackendValue>,
    maglev: ArrayOfMaps<MapData, Array<MapData, u32>>,
    /// The table pages, by page id (kept to write into them).
    pages: std::collections::BTreeMap<u32, Array<MapData, u32>>,
    source_ranges: LpmTrie<MapData, SourceRangeData, u32>,
    vips: HashMap<MapData, VipKey, VipValue>,
    vip_filter: Array<MapData, u32>,
    service_stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    datapath_stats: PerCpuArray<MapData, DatapathStats>,
    pub conntrack: HashMap<MapData, FlowKey, FlowValue>,
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub snat: HashMap<MapData, FlowKey, SnatValue>,
    snat_config: Array<MapData, SnatConfig>,
    l2_ports: HashMap<MapData, u32, L2Port>,
    l2_lease: Array<MapData, u64>,
    tx_ports: DevMapHash<MapData>,
    ncpus: usize,
    /// Second handles on the table pages, shared with inspectors: reading a page through the
    /// outer map's id would need CAP_SYS_ADMIN.
    shared_pages: SharedPages,
}

/// Table pages by page id, readable by inspectors.
type SharedPages = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u32, Map>>>;

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DataplaneError> {
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
    fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let ncpus = aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::Map {
            name: maps::SERVICE_STATS,
            detail: format!("{what}: {e}"),
        })?;
        Ok(Self {
            services: typed!(ebpf, maps::SERVICES),
            backends: typed!(ebpf, maps::BACKENDS),
            maglev: typed!(ebpf, maps::MAGLEV),
            pages: std::collections::BTreeMap::new(),
            source_ranges: typed!(ebpf, maps::SOURCE_RANGES),
            vips: typed!(ebpf, maps::VIPS),
            vip_filter: typed!(ebpf, maps::VIP_FILTER),
            service_stats: typed!(ebpf, maps::SERVICE_STATS),
            backend_stats: typed!(ebpf, maps::BACKEND_STATS),
            datapath_stats: typed!(ebpf, maps::DATAPATH_STATS),
            conntrack: typed!(ebpf, maps::CONNTRACK),
            endpoints: typed!(ebpf, maps::ENDPOINTS),
            affinity: typed!(ebpf, maps::AFFINITY),
            snat: typed!(ebpf, maps::SNAT),
            snat_config: typed!(ebpf, maps::SNAT_CONFIG),
            l2_ports: typed!(ebpf, maps::L2_PORTS),
            l2_lease: typed!(ebpf, maps::L2_LEASE),
            tx_ports: typed!(ebpf, maps::TX_PORTS),
            ncpus,
            shared_pages: SharedPages::default(),
        })
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
            affinity: typed(maps::AFFINITY, IterableMap::map(&self.affinity))?,
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

fn err(map: &'static str, op: &str, e: impl std::fmt::Display) -> MapError {
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

/// A second handle on a map: a duplicated file descriptor.
fn reopen(m: &MapData) -> Result<MapData, aya::maps::MapError> {
    let fd = m.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error,
        })
    })?;
    MapData::from_fd(fd)
}

/// Reads weir's maps through file descriptors of its own (see [`Inspect`]).
pub struct EbpfInspector {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, BackendValue>,
    /// The Maglev table pages (shared with the maps' owner, which adds them).
    pages: SharedPages,
    source_ranges: LpmTrie<MapData, SourceRangeData, u32>,
    /// Read in batches, by raw file descriptor.
    service_stats: MapData,
    backend_stats: MapData,
    datapath_stats: PerCpuArray<MapData, DatapathStats>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    ncpus: usize,
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` when walking the connection table.
const WALK_CHUNK: usize = 4096;

impl EbpfInspector {
    /// Per-CPU values of array ids `0..count`, one syscall, summed with `sum`.
    fn per_cpu_batch<T: aya::Pod + Default, S>(
        &self,
        name: &'static str,
        map: &MapData,
        count: u32,
        sum: impl Fn(&mut dyn Iterator<Item = T>) -> S,
    ) -> Result<Vec<S>, MapError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let stride = std::mem::size_of::<T>().next_multiple_of(8);
        let mut keys = vec![0u8; count as usize * 4];
        let mut values = vec![0u8; count as usize * stride * self.ncpus];
        let mut token = 0u32;
        let (got, _) = sys::lookup_batch(map, None, &mut token, &mut keys, &mut values, count)
            .map_err(|e| err(name, "lookup batch", e))?;
        let mut out = Vec::with_capacity(got as usize);
        for i in 0..got as usize {
            let mut cpus = (0..self.ncpus).map(|c| {
                let at = (i * self.ncpus + c) * stride;
                sys::read_value::<T>(&values[at..])
            });
            out.push(sum(&mut cpus));
        }
        Ok(out)
    }

    /// Backend `id` when it can take flows (id 0 is never a backend).
    fn present_backend(&self, id: u32) -> Result<Option<BackendValue>, MapError> {
        if id == 0 {
            return Ok(None);
        }
        let b = self
            .backends
            .get(&id, 0)
            .map_err(|e| err(maps::BACKENDS, "get", e))?;
        Ok((b.flags & backend_flags::PRESENT != 0).then_some(b))
    }

    /// Backend `id` if it still takes flows with the generation a flow or affinity remembers.
    fn live_backend(&self, id: u32, generation: u32) -> Result<Option<BackendValue>, MapError> {
        Ok(self
            .present_backend(id)?
            .filter(|b| b.generation == generation))
    }

    /// The Maglev slot `h` picks, with the backend in it when it can take flows.
    fn maglev(
        &self,
        svc: &ServiceValue,
        h: u32,
    ) -> Result<Option<(u32, u32, BackendValue)>, MapError> {
        if svc.table_size == 0 {
            return Ok(None);
        }
        let slot = h % svc.table_size;
        let id = {
            let pages = self
                .pages
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let page = pages.get(&svc.table_page).ok_or_else(|| MapError {
                map: maps::MAGLEV,
                op: "get page".into(),
                detail: format!("no page {}", svc.table_page),
            })?;
            let page: Array<&MapData, u32> =
                Array::try_from(page).map_err(|e| err(maps::MAGLEV, "get page", e))?;
            page.get(&(svc.table_offset + slot), 0)
                .map_err(|e| err(maps::MAGLEV, "get slot", e))?
        };
        Ok(self.present_backend(id)?.map(|b| (slot, id, b)))
    }
}

fn backend_addr(b: &BackendValue) -> std::net::SocketAddr {
    std::net::SocketAddr::new(
        super::words_addr(&b.addr, b.family),
        u16::from_be(b.port_be),
    )
}

/// `bpf_ktime_get_ns()`'s clock.
/// Lets the data plane answer ARP and Neighbor Solicitations for a while (see `L2_LEASE`).
pub struct L2Lease(Array<MapData, u64>);

impl L2LeaseWriter for L2Lease {
    fn extend(&mut self, lease: std::time::Duration) -> Result<(), MapError> {
        let until = sys::monotonic_ns() + lease.as_nanos() as u64;
        self.0
            .set(0, until, 0)
            .map_err(|e| err(maps::L2_LEASE, "set", e))
    }
}

fn found<V>(r: Result<V, aya::maps::MapError>, map: &'static str) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(err(map, "get", e)),
    }
}

impl Inspect for EbpfInspector {
    fn counters(&self, services: u32, backends: u32) -> Result<RawCounters, MapError> {
        let services = self.per_cpu_batch(
            maps::SERVICE_STATS,
            &self.service_stats,
            services,
            |cpus: &mut dyn Iterator<Item = ServiceStats>| inspect::sum_service(cpus),
        )?;
        let backends = self.per_cpu_batch(
            maps::BACKEND_STATS,
            &self.backend_stats,
            backends,
            |cpus: &mut dyn Iterator<Item = BackendStats>| inspect::sum_backend(cpus),
        )?;
        let per_cpu = self
            .datapath_stats
            .get(&0, 0)
            .map_err(|e| err(maps::DATAPATH_STATS, "get", e))?;
        Ok(RawCounters {
            services,
            backends,
            datapath: inspect::sum_datapath(per_cpu.iter().copied()),
        })
    }

    fn conntrack_entries(&self) -> Result<u64, MapError> {
        let map = IterableMap::map(&self.conntrack);
        let mut keys = vec![0u8; WALK_CHUNK * std::mem::size_of::<FlowKey>()];
        let mut values = vec![0u8; WALK_CHUNK * std::mem::size_of::<FlowValue>()];
        let mut total = 0u64;
        let mut token = 0u32;
        let mut first = true;
        loop {
            let cursor = (!first).then_some(token);
            let (got, done) = sys::lookup_batch(
                map,
                cursor,
                &mut token,
                &mut keys,
                &mut values,
                WALK_CHUNK as u32,
            )
            .map_err(|e| err(maps::CONNTRACK, "lookup batch", e))?;
            total += u64::from(got);
            first = false;
            if done {
                return Ok(total);
            }
        }
    }

    fn trace(&self, flow: &FlowKey) -> Result<Trace, MapError> {
        // As `lb-ebpf/src/l4.rs` and `lookup.rs` decide, in the same order.
        let mut resteered = false;
        if let Some(ct) = found(self.conntrack.get(flow, 0), maps::CONNTRACK)? {
            match self.live_backend(ct.backend_id, ct.backend_generation)? {
                Some(b) => {
                    return Ok(Trace::Forwarded {
                        service_id: ct.service_id,
                        backend_id: ct.backend_id,
                        backend: backend_addr(&b),
                        via: Via::Connection,
                        slot: None,
                        resteered: false,
                        source_nat_port: (b.flags & backend_flags::SNAT != 0)
                            .then(|| u16::from_be(ct.snat_port_be)),
                    });
                }
                None => resteered = true,
            }
        }
        let key = ServiceKey {
            addr: flow.dst,
            port_be: flow.dport_be,
            proto: flow.proto,
            family: flow.family,
        };
        let Some(svc) = found(self.services.get(&key, 0), maps::SERVICES)? else {
            return Ok(Trace::NoService);
        };
        if svc.flags & service_flags::SOURCE_RANGES != 0 {
            let key = Key::new(
                lb_common::source_range_prefix(128),
                SourceRangeData {
                    service_id_be: svc.id.to_be(),
                    addr: flow.src,
                },
            );
            if found(self.source_ranges.get(&key, 0), maps::SOURCE_RANGES)?.is_none() {
                return Ok(Trace::Dropped {
                    service_id: svc.id,
                    reason: drop_reason::SOURCE_NOT_ALLOWED,
                });
            }
        }
        let h = if svc.flags & service_flags::AFFINITY != 0 {
            let key = AffinityKey {
                client: flow.src,
                service_id: svc.id,
            };
            if let Some(a) = found(self.affinity.get(&key, 0), maps::AFFINITY)?
                && sys::monotonic_ns().wrapping_sub(a.last_used_ns)
                    <= u64::from(svc.affinity_timeout_s) * 1_000_000_000
                && let Some(b) = self.live_backend(a.backend_id, a.backend_generation)?
            {
                return Ok(Trace::Forwarded {
                    service_id: svc.id,
                    backend_id: a.backend_id,
                    backend: backend_addr(&b),
                    via: Via::Affinity,
                    slot: None,
                    resteered,
                    source_nat_port: (b.flags & backend_flags::SNAT != 0).then_some(0),
                });
            }
            lb_common::hash::client_hash(&flow.src)
        } else {
            lb_common::hash::flow_hash(
                &flow.src,
                &flow.dst,
                flow.sport_be,
                flow.dport_be,
                flow.proto,
            )
        };
        Ok(match self.maglev(&svc, h)? {
            Some((slot, backend_id, b)) => Trace::Forwarded {
                service_id: svc.id,
                backend_id,
                backend: backend_addr(&b),
                via: Via::Maglev,
                slot: Some(slot),
                resteered,
                source_nat_port: (b.flags & backend_flags::SNAT != 0).then_some(0),
            },
            None => Trace::Dropped {
                service_id: svc.id,
                reason: drop_reason::NO_BACKEND,
            },
        })
    }
}
