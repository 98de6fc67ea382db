//! The reconciler on the in-memory data plane and hand-set check results, with tokio's paused
//! clock: no root, no sockets, no real time.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use super::*;
use crate::{
    LockExt as _,
    config::Config,
    dataplane::fake::{FakeDataplane, Observer},
    health::fake::FakeChecks,
};

type Fixture = (
    Reconciler<FakeDataplane, FakeChecks>,
    FakeChecks,
    watch::Receiver<Arc<Snapshot>>,
);

/// A reconciler on the fakes; `l2`: the node announces its VIPs on L2.
fn setup_l2(l2: bool) -> Fixture {
    let checks = FakeChecks::default();
    let snapshot = watch::Sender::new(Arc::new(Snapshot::default()));
    let rx = snapshot.subscribe();
    let r = Reconciler::new(
        FakeDataplane::default(),
        checks.clone(),
        Programmer::new(&crate::dataplane::DataplaneLimits::default(), 0),
        snapshot,
        l2,
    );
    (r, checks, rx)
}

fn setup() -> Fixture {
    setup_l2(false)
}

/// A desired state from config-file services (YAML list items).
fn desired(services: &str) -> DesiredState {
    let text = format!("node:\n  interfaces: [eth0]\nservices:\n{services}");
    Config::parse(&text, "test.yaml")
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .desired
}

const WEB: &str = "
  - name: web
    vip: 198.18.100.10
    port: 80
    protocol: tcp
    backends:
      - {address: 198.18.1.11, port: 8080}
      - {address: 198.18.1.12, port: 8080}
";

/// `WEB` with a TCP check (timeout 500 ms).
fn web_checked() -> String {
    WEB.replace(
        "    backends:",
        "    health_check: {type: tcp, interval: 1s, timeout: 500ms}\n    backends:",
    )
}

const API: &str = "
  - name: api
    vip: 198.18.100.11
    port: 443
    protocol: tcp
    health_check: {type: tcp, port: 9000}
    backends:
      - {address: 198.18.1.21, port: 8443}
";

/// `service mode backend:in_rotation ...` for each published service.
fn published(rx: &watch::Receiver<Arc<Snapshot>>) -> Vec<String> {
    rx.borrow()
        .services
        .iter()
        .map(|s| {
            let backends: Vec<String> = s
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.addr, u8::from(b.in_rotation)))
                .collect();
            format!("{} {} {}", s.name, s.mode.as_str(), backends.join(" "))
        })
        .collect()
}

fn table_lines(r: &Reconciler<FakeDataplane, FakeChecks>) -> Vec<String> {
    r.dataplane()
        .dump()
        .lines()
        .filter(|l| l.starts_with("service "))
        .map(str::to_string)
        .collect()
}

/// Each service's table as `vip:port backend-address:slots ...` (ids may differ after a
/// backend was removed and added back).
fn tables_by_address(r: &Reconciler<FakeDataplane, FakeChecks>) -> Vec<String> {
    let maps = &r.dataplane().maps;
    maps.services
        .values()
        .map(|v| {
            let mut shares: BTreeMap<String, usize> = BTreeMap::new();
            for id in maps.table(v).expect("a table") {
                let b = &maps.backends[id];
                let addr = SocketAddr::new(
                    crate::dataplane::words_addr(&b.addr, b.family),
                    u16::from_be(b.port_be),
                );
                *shares.entry(addr.to_string()).or_default() += 1;
            }
            format!("id={} {shares:?}", v.id)
        })
        .collect()
}

