//! The kernel data plane: weir's eBPF object loaded with aya and its programs attached to
//! the configured interfaces (this file); its maps behind [`MapWriter`] ([`writer`]); reading
//! them without writing ([`inspector`]).

mod inspector;
pub mod pins;
mod writer;

use std::{collections::BTreeMap, path::Path};

pub use self::{inspector::EbpfInspector, writer::EbpfMaps};
use self::{
    pins::{Found, Pins, Shape},
    writer::{err, reopen, take},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, IterableMap, Map, MapData, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp,
        XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::{L2Port, maps, programs};
use tracing::{info, warn};

use crate::dataplane::{
    AttachedMode, Dataplane, L2LeaseWriter, MapContents, MapError, MapWriter, inspect::Inspect, sys,
};
use crate::dataplane::{DataplaneLimits, XdpMode};

/// The eBPF object, built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// `statfs` type of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

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
    #[error("pinned data plane: {detail}")]
    Pins { detail: String },
    #[error("socket load balancing at cgroup {path}: {detail}")]
    Cgroup { path: String, detail: String },
    #[error("adopting the pinned data plane: {0} (lb-agent cleanup removes it)")]
    Adopt(#[source] MapError),
}

/// How the data plane came to be: what the agent found pinned when it loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Not pinned (no `dataplane.pin_dir` on a bpf filesystem): it lives as long as the agent.
    Unpinned,
    /// Nothing pinned: fresh maps, pinned now.
    Fresh,
    /// A previous agent's maps, adopted with their state.
    Adopted,
    /// A previous data plane this agent does not read (why): fresh maps, programmed before the
    /// links switch over; the old maps go once nothing uses them.
    Replaced(String),
}

impl Start {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unpinned => "unpinned",
            Self::Fresh => "fresh",
            Self::Adopted => "adopted",
            Self::Replaced(_) => "replaced",
        }
    }
}

/// An attachment's link, as held.
enum Held {
    /// Pinned: it stays attached when the agent goes, until its pin is removed.
    Pinned(FdLink, std::path::PathBuf),
    Xdp(XdpLink),
    /// Not pinned: it goes when dropped.
    Link(FdLink),
    /// TC through netlink (kernels without TCX): a filter, which stays when the agent goes.
    Tc(SchedClassifierLink),
}

impl Held {
    /// Detaches: removes the pin and drops the last handle.
    fn detach(self) -> std::io::Result<()> {
        match self {
            Self::Pinned(link, path) => {
                drop(link);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            }
            // Dropping the link detaches it.
            Self::Xdp(l) => {
                drop(l);
                Ok(())
            }
            Self::Link(l) => {
                drop(l);
                Ok(())
            }
            Self::Tc(l) => {
                drop(l);
                Ok(())
            }
        }
    }

    /// Lets go without detaching.
    fn keep(self) {
        match self {
            Self::Pinned(..) | Self::Xdp(_) | Self::Link(_) => {}
            // Dropping a netlink link would delete the filter.
            Self::Tc(l) => std::mem::forget(l),
        }
    }
}

struct Attachment {
    iface: String,
    ifindex: u32,
    mode: AttachedMode,
    xdp: Held,
    tc: Held,
}

/// The loaded programs and maps. Pinned, they outlive the agent: dropping it lets go of them
/// as they are (attached, with their state), [`Datapath::detach_all`] detaches and unpins.
/// Unpinned, dropping it detaches everything.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: EbpfMaps,
    attached: Vec<Attachment>,
    /// The socket hooks' links (attach point, link), when attached to a cgroup.
    sock: Vec<(&'static str, Held)>,
    /// Held open: the kernel empties a program array when its last user-space reference goes
    /// (pinned, the pin is one).
    _tails: [ProgramArray<MapData>; 2],
    pins: Option<Pins>,
    /// This program set's name under `pins`.
    load: String,
    start: Start,
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        name,
        detail: e.to_string(),
    }
}

/// The half-open table's size: a quarter of the connection table's, at least
/// `MIN_HALF_OPEN`.
pub fn half_open_size(limits: &DataplaneLimits) -> u32 {
    (limits.conntrack_size / 4).max(lb_common::limits::MIN_HALF_OPEN)
}

