//! Check results set by hand, for the tests of the layers above (`reconcile`, `app`): no
//! probes, no sockets.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{
    CheckUser,
    monitor::{CheckKey, Checks, Shared, SyncReport},
    state::Health,
};
use crate::LockExt as _;

/// Check results set by hand, by target; a check without one is unknown.
#[derive(Clone, Default)]
pub struct FakeChecks(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    running: BTreeSet<CheckKey>,
    results: HashMap<SocketAddr, Health>,
}

impl FakeChecks {
    pub fn set(&self, target: &str, h: Health) {
        self.0.locked().results.insert(target.parse().unwrap(), h);
    }

    /// The running check of `target` (`ip:port`).
    pub fn running_key(&self, target: &str) -> Option<CheckKey> {
        let i = self.0.locked();
        i.running
            .iter()
            .find(|k| k.target.to_string() == target)
            .cloned()
    }

    /// The running checks as `kind target`.
    pub fn running(&self) -> Vec<String> {
        let i = self.0.locked();
        i.running
            .iter()
            .map(|k| format!("{} {}", k.probe.kind.as_str(), k.target))
            .collect()
    }
}

impl Checks for FakeChecks {
    fn start(&mut self, wanted: &BTreeMap<CheckKey, Vec<CheckUser>>) -> SyncReport {
        let mut i = self.0.locked();
        let mut report = SyncReport::default();
        for k in wanted.keys() {
            report.started += usize::from(i.running.insert(k.clone()));
        }
        report
    }

    fn retain(&mut self, wanted: &BTreeMap<CheckKey, Vec<CheckUser>>) -> usize {
        let mut i = self.0.locked();
        let before = i.running.len();
        i.running.retain(|k| wanted.contains_key(k));
        before - i.running.len()
    }

    fn states(&self) -> HashMap<CheckKey, Health> {
        let i = self.0.locked();
        i.running
            .iter()
            .map(|k| {
                let h = i.results.get(&k.target).copied().unwrap_or(Health::Unknown);
                (k.clone(), h)
            })
            .collect()
    }

    fn shared(&self, _key: &CheckKey) -> Option<Arc<Shared>> {
        None
    }

    fn max_timeout(&self) -> Duration {
        let i = self.0.locked();
        i.running
            .iter()
            .map(|k| k.probe.timeout)
            .max()
            .unwrap_or_default()
    }
}
