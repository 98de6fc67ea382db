//! What a health check is: the checked form, built from the standalone config's `health_check`
//! block or from Service annotations (`weir.dev/health-check*`, with LoxiLB's `loxilb.io/*` as
//! aliases). Both parsers are pure functions; a bad value is an error naming the key.

use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::Protocol;

/// The defaults: interval 1 s, timeout 500 ms, rise 2, fall 2.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 2;
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
pub const MAX_INTERVAL: Duration = Duration::from_hours(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Ping,
    Tcp,
    Udp,
    Sctp,
    Http,
    Https,
}

impl CheckKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
            Self::Http => "http",
            Self::Https => "https",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ping" | "icmp" => Self::Ping,
            "tcp" => Self::Tcp,
            "udp" => Self::Udp,
            "sctp" => Self::Sctp,
            "http" => Self::Http,
            "https" => Self::Https,
            _ => return None,
        })
    }

    fn http(self) -> bool {
        matches!(self, Self::Http | Self::Https)
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a `tcp` check opens its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Handshake {
    /// SYN, then SYN-ACK (up) or reset (down); the node's kernel resets the half-open
    /// connection. The default when the check sends no request.
    Half,
    /// A full connect, then close with a reset; needed to send a request.
    Full,
}

impl Handshake {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Half => "half",
            Self::Full => "full",
        }
    }
}

/// Accepted HTTP status ranges, e.g. `200-399` or `200,204,300-399`.
/// An `expect_status` value that is not a list of HTTP status codes and ranges.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StatusRangeError {
    #[error("{0:?} is not an HTTP status code (100-599)")]
    NotAStatus(String),
    #[error("{lo}-{hi} is an empty range")]
    Empty { lo: u16, hi: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatusRanges(pub Vec<(u16, u16)>);

impl StatusRanges {
    pub fn default_ok() -> Self {
        Self(vec![(200, 399)])
    }

    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }

    pub fn parse(s: &str) -> Result<Self, StatusRangeError> {
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim) {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let code = |x: &str| {
                x.parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(|| StatusRangeError::NotAStatus(x.to_string()))
            };
            let (lo, hi) = (code(lo)?, code(hi)?);
            if lo > hi {
                return Err(StatusRangeError::Empty { lo, hi });
            }
            v.push((lo, hi));
        }
        Ok(Self(v))
    }
}

impl fmt::Display for StatusRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// How to probe one target: everything but the target's address and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Probe {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// http(s): request path.
    pub path: String,
    /// http(s): Host header and TLS SNI (default: the target's address).
    pub host: Option<String>,
    pub expect_status: StatusRanges,
    /// tcp/udp: payload to send.
    pub request: Option<String>,
    /// tcp/udp: the reply must contain this.
    pub response: Option<String>,
    /// tcp: half-open (SYN only) or a full connection. Other types: `Full`.
    pub handshake: Handshake,
    /// https: verify the server's certificate against this CA bundle (default: no verification).
    pub ca_file: Option<PathBuf>,
}

/// A service's health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    /// Port to probe (default: each backend's own port).
    pub port: Option<u16>,
    /// When every backend is unhealthy: drop new flows instead of sending them to all backends.
    pub fail_closed: bool,
}

/// The config file's `health_check` block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(rename = "type")]
    kind: CheckKind,
    port: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    path: Option<String>,
    host: Option<String>,
    expect_status: Option<String>,
    request: Option<String>,
    response: Option<String>,
    handshake: Option<Handshake>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    fail_closed: bool,
}

/// One problem, at a key (`interval`, or an annotation name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecProblem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// The fields common to both sources, before checking.
#[derive(Default)]
struct Fields {
    kind: Option<CheckKind>,
    port: Option<u16>,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    path: Option<String>,
    host: Option<String>,
    expect_status: Option<StatusRanges>,
    request: Option<String>,
    response: Option<String>,
    handshake: Option<Handshake>,
    ca_file: Option<PathBuf>,
    fail_closed: bool,
}

/// Field names as each source spells them, for messages.
#[derive(Clone, Copy)]
struct Names {
    kind: &'static str,
    port: &'static str,
    interval: &'static str,
    timeout: &'static str,
    rise: &'static str,
    fall: &'static str,
    path: &'static str,
    host: &'static str,
    expect_status: &'static str,
    request: &'static str,
    response: &'static str,
    handshake: &'static str,
    ca_file: &'static str,
}