/// The capacities the agent gives the maps (the others keep the object's).
fn capacities(limits: &DataplaneLimits) -> [(&'static str, u32); 13] {
    [
        // A service of both scopes has two keys.
        (maps::SERVICES, limits.max_services.saturating_mul(2)),
        (maps::VIPS, limits.max_services),
        (maps::SERVICE_STATS, limits.max_services),
        (maps::BACKENDS, limits.max_backends),
        (maps::BACKEND_STATS, limits.max_backends),
        (maps::NEXTHOPS, limits.max_backends),
        (maps::SNAT_FULL, limits.max_backends),
        (maps::CONNTRACK, limits.conntrack_size),
        (maps::HALF_OPEN, half_open_size(limits)),
        (maps::SNAT, limits.conntrack_size),
        (maps::SOCK_REVNAT, limits.conntrack_size),
        (maps::ENDPOINTS, limits.max_backends),
        (maps::AFFINITY, limits.affinity_size),
    ]
}

/// The shapes of the pinned maps as this agent creates them.
fn expected_shapes(
    limits: &DataplaneLimits,
) -> Result<BTreeMap<&'static str, Shape>, DataplaneError> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| DataplaneError::Pins {
        detail: format!("reading the object's map definitions: {e}"),
    })?;
    let caps: BTreeMap<&str, u32> = capacities(limits).into_iter().collect();
    let mut out = BTreeMap::new();
    for name in maps::PINNED {
        let m = obj.maps.get(*name).ok_or(DataplaneError::Map {
            name,
            detail: "not in the eBPF object".into(),
        })?;
        let device = *name == maps::TX_PORTS;
        out.insert(
            *name,
            Shape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: (!device).then(|| m.value_size()),
                max_entries: caps.get(name).copied().unwrap_or_else(|| m.max_entries()),
                flags: m.map_flags(),
            },
        );
    }
    Ok(out)
}

