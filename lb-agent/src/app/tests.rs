//! The agent's reload path on the in-memory data plane: a real config file, no root.

use super::agent::Agent;
use crate::{
    LockExt as _, announce::Announcer, config::Source, dataplane::fake::FakeDataplane,
    health::fake::FakeChecks, reconcile::Reconciler,
};

const CONFIG: &str = "
node:
  interfaces: [eth0]
services:
  - name: web
    vip: 198.18.100.10
    port: 80
    protocol: tcp
    backends:
      - {address: 198.18.1.11, port: 8080}
";

/// A config file of its own for each test, removed at the end.
struct File(std::path::PathBuf);

impl File {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("weir-{}-{name}.yaml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap();
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn agent(file: &File) -> Agent<FakeDataplane, FakeChecks> {
    let source = Source::File(file.0.clone());
    let (config, fingerprint) = source.load_with_fingerprint().expect("valid");
    let out = super::Outputs::new();
    let mut dataplane = FakeDataplane::default();
    let announcer = Announcer::start(
        &config.announce,
        "node".into(),
        false,
        &mut dataplane,
        &out.api.tasks,
    )
    .await
    .expect("nothing to announce");
    let mut reconciler = Reconciler::new(
        dataplane,
        FakeChecks::default(),
        crate::dataplane::Programmer::new(&config.dataplane, config.maglev.seed),
        out.snapshot.clone(),
        false,
    );
    reconciler.apply(config.desired.clone()).expect("applies");
    out.api.note_config(Ok::<(), &str>(()));
    Agent {
        api: out.api,
        source,
        current: config,
        fingerprint,
        reconciler,
        announcer,
        snapshot: out.snapshot,
        metrics: out.metrics,
        kubernetes: false,
        node_name: String::new(),
        events: None,
        left_out: Vec::new(),
        retry: super::agent::Retry::default(),
    }
}

fn last_error(a: &Agent<FakeDataplane, FakeChecks>) -> Option<String> {
    a.api.config.locked().last_error.clone()
}

#[tokio::test]
async fn reloads_apply_whole_or_are_refused_without_a_change() {
    let file = File::new("reload", CONFIG);
    let mut a = agent(&file).await;
    let start = a.reconciler.dataplane().dump();

    // A field that only changes with a restart: refused, even with a valid service change.
    file.write(
        &CONFIG
            .replace("[eth0]", "[eth1]")
            .replace("198.18.1.11", "198.18.1.12"),
    );
    a.reload("test");
    assert_eq!(
        last_error(&a).as_deref(),
        Some("node.interfaces only changes with a restart")
    );
    assert_eq!(a.reconciler.dataplane().dump(), start, "maps unchanged");

    // A file that does not parse: refused with the problem, nothing changed.
    file.write(&CONFIG.replace("port: 80", "port: eighty"));
    a.reload("test");
    let e = last_error(&a).expect("refused");
    assert!(e.contains("port"), "{e}");
    assert_eq!(a.reconciler.dataplane().dump(), start, "maps unchanged");

    // A valid change: applied whole, the status clean, the snapshot follows.
    file.write(&CONFIG.replace("198.18.1.11", "198.18.1.12"));
    a.reload("test");
    assert_eq!(last_error(&a), None);
    let snap = a.snapshot.borrow().clone();
    assert_eq!(snap.services.len(), 1);
    assert_eq!(
        snap.services[0].backends[0].addr,
        "198.18.1.12:8080".parse().unwrap()
    );
    assert_eq!(a.api.config.locked().generation, 2);
    assert_eq!(a.api.config.locked().reload_failures, 2);
}

#[tokio::test(start_paused = true)]
async fn a_change_the_data_plane_refuses_is_tried_again_with_backoff() {
    let file = File::new("retry", CONFIG);
    let mut a = agent(&file).await;
    assert!(a.retry.at.is_none());

    // The maps refuse every write for a while (a kernel out of memory, say).
    let broken = a.reconciler.dataplane().maps.log.len();
    a.reconciler.dataplane_mut().maps.fail_after = Some(broken);
    file.write(&CONFIG.replace("198.18.1.11", "198.18.1.12"));
    a.reload("test");
    assert!(last_error(&a).is_some(), "refused");
    let start = tokio::time::Instant::now();
    assert_eq!(a.retry.at, Some(start + super::agent::RETRY_FIRST));
    // Each retry that fails waits twice as long, up to the cap.
    let mut waits = Vec::new();
    for _ in 0..8 {
        let at = a.retry.at.expect("a retry is due");
        tokio::time::sleep_until(at).await;
        a.retry();
        waits.push(a.retry.at.expect("again").duration_since(at).as_millis());
    }
    assert_eq!(waits, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
    assert_eq!(a.metrics.agent.apply_failures.get(), 9);
    let snap = a.snapshot.borrow().clone();
    assert_eq!(
        snap.services[0].backends[0].addr,
        "198.18.1.11:8080".parse().unwrap()
    );

    // The maps take writes again: the next retry lands the change, with no new trigger.
    a.reconciler.dataplane_mut().maps.fail_after = None;
    tokio::time::sleep_until(a.retry.at.unwrap()).await;
    a.retry();
    assert!(a.retry.at.is_none());
    assert_eq!(last_error(&a), None);
    let snap = a.snapshot.borrow().clone();
    assert_eq!(
        snap.services[0].backends[0].addr,
        "198.18.1.12:8080".parse().unwrap()
    );

    // Kubernetes mode: the refused translation's state is what is tried again.
    a.kubernetes = true;
    let mut t = crate::sources::kubernetes::translate::Translation {
        desired: a.reconciler.requested().clone(),
        ..Default::default()
    };
    std::sync::Arc::make_mut(&mut std::sync::Arc::make_mut(&mut t.desired.services)[0]).backends
        [0]
    .addr = "198.18.1.13:8080".parse().unwrap();
    a.reconciler.dataplane_mut().maps.fail_on = Some("backends put".into());
    assert!(!a.apply_kubernetes(&t), "refused once");
    assert!(a.retry.at.is_some());
    tokio::time::sleep_until(a.retry.at.unwrap()).await;
    a.retry();
    assert!(a.retry.at.is_none());
    assert_eq!(a.reconciler.requested(), &t.desired);
}
