//! Where a config comes from — a file or the embedded default — and the facts of the host the
//! agent reads (its sysctls, its name): the one place that reads files and `/proc`.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use super::{raw::RawConfig, *};

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    /// The embedded default configuration.
    pub fn default_config() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME)
    }

    /// Parses and checks `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            file: file.to_string(),
            problems,
        };
        // The field path of a bad value, as serde_path_to_error tracks it.
        let mut at = None;
        let raw: RawConfig =
            serde_saphyr::with_deserializer_from_str_with_options(text, yaml_options(), |de| {
                serde_path_to_error::deserialize(de).map_err(|e| {
                    at = Some(e.path().to_string());
                    e.into_inner()
                })
            })
            .map_err(|e| {
                let path = match at.as_deref() {
                    None | Some(".") => "(top level)".to_string(),
                    Some(p) => p.to_string(),
                };
                invalid(vec![Problem {
                    path,
                    message: yaml_message(&e),
                }])
            })?;
        raw.check().map_err(invalid)
    }
}

/// The parser's limits: room for a file of as many services as the data plane holds (the
/// parser's defaults, 250 000 nodes, refuse a file of some 15 000 services), with the
/// defaults' protection against alias expansion kept.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 8_000_000;
    budget.max_events = 32_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// A YAML error's message on one line, with its place in the file: `what (line L column C)`.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    match text
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((place, message)) => format!("{message} (line {place})"),
        None => text.to_string(),
    }
}

/// Where a config came from: a file path, or the embedded default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

impl Source {
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.load_with_fingerprint().map(|(c, _)| c)
    }

    /// The config and the bytes it was parsed from (what [`fingerprint`](Self::fingerprint)
    /// compares), read once so that the two always match.
    pub fn load_with_fingerprint(&self) -> Result<(Config, Option<Vec<u8>>), ConfigError> {
        match self {
            Self::File(p) => {
                let file = p.display().to_string();
                let bytes = std::fs::read(p).map_err(|source| ConfigError::Read {
                    file: file.clone(),
                    source,
                })?;
                let text = String::from_utf8_lossy(&bytes);
                Ok((Config::parse(&text, &file)?, Some(bytes)))
            }
            Self::Embedded => Ok((Config::default_config()?, None)),
        }
    }

    /// The file's current bytes, to notice changes (the embedded default never changes).
    pub fn fingerprint(&self) -> Option<Vec<u8>> {
        match self {
            Self::File(p) => std::fs::read(p).ok(),
            Self::Embedded => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Embedded => f.write_str(DEFAULT_CONFIG_NAME),
        }
    }
}

/// This network namespace's ephemeral port range and its reserved ports (the text of
/// `ip_local_reserved_ports`; empty when unreadable).
pub fn ephemeral_ports() -> Result<(u16, u16, String), ConfigError> {
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let text = std::fs::read_to_string(RANGE).map_err(|source| ConfigError::Host {
        what: RANGE,
        source,
    })?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return Err(ConfigError::Host {
            what: RANGE,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected contents {text:?}"),
            ),
        });
    };
    let reserved = std::fs::read_to_string(RESERVED).unwrap_or_default();
    Ok((lo, hi, reserved))
}

/// This host's name (the default node name among the announcing nodes).
/// This process's cgroup memory limit in bytes (cgroup v2's `memory.max`, else v1's
/// `memory.limit_in_bytes`, as mounted in a container); None when unlimited or unknown.
pub fn cgroup_memory_limit() -> Option<u64> {
    let v2 = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .into_iter()
        .flat_map(|path| {
            [
                format!("/sys/fs/cgroup{}/memory.max", path.trim_end()),
                "/sys/fs/cgroup/memory.max".to_string(),
            ]
        });
    let v1 = [
        "/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string(),
        "/sys/fs/cgroup/memory.max".to_string(),
    ];
    v2.chain(v1).find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        let n: u64 = text.trim().parse().ok()?;
        // v1 reports "no limit" as a huge page-aligned number.
        (n < 1 << 62).then_some(n)
    })
}

pub fn host_name() -> Result<String, ConfigError> {
    const HOSTNAME: &str = "/proc/sys/kernel/hostname";
    std::fs::read_to_string(HOSTNAME)
        .map(|n| n.trim().to_string())
        .map_err(|source| ConfigError::Host {
            what: HOSTNAME,
            source,
        })
}

/// Kubernetes mode's settings from the environment (the chart sets them from the Downward
/// API): `NODE_NAME`, `POD_NAME`, `POD_NAMESPACE`; an empty variable counts as unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeEnv {
    pub node_name: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub daemonset: Option<String>,
}

impl KubeEnv {
    pub fn read() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            node_name: var("NODE_NAME"),
            pod_name: var("POD_NAME"),
            pod_namespace: var("POD_NAMESPACE"),
            daemonset: var("DAEMONSET_NAME"),
        }
    }
}