#[test]
fn apply_programs_the_maps_then_publishes() {
    let (mut r, _, rx) = setup();
    // Every write must happen while the snapshot still shows the state before the change.
    let during: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let (seen, snap) = (during.clone(), rx.clone());
    r.dataplane_mut().maps.observer = Some(Observer(Box::new(move |line| {
        seen.locked()
            .push((line.to_string(), snap.borrow().services.len()));
    })));
    let a = r.apply(desired(WEB)).expect("applies");
    assert_eq!(a.report.added, ["web"]);
    assert!(
        during.locked().iter().all(|(_, n)| *n == 0),
        "a write after the snapshot was published: {:?}",
        during.locked()
    );
    assert_eq!(
        published(&rx),
        ["web unchecked 198.18.1.11:8080:1 198.18.1.12:8080:1"]
    );
    let dump = r.dataplane().dump();
    assert!(
        dump.contains("service 198.18.100.10:80 external proto=6 id=1 size=")
            && dump.contains("table 1:")
            && dump.contains(" 2:"),
        "{dump}"
    );
    // The ids published are the data plane's.
    let snap = rx.borrow().clone();
    assert_eq!(snap.services[0].id, 1);
    assert_eq!(
        snap.services[0]
            .backends
            .iter()
            .map(|b| b.id)
            .collect::<Vec<_>>(),
        [1, 2]
    );

    // Removing: the snapshot still lists the service while its maps are cleared.
    during.locked().clear();
    r.apply(DesiredState::default()).expect("removes");
    assert!(
        during.locked().iter().all(|(_, n)| *n == 1),
        "{:?}",
        during.locked()
    );
    assert!(published(&rx).is_empty());
    assert!(table_lines(&r).is_empty());
}

#[test]
fn a_failed_change_rolls_back_maps_checks_and_snapshot() {
    let (mut r, checks, rx) = setup();
    checks.set("198.18.1.11:8080", Health::Up);
    checks.set("198.18.1.12:8080", Health::Up);
    r.apply(desired(&web_checked())).expect("first state");
    let before_tables = tables_by_address(&r);
    let before_published = published(&rx);
    let before_checks = checks.running();
    assert_eq!(
        before_checks,
        ["tcp 198.18.1.11:8080", "tcp 198.18.1.12:8080"]
    );

    // web loses a backend and api arrives; publishing api fails: web has changed by then.
    let one_backend = web_checked().replace("      - {address: 198.18.1.12, port: 8080}\n", "");
    r.dataplane_mut().maps.fail_on = Some("services put id=2".into());
    let e = r
        .apply(desired(&format!("{one_backend}{API}")))
        .expect_err("the injected failure");
    assert!(
        matches!(e, ReconcileError::RolledBack(_)),
        "rolled back: {e}"
    );
    assert!(e.to_string().contains("injected failure"), "{e}");
    assert_eq!(
        tables_by_address(&r),
        before_tables,
        "maps back as they were"
    );
    assert_eq!(published(&rx), before_published, "snapshot back as it was");
    assert_eq!(
        checks.running(),
        before_checks,
        "api's check stopped again, web's kept"
    );
    assert_eq!(r.desired(), &desired(&web_checked()));

    // The same change goes through once the map takes writes again.
    let a = r
        .apply(desired(&format!("{one_backend}{API}")))
        .expect("applies");
    assert_eq!(a.report.added, ["api"]);
    assert_eq!(a.report.updated, ["web"]);
    assert_eq!((a.checks_started, a.checks_stopped), (1, 1));
}

#[test]
fn a_rollback_that_fails_says_so() {
    let (mut r, _, _rx) = setup();
    let api = API.replace("    health_check: {type: tcp, port: 9000}\n", "");
    r.apply(desired(&format!("{WEB}{api}")))
        .expect("first state");
    // web's change lands (its new backend, table and switch of both scopes, the old backend
    // cleared: eight writes), then the maps break: api's change fails, and so does putting
    // web back.
    let maps = &mut r.dataplane_mut().maps;
    let n = maps.log.len();
    maps.fail_after = Some(n + 8);
    let change = format!(
        "{}{}",
        WEB.replace("198.18.1.12", "198.18.1.13"),
        api.replace("198.18.1.21", "198.18.1.22")
    );
    let e = r.apply(desired(&change)).expect_err("fails");
    let log = &r.dataplane().maps.log[n..];
    assert!(
        log.iter().any(|l| l == "services put id=1 external") && log.len() == 8,
        "web switched over before the maps broke: {log:?}"
    );
    assert!(
        matches!(e, ReconcileError::RollbackFailed { .. }),
        "rollback failed too: {e}"
    );
    assert!(e.to_string().contains("partly updated"), "{e}");
}

