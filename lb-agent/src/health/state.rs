//! The rise/fall state machine of one check, and what a failed probe says.

use std::fmt;

use serde::Serialize;

/// What the checks say about a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not probed yet: kept out of rotation until the first answer.
    Unknown,
    Up,
    Down,
}

impl Health {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts consecutive results against the current state:
/// - `Unknown` takes the first result as it is (a new target joins after one success, not
///   `rise`, and one that never answered is down at once);
/// - `Up` turns `Down` after `fall` failures in a row;
/// - `Down` turns `Up` after `rise` successes in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracker {
    health: Health,
    /// Consecutive results that disagree with `health`.
    streak: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new(Health::Unknown)
    }
}

impl Tracker {
    pub const fn new(health: Health) -> Self {
        Self { health, streak: 0 }
    }

    pub const fn health(&self) -> Health {
        self.health
    }

    /// Results against the current state so far.
    pub const fn streak(&self) -> u32 {
        self.streak
    }

    /// Takes one probe result; returns the new state when it changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        let next = match (self.health, ok) {
            (Health::Unknown, true) => Health::Up,
            (Health::Unknown, false) => Health::Down,
            (Health::Up, true) | (Health::Down, false) => {
                self.streak = 0;
                return None;
            }
            (Health::Up, false) => {
                self.streak += 1;
                if self.streak < fall.max(1) {
                    return None;
                }
                Health::Down
            }
            (Health::Down, true) => {
                self.streak += 1;
                if self.streak < rise.max(1) {
                    return None;
                }
                Health::Up
            }
        };
        self.health = next;
        self.streak = 0;
        Some(next)
    }
}

/// Why a probe failed: a bounded set (a metric label), with the detail kept for the API and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// No answer within the timeout.
    Timeout,
    /// Connection refused, ICMP port unreachable, SCTP ABORT.
    Refused,
    /// ICMP destination unreachable (host, network, protocol), or no route.
    Unreachable,
    /// The connection was reset or closed before the answer.
    Reset,
    /// An HTTP status outside the expected ranges.
    BadStatus,
    /// A reply that is not the expected one (TCP/UDP `response`, malformed HTTP).
    BadResponse,
    /// The TLS handshake failed (certificate, name, protocol).
    Tls,
    /// Anything else (a local error such as a missing raw-socket capability).
    Error,
}

impl FailureKind {
    pub const ALL: [Self; 8] = [
        Self::Timeout,
        Self::Refused,
        Self::Unreachable,
        Self::Reset,
        Self::BadStatus,
        Self::BadResponse,
        Self::Tls,
        Self::Error,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::Reset => "reset",
            Self::BadStatus => "bad_status",
            Self::BadResponse => "bad_response",
            Self::Tls => "tls",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    /// Classifies a socket error.
    pub fn io(what: &str, e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match e.kind() {
            K::ConnectionRefused => FailureKind::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                FailureKind::Reset
            }
            K::TimedOut => FailureKind::Timeout,
            K::HostUnreachable | K::NetworkUnreachable => FailureKind::Unreachable,
            _ => match e.raw_os_error() {
                Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN) => {
                    FailureKind::Unreachable
                }
                Some(libc::EPROTO) => FailureKind::Refused,
                _ => FailureKind::Error,
            },
        };
        Self::new(kind, format!("{what}: {e}"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &mut Tracker, results: &str, rise: u32, fall: u32) -> Vec<Option<Health>> {
        results
            .chars()
            .map(|c| t.record(c == '+', rise, fall))
            .collect()
    }

    #[test]
    fn first_result_decides_an_unknown_target() {
        let mut t = Tracker::default();
        assert_eq!(t.record(true, 5, 5), Some(Health::Up));
        let mut t = Tracker::default();
        assert_eq!(t.record(false, 5, 5), Some(Health::Down));
    }

    #[test]
    fn fall_failures_in_a_row_take_it_down() {
        let mut t = Tracker::new(Health::Up);
        // Two failures, a success resets the count, then three in a row.
        let got = run(&mut t, "--+---", 2, 3);
        assert_eq!(got, vec![None, None, None, None, None, Some(Health::Down)]);
        assert_eq!(t.health(), Health::Down);
    }

    #[test]
    fn rise_successes_in_a_row_bring_it_back() {
        let mut t = Tracker::new(Health::Down);
        let got = run(&mut t, "+-++", 2, 3);
        assert_eq!(got, vec![None, None, None, Some(Health::Up)]);
        assert_eq!(t.streak(), 0);
    }

    #[test]
    fn a_flapping_target_stays_down_under_rise() {
        // Alternating results never reach rise=2 or fall=2: the state holds.
        for start in [Health::Up, Health::Down] {
            let mut t = Tracker::new(start);
            assert!(run(&mut t, "+-+-+-+-", 2, 2).iter().all(Option::is_none));
            assert_eq!(t.health(), start);
        }
    }

    #[test]
    fn rise_and_fall_of_one_flip_at_once() {
        let mut t = Tracker::new(Health::Up);
        assert_eq!(
            run(&mut t, "-+-", 1, 1),
            vec![Some(Health::Down), Some(Health::Up), Some(Health::Down)]
        );
    }

    #[test]
    fn socket_errors_are_classified() {
        use std::io::{Error, ErrorKind};
        let k = |e: Error| Failure::io("connect", &e).kind;
        assert_eq!(k(ErrorKind::ConnectionRefused.into()), FailureKind::Refused);
        assert_eq!(k(ErrorKind::ConnectionReset.into()), FailureKind::Reset);
        assert_eq!(
            k(Error::from_raw_os_error(libc::EHOSTUNREACH)),
            FailureKind::Unreachable
        );
        assert_eq!(
            k(Error::from_raw_os_error(libc::EACCES)),
            FailureKind::Error
        );
        assert_eq!(
            Failure::io("connect", &ErrorKind::ConnectionRefused.into()).to_string(),
            "refused: connect: connection refused"
        );
    }
}