const CONFIG_NAMES: Names = Names {
    kind: "type",
    port: "port",
    interval: "interval",
    timeout: "timeout",
    rise: "rise",
    fall: "fall",
    path: "path",
    host: "host",
    expect_status: "expect_status",
    request: "request",
    response: "response",
    handshake: "handshake",
    ca_file: "ca_file",
};

const ANNOTATION_NAMES: Names = Names {
    kind: "weir.dev/health-check",
    port: "weir.dev/health-check-port",
    interval: "weir.dev/health-check-interval",
    timeout: "weir.dev/health-check-timeout",
    rise: "weir.dev/health-check-rise",
    fall: "weir.dev/health-check-fall",
    path: "weir.dev/health-check-path",
    host: "weir.dev/health-check-host",
    expect_status: "weir.dev/health-check-expect-status",
    request: "weir.dev/health-check-request",
    response: "weir.dev/health-check-response",
    handshake: "weir.dev/health-check-handshake",
    ca_file: "weir.dev/health-check-ca-file",
};

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']'))
}

impl Fields {
    /// Checks the fields and applies the defaults.
    fn check(self, names: &Names) -> Result<HealthCheck, Vec<SpecProblem>> {
        let mut p = Vec::new();
        let mut fail = |key: &str, message: String| {
            p.push(SpecProblem {
                key: key.to_string(),
                message,
            });
        };
        let Some(kind) = self.kind else {
            fail(names.kind, "the check type is required".into());
            return Err(p);
        };
        let interval = self.interval.unwrap_or(DEFAULT_INTERVAL);
        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT.min(interval));
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
            fail(
                names.interval,
                format!(
                    "{} is outside 10ms..1h",
                    humantime::format_duration(interval)
                ),
            );
        }
        if timeout.is_zero() || timeout > interval {
            fail(
                names.timeout,
                format!(
                    "{} must be above 0 and at most the interval ({})",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            );
        }
        let (rise, fall) = (
            self.rise.unwrap_or(DEFAULT_RISE),
            self.fall.unwrap_or(DEFAULT_FALL),
        );
        for (key, v) in [(names.rise, rise), (names.fall, fall)] {
            if !(1..=100).contains(&v) {
                fail(key, format!("{v} is outside 1..100"));
            }
        }
        if self.port == Some(0) {
            fail(names.port, "must be between 1 and 65535".into());
        }
        if self.port.is_some() && kind == CheckKind::Ping {
            fail(names.port, "a ping check has no port".into());
        }
        let http_only = [
            (names.path, self.path.is_some()),
            (names.host, self.host.is_some()),
            (names.expect_status, self.expect_status.is_some()),
        ];
        for (key, set) in http_only {
            if set && !kind.http() {
                fail(
                    key,
                    format!("only http and https checks take it, not {kind}"),
                );
            }
        }
        if self.ca_file.is_some() && kind != CheckKind::Https {
            fail(
                names.ca_file,
                format!("only https checks take it, not {kind}"),
            );
        }
        for (key, set) in [
            (names.request, self.request.is_some()),
            (names.response, self.response.is_some()),
        ] {
            if set && !matches!(kind, CheckKind::Tcp | CheckKind::Udp) {
                fail(key, format!("only tcp and udp checks take it, not {kind}"));
            }
        }
        let payload = self.request.is_some() || self.response.is_some();
        let handshake = match (kind, self.handshake) {
            (CheckKind::Tcp, Some(Handshake::Half)) if payload => {
                fail(
                    names.handshake,
                    "a half-open check sends no request and reads no response: use full".into(),
                );
                Handshake::Half
            }
            (CheckKind::Tcp, Some(h)) => h,
            (CheckKind::Tcp, None) if !payload => Handshake::Half,
            (_, None) => Handshake::Full,
            (_, Some(_)) => {
                fail(
                    names.handshake,
                    format!("only tcp checks take it, not {kind}"),
                );
                Handshake::Full
            }
        };
        if kind == CheckKind::Udp && self.request.as_deref().is_none_or(str::is_empty) {
            fail(
                names.request,
                "a udp check needs a request (silence cannot tell a live server from a dead one)"
                    .into(),
            );
        }
        if let Some(path) = &self.path
            && (!path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            fail(names.path, format!("{path:?} is not an absolute path"));
        }
        if let Some(host) = &self.host
            && !valid_host(host)
        {
            fail(names.host, format!("{host:?} is not a host name"));
        }
        if !p.is_empty() {
            return Err(p);
        }
        Ok(HealthCheck {
            probe: Probe {
                kind,
                interval,
                timeout,
                rise,
                fall,
                path: self.path.unwrap_or_else(|| "/".into()),
                host: self.host,
                expect_status: self.expect_status.unwrap_or_else(StatusRanges::default_ok),
                request: self.request,
                response: self.response,
                handshake,
                ca_file: self.ca_file,
            },
            port: self.port,
            fail_closed: self.fail_closed,
        })
    }
}

