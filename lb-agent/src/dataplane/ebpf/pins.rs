//! Where the data plane lives in bpffs, so that it outlives the agent that loaded it.
//!
//! ```text
//! <dir>/                          dataplane.pin_dir, /sys/fs/bpf/weir by default
//!   layout-v<N>/                  the maps of layout version N (lb_common::LAYOUT_VERSION):
//!     SERVICES, CONNTRACK, ...    every map of lb_common::maps::PINNED
//!     MAGLEV_PAGE_<p>             the Maglev table pages (inner maps of MAGLEV)
//!   programs/<load>/              one loaded program set's tail-call arrays: the kernel
//!     XDP_TAILS, TC_TAILS         empties a program array when nothing holds it
//!   links/<iface>/                the attachments: XDP (its mode in the name) and TC egress
//!     xdp-native | xdp-generic, tc
//!   retired-<n>/                  a replaced layout's maps, kept until no link uses them
//! ```
//!
//! A starting agent whose maps match what is pinned (same layout version, same types, key
//! and value sizes, capacities and flags) adopts them: connections, source-NAT and affinity
//! entries and counters carry on. Anything else is never read as this layout: the old maps
//! are retired, fresh ones are programmed, and the links are switched over to the new
//! programs.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use lb_common::LAYOUT_VERSION;

use super::DataplaneError;

/// `BPF_FS_MAGIC`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What a starting agent found pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing: a fresh data plane.
    Nothing,
    /// A data plane of this layout with these capacities: adopted as it is.
    Compatible,
    /// Something this agent does not read (why): replaced.
    Incompatible(String),
}

/// A map's kernel shape, as created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    /// None: not compared, nor are the flags (device maps: the loader picks their value size
    /// from the kernel's features, and the kernel adds `BPF_F_RDONLY_PROG` to their flags).
    pub value_size: Option<u32>,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} value {} entries {} flags {:#x}",
            self.map_type,
            self.key_size,
            self.value_size
                .map_or_else(|| "-".into(), |v| v.to_string()),
            self.max_entries,
            self.flags
        )
    }
}

/// The pin directory.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

fn io_err(path: &Path, what: &str) -> impl Fn(io::Error) -> DataplaneError {
    let path = path.display().to_string();
    let what = what.to_string();
    move |e| DataplaneError::Pins {
        detail: format!("{what} {path}: {e}"),
    }
}

