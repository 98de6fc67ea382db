//! The kernel data plane: weir's eBPF object loaded with aya and its programs attached to
//! the configured interfaces (this file); its maps behind [`MapWriter`] ([`writer`]); reading
//! them without writing ([`inspector`]).

mod inspector;
mod writer;

use self::writer::{err, reopen, take};
pub use self::{inspector::EbpfInspector, writer::EbpfMaps};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, IterableMap, Map, MapData, ProgramArray},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode, tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
};
use lb_common::{L2Port, maps, programs};
use tracing::{info, warn};

use crate::dataplane::{
    AttachedMode, Dataplane, L2LeaseWriter, MapError, MapWriter, inspect::Inspect, sys,
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

fn ifindex(iface: &str) -> Result<u32, DataplaneError> {
    let err = |detail: &str| DataplaneError::Interface {
        iface: iface.to_string(),
        detail: detail.to_string(),
    };
    crate::sys::if_nametoindex(iface).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => err("invalid name"),
        _ => err("no such interface"),
    })
}

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