impl RawHealthCheck {
    /// The checked form; problems name the block's keys.
    pub fn check(self) -> Result<HealthCheck, Vec<SpecProblem>> {
        let mut early = Vec::new();
        let expect_status = match self.expect_status.as_deref().map(StatusRanges::parse) {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                early.push(SpecProblem {
                    key: "expect_status".into(),
                    message: e.to_string(),
                });
                None
            }
            None => None,
        };
        let fields = Fields {
            kind: Some(self.kind),
            port: self.port,
            interval: self.interval,
            timeout: self.timeout,
            rise: self.rise,
            fall: self.fall,
            path: self.path,
            host: self.host,
            expect_status,
            request: self.request,
            response: self.response,
            handshake: self.handshake,
            ca_file: self.ca_file,
            fail_closed: self.fail_closed,
        };
        match fields.check(&CONFIG_NAMES) {
            Ok(h) if early.is_empty() => Ok(h),
            Ok(_) => Err(early),
            Err(mut p) => {
                early.append(&mut p);
                Err(early)
            }
        }
    }
}

/// LoxiLB's annotations, accepted as aliases.
mod loxilb {
    pub const LIVENESS: &str = "loxilb.io/liveness";
    pub const TYPE: &str = "loxilb.io/probetype";
    pub const PORT: &str = "loxilb.io/probeport";
    pub const REQUEST: &str = "loxilb.io/probereq";
    pub const RESPONSE: &str = "loxilb.io/proberesp";
    /// LoxiLB's probe interval, in seconds.
    pub const INTERVAL: &str = "loxilb.io/probetimeout";
    /// Failures before an endpoint is down.
    pub const RETRIES: &str = "loxilb.io/proberetries";
}

