use std::{collections::HashMap, sync::Arc};

use super::*;
use crate::model::check::{self as spec, HealthCheck};
use crate::model::{Frontend, Protocol, Scope};

fn check(kind: CheckKind, port: Option<u16>, fail_closed: bool) -> HealthCheck {
    let raw: spec::RawHealthCheck =
        serde_saphyr::from_str(&format!("{{type: {kind}}}")).expect("block");
    let mut hc = raw.check().expect("valid");
    hc.port = port;
    hc.fail_closed = fail_closed;
    hc
}

fn service(name: &str, port: u16, backends: &[(&str, u32)], hc: Option<HealthCheck>) -> Service {
    Service {
        name: name.into(),
        frontend: Frontend {
            vip: "198.18.100.10".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            scope: Scope::Both,
        },
        backends: backends
            .iter()
            .map(|(a, w)| Backend::new(a.parse().unwrap(), *w))
            .collect(),
        source_ranges: vec![],
        affinity_timeout: None,
        table_size: 13,
        health_check: hc,
        node_address: false,
    }
}

const B1: &str = "198.18.1.11:8080";
const B2: &str = "198.18.1.12:8080";
const B3: &str = "198.18.1.13:8080";

/// Runs `effective` with the given backend states (by address; others unknown).
fn run(
    desired: &DesiredState,
    states: &[(&str, Health)],
) -> (Vec<Vec<bool>>, BTreeMap<String, HealthMode>) {
    let by_ip: HashMap<std::net::IpAddr, Health> = states
        .iter()
        .map(|(a, h)| (a.parse::<SocketAddr>().unwrap().ip(), *h))
        .collect();
    let (out, modes) = effective(desired, |k| {
        by_ip
            .get(&k.target.ip())
            .copied()
            .unwrap_or(Health::Unknown)
    });
    let available = out
        .services
        .iter()
        .map(|s| s.backends.iter().map(|b| b.available).collect())
        .collect();
    (available, by_name(desired, modes))
}

/// Modes by service name (the names here are unique).
fn by_name(
    desired: &DesiredState,
    modes: BTreeMap<Frontend, HealthMode>,
) -> BTreeMap<String, HealthMode> {
    modes
        .into_iter()
        .map(|(f, m)| {
            let s = desired.services.iter().find(|s| s.frontend == f).unwrap();
            (s.name.clone(), m)
        })
        .collect()
}

fn state(services: Vec<Service>) -> DesiredState {
    DesiredState {
        services: Arc::new(services.into_iter().map(Arc::new).collect()),
        ..Default::default()
    }
}

#[test]
fn unchecked_services_are_untouched() {
    let d = state(vec![service("web", 80, &[(B1, 1), (B2, 0)], None)]);
    let (out, modes) = effective(&d, |_| Health::Down);
    let modes = by_name(&d, modes);
    assert_eq!(out, d);
    assert!(
        Arc::ptr_eq(&out.services[0], &d.services[0]),
        "the same service"
    );
    assert_eq!(modes.get("web"), None, "unchecked: no mode to keep");
}

#[test]
fn down_and_unknown_backends_leave_rotation() {
    let hc = check(CheckKind::Tcp, None, false);
    let d = state(vec![service(
        "web",
        80,
        &[(B1, 1), (B2, 1), (B3, 1)],
        Some(hc),
    )]);
    let (avail, modes) = run(&d, &[(B1, Health::Up), (B2, Health::Down)]);
    assert_eq!(avail, [[true, false, false]]);
    assert_eq!(modes["web"], HealthMode::Checked);
}

#[test]
fn all_down_fails_open_unless_fail_closed() {
    let all_down = [
        (B1, Health::Down),
        (B2, Health::Down),
        (B3, Health::Unknown),
    ];
    let open = state(vec![service(
        "web",
        80,
        &[(B1, 1), (B2, 1), (B3, 0)],
        Some(check(CheckKind::Http, None, false)),
    )]);
    let (avail, modes) = run(&open, &all_down);
    // Every backend with a weight takes flows again; the drained one stays out.
    assert_eq!(avail, [[true, true, false]]);
    assert_eq!(modes["web"], HealthMode::FailOpen);

    let closed = state(vec![service(
        "web",
        80,
        &[(B1, 1), (B2, 1), (B3, 0)],
        Some(check(CheckKind::Http, None, true)),
    )]);
    let (avail, modes) = run(&closed, &all_down);
    assert_eq!(avail, [[false, false, false]]);
    assert_eq!(modes["web"], HealthMode::FailClosed);
}

#[test]
fn a_service_whose_backends_never_answered_waits() {
    let d = state(vec![service(
        "web",
        80,
        &[(B1, 1), (B2, 1)],
        Some(check(CheckKind::Tcp, None, false)),
    )]);
    let (avail, modes) = run(&d, &[]);
    assert_eq!(avail, [[false, false]]);
    assert_eq!(modes["web"], HealthMode::Pending);
    // One answer decides.
    let (avail, modes) = run(&d, &[(B2, Health::Up)]);
    assert_eq!(avail, [[false, true]]);
    assert_eq!(modes["web"], HealthMode::Checked);
}

#[test]
fn a_drained_healthy_backend_keeps_its_flows() {
    let d = state(vec![service(
        "web",
        80,
        &[(B1, 1), (B2, 0)],
        Some(check(CheckKind::Tcp, None, false)),
    )]);
    let (avail, _) = run(&d, &[(B1, Health::Up), (B2, Health::Up)]);
    // Available (its flows stay), though it gets no share of the table (weight 0).
    assert_eq!(avail, [[true, true]]);
}

#[test]
fn services_share_one_check_per_target_and_spec() {
    let tcp = check(CheckKind::Tcp, None, false);
    let d = state(vec![
        service("a", 80, &[(B1, 1), (B2, 1)], Some(tcp.clone())),
        // Same backends, same spec: the same two checks.
        service("b", 81, &[(B1, 1), (B2, 1)], Some(tcp.clone())),
        // A different probe port is a different target.
        service(
            "c",
            82,
            &[(B1, 1)],
            Some(check(CheckKind::Tcp, Some(9000), false)),
        ),
        // Ping ignores ports: both backends of one host are one target.
        service(
            "d",
            83,
            &[(B1, 1), ("198.18.1.11:9090", 1)],
            Some(check(CheckKind::Ping, None, false)),
        ),
        service("e", 84, &[(B3, 1)], None),
    ]);
    let wanted = wanted_checks(&d);
    let summary: std::collections::BTreeSet<(String, Vec<String>)> = wanted
        .iter()
        .map(|(k, users)| {
            (
                format!("{} {}", k.probe.kind, k.target),
                users
                    .iter()
                    .map(|u| format!("{}@{}", u.service, u.backend))
                    .collect(),
            )
        })
        .collect();
    let s = |a: &str, b: &[&str]| (a.to_string(), b.iter().map(ToString::to_string).collect());
    let expected = std::collections::BTreeSet::from([
        s(
            "tcp 198.18.1.11:8080",
            &["a@198.18.1.11:8080", "b@198.18.1.11:8080"],
        ),
        s(
            "tcp 198.18.1.12:8080",
            &["a@198.18.1.12:8080", "b@198.18.1.12:8080"],
        ),
        s("tcp 198.18.1.11:9000", &["c@198.18.1.11:8080"]),
        s(
            "ping 198.18.1.11:0",
            &["d@198.18.1.11:8080", "d@198.18.1.11:9090"],
        ),
    ]);
    assert_eq!(summary, expected);
}
