//! The kernel data plane: weir's eBPF object loaded with aya, its programs attached to the
//! configured interfaces, and its maps behind [`MapWriter`].

use std::{
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

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
    EndpointValue, FlowKey, FlowValue, ServiceKey, ServiceStats, ServiceValue, SourceRangeData,
    VipKey, VipValue, maps, programs,
};
use tracing::{info, warn};

use super::{MapError, MapWriter};
use crate::config::{DataplaneLimits, XdpMode};

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

/// How XDP ended up attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
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
            .map_max_entries(maps::ENDPOINTS, limits.max_backends)
            .map_max_entries(maps::AFFINITY, limits.affinity_size)
            .load(OBJECT)
            .map_err(DataplaneError::Load)?;
        let load_err = |name| move |source| DataplaneError::Program { name, source };
        for name in [programs::XDP_INGRESS, programs::XDP_SCTP] {
            let p: &mut Xdp = program_mut(&mut ebpf, name)?;
            p.load().map_err(load_err(name))?;
        }
        for name in [programs::TC_EGRESS, programs::TC_SCTP] {
            let p: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            p.load().map_err(load_err(name))?;
        }
        let tails = [
            tail_array(&mut ebpf, maps::XDP_TAILS, programs::XDP_SCTP)?,
            tail_array(&mut ebpf, maps::TC_TAILS, programs::TC_SCTP)?,
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

    /// How many instructions the verifier walked for each program (the kernel's budget is one
    /// million per program).
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        [
            programs::XDP_INGRESS,
            programs::XDP_SCTP,
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
    program: &'static str,
) -> Result<ProgramArray<MapData>, DataplaneError> {
    let fd = ebpf
        .program(program)
        .ok_or(DataplaneError::Program {
            name: program,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|source| DataplaneError::Program {
            name: program,
            source,
        })?;
    let mut array: ProgramArray<MapData> = take(ebpf, map)?.try_into().map_err(map_err(map))?;
    array.set(0, &fd, 0).map_err(map_err(map))?;
    Ok(array)
}

pub fn ifindex(iface: &str) -> Result<u32, DataplaneError> {
    let err = |detail: &str| DataplaneError::Interface {
        iface: iface.to_string(),
        detail: detail.to_string(),
    };
    let c = CString::new(iface).map_err(|_| err("invalid name"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(err("no such interface"));
    }
    Ok(i)
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
    tx_ports: DevMapHash<MapData>,
    ncpus: usize,
}

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
            tx_ports: typed!(ebpf, maps::TX_PORTS),
            ncpus,
        })
    }

    /// A service's counters, summed over CPUs.
    pub fn service_stats(&self, id: u32) -> Result<ServiceStats, MapError> {
        let per_cpu = self
            .service_stats
            .get(&id, 0)
            .map_err(|e| err(maps::SERVICE_STATS, "get", e))?;
        let mut sum = ServiceStats::default();
        for s in per_cpu.iter() {
            sum.packets_in += s.packets_in;
            sum.bytes_in += s.bytes_in;
            sum.packets_out += s.packets_out;
            sum.bytes_out += s.bytes_out;
            sum.new_flows += s.new_flows;
            for (d, x) in sum.drops.iter_mut().zip(s.drops) {
                *d += x;
            }
        }
        Ok(sum)
    }

    /// A backend's counters, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats, MapError> {
        let per_cpu = self
            .backend_stats
            .get(&id, 0)
            .map_err(|e| err(maps::BACKEND_STATS, "get", e))?;
        let mut sum = BackendStats::default();
        for s in per_cpu.iter() {
            sum.packets_in += s.packets_in;
            sum.bytes_in += s.bytes_in;
            sum.packets_out += s.packets_out;
            sum.bytes_out += s.bytes_out;
            sum.new_flows += s.new_flows;
        }
        Ok(sum)
    }

    /// The data plane's path counters, summed over CPUs.
    pub fn datapath_stats(&self) -> Result<DatapathStats, MapError> {
        let per_cpu = self
            .datapath_stats
            .get(&0, 0)
            .map_err(|e| err(maps::DATAPATH_STATS, "get", e))?;
        let mut sum = DatapathStats::default();
        for s in per_cpu.iter() {
            for (d, x) in sum.counters.iter_mut().zip(s.counters) {
                *d += x;
            }
        }
        Ok(sum)
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

/// `BPF_MAP_UPDATE_BATCH` of `values` at keys `first..`, one syscall (aya has no batch call).
fn update_batch(fd: BorrowedFd<'_>, first: u32, values: &[u32]) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let keys: Vec<u32> = (first..first + values.len() as u32).collect();
    let mut attr = Attr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: values.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr for BPF_MAP_UPDATE_BATCH; `keys` and `values` hold
    // `count` u32s each and outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if attr.count as usize != values.len() {
        return Err(std::io::Error::other(format!(
            "wrote {} of {} entries",
            attr.count,
            values.len()
        )));
    }
    Ok(())
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
        self.pages.insert(page, inner);
        Ok(())
    }

    fn write_table(&mut self, page: u32, offset: u32, slots: &[u32]) -> Result<(), MapError> {
        let inner = self.pages.get(&page).ok_or_else(|| MapError {
            map: maps::MAGLEV,
            op: "write table".into(),
            detail: format!("no page {page}"),
        })?;
        update_batch(IterableMap::map(inner).fd().as_fd(), offset, slots)
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