impl Datapath {
    /// Loads the object with the map capacities of `limits` and verifies the programs, with
    /// its maps pinned under `pin_dir` when given: a previous agent's maps there are adopted
    /// when they match, replaced otherwise. Nothing is attached yet.
    pub fn load(limits: &DataplaneLimits, pin_dir: Option<&Path>) -> Result<Self, DataplaneError> {
        let pins = pin_dir.map(Pins::open).transpose()?;
        let load = pins::load_name();
        let start = match &pins {
            None => Start::Unpinned,
            Some(p) => match p.check(&expected_shapes(limits)?) {
                Found::Nothing => Start::Fresh,
                Found::Compatible => Start::Adopted,
                Found::Incompatible(why) => {
                    p.retire()?;
                    Start::Replaced(why)
                }
            },
        };
        let mut loader = EbpfLoader::new();
        for (name, n) in capacities(limits) {
            loader.map_max_entries(name, n);
        }
        let map_paths: Vec<(&str, std::path::PathBuf)> = match &pins {
            Some(p) => {
                p.prepare(&load)?;
                maps::PINNED.iter().map(|n| (*n, p.map(n))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(DataplaneError::Load)?;
        let load_err = |name| move |source| DataplaneError::Program { name, source };
        for name in [
            programs::XDP_INGRESS,
            programs::XDP_SCTP,
            programs::XDP_SNAT,
            programs::XDP_NEIGH,
            programs::XDP_SHARED,
        ] {
            let p: &mut Xdp = program_mut(&mut ebpf, name)?;
            p.load().map_err(load_err(name))?;
        }
        for name in [programs::TC_EGRESS, programs::TC_SCTP] {
            let p: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            p.load().map_err(load_err(name))?;
        }
        for (name, _) in programs::SOCK {
            let p: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            p.load().map_err(load_err(name))?;
        }
        let tails_dir = pins.as_ref().map(|p| p.programs_dir(&load));
        let tails = [
            tail_array(
                &mut ebpf,
                maps::XDP_TAILS,
                &[
                    programs::XDP_SCTP,
                    programs::XDP_SNAT,
                    programs::XDP_NEIGH,
                    programs::XDP_SHARED,
                    programs::XDP_INGRESS,
                ],
                tails_dir.as_deref(),
            )?,
            tail_array(
                &mut ebpf,
                maps::TC_TAILS,
                &[programs::TC_SCTP],
                tails_dir.as_deref(),
            )?,
        ];
        let mut maps = EbpfMaps::take(&mut ebpf, pins.clone())?;
        if start == Start::Adopted {
            maps.open_pages().map_err(DataplaneError::Adopt)?;
        }
        Ok(Self {
            ebpf,
            maps,
            attached: Vec::new(),
            sock: Vec::new(),
            _tails: tails,
            pins,
            load,
            start,
        })
    }

    /// What the agent found pinned when it loaded.
    pub fn start(&self) -> &Start {
        &self.start
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

    /// Attaches XDP (ingress) and TC (egress) to `iface`: where a previous agent's links are
    /// pinned for it, this agent's programs replace theirs in one step each (no packet meets
    /// an interface without a program); otherwise fresh links, pinned when the data plane is.
    /// With native XDP the interface also becomes a redirect target. On error a fresh
    /// attachment is undone; a previous agent's link keeps running (the new program when it
    /// was swapped already).
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<AttachedMode, DataplaneError> {
        let ifindex = ifindex(iface)?;
        // A previous agent's XDP link: on a TC failure it keeps the new program (the
        // interface was being served; detaching would stop that).
        let had_link = self.pins.as_ref().is_some_and(|p| {
            ["xdp-native", "xdp-generic"]
                .iter()
                .any(|k| p.link(iface, k).exists())
        });
        let (xdp, attached) = self.attach_xdp(iface, ifindex, mode)?;
        let tc = match self.attach_tc(iface, ifindex) {
            Ok(tc) => tc,
            Err(e) => {
                if had_link {
                    xdp.keep();
                } else if let Err(d) = xdp.detach() {
                    warn!(iface, error = %d, "detaching XDP after the TC failure failed");
                }
                return Err(e);
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
            xdp,
            tc,
        });
        Ok(attached)
    }

    /// A pinned link of `kind` on `iface` that is still attached to it.
    fn pinned_link(
        &self,
        iface: &str,
        ifindex: u32,
        kind: &str,
    ) -> Option<(FdLink, std::path::PathBuf)> {
        let path = self.pins.as_ref()?.link(iface, kind);
        if !path.exists() {
            return None;
        }
        match sys::pinned_link_ifindex(&path) {
            Ok(i) if i == ifindex => Some((FdLink::from(PinnedLink::from_pin(&path).ok()?), path)),
            other => {
                // Its interface is gone (the link is defunct) or is another one now.
                info!(iface, kind, found = ?other, "dropping a stale pinned link");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: XdpMode,
    ) -> Result<(Held, AttachedMode), DataplaneError> {
        let iface_err = |detail: String| DataplaneError::Interface {
            iface: iface.to_string(),
            detail,
        };
        for (kind, was) in [
            ("xdp-native", AttachedMode::Native),
            ("xdp-generic", AttachedMode::Generic),
        ] {
            let Some((link, path)) = self.pinned_link(iface, ifindex, kind) else {
                continue;
            };
            let fits = match mode {
                XdpMode::Auto => true,
                XdpMode::Native => was == AttachedMode::Native,
                XdpMode::Generic => was == AttachedMode::Generic,
            };
            if !fits {
                // XDP cannot change mode in place: a short gap, on a configuration change.
                warn!(
                    iface,
                    from = was.as_str(),
                    "xdp_mode changed: re-attaching XDP"
                );
                drop(link);
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let link =
                XdpLink::try_from(link).map_err(|e| iface_err(format!("pinned XDP link: {e}")))?;
            let xdp: &mut Xdp = program_mut(&mut self.ebpf, programs::XDP_INGRESS)?;
            let id = xdp
                .attach_to_link(link)
                .map_err(|e| iface_err(format!("replacing the XDP program: {e}")))?;
            let link = xdp
                .take_link(id)
                .map_err(|e| iface_err(format!("XDP link: {e}")))
                .and_then(|l| {
                    FdLink::try_from(l).map_err(|e| iface_err(format!("XDP link: {e}")))
                })?;
            info!(
                iface,
                mode = was.as_str(),
                "XDP program replaced in the pinned link"
            );
            return Ok((Held::Pinned(link, path), was));
        }
        let xdp: &mut Xdp = program_mut(&mut self.ebpf, programs::XDP_INGRESS)?;
        let (id, attached) = match mode {
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
        let link = xdp
            .take_link(id)
            .map_err(|e| iface_err(format!("XDP link: {e}")))?;
        let Some(pins) = &self.pins else {
            return Ok((Held::Xdp(link), attached));
        };
        let kind = match attached {
            AttachedMode::Native => "xdp-native",
            AttachedMode::Generic => "xdp-generic",
        };
        let path = pins.link(iface, kind);
        let link = FdLink::try_from(link).map_err(|e| iface_err(format!("XDP link: {e}")))?;
        pin_link(link, &path)
            .map(|l| (l, attached))
            .map_err(iface_err)
    }

    fn attach_tc(&mut self, iface: &str, ifindex: u32) -> Result<Held, DataplaneError> {
        let iface_err = |detail: String| DataplaneError::Interface {
            iface: iface.to_string(),
            detail,
        };
        if let Some((link, path)) = self.pinned_link(iface, ifindex, "tc") {
            let link = SchedClassifierLink::try_from(link)
                .map_err(|e| iface_err(format!("pinned TC link: {e}")))?;
            let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, programs::TC_EGRESS)?;
            let id = tc
                .attach_to_link(link)
                .map_err(|e| iface_err(format!("replacing the TC program: {e}")))?;
            let link = tc
                .take_link(id)
                .map_err(|e| iface_err(format!("TC link: {e}")))
                .and_then(|l| {
                    FdLink::try_from(l).map_err(|e| iface_err(format!("TC link: {e}")))
                })?;
            info!(iface, "TC program replaced in the pinned link");
            return Ok(Held::Pinned(link, path));
        }
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, programs::TC_EGRESS)?;
        // A netlink filter of a previous agent (kernels without TCX) would run beside ours.
        let _ = aya::programs::tc::qdisc_detach_program(
            iface,
            TcAttachType::Egress,
            programs::TC_EGRESS,
        );
        let id = tc
            .attach(iface, TcAttachType::Egress)
            .map_err(|e| iface_err(format!("TC egress: {e}")))?;
        let link = tc
            .take_link(id)
            .map_err(|e| iface_err(format!("TC link: {e}")))?;
        // Netlink (no TCX): not a link to pin; the filter itself stays when the agent goes.
        let (Some(pins), true) = (&self.pins, <&FdLink>::try_from(&link).is_ok()) else {
            return Ok(Held::Tc(link));
        };
        let link = FdLink::try_from(link).map_err(|e| iface_err(format!("TC link: {e}")))?;
        pin_link(link, &pins.link(iface, "tc")).map_err(iface_err)
    }

    /// Attaches the socket hooks (socket-level load balancing) to the cgroup v2 directory
    /// `cgroup`, for every process in it and below; other programs there keep running (the
    /// hooks are attached beside them). A previous agent's pinned links on the same cgroup get
    /// the new programs in place, so no connection meets the cgroup without them. On error the
    /// fresh links are detached again (swapped ones keep the new program).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        use std::os::unix::fs::MetadataExt as _;
        let err = |detail: String| DataplaneError::Cgroup {
            path: cgroup.display().to_string(),
            detail,
        };
        match crate::sys::fs_type(cgroup) {
            Ok(CGROUP2_SUPER_MAGIC) => {}
            Ok(_) => {
                return Err(err(
                    "not a cgroup v2 directory (mount cgroup2 there, or name the cgroup2 mount)"
                        .into(),
                ));
            }
            Err(e) => return Err(err(e.to_string())),
        }
        let dir = std::fs::File::open(cgroup).map_err(|e| err(e.to_string()))?;
        let id = dir.metadata().map_err(|e| err(e.to_string()))?.ino();
        let mut done: Vec<(&'static str, Held, bool)> = Vec::new();
        let result = (|| {
            for (name, attach) in programs::SOCK {
                if let Some(held) = self.swap_cgroup_link(name, attach, id).map_err(&err)? {
                    done.push((attach, held, false));
                    continue;
                }
                let prog: &mut CgroupSockAddr = program_mut(&mut self.ebpf, name)?;
                // A BPF link on a cgroup always runs beside the cgroup's other programs; the
                // kernel takes no flags with it ("Single" is none).
                let link_id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(|e| err(format!("{attach}: {}", chain(&e))))?;
                let link = prog
                    .take_link(link_id)
                    .map_err(|e| err(format!("{attach}: {e}")))
                    .and_then(|l| FdLink::try_from(l).map_err(|e| err(format!("{attach}: {e}"))))?;
                let held = match &self.pins {
                    Some(pins) => pin_link(link, &pins.cgroup_link(attach)).map_err(&err)?,
                    None => Held::Link(link),
                };
                done.push((attach, held, true));
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (attach, held, fresh) in done {
                if fresh {
                    if let Err(d) = held.detach() {
                        warn!(attach, error = %d, "detaching a socket hook after the failure failed");
                    }
                } else {
                    held.keep();
                }
            }
            return Err(e);
        }
        self.sock = done.into_iter().map(|(a, h, _)| (a, h)).collect();
        Ok(())
    }

    /// A previous agent's pinned link of `attach` on cgroup `id`, now running program `name`.
    /// A pinned link on another cgroup (or a gone one) is detached.
    fn swap_cgroup_link(
        &mut self,
        name: &'static str,
        attach: &'static str,
        id: u64,
    ) -> Result<Option<Held>, String> {
        use std::os::fd::AsFd as _;
        let Some(path) = self.pins.as_ref().map(|p| p.cgroup_link(attach)) else {
            return Ok(None);
        };
        if !path.exists() {
            return Ok(None);
        }
        match sys::pinned_cgroup_link(&path) {
            Ok((cg, link)) if cg == id => {
                let prog: &mut CgroupSockAddr =
                    program_mut(&mut self.ebpf, name).map_err(|e| e.to_string())?;
                let prog_fd = prog.fd().map_err(|e| format!("{attach}: {e}"))?;
                sys::link_update(link.as_fd(), prog_fd.as_fd())
                    .map_err(|e| format!("{attach}: replacing the program: {e}"))?;
                let link = PinnedLink::from_pin(&path)
                    .map_err(|e| format!("{attach}: pinned link: {e}"))?;
                Ok(Some(Held::Pinned(FdLink::from(link), path)))
            }
            other => {
                info!(attach, found = ?other.map(|(cg, _)| cg), "detaching a socket hook pinned for another cgroup");
                let _ = sys::detach_pinned_link(&path);
                let _ = std::fs::remove_file(&path);
                Ok(None)
            }
        }
    }

    /// Whether the socket hooks are attached.
    pub fn socket_hooks(&self) -> bool {
        !self.sock.is_empty()
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
            programs::XDP_SHARED,
            programs::TC_EGRESS,
            programs::TC_SCTP,
        ]
        .into_iter()
        .chain(programs::SOCK.map(|(name, _)| name))
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

    /// Detaches both programs from every interface (removing their pins), logging each.
    pub fn detach_all(&mut self) {
        for (attach, held) in std::mem::take(&mut self.sock) {
            if let Err(e) = held.detach() {
                warn!(attach, error = %e, "detaching the socket hook failed");
            }
        }
        for a in std::mem::take(&mut self.attached) {
            let _ = self.maps.tx_ports.remove(a.ifindex);
            for (what, held) in [("XDP", a.xdp), ("TC", a.tc)] {
                match held.detach() {
                    Ok(()) => info!(iface = %a.iface, "{what} program detached"),
                    Err(e) => warn!(iface = %a.iface, error = %e, "detaching {what} failed"),
                }
            }
        }
        if let Some(pins) = &self.pins {
            match pins.remove_all() {
                Ok(()) => info!(dir = %pins.root().display(), "pinned data plane removed"),
                Err(e) => {
                    warn!(dir = %pins.root().display(), error = %e, "removing the pins failed");
                }
            }
        }
    }

    /// Once every configured interface is attached: detaches pinned links of interfaces no
    /// longer configured, and removes what no link uses any more (other program sets, retired
    /// or other layouts' maps). Returns what it did, for the log.
    pub fn settle(&mut self) -> Vec<String> {
        let Some(pins) = self.pins.clone() else {
            return Vec::new();
        };
        let mut done = Vec::new();
        for iface in pins.links().into_keys() {
            if self.attached.iter().any(|a| a.iface == iface) {
                continue;
            }
            pins.remove_links(&iface);
            if let Ok(i) = ifindex(&iface) {
                let _ = self.maps.tx_ports.remove(i);
            }
            done.push(format!("detached from {iface} (no longer configured)"));
        }
        if self.sock.is_empty() {
            for attach in pins.cgroup_links() {
                let path = pins.cgroup_link(&attach);
                let _ = sys::detach_pinned_link(&path);
                let _ = std::fs::remove_file(&path);
                done.push(format!(
                    "socket hook {attach} detached (socket load balancing is off)"
                ));
            }
        }
        for path in pins.remove_stale(&self.load) {
            done.push(format!("removed {}", path.display()));
        }
        done
    }

    /// The pin directory, when the data plane is pinned.
    pub fn pins(&self) -> Option<&Pins> {
        self.pins.as_ref()
    }
}

/// `lb-agent cleanup`: detaches weir from every interface its pins under `dir` name (and any
/// TC netlink filter of weir's left on an interface of this network namespace, which kernels
/// without TCX keep when the agent goes), then removes the pins; the maps go with the last
/// holder. Says what it did.
pub fn cleanup(dir: &Path) -> Result<Vec<String>, String> {
    let pins = Pins::at(dir);
    let mut done = Vec::new();
    for attach in pins.cgroup_links() {
        match sys::detach_pinned_link(&pins.cgroup_link(&attach)) {
            Ok(()) => done.push(format!("socket hook {attach} detached")),
            Err(e) => done.push(format!("socket hook {attach}: {e} (already detached?)")),
        }
    }
    for (iface, kinds) in pins.links() {
        for kind in kinds {
            let path = pins.link(&iface, &kind);
            match sys::detach_pinned_link(&path) {
                Ok(()) => done.push(format!("{iface}: {kind} detached")),
                Err(e) => done.push(format!("{iface}: {kind}: {e} (already detached?)")),
            }
        }
    }
    for e in std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(iface) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if aya::programs::tc::qdisc_detach_program(
            &iface,
            TcAttachType::Egress,
            programs::TC_EGRESS,
        )
        .is_ok()
        {
            done.push(format!("{iface}: TC netlink filter removed"));
        }
    }
    if dir.exists() {
        pins.remove_all()
            .map_err(|e| format!("removing {}: {e}", dir.display()))?;
        done.push(format!("{} removed", dir.display()));
    }
    Ok(done)
}

/// An error with its sources, for the log (aya's errors keep the system call's in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// Pins `link` at `path` (replacing a stale pin there).
fn pin_link(link: FdLink, path: &Path) -> Result<Held, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let pinned = link
        .pin(path)
        .map_err(|e| format!("pinning the link at {}: {e}", path.display()))?;
    Ok(Held::Pinned(FdLink::from(pinned), path.to_path_buf()))
}

impl Dataplane for Datapath {
    fn maps(&mut self) -> &mut dyn MapWriter {
        &mut self.maps
    }

    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<AttachedMode, DataplaneError> {
        Datapath::attach(self, iface, mode)
    }

    fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        Datapath::attach_cgroup(self, cgroup)
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

    fn start(&self) -> Start {
        self.start.clone()
    }

    fn previous_state(&self) -> Result<Option<MapContents>, MapError> {
        if self.start == Start::Adopted {
            self.maps.contents().map(Some)
        } else {
            Ok(None)
        }
    }

    fn settle(&mut self) -> Vec<String> {
        Datapath::settle(self)
    }
}

impl Drop for Datapath {
    /// Pinned, the programs stay attached with their maps (the next agent adopts them);
    /// unpinned, they go with the agent.
    fn drop(&mut self) {
        if self.pins.is_some() {
            for a in std::mem::take(&mut self.attached) {
                a.xdp.keep();
                a.tc.keep();
            }
            for (_, held) in std::mem::take(&mut self.sock) {
                held.keep();
            }
        } else {
            self.detach_all();
        }
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
    pin_dir: Option<&Path>,
) -> Result<ProgramArray<MapData>, DataplaneError> {
    let taken = take(ebpf, map)?;
    if let Some(dir) = pin_dir {
        taken.pin(dir.join(map)).map_err(|e| DataplaneError::Map {
            name: map,
            detail: format!("pinning: {e}"),
        })?;
    }
    let mut array: ProgramArray<MapData> = taken.try_into().map_err(map_err(map))?;
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
