//! One account of the API server's reachability for the whole agent: while it is away every
//! watcher, the Lease and the status writers fail at once, every few hundred milliseconds;
//! the log gets one line when it goes, one per backoff step while it stays away (1 s, 2 s,
//! 4 s … apart, at most [`MAX_STEP`]), and one when it is back. The watchers retry on their
//! own short backoff ([`WatchBackoff`]), so that it is noticed back within a couple of
//! seconds.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use kube::runtime::utils::Backoff;
use tracing::{info, warn};

use crate::LockExt as _;

/// The longest gap between two "still unreachable" lines.
pub const MAX_STEP: Duration = Duration::from_mins(1);

#[derive(Debug)]
struct Down {
    since: Instant,
    failures: u64,
    /// When the next line is due, and the gap after it.
    next_line: Instant,
    step: Duration,
}

static STATE: Mutex<Option<Down>> = Mutex::new(None);

/// A call to the API server failed in a way that says it is away (no connection, a timeout,
/// a 5xx or 429): logged once per step, with `what` and `error`. Other failures (a refused
/// write, a missing object) are the caller's to log.
pub fn failed(what: &str, error: &dyn std::fmt::Display) {
    failed_at(Instant::now(), what, error);
}

fn failed_at(now: Instant, what: &str, error: &dyn std::fmt::Display) {
    let mut state = STATE.locked();
    match state.as_mut() {
        None => {
            warn!(what, error = %error, "Kubernetes API unreachable; serving the last state and retrying");
            *state = Some(Down {
                since: now,
                failures: 1,
                next_line: now + Duration::from_secs(1),
                step: Duration::from_secs(2),
            });
        }
        Some(d) => {
            d.failures += 1;
            if now >= d.next_line {
                warn!(
                    what,
                    error = %error,
                    failed_calls = d.failures,
                    for_s = now.duration_since(d.since).as_secs(),
                    "Kubernetes API still unreachable"
                );
                d.next_line = now + d.step;
                d.step = (d.step * 2).min(MAX_STEP);
            }
        }
    }
}

/// A call to the API server succeeded.
pub fn ok() {
    let mut state = STATE.locked();
    if let Some(d) = state.take() {
        info!(
            after_s = d.since.elapsed().as_secs_f64(),
            failed_calls = d.failures,
            "Kubernetes API reachable again"
        );
    }
}

/// Whether the API server is away now (callers then leave their own failure lines out).
pub fn is_down() -> bool {
    STATE.locked().is_some()
}

/// Whether `e` says the API server is away rather than that it refused this call.
pub fn is_outage(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429,
        _ => true,
    }
}

/// The watchers' backoff: 250 ms doubling to 2 s, with up to 25% jitter so that the
/// watchers of many nodes do not retry in step. Short, so that an API server that is back
/// is seen within about two seconds; the 2 s cap keeps a node at a few requests a second
/// while it is away.
#[derive(Debug, Default)]
pub struct WatchBackoff {
    next: Option<Duration>,
}

pub const WATCH_BACKOFF_FIRST: Duration = Duration::from_millis(250);
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next.unwrap_or(WATCH_BACKOFF_FIRST);
        self.next = Some((d * 2).min(WATCH_BACKOFF_MAX));
        // Jitter from the clock's low bits: no generator needed for spreading retries.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        let jitter = d.mul_f64(f64::from(nanos % 1000) / 4000.0);
        Some(d.saturating_sub(jitter))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_backoff_doubles_to_its_cap_and_resets() {
        let mut b = WatchBackoff::default();
        let steps: Vec<Duration> = (&mut b).take(6).collect();
        let bounds = [250, 500, 1000, 2000, 2000, 2000];
        for (s, max) in steps.iter().zip(bounds) {
            let max = Duration::from_millis(max);
            assert!(*s <= max && *s >= max.mul_f64(0.75), "{steps:?}");
        }
        b.reset();
        assert!(b.next().unwrap() <= WATCH_BACKOFF_FIRST);
    }

    #[test]
    fn an_outage_logs_once_per_step() {
        // Lines are counted through the steps the state takes (the log itself is the
        // tracing subscriber's).
        let t0 = Instant::now();
        let mut lines = 0;
        let mut last_step = None;
        *STATE.locked() = None;
        // 20 calls a second for 60 s.
        for i in 0..1200u64 {
            let now = t0 + Duration::from_millis(50 * i);
            let before = STATE.locked().as_ref().map(|d| d.next_line);
            failed_at(now, "test", &"503");
            let after = STATE.locked().as_ref().map(|d| d.next_line);
            if before != after {
                lines += 1;
                last_step = after.map(|a| a.duration_since(now));
            }
        }
        // 0, 1, 3, 7, 15, 31 s: six lines in a minute, the gap doubling.
        assert_eq!(lines, 6);
        assert_eq!(last_step, Some(Duration::from_secs(32)));
        ok();
        assert!(STATE.locked().is_none());
    }
}