#[test]
fn health_flaps_move_backends_out_of_and_back_into_rotation() {
    let (mut r, checks, rx) = setup();
    checks.set("198.18.1.11:8080", Health::Up);
    checks.set("198.18.1.12:8080", Health::Up);
    r.apply(desired(&web_checked())).expect("applies");
    let both = table_lines(&r);
    assert_eq!(
        published(&rx),
        ["web checked 198.18.1.11:8080:1 198.18.1.12:8080:1"]
    );

    checks.set("198.18.1.12:8080", Health::Down);
    let report = r.reprogram().expect("reprograms");
    assert_eq!(report.updated, ["web"]);
    assert_eq!(
        published(&rx),
        ["web checked 198.18.1.11:8080:1 198.18.1.12:8080:0"]
    );
    let one = table_lines(&r);
    assert!(
        one[0].ends_with(&format!("table 1:{}", r.desired().services[0].table_size)),
        "every slot on backend 1: {one:?}"
    );

    // Nothing changed: nothing written.
    let writes = r.dataplane().maps.log.len();
    assert!(!r.reprogram().expect("reprograms").changed());
    assert_eq!(r.dataplane().maps.log.len(), writes);

    checks.set("198.18.1.12:8080", Health::Up);
    r.reprogram().expect("reprograms");
    assert_eq!(table_lines(&r), both, "back to the same table, same ids");
}

#[test]
fn every_backend_down_fails_open_or_closed() {
    let (mut r, checks, rx) = setup();
    checks.set("198.18.1.11:8080", Health::Down);
    checks.set("198.18.1.12:8080", Health::Down);
    r.apply(desired(&web_checked())).expect("applies");
    assert_eq!(
        published(&rx),
        ["web fail_open 198.18.1.11:8080:1 198.18.1.12:8080:1"]
    );
    let closed = web_checked().replace("timeout: 500ms}", "timeout: 500ms, fail_closed: true}");
    r.apply(desired(&closed)).expect("applies");
    assert_eq!(
        published(&rx),
        ["web fail_closed 198.18.1.11:8080:0 198.18.1.12:8080:0"]
    );
    let size = r.desired().services[0].table_size;
    assert!(
        table_lines(&r)[0].ends_with(&format!("table 0:{size}")),
        "no slot on a backend: {:?}",
        table_lines(&r)
    );
}

#[tokio::test(start_paused = true)]
async fn the_first_state_waits_for_the_first_results_but_not_forever() {
    // No result ever: programmed after the longest timeout and the grace, waiting (Pending).
    let (mut r, _checks, rx) = setup();
    let (_events_tx, mut events) = mpsc::unbounded_channel();
    let began = Instant::now();
    r.first_state(desired(&web_checked()), &mut events, |_, _| {})
        .await
        .expect("programs");
    assert_eq!(
        began.elapsed(),
        Duration::from_millis(500) + FIRST_RESULTS_GRACE
    );
    assert_eq!(
        published(&rx),
        ["web pending 198.18.1.11:8080:0 198.18.1.12:8080:0"]
    );

    // Results after 200 and 400 ms: programmed at the last, with them.
    let (mut r, checks, rx) = setup();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let results = tokio::spawn(async move {
        for (target, h) in [
            ("198.18.1.11:8080", Health::Up),
            ("198.18.1.12:8080", Health::Down),
        ] {
            tokio::time::sleep(Duration::from_millis(200)).await;
            checks.set(target, h);
            let key = checks.running_key(target).expect("started");
            let _ = events_tx.send(CheckEvent {
                key,
                from: Health::Unknown,
                to: h,
                failure: None,
            });
        }
    });
    let began = Instant::now();
    let mut seen = Vec::new();
    r.first_state(desired(&web_checked()), &mut events, |users, e| {
        seen.push(format!("{} {}", users[0].backend, e.to));
    })
    .await
    .expect("programs");
    results.await.unwrap();
    assert_eq!(began.elapsed(), Duration::from_millis(400));
    assert_eq!(seen, ["198.18.1.11:8080 up", "198.18.1.12:8080 down"]);
    assert_eq!(
        published(&rx),
        ["web checked 198.18.1.11:8080:1 198.18.1.12:8080:0"]
    );
}

#[test]
fn announced_vips_are_flagged_in_the_maps_and_the_snapshot() {
    let (mut r, _, rx) = setup_l2(true);
    r.apply(desired(WEB)).expect("applies");
    assert_eq!(rx.borrow().services[0].announced, Some(false));
    assert!(r.dataplane().dump().contains("vip 198.18.100.10\n"));
    let vip = "198.18.100.10".parse().unwrap();
    r.set_announced(BTreeSet::from([vip])).expect("marks");
    assert_eq!(rx.borrow().services[0].announced, Some(true));
    assert!(r.dataplane().dump().contains("vip 198.18.100.10 l2\n"));
}