/// The health check a Service's annotations ask for (None: no check), for a Service whose
/// ports use `protocol`. `weir.dev/health-check*` wins over the `loxilb.io/*` aliases; a LoxiLB
/// `liveness: "yes"` without a probe type checks with the Service's own protocol, as LoxiLB
/// does. Errors name the annotation.
pub fn from_annotations(
    annotations: &BTreeMap<String, String>,
    protocol: Protocol,
) -> Result<Option<HealthCheck>, Vec<SpecProblem>> {
    // The value as written (payloads keep their whitespace); parsers trim.
    let get = |weir: &'static str, alias: Option<&'static str>| -> Option<(&'static str, &str)> {
        if let Some(v) = annotations.get(weir) {
            return Some((weir, v.as_str()));
        }
        alias.and_then(|a| annotations.get(a).map(|v| (a, v.as_str())))
    };
    let mut problems = Vec::new();
    let mut fail = |key: &str, message: String| {
        problems.push(SpecProblem {
            key: key.to_string(),
            message,
        });
    };

    // The type: weir.dev/health-check, else loxilb.io/probetype, else liveness → protocol.
    let kind = match get(ANNOTATION_NAMES.kind, Some(loxilb::TYPE)).map(|(k, v)| (k, v.trim())) {
        Some((_, "none" | "")) => return Ok(None),
        Some((key, v)) => {
            if let Some(k) = CheckKind::parse(&v.to_ascii_lowercase()) {
                Some(k)
            } else {
                fail(
                    key,
                    format!("{v:?} is not one of ping, tcp, udp, sctp, http, https, none"),
                );
                None
            }
        }
        None => match annotations.get(loxilb::LIVENESS).map(|v| v.trim()) {
            Some("yes" | "true") => Some(match protocol {
                Protocol::Tcp => CheckKind::Tcp,
                Protocol::Udp => CheckKind::Udp,
                Protocol::Sctp => CheckKind::Sctp,
            }),
            Some("no" | "false") | None => {
                // Other weir.dev/health-check-* keys without a type are a mistake worth saying.
                if let Some(k) = annotations
                    .keys()
                    .find(|k| k.starts_with("weir.dev/health-check-"))
                {
                    fail(
                        k,
                        format!("set {} to the check type too", ANNOTATION_NAMES.kind),
                    );
                    return Err(problems);
                }
                return Ok(None);
            }
            Some(v) => {
                fail(loxilb::LIVENESS, format!("{v:?} is neither yes nor no"));
                None
            }
        },
    };

    let mut f = Fields {
        kind,
        ..Fields::default()
    };
    // Problems found when checking name the key the value came from (weir's or an alias).
    let mut names = ANNOTATION_NAMES;
    let number = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{v:?} is not a whole number"))
    };
    if let Some((key, v)) = get(ANNOTATION_NAMES.port, Some(loxilb::PORT)) {
        names.port = key;
        match v.trim().parse::<u16>() {
            Ok(p) => f.port = Some(p),
            Err(_) => fail(key, format!("{v:?} is not a port number")),
        }
    }
    match (
        annotations.get(ANNOTATION_NAMES.interval),
        annotations.get(loxilb::INTERVAL),
    ) {
        (Some(v), _) => match humantime::parse_duration(v.trim()) {
            Ok(d) => f.interval = Some(d),
            Err(e) => fail(ANNOTATION_NAMES.interval, format!("{v:?}: {e}")),
        },
        (None, Some(v)) => match number(v) {
            Ok(s) => {
                names.interval = loxilb::INTERVAL;
                f.interval = Some(Duration::from_secs(u64::from(s)));
            }
            Err(m) => fail(loxilb::INTERVAL, format!("{m} (seconds)")),
        },
        (None, None) => {}
    }
    if let Some(v) = annotations.get(ANNOTATION_NAMES.timeout) {
        match humantime::parse_duration(v.trim()) {
            Ok(d) => f.timeout = Some(d),
            Err(e) => fail(ANNOTATION_NAMES.timeout, format!("{v:?}: {e}")),
        }
    }
    if let Some(v) = annotations.get(ANNOTATION_NAMES.rise) {
        match number(v) {
            Ok(n) => f.rise = Some(n),
            Err(m) => fail(ANNOTATION_NAMES.rise, m),
        }
    }
    if let Some((key, v)) = get(ANNOTATION_NAMES.fall, Some(loxilb::RETRIES)) {
        names.fall = key;
        match number(v) {
            Ok(n) => f.fall = Some(n),
            Err(m) => fail(key, m),
        }
    }
    f.path = annotations
        .get(ANNOTATION_NAMES.path)
        .map(|v| v.trim().to_string());
    f.host = annotations
        .get(ANNOTATION_NAMES.host)
        .map(|v| v.trim().to_string());
    if let Some(v) = annotations.get(ANNOTATION_NAMES.expect_status) {
        match StatusRanges::parse(v) {
            Ok(r) => f.expect_status = Some(r),
            Err(e) => fail(ANNOTATION_NAMES.expect_status, e.to_string()),
        }
    }
    if let Some((key, v)) = get(ANNOTATION_NAMES.request, Some(loxilb::REQUEST)) {
        names.request = key;
        f.request = Some(v.to_string());
    }
    if let Some((key, v)) = get(ANNOTATION_NAMES.response, Some(loxilb::RESPONSE)) {
        names.response = key;
        f.response = Some(v.to_string());
    }
    if let Some(v) = annotations.get(ANNOTATION_NAMES.handshake) {
        match v.trim() {
            "half" => f.handshake = Some(Handshake::Half),
            "full" => f.handshake = Some(Handshake::Full),
            other => fail(
                ANNOTATION_NAMES.handshake,
                format!("{other:?} is neither half nor full"),
            ),
        }
    }
    f.ca_file = annotations
        .get(ANNOTATION_NAMES.ca_file)
        .map(|v| PathBuf::from(v.trim()));
    if let Some(v) = annotations.get("weir.dev/health-check-fail-closed") {
        match v.trim() {
            "true" | "yes" => f.fail_closed = true,
            "false" | "no" => {}
            other => fail(
                "weir.dev/health-check-fail-closed",
                format!("{other:?} is neither true nor false"),
            ),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    f.check(&names).map(Some)
}

#[cfg(test)]
mod tests;