impl Pins {
    /// The pin directory `root`, created if needed; it must be on a bpf filesystem.
    pub fn open(root: &Path) -> Result<Self, DataplaneError> {
        std::fs::create_dir_all(root).map_err(io_err(root, "creating"))?;
        let fs = crate::sys::fs_type(root).map_err(io_err(root, "statfs"))?;
        if fs != BPF_FS_MAGIC {
            return Err(DataplaneError::Pins {
                detail: format!(
                    "{} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf; \
                     in Kubernetes the chart mounts the host's)",
                    root.display()
                ),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The pin directory without checking it (for `cleanup`, which removes what is there).
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This layout's map directory.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("layout-v{LAYOUT_VERSION}"))
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn page(&self, page: u32) -> PathBuf {
        self.maps_dir().join(format!("MAGLEV_PAGE_{page}"))
    }

    /// The Maglev pages pinned in this layout's directory.
    pub fn pages(&self) -> Vec<(u32, PathBuf)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.maps_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("MAGLEV_PAGE_"))
                .and_then(|n| n.parse().ok())
            {
                out.push((n, e.path()));
            }
        }
        out.sort();
        out
    }

    /// The directory of one loaded program set.
    pub fn programs_dir(&self, load: &str) -> PathBuf {
        self.root.join("programs").join(load)
    }

    /// Where the link of `kind` (`xdp-native`, `xdp-generic`, `tc`) on `iface` is pinned.
    pub fn link(&self, iface: &str, kind: &str) -> PathBuf {
        self.root.join("links").join(iface).join(kind)
    }

    /// Where the socket hook link of `attach` (`connect4`, ...) is pinned.
    pub fn cgroup_link(&self, attach: &str) -> PathBuf {
        self.root.join("cgroup-links").join(attach)
    }

    /// The socket hooks' pinned links (their attach points).
    pub fn cgroup_links(&self) -> Vec<String> {
        entries(&self.root.join("cgroup-links"))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect()
    }

    /// Pinned links: interface → the kinds pinned for it.
    pub fn links(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for dir in entries(&self.root.join("links")) {
            let Some(iface) = dir.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let kinds: Vec<String> = entries(&dir.path())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect();
            out.insert(iface, kinds);
        }
        out
    }

    /// Compares what is pinned in this layout's directory with `expected` (map → shape), and
    /// says whether other layouts are pinned beside it.
    pub fn check(&self, expected: &BTreeMap<&'static str, Shape>) -> Found {
        let others = self.other_layouts();
        let mut missing = Vec::new();
        let mut present = 0;
        for (name, want) in expected {
            let path = self.map(name);
            if !path.exists() {
                missing.push(*name);
                continue;
            }
            present += 1;
            match MapInfo::from_pin(&path) {
                Ok(info) => {
                    let have = Shape {
                        map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
                        key_size: info.key_size(),
                        value_size: want.value_size.map(|_| info.value_size()),
                        max_entries: info.max_entries(),
                        flags: if want.value_size.is_some() {
                            info.map_flags()
                        } else {
                            want.flags
                        },
                    };
                    if have != *want {
                        return Found::Incompatible(format!(
                            "pinned {name} is {have}, this agent's is {want} \
                             (a changed dataplane capacity?)"
                        ));
                    }
                }
                Err(e) => {
                    return Found::Incompatible(format!("pinned {name} unreadable: {e}"));
                }
            }
        }
        match (present, missing.is_empty(), others.is_empty()) {
            (0, _, true) => Found::Nothing,
            (0, _, false) => Found::Incompatible(format!(
                "pinned by another layout version ({}); this agent's is {LAYOUT_VERSION}",
                others
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            (_, false, _) => {
                Found::Incompatible(format!("incomplete: {} not pinned", missing.join(", ")))
            }
            (_, true, _) => Found::Compatible,
        }
    }

    /// Layout directories of other versions, and retired ones.
    fn other_layouts(&self) -> Vec<PathBuf> {
        let ours = self.maps_dir();
        entries(&self.root)
            .map(|e| e.path())
            .filter(|p| {
                p != &ours
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("layout-v") || n.starts_with("retired-"))
            })
            .collect()
    }

    /// Moves this layout's maps aside: programs attached now keep using them until their
    /// links are switched over; [`Pins::remove_stale`] removes them then.
    pub fn retire(&self) -> Result<(), DataplaneError> {
        let from = self.maps_dir();
        if !from.exists() {
            return Ok(());
        }
        let to = self
            .root
            .join(format!("retired-{}", super::super::sys::monotonic_ns()));
        std::fs::rename(&from, &to).map_err(io_err(&from, "retiring"))
    }

    /// Creates this layout's and `load`'s directories.
    pub fn prepare(&self, load: &str) -> Result<(), DataplaneError> {
        for dir in [self.maps_dir(), self.programs_dir(load)] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir, "creating"))?;
        }
        Ok(())
    }

    /// Removes other layouts, retired maps and program sets other than `load` (once every link
    /// runs `load`'s programs). Returns what was removed.
    pub fn remove_stale(&self, load: &str) -> Vec<PathBuf> {
        let mut gone = Vec::new();
        let programs = self.root.join("programs");
        let old_programs = entries(&programs)
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()) != Some(load));
        for path in self.other_layouts().into_iter().chain(old_programs) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => gone.push(path),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove stale pins");
                }
            }
        }
        gone
    }

    /// Removes the link pins of `iface`.
    pub fn remove_links(&self, iface: &str) {
        let _ = std::fs::remove_dir_all(self.root.join("links").join(iface));
    }

    /// Removes everything under the pin directory, and the directory itself.
    pub fn remove_all(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// The entries of `dir` (none when it cannot be read: nothing pinned there).
fn entries(dir: &Path) -> impl Iterator<Item = std::fs::DirEntry> {
    std::fs::read_dir(dir).into_iter().flatten().flatten()
}

/// A name for one loaded program set, unique on this host.
pub fn load_name() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        super::super::sys::monotonic_ns()
    )
}
