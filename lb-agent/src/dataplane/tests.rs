use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{fake::FakeMaps, *};
use crate::{
    config::Config,
    dataplane::DataplaneLimits,
    model::{Backend, DesiredState, Protocol, Scope, Service},
};

/// Service `web` at 198.18.100.10:80/tcp with `backends` (address:port, weight).
pub(super) fn web(backends: &[(&str, u32)]) -> Service {
    Service {
        name: "web".into(),
        frontend: Frontend {
            vip: "198.18.100.10".parse().unwrap(),
            port: 80,
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
        health_check: None,
        node_address: false,
    }
}

pub(super) fn state(services: Vec<Service>) -> DesiredState {
    DesiredState {
        services: Arc::new(services.into_iter().map(Arc::new).collect()),
        ..Default::default()
    }
}

fn setup() -> (Programmer, FakeMaps) {
    (
        Programmer::new(&DataplaneLimits::default(), 0),
        FakeMaps::default(),
    )
}

#[test]
fn address_forms_round_trip() {
    for ip in ["198.18.1.11", "fd00::1:11", "::ffff:198.18.1.1"] {
        let ip: IpAddr = ip.parse().unwrap();
        let (w, f) = addr_words(ip);
        assert_eq!(words_addr(&w, f), ip);
    }
    // IPv4 is stored mapped, bytes in packet order.
    let (w, f) = addr_words("198.18.1.11".parse().unwrap());
    assert_eq!(f, family::V4);
    assert_eq!(w[3].to_ne_bytes(), [198, 18, 1, 11]);
    assert_eq!(&w[..3], &lb_common::V4_MAPPED_PREFIX);
}

#[test]
fn default_config_programs_a_stable_dump() {
    let (mut p, mut m) = setup();
    let c = Config::default_config().unwrap();
    let r = p.apply(&c.desired, &mut m).unwrap();
    assert_eq!(r.added.len(), 5);
    let dump = m.dump();
    // Five services, two VIPv4 addresses and one IPv6.
    assert_eq!(
        dump.lines().filter(|l| l.starts_with("service ")).count(),
        10
    );
    assert_eq!(dump.lines().filter(|l| l.starts_with("vip ")).count(), 3);
    assert_eq!(
        dump.lines().filter(|l| l.starts_with("backend ")).count(),
        15
    );
    assert!(
        dump.contains("source_range service=4 198.18.0.0/24"),
        "{dump}"
    );
    // web-sticky: weights 2:1:1 over 1021 slots, exactly.
    assert!(dump.contains("table 10:511 11:255 12:255"), "{dump}");
    assert!(
        dump.contains(
            "service 198.18.100.11:80 external proto=6 id=4 size=1021 flags=3 affinity=600s table 10:511 11:255 12:255"
        ),
        "{dump}"
    );
    // The same state again writes nothing.
    m.log.clear();
    let r = p.apply(&c.desired, &mut m).unwrap();
    assert!(!r.changed());
    assert_eq!(r.unchanged, 5);
    assert!(m.log.is_empty(), "{:?}", m.log);
}

#[test]
fn a_new_service_is_published_last() {
    let (mut p, mut m) = setup();
    p.apply(&state(vec![web(&[("198.18.1.11:80", 1)])]), &mut m)
        .unwrap();
    assert_eq!(
        m.log,
        [
            "service_stats reset 1",
            "backend_stats reset 1",
            "backends put 1 flags=1",
            "endpoints put count=1",
            "maglev create page 1",
            "maglev write 1+0",
            "vips put",
            &format!(
                "vip_filter set {}=1",
                lb_common::vip_filter_index(&vip_key("198.18.100.10".parse().unwrap()).addr)
            ),
            "services put id=1 external",
            "services put id=1 internal",
        ]
    );
}

#[test]
fn a_changed_service_keeps_its_surviving_backends_and_swaps_its_table() {
    let (mut p, mut m) = setup();
    let three = web(&[
        ("198.18.1.11:80", 1),
        ("198.18.1.12:80", 1),
        ("198.18.1.13:80", 1),
    ]);
    let mut other = web(&[("198.18.1.21:80", 1)]);
    other.name = "other".into();
    other.frontend.port = 81;
    p.apply(&state(vec![three.clone(), other.clone()]), &mut m)
        .unwrap();
    let before: Vec<ProgrammedService> = p.services().cloned().collect();
    // The tables are in the maps only (the programmer keeps a digest).
    let table_of = |m: &FakeMaps, s: &ProgrammedService| m.table(&s.value()).unwrap().to_vec();
    let old_table = table_of(&m, before.iter().find(|s| s.spec.name == "web").unwrap());
    m.log.clear();

    let two = web(&[("198.18.1.11:80", 1), ("198.18.1.13:80", 1)]);
    let r = p.apply(&state(vec![two, other]), &mut m).unwrap();
    assert_eq!(r.updated, ["web"]);
    assert_eq!(r.unchanged, 1);
    // New table in a new slot, one switch-over write, then the removed backend cleared and
    // the old table dropped. Nothing touches "other".
    assert_eq!(
        m.log,
        [
            "maglev write 1+26",
            "services put id=1 external",
            "services put id=1 internal",
            "backends put 2 flags=0",
            "endpoints delete",
        ]
    );
    let after = p.services().find(|s| s.spec.name == "web").unwrap();
    let old = before.iter().find(|s| s.spec.name == "web").unwrap();
    for a in ["198.18.1.11:80", "198.18.1.13:80"] {
        let a: SocketAddr = a.parse().unwrap();
        assert_eq!(
            after.backends[&a], old.backends[&a],
            "kept backend keeps id and generation"
        );
    }
    // Only the removed backend's slots moved.
    let new_table = table_of(&m, after);
    assert_eq!(after.table, TableDigest::of(&new_table));
    assert_eq!(p.table_of(after), new_table, "made again as installed");
    for (o, n) in old_table.iter().zip(&new_table) {
        if *o != 2 {
            assert_eq!(o, n);
        }
    }
    assert!(!new_table.contains(&2));
}

#[test]
fn draining_keeps_the_backend_present_but_out_of_the_table() {
    let (mut p, mut m) = setup();
    p.apply(
        &state(vec![web(&[("198.18.1.11:80", 1), ("198.18.1.12:80", 1)])]),
        &mut m,
    )
    .unwrap();
    m.log.clear();
    p.apply(
        &state(vec![web(&[("198.18.1.11:80", 1), ("198.18.1.12:80", 0)])]),
        &mut m,
    )
    .unwrap();
    assert_eq!(
        m.log,
        [
            "maglev write 1+13",
            "services put id=1 external",
            "services put id=1 internal"
        ]
    );
    assert_eq!(m.backends[&2].flags, lb_common::backend_flags::PRESENT);
    let v = m.services.values().next().unwrap();
    assert!(m.table(v).unwrap().iter().all(|&b| b == 1));
}

#[test]
fn a_removed_service_is_unpublished_first_and_its_ids_come_back_later() {
    let (mut p, mut m) = setup();
    p.apply(&state(vec![web(&[("198.18.1.11:80", 1)])]), &mut m)
        .unwrap();
    m.log.clear();
    let r = p.apply(&state(vec![]), &mut m).unwrap();
    assert_eq!(r.removed, ["web"]);
    assert_eq!(m.log[0], "services delete id=1 external");
    assert_eq!(m.log[1], "services delete id=1 internal");
    assert!(m.services.is_empty() && m.vips.is_empty() && m.endpoints.is_empty());
    assert!(m.vip_filter.values().all(|&n| n == 0));
    assert_eq!(m.dump(), "");

    // Fresh ids are used before freed ones; a reused backend id gets a new generation.
    let limits = DataplaneLimits {
        max_backends: 2,
        ..DataplaneLimits::default()
    };
    let mut p = Programmer::new(&limits, 0);
    let mut m = FakeMaps::default();
    p.apply(&state(vec![web(&[("198.18.1.11:80", 1)])]), &mut m)
        .unwrap();
    assert_eq!(m.backends[&1].generation, 1);
    p.apply(&state(vec![web(&[("198.18.1.12:80", 1)])]), &mut m)
        .unwrap_err(); // id 1 is still in use while the new backend is added: no room
    p.apply(&state(vec![]), &mut m).unwrap();
    p.apply(&state(vec![web(&[("198.18.1.12:80", 1)])]), &mut m)
        .unwrap();
    assert_eq!(m.backends[&1].generation, 2);
}

#[test]
fn a_failed_add_leaves_nothing_behind() {
    let (mut p, mut m) = setup();
    let mut first = web(&[("198.18.1.11:80", 1)]);
    first.name = "first".into();
    first.frontend.port = 81;
    p.apply(&state(vec![first.clone()]), &mut m).unwrap();
    let before = m.dump();

    let mut second = web(&[("198.18.1.12:80", 1), ("198.18.1.13:80", 1)]);
    second.source_ranges = vec!["198.18.0.0/16".parse().unwrap()];
    second.frontend.vip = "198.18.100.12".parse().unwrap();
    for step in [
        "endpoints put",
        "maglev write",
        "source_ranges put",
        "vips put",
        "services put",
    ] {
        m.fail_on = Some(step.into());
        let e = p
            .apply(&state(vec![first.clone(), second.clone()]), &mut m)
            .unwrap_err();
        assert!(e.to_string().starts_with("service web: "), "{e}");
        assert_eq!(m.dump(), before, "after failing at {step}");
        assert_eq!(p.services().count(), 1);
    }
    // And it works once the fault is gone.
    p.apply(&state(vec![first, second]), &mut m).unwrap();
    assert_eq!(p.services().count(), 2);
}

#[test]
fn a_failed_update_leaves_the_service_as_it_was() {
    let (mut p, mut m) = setup();
    let old = web(&[("198.18.1.11:80", 1), ("198.18.1.12:80", 1)]);
    p.apply(&state(vec![old.clone()]), &mut m).unwrap();
    let before = m.dump();
    let mut new = web(&[("198.18.1.11:80", 1), ("198.18.1.13:80", 1)]);
    new.affinity_timeout = Some(Duration::from_mins(1));
    for step in ["backends put", "maglev write", "services put"] {
        m.fail_on = Some(step.into());
        p.apply(&state(vec![new.clone()]), &mut m).unwrap_err();
        assert_eq!(m.dump(), before, "after failing at {step}");
        assert_eq!(*p.services().next().unwrap().spec, old);
    }
}

#[test]
fn shared_vips_are_reference_counted() {
    let (mut p, mut m) = setup();
    let a = web(&[("198.18.1.11:80", 1)]);
    let mut b = a.clone();
    b.name = "dns".into();
    b.frontend.port = 53;
    b.frontend.protocol = Protocol::Udp;
    p.apply(&state(vec![a.clone(), b]), &mut m).unwrap();
    assert_eq!(m.vips.len(), 1);
    p.apply(&state(vec![a]), &mut m).unwrap();
    assert_eq!(m.vips.len(), 1, "the VIP stays while a service uses it");
    p.apply(&state(vec![]), &mut m).unwrap();
    assert!(m.vips.is_empty());
}

#[test]
fn flow_slot_matches_the_shared_hash() {
    let client: SocketAddr = "198.18.0.1:40000".parse().unwrap();
    let vip: SocketAddr = "198.18.100.10:80".parse().unwrap();
    let (s, _) = addr_words(client.ip());
    let (d, _) = addr_words(vip.ip());
    let h = lb_common::hash::flow_hash(&s, &d, 40000u16.to_be(), 80u16.to_be(), 6);
    assert_eq!(
        flow_slot(client, vip, Protocol::Tcp, false, 16381),
        h % 16381
    );
    assert_eq!(
        flow_slot(client, vip, Protocol::Tcp, true, 16381),
        lb_common::hash::client_hash(&s) % 16381
    );
}

#[test]
fn an_endpoint_shared_by_two_services_lists_both_frontends() {
    let (mut p, mut m) = setup();
    let a = web(&[("198.18.1.11:80", 1)]);
    let mut b = a.clone();
    b.name = "alt".into();
    b.frontend.vip = "198.18.100.20".parse().unwrap();
    p.apply(&state(vec![a.clone(), b]), &mut m).unwrap();
    let dump = m.dump();
    let line = dump.lines().find(|l| l.starts_with("endpoint ")).unwrap();
    assert!(
        line.starts_with("endpoint 198.18.1.11:80 proto=6 -> ")
            && line.contains("198.18.100.10:80 service=")
            && line.contains("198.18.100.20:80 service="),
        "{dump}"
    );
    // Removing one service leaves the other's frontend.
    p.apply(&state(vec![a]), &mut m).unwrap();
    let dump = m.dump();
    let line = dump.lines().find(|l| l.starts_with("endpoint ")).unwrap();
    assert!(
        line.contains("198.18.100.10:80") && !line.contains("198.18.100.20"),
        "{line}"
    );
    p.apply(&state(vec![]), &mut m).unwrap();
    assert!(m.endpoints.is_empty());
}

#[test]
fn a_table_region_is_written_again_only_in_a_later_apply() {
    let (mut p, mut m) = setup();
    let one = web(&[("198.18.1.11:80", 1)]);
    let two = web(&[("198.18.1.11:80", 1), ("198.18.1.12:80", 1)]);
    p.apply(&state(vec![one.clone()]), &mut m).unwrap();
    p.apply(&state(vec![two.clone()]), &mut m).unwrap();
    // The first table (offset 0) may still be read by a packet that just looked the service up:
    // the new one goes elsewhere. The next apply may reuse it.
    assert!(
        m.log.contains(&"maglev write 1+13".to_string()),
        "{:?}",
        m.log
    );
    m.log.clear();
    p.apply(&state(vec![one]), &mut m).unwrap();
    assert_eq!(m.log[0], "maglev write 1+0");
    // Tables of another size get a page of their own.
    let mut big = two;
    big.table_size = 17;
    m.log.clear();
    p.apply(&state(vec![big]), &mut m).unwrap();
    for line in ["maglev create page 2", "maglev write 2+0"] {
        assert!(m.log.contains(&line.to_string()), "{:?}", m.log);
    }
}

fn with_availability(mut s: Service, available: &[bool]) -> Service {
    for (b, a) in s.backends.iter_mut().zip(available) {
        b.available = *a;
    }
    s
}

#[test]
fn an_unhealthy_backend_leaves_the_table_before_its_flows_move() {
    let (mut p, mut m) = setup();
    let three = web(&[
        ("198.18.1.11:80", 1),
        ("198.18.1.12:80", 1),
        ("198.18.1.13:80", 1),
    ]);
    p.apply(&state(vec![three.clone()]), &mut m).unwrap();
    let before = p.services().next().unwrap().clone();
    let before_table = m.table(&before.value()).unwrap().to_vec();
    m.log.clear();

    let down = with_availability(three.clone(), &[true, false, true]);
    let r = p.apply(&state(vec![down.clone()]), &mut m).unwrap();
    assert_eq!(r.updated, ["web"]);
    // The table without it is switched in first; only then is it marked absent, so that its
    // flows are steered through a table that no longer holds it.
    assert_eq!(
        m.log,
        [
            "maglev write 1+13",
            "services put id=1 external",
            "services put id=1 internal",
            "backends put 2 flags=0"
        ]
    );
    let after = p.services().next().unwrap().clone();
    assert_eq!(after.backends, before.backends, "ids and generations kept");
    let after_table = m.table(&after.value()).unwrap().to_vec();
    assert!(!after_table.contains(&2));
    for (o, n) in before_table.iter().zip(&after_table) {
        if *o != 2 {
            assert_eq!(o, n, "only the unhealthy backend's slots move");
        }
    }
    // Its reverse-NAT entry stays: replies of flows in flight still leave as the VIP.
    assert_eq!(m.endpoints.len(), 3);
    assert_eq!(m.backends[&2].generation, 1);

    // Recovered: present again under a new generation (flows it had never come back), then
    // the table with it.
    m.log.clear();
    p.apply(&state(vec![three.clone()]), &mut m).unwrap();
    assert_eq!(
        m.log,
        [
            "backends put 2 flags=1",
            "maglev write 1+0",
            "services put id=1 external",
            "services put id=1 internal"
        ]
    );
    assert_eq!(m.backends[&2].generation, 2);
    let back = p.services().next().unwrap();
    assert_eq!(
        back.table, before.table,
        "the same table as before it failed"
    );
    assert_eq!(
        back.backends[&"198.18.1.12:80".parse().unwrap()].generation,
        2
    );
}

#[test]
fn a_failed_recovery_leaves_the_backend_out() {
    let (mut p, mut m) = setup();
    let two = web(&[("198.18.1.11:80", 1), ("198.18.1.12:80", 1)]);
    p.apply(
        &state(vec![with_availability(two.clone(), &[true, false])]),
        &mut m,
    )
    .unwrap();
    let before = m.dump();
    for step in ["maglev write", "services put"] {
        m.fail_on = Some(step.into());
        p.apply(&state(vec![two.clone()]), &mut m).unwrap_err();
        assert_eq!(m.dump(), before, "after failing at {step}");
        assert_eq!(m.backends[&2].flags, 0);
    }
    p.apply(&state(vec![two]), &mut m).unwrap();
    assert_eq!(m.backends[&2].flags, lb_common::backend_flags::PRESENT);
}

#[test]
fn no_available_backend_leaves_an_empty_table() {
    let (mut p, mut m) = setup();
    let two = web(&[("198.18.1.11:80", 1), ("198.18.1.12:80", 1)]);
    p.apply(
        &state(vec![with_availability(two, &[false, false])]),
        &mut m,
    )
    .unwrap();
    let v = m.services.values().next().unwrap();
    assert!(m.table(v).unwrap().iter().all(|&b| b == 0));
    assert!(m.backends.values().all(|b| b.flags == 0));
    // ...but the backends exist: they are steered to as soon as they are available.
    assert_eq!(m.backends.len(), 2);
}

fn nat(ipv4: Option<&str>, ipv6: Option<&str>) -> Option<crate::model::SourceNat> {
    Some(crate::model::SourceNat {
        ipv4: ipv4.map(|a| a.parse().unwrap()),
        ipv6: ipv6.map(|a| a.parse().unwrap()),
        ports: (61000, 61999),
    })
}

#[test]
fn source_nat_settings_are_written_first_and_join_the_vip_filter() {
    let (mut p, mut m) = setup();
    let mut s = state(vec![web(&[("198.18.1.11:8080", 1)])]);
    let b = &mut Arc::make_mut(&mut Arc::make_mut(&mut s.services)[0]).backends[0];
    *b = b.with_snat();
    s.source_nat = nat(Some("198.18.0.2"), Some("fd00:18::2"));
    p.apply(&s, &mut m).unwrap();
    // Filter slots for the node's addresses, then the settings, before any service.
    assert_eq!(
        m.log[..3],
        [
            "vip_filter set 27077=1",
            "vip_filter set 22227=1",
            "snat_config set"
        ],
        "{:?}",
        m.log
    );
    let dump = m.dump();
    assert!(
        dump.contains("snat 198.18.0.2 fd00:18::2 ports=61000-61999"),
        "{dump}"
    );
    assert!(
        dump.contains("backend 1 198.18.1.11:8080 gen=1 flags=3"),
        "{dump}"
    );
    // The VIP and both node addresses are in the pre-filter.
    assert_eq!(
        m.vip_filter.values().filter(|n| **n > 0).count(),
        3,
        "{dump}"
    );

    // Unchanged settings are not written again; removed ones clear the config and the filter.
    m.log.clear();
    p.apply(&s, &mut m).unwrap();
    assert!(m.log.is_empty(), "{:?}", m.log);
    let mut none = s.clone();
    none.source_nat = None;
    Arc::make_mut(&mut Arc::make_mut(&mut none.services)[0]).backends[0].snat = false;
    p.apply(&none, &mut m).unwrap();
    assert_eq!(m.snat_config, SnatConfig::default());
    assert_eq!(m.vip_filter.values().filter(|n| **n > 0).count(), 1);
}

#[test]
fn a_failed_source_nat_write_changes_nothing() {
    let (mut p, mut m) = setup();
    let mut s = state(vec![web(&[("198.18.1.11:8080", 1)])]);
    s.source_nat = nat(Some("198.18.0.2"), None);
    m.fail_on = Some("snat_config".into());
    let e = p.apply(&s, &mut m).unwrap_err();
    assert!(e.to_string().starts_with("source NAT: "), "{e}");
    assert!(m.services.is_empty());
    assert!(m.vip_filter.values().all(|n| *n == 0), "filter rolled back");
    // The next apply writes it all.
    p.apply(&s, &mut m).unwrap();
    assert!(m.dump().contains("snat 198.18.0.2 - ports=61000-61999"));
}

#[test]
fn turning_source_nat_on_or_off_gives_the_backend_a_new_generation() {
    let (mut p, mut m) = setup();
    let mut s = state(vec![web(&[
        ("198.18.1.11:8080", 1),
        ("198.18.1.12:8080", 1),
    ])]);
    s.source_nat = nat(Some("198.18.0.2"), None);
    p.apply(&s, &mut m).unwrap();
    let generation = |m: &FakeMaps, id: u32| (m.backends[&id].generation, m.backends[&id].flags);
    assert_eq!(generation(&m, 1), (1, 1));
    // Its flows' source cannot change under them: they are steered again.
    let b = &mut Arc::make_mut(&mut Arc::make_mut(&mut s.services)[0]).backends[0];
    *b = b.with_snat();
    p.apply(&s, &mut m).unwrap();
    assert_eq!(generation(&m, 1), (2, 3));
    assert_eq!(generation(&m, 2), (1, 1), "the other backend is untouched");
    Arc::make_mut(&mut Arc::make_mut(&mut s.services)[0]).backends[0].snat = false;
    p.apply(&s, &mut m).unwrap();
    assert_eq!(generation(&m, 1), (3, 1));
}

#[test]
fn announced_vips_carry_the_neighbor_flag_now_and_when_added() {
    let (mut p, mut m) = setup();
    let vip: IpAddr = "198.18.100.10".parse().unwrap();
    let other: IpAddr = "198.18.100.20".parse().unwrap();
    p.apply(&state(vec![web(&[("198.18.1.11:8080", 1)])]), &mut m)
        .unwrap();
    let flags = |m: &FakeMaps, ip: IpAddr| m.vips.get(&vip_key(ip)).map(|v| v.flags);
    assert_eq!(flags(&m, vip), Some(0));
    m.log.clear();
    p.set_announced([vip, other].into(), &mut m).unwrap();
    assert_eq!(flags(&m, vip), Some(lb_common::vip_flags::NEIGHBOR));
    assert_eq!(m.log, ["vips put"], "only the programmed VIP is written");
    // A VIP programmed later comes with its flag.
    let mut second = web(&[("198.18.1.12:8080", 1)]);
    second.name = "second".into();
    second.frontend.vip = other;
    p.apply(
        &state(vec![second, web(&[("198.18.1.11:8080", 1)])]),
        &mut m,
    )
    .unwrap();
    assert_eq!(flags(&m, other), Some(lb_common::vip_flags::NEIGHBOR));
    // Unchanged: nothing written; handed over: cleared.
    m.log.clear();
    p.set_announced([vip, other].into(), &mut m).unwrap();
    assert!(m.log.is_empty(), "{:?}", m.log);
    p.set_announced([other].into(), &mut m).unwrap();
    assert_eq!(flags(&m, vip), Some(0));
    assert_eq!(flags(&m, other), Some(lb_common::vip_flags::NEIGHBOR));
}

/// A second programmer adopting `maps` as a restarted agent would.
fn adopt(maps: &mut FakeMaps) -> (Programmer, AdoptReport) {
    let contents = maps.contents();
    maps.log.clear();
    Programmer::adopt(&DataplaneLimits::default(), 0, &contents, maps).expect("adopts")
}

#[test]
fn an_adopted_data_plane_takes_no_write_for_the_same_state() {
    let (mut p, mut m) = setup();
    let mut c = Config::default_config().unwrap();
    c.desired.source_nat = nat(Some("198.18.0.1"), Some("fd00::1"));
    p.apply(&c.desired, &mut m).unwrap();
    p.set_announced(
        ["198.18.100.10".parse().unwrap()].into_iter().collect(),
        &mut m,
    )
    .unwrap();
    let before = m.dump();

    let (mut q, report) = adopt(&mut m);
    assert_eq!(report.services, 5);
    assert!(report.repaired.is_empty(), "{:?}", report.repaired);
    assert!(m.log.is_empty(), "adopting wrote {:?}", m.log);
    // Every service is "updated" (the maps do not hold names or weights), but nothing differs.
    let r = q.apply(&c.desired, &mut m).unwrap();
    assert_eq!(r.updated.len(), 5, "{r:?}");
    assert!(m.log.is_empty(), "the first apply wrote {:?}", m.log);
    assert_eq!(m.dump(), before);
    // The announced VIP stays announced.
    q.set_announced(
        ["198.18.100.10".parse().unwrap()].into_iter().collect(),
        &mut m,
    )
    .unwrap();
    assert!(m.log.is_empty(), "{:?}", m.log);
}

#[test]
fn an_adopted_data_plane_keeps_ids_and_generations_through_changes() {
    let (mut p, mut m) = setup();
    let web3 = web(&[
        ("198.18.1.11:8080", 1),
        ("198.18.1.12:8080", 1),
        ("198.18.1.13:8080", 1),
    ]);
    p.apply(&state(vec![web3.clone()]), &mut m).unwrap();
    // A backend removed and one added before the restart: id 3 freed with its generation.
    let web2 = web(&[("198.18.1.11:8080", 1), ("198.18.1.12:8080", 1)]);
    p.apply(&state(vec![web2.clone()]), &mut m).unwrap();
    let ids_before: Vec<(u32, u32)> = p
        .services()
        .flat_map(|s| s.backends.values().map(|b| (b.id, b.generation)))
        .collect();

    let (mut q, _) = adopt(&mut m);
    let ids_after: Vec<(u32, u32)> = q
        .services()
        .flat_map(|s| s.backends.values().map(|b| (b.id, b.generation)))
        .collect();
    assert_eq!(ids_before, ids_after);
    // A new backend gets a fresh id (4), not the freed 3, as the first agent would have done.
    let web3b = web(&[
        ("198.18.1.11:8080", 1),
        ("198.18.1.12:8080", 1),
        ("198.18.1.14:8080", 1),
    ]);
    q.apply(&state(vec![web3b]), &mut m).unwrap();
    let dump = m.dump();
    assert!(
        dump.contains("backend 4 198.18.1.14:8080 gen=1 flags=1"),
        "{dump}"
    );
    // The freed slot kept its generation: when it is given out again, it gets the next one.
    assert_eq!((m.backends[&3].generation, m.backends[&3].flags), (1, 0));
    // Service ids and the table carry on: the service keeps id 1.
    assert!(dump.contains("id=1 size=13"), "{dump}");
}

#[test]
fn adopting_clears_what_an_unfinished_change_left() {
    let (mut p, mut m) = setup();
    p.apply(&state(vec![web(&[("198.18.1.11:8080", 1)])]), &mut m)
        .unwrap();
    // An agent stopped in the middle of adding a second service: its backend, endpoint, VIP
    // and source range written, the service itself never published.
    let mut other = web(&[("198.18.1.21:8080", 1)]);
    other.name = "other".into();
    other.frontend.vip = "198.18.100.20".parse().unwrap();
    other.source_ranges = vec!["198.18.0.0/24".parse().unwrap()];
    m.fail_on = Some("services put id=2 external".into());
    assert!(
        p.apply(
            &state(vec![web(&[("198.18.1.11:8080", 1)]), other.clone()]),
            &mut m
        )
        .is_err()
    );
    // The failed add undid its writes; write them again by hand, as a crash would leave them.
    let (mut scratch, mut leftovers) = setup();
    scratch
        .apply(
            &state(vec![web(&[("198.18.1.11:8080", 1)]), other]),
            &mut leftovers,
        )
        .unwrap();
    leftovers.services.retain(|_, v| v.id != 2);
    let clean = {
        let (mut p, mut m) = setup();
        p.apply(&state(vec![web(&[("198.18.1.11:8080", 1)])]), &mut m)
            .unwrap();
        m.dump()
    };

    let (_q, report) = adopt(&mut leftovers);
    assert_eq!(report.services, 1);
    assert_eq!(report.repaired.len(), 5, "{:?}", report.repaired);
    // What is left is exactly what the published service needs (the cleared backend slot
    // keeps its generation).
    assert_eq!(leftovers.dump(), clean);
    assert_eq!(
        (
            leftovers.backends[&2].generation,
            leftovers.backends[&2].flags
        ),
        (1, 0)
    );
}

/// A NodePort on the node's address: its address joins the pre-filter (XDP looks its packets
/// up) but not `VIPS` (its other ports, ICMP and neighbour resolution stay the node's); an
/// address with an external and an internal frontend of other backends is two keys of two ids.
/// Adopting rebuilds both.
#[test]
fn node_ports_and_split_scopes_program_and_adopt() {
    let (mut p, mut m) = setup();
    let mut node_port = web(&[("198.18.1.11:8080", 1)]);
    node_port.frontend.vip = "198.18.0.2".parse().unwrap();
    node_port.frontend.port = 30080;
    node_port.node_address = true;
    let mut external = web(&[("198.18.1.11:8080", 1)]);
    external.frontend.scope = Scope::External;
    let mut internal = web(&[("198.18.1.11:8080", 1), ("198.18.1.12:8080", 1)]);
    internal.frontend.scope = Scope::Internal;
    let desired = state(vec![node_port.clone(), external, internal]);
    p.apply(&desired, &mut m).unwrap();
    let dump = m.dump();
    let services: Vec<&str> = dump.lines().filter(|l| l.starts_with("service ")).collect();
    assert_eq!(
        services
            .iter()
            .map(|l| l.split(" size=").next().unwrap())
            .collect::<Vec<_>>(),
        [
            "service 198.18.0.2:30080 external proto=6 id=1",
            "service 198.18.0.2:30080 internal proto=6 id=1",
            "service 198.18.100.10:80 external proto=6 id=2",
            "service 198.18.100.10:80 internal proto=6 id=3",
        ],
        "{dump}"
    );
    let vips: Vec<&str> = dump.lines().filter(|l| l.starts_with("vip ")).collect();
    assert_eq!(vips, ["vip 198.18.100.10"], "the node address is no VIP");
    let filter = |dump: &str| {
        dump.lines()
            .filter(|l| l.starts_with("vip_filter["))
            .count()
    };
    assert_eq!(filter(&dump), 2, "the VIP and the node address: {dump}");
    assert!(dump.contains("flags=4"), "NODE_ADDRESS flag: {dump}");

    let (mut q, report) = adopt(&mut m);
    assert!(report.repaired.is_empty(), "{:?}", report.repaired);
    q.apply(&desired, &mut m).unwrap();
    assert!(m.log.is_empty(), "the first apply wrote {:?}", m.log);
    assert_eq!(m.dump(), dump);

    // The NodePort goes: its address leaves the pre-filter; the VIP stays.
    q.apply(
        &DesiredState {
            services: Arc::new(desired.services[1..].to_vec()),
            ..desired.clone()
        },
        &mut m,
    )
    .unwrap();
    let after = m.dump();
    assert_eq!(filter(&after), 1, "{after}");
    assert!(!after.contains("198.18.0.2"), "{after}");
}
