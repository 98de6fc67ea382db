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
    let (_events_tx, mut events) = mpsc::channel(16);
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
    let (events_tx, mut events) = mpsc::channel(16);
    let results = tokio::spawn(async move {
        for (target, h) in [
            ("198.18.1.11:8080", Health::Up),
            ("198.18.1.12:8080", Health::Down),
        ] {
            tokio::time::sleep(Duration::from_millis(200)).await;
            checks.set(target, h);
            let key = checks.running_key(target).expect("started");
            events_tx
                .send(CheckEvent {
                    key,
                    from: Health::Unknown,
                    to: h,
                    failure: None,
                })
                .await
                .expect("the reconciler listens");
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

/// `n` distinct /32 source ranges in 198.18.0.0/15 starting at the `from`-th address.
fn ranges(from: u32, n: u32) -> Vec<ipnet::IpNet> {
    (from..from + n)
        .map(|i| {
            let ip =
                std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + i);
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(ip, 32).unwrap())
        })
        .collect()
}

/// `state` plus a service `name` (one frontend on `vip`:80) with `n` source ranges.
fn with_ranges(mut state: DesiredState, name: &str, vip: &str, from: u32, n: u32) -> DesiredState {
    let mut s = Arc::make_mut(&mut desired(WEB).services).remove(0);
    let m = Arc::make_mut(&mut s);
    m.name = name.into();
    m.frontend.vip = vip.parse().unwrap();
    m.source_ranges = ranges(from, n);
    Arc::make_mut(&mut state.services).push(s);
    Arc::make_mut(&mut state.services)
        .sort_by(|a, b| (&a.name, a.frontend).cmp(&(&b.name, b.frontend)));
    state
}

/// `state` plus a service `name` whose one backend sits behind `n` frontends (ports 1..=n).
fn with_wide(mut state: DesiredState, name: &str, n: u16) -> DesiredState {
    let base = Arc::make_mut(&mut desired(WEB).services).remove(0);
    for port in 1..=n {
        let mut s = (*base).clone();
        s.name = name.into();
        s.frontend.vip = "198.18.100.30".parse().unwrap();
        s.frontend.port = port;
        s.backends.truncate(1);
        s.backends[0].addr = "198.18.1.31:8080".parse().unwrap();
        Arc::make_mut(&mut state.services).push(Arc::new(s));
    }
    Arc::make_mut(&mut state.services)
        .sort_by(|a, b| (&a.name, a.frontend).cmp(&(&b.name, b.frontend)));
    state
}

fn left_out(r: &Reconciler<FakeDataplane, FakeChecks>) -> Vec<String> {
    r.left_out()
        .iter()
        .map(|l| format!("{} {} kept={}", l.name, l.limit, l.kept_previous))
        .collect()
}

fn served_names(rx: &watch::Receiver<Arc<Snapshot>>) -> BTreeSet<String> {
    rx.borrow()
        .services
        .iter()
        .map(|s| s.name.clone())
        .collect()
}

#[test]
fn a_service_over_a_data_plane_limit_is_left_out_and_everything_else_is_programmed() {
    let (mut r, _, rx) = setup();
    // More source ranges than the data plane holds over all services, and one endpoint
    // behind one frontend more than it may serve: before, either failed the whole change.
    let limit = lb_common::limits::MAX_SOURCE_RANGES;
    let wide = lb_common::limits::MAX_ENDPOINT_FRONTENDS as u16 + 1;
    let state = with_wide(
        with_ranges(
            desired(&format!("{WEB}{API}")),
            "huge",
            "198.18.100.20",
            0,
            limit + 3616,
        ),
        "wide",
        wide,
    );
    r.apply(state.clone()).expect("the rest is programmed");
    assert_eq!(
        served_names(&rx),
        BTreeSet::from(["api".into(), "web".into()])
    );
    assert_eq!(
        left_out(&r),
        [
            "huge source_ranges kept=false",
            "wide endpoint_frontends kept=false"
        ]
    );
    let snap = rx.borrow().clone();
    assert!(
        snap.left_out[1]
            .reason
            .contains("198.18.1.31:8080/tcp would serve 17 frontends"),
        "{:?}",
        snap.left_out
    );
    assert!(
        r.dataplane().maps.source_ranges.is_empty(),
        "nothing of huge written"
    );

    // Other services keep changing while the two stay out.
    let mut next = state.clone();
    Arc::make_mut(&mut next.services).retain(|s| s.name != "api");
    Arc::make_mut(&mut next.services)
        .iter_mut()
        .filter(|s| s.name == "web")
        .for_each(|s| Arc::make_mut(s).backends.truncate(1));
    let a = r.apply(next).expect("programmed");
    assert_eq!(a.report.removed, ["api"]);
    assert_eq!(a.report.updated, ["web"]);
    assert_eq!(served_names(&rx), BTreeSet::from(["web".into()]));
    assert_eq!(left_out(&r).len(), 2);

    // Fixed: programmed, and nothing is left out any more.
    let fixed = with_wide(
        with_ranges(desired(WEB), "huge", "198.18.100.20", 0, 100),
        "wide",
        wide - 1,
    );
    r.apply(fixed).expect("programmed");
    assert_eq!(served_names(&rx).len(), 3);
    assert!(r.left_out().is_empty());
    assert_eq!(r.dataplane().maps.source_ranges.len(), 100);
}

#[test]
fn a_change_that_does_not_fit_keeps_the_previous_version_and_a_new_service_never_pushes_out_a_served_one()
 {
    let (mut r, _, rx) = setup();
    let limit = lb_common::limits::MAX_SOURCE_RANGES;
    let first = with_ranges(desired(WEB), "zeta", "198.18.100.20", 0, 10_000);
    r.apply(first.clone()).expect("programmed");
    // A newer service sorted first by name that would need the space zeta holds.
    let both = with_ranges(first.clone(), "alpha", "198.18.100.21", 20_000, 10_000);
    r.apply(both).expect("programmed without alpha");
    assert_eq!(left_out(&r), ["alpha source_ranges kept=false"]);
    assert_eq!(
        served_names(&rx),
        BTreeSet::from(["web".into(), "zeta".into()])
    );
    assert_eq!(r.dataplane().maps.source_ranges.len(), 10_000);

    // zeta grows past the limit: its previous version keeps serving.
    let grown = with_ranges(desired(WEB), "zeta", "198.18.100.20", 0, limit + 1);
    r.apply(grown).expect("programmed");
    assert_eq!(left_out(&r), ["zeta source_ranges kept=true"]);
    let zeta = r
        .desired()
        .services
        .iter()
        .find(|s| s.name == "zeta")
        .unwrap();
    assert_eq!(zeta.source_ranges.len(), 10_000);
    assert_eq!(r.dataplane().maps.source_ranges.len(), 10_000);

    // A change that fits once another service's switch-over is through: applied in the
    // same call. web swaps 8000 ranges for 8000 others (both sets while it switches) and zeta
    // grows to 400 (it counted with web's both sets, but not after).
    let swap_from = with_ranges(
        with_ranges(DesiredState::default(), "web", "198.18.100.10", 0, 8000),
        "zeta",
        "198.18.100.20",
        50_000,
        100,
    );
    r.apply(swap_from).expect("programmed");
    assert!(r.left_out().is_empty());
    let swap_to = with_ranges(
        with_ranges(DesiredState::default(), "web", "198.18.100.10", 8000, 8000),
        "zeta",
        "198.18.100.20",
        60_000,
        400,
    );
    r.apply(swap_to.clone()).expect("programmed");
    assert!(r.left_out().is_empty(), "{:?}", left_out(&r));
    assert_eq!(r.desired(), &swap_to);
    assert_eq!(r.dataplane().maps.source_ranges.len(), 8400);
}

#[test]
fn a_frontend_held_by_a_kept_previous_version_goes_to_no_other_service_but_another_scope_does() {
    use crate::model::Scope;
    let (mut r, _, _rx) = setup();
    let limit = lb_common::limits::MAX_SOURCE_RANGES;
    // zeta's external frontend of 198.18.100.20:80, programmed.
    let scoped = |mut state: DesiredState, name: &str, scope: Scope| {
        for s in Arc::make_mut(&mut state.services)
            .iter_mut()
            .filter(|s| s.name == name)
        {
            Arc::make_mut(s).frontend.scope = scope;
        }
        Arc::make_mut(&mut state.services)
            .sort_by(|a, b| (&a.name, a.frontend).cmp(&(&b.name, b.frontend)));
        state
    };
    let first = scoped(
        with_ranges(DesiredState::default(), "zeta", "198.18.100.20", 0, 10),
        "zeta",
        Scope::External,
    );
    r.apply(first).expect("programmed");
    // zeta grows past the limit (its previous version keeps the frontend), while two new
    // services want the same address and port: the internal one reaches other clients and is
    // programmed; the external one would take zeta's clients and is left out.
    let next = scoped(
        scoped(
            with_ranges(
                with_ranges(
                    with_ranges(
                        DesiredState::default(),
                        "zeta",
                        "198.18.100.20",
                        0,
                        limit + 1,
                    ),
                    "inside",
                    "198.18.100.20",
                    20_000,
                    1,
                ),
                "outside",
                "198.18.100.20",
                30_000,
                1,
            ),
            "zeta",
            Scope::External,
        ),
        "inside",
        Scope::Internal,
    );
    let next = scoped(next, "outside", Scope::External);
    r.apply(next).expect("programmed without outside");
    assert_eq!(
        left_out(&r),
        [
            "zeta source_ranges kept=true",
            "outside services kept=false"
        ]
    );
    let reason = &r.left_out()[1].reason;
    assert!(
        reason.contains("is still served by the previous version of zeta"),
        "{reason}"
    );
    assert!(
        r.desired()
            .services
            .iter()
            .any(|s| s.name == "inside" && s.frontend.scope == Scope::Internal),
        "{:?}",
        r.desired()
    );
}
