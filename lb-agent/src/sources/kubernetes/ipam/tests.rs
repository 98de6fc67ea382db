use proptest::prelude::*;

use super::*;
use crate::sources::kubernetes::crd::{IPPoolSpec, ServiceAllocation};

fn pool(name: &str, addresses: &[&str]) -> Pool {
    Pool::from_spec(
        name,
        &IPPoolSpec {
            addresses: addresses.iter().map(ToString::to_string).collect(),
            auto_assign: true,
            ..IPPoolSpec::default()
        },
    )
    .unwrap()
}

fn req(service: &str) -> Request {
    Request {
        service: format!("default/{service}"),
        namespace: "default".into(),
        labels: BTreeMap::new(),
        families: vec![Family::V4],
        addresses: vec![],
        pool: None,
        sharing: None,
        ports: [(Protocol::Tcp, 80)].into(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn ranges_parse_and_refuse_clearly() {
    let r = AddrRange::parse("198.18.100.0/30").unwrap();
    assert!(r.contains(ip("198.18.100.3")) && !r.contains(ip("198.18.100.4")));
    let r = AddrRange::parse("198.18.100.10 - 198.18.100.12").unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(AddrRange::parse("fd00:100::/120").unwrap().len(), 256);
    assert_eq!(AddrRange::parse("198.18.100.7").unwrap().len(), 1);
    for (text, message) in [
        (
            "198.18.100.1/24",
            "host bits set (did you mean 198.18.100.0/24?)",
        ),
        (
            "198.18.100.9-198.18.100.1",
            "the first address is after the last",
        ),
        ("198.18.100.1-fd00::1", "mixes IPv4 and IPv6"),
        ("pool", "neither a CIDR"),
    ] {
        let e = AddrRange::parse(text).unwrap_err().to_string();
        assert!(e.contains(message), "{text}: {e}");
    }
    let e = Pool::from_spec(
        "p",
        &IPPoolSpec {
            addresses: vec!["198.18.100.0/24".into(), "x".into()],
            ..IPPoolSpec::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("spec.addresses[1]: "), "{e}");
}

#[test]
fn buggy_addresses_are_skipped_and_not_counted() {
    let mut p = pool("p", &["198.18.99.254-198.18.100.1"]);
    assert_eq!(p.size(None), 4);
    p.avoid_buggy_ips = true;
    assert_eq!(p.size(Some(Family::V4)), 2);
    let mut a = Allocator::default();
    a.set_pools([p]);
    assert_eq!(a.assign(&req("a"), &[]).unwrap(), [ip("198.18.99.254")]);
    assert_eq!(a.assign(&req("b"), &[]).unwrap(), [ip("198.18.100.1")]);
    assert!(matches!(
        a.assign(&req("c"), &[]),
        Err(AllocError::Exhausted {
            family: Family::V4,
            ..
        })
    ));
}

#[test]
fn dual_stack_requests_get_one_address_per_family_in_order() {
    let mut a = Allocator::default();
    a.set_pools([pool("p", &["198.18.100.0/30", "fd00:100::/126"])]);
    let mut r = req("web");
    r.families = vec![Family::V6, Family::V4];
    assert_eq!(
        a.assign(&r, &[]).unwrap(),
        [ip("fd00:100::"), ip("198.18.100.0")]
    );
    assert_eq!(a.assigned_in("p"), 2);
}

#[test]
fn sharing_needs_the_same_key_and_no_common_port() {
    let mut a = Allocator::default();
    a.set_pools([pool("p", &["198.18.100.10-198.18.100.11"])]);
    let mut dns_tcp = req("dns-tcp");
    dns_tcp.sharing = Some("dns".into());
    dns_tcp.ports = [(Protocol::Tcp, 53)].into();
    let mut dns_udp = req("dns-udp");
    dns_udp.sharing = Some("dns".into());
    dns_udp.ports = [(Protocol::Udp, 53)].into();
    let first = a.assign(&dns_tcp, &[]).unwrap();
    assert_eq!(
        a.assign(&dns_udp, &[]).unwrap(),
        first,
        "shares the key's address"
    );
    // Same key, common port: a new address, or refused when asked for the shared one.
    let mut clash = dns_udp.clone();
    clash.service = "default/clash".into();
    assert_eq!(a.assign(&clash, &[]).unwrap(), [ip("198.18.100.11")]);
    a.release("default/clash");
    clash.addresses = first.clone();
    assert_eq!(
        a.assign(&clash, &[]),
        Err(AllocError::InUse {
            ip: first[0],
            by: "default/dns-udp".into()
        })
    );
    // Without a key nothing is shared.
    let mut plain = req("plain");
    plain.addresses = first.clone();
    plain.ports = [(Protocol::Tcp, 8080)].into();
    assert!(matches!(
        a.assign(&plain, &[]),
        Err(AllocError::InUse { .. })
    ));
    // Releasing both holders frees the address.
    a.release("default/dns-tcp");
    a.release("default/dns-udp");
    assert_eq!(a.assign(&plain, &[]).unwrap(), first);
}

#[test]
fn pools_are_chosen_by_name_namespace_labels_and_auto_assign() {
    let mut restricted = pool("team-a", &["198.18.101.0/30"]);
    restricted.namespaces = vec!["team-a".into()];
    let mut manual = pool("manual", &["198.18.102.0/30"]);
    manual.auto_assign = false;
    let mut labelled = Pool::from_spec(
        "gold",
        &IPPoolSpec {
            addresses: vec!["198.18.103.0/30".into()],
            auto_assign: true,
            service_allocation: Some(ServiceAllocation {
                namespaces: vec![],
                service_selector: Some(LabelSelector {
                    match_labels: Some([("tier".to_string(), "gold".to_string())].into()),
                    ..LabelSelector::default()
                }),
            }),
            ..IPPoolSpec::default()
        },
    )
    .unwrap();
    labelled.name = "gold".into();
    let mut a = Allocator::default();
    a.set_pools([restricted, manual, labelled]);
    // default/x: neither team-a (namespace) nor manual (no auto) nor gold (labels).
    assert!(matches!(
        a.assign(&req("x"), &[]),
        Err(AllocError::Exhausted { .. })
    ));
    let mut gold = req("g");
    gold.labels.insert("tier".into(), "gold".into());
    assert_eq!(a.assign(&gold, &[]).unwrap(), [ip("198.18.103.0")]);
    let mut named = req("m");
    named.pool = Some("manual".into());
    assert_eq!(a.assign(&named, &[]).unwrap(), [ip("198.18.102.0")]);
    named.pool = Some("team-a".into());
    named.service = "default/n".into();
    assert_eq!(
        a.assign(&named, &[]),
        Err(AllocError::PoolNotAllowed {
            pool: "team-a".into()
        })
    );
    named.pool = Some("nope".into());
    assert_eq!(
        a.assign(&named, &[]),
        Err(AllocError::NoSuchPool("nope".into()))
    );
    let mut outside = req("o");
    outside.addresses = vec![ip("198.18.200.1")];
    assert_eq!(
        a.assign(&outside, &[]),
        Err(AllocError::NotInPool {
            ip: ip("198.18.200.1"),
            pool: None
        })
    );
}

#[test]
fn addresses_stay_put_and_a_new_leader_adopts_the_status() {
    let mut a = Allocator::default();
    a.set_pools([pool("p", &["198.18.100.0/29"])]);
    let web = req("web");
    let got = a.assign(&web, &[]).unwrap();
    // Another Service coming and going does not move web.
    a.assign(&req("other"), &[]).unwrap();
    a.release("default/other");
    assert_eq!(a.assign(&web, &[]).unwrap(), got);
    // A new leader starts empty and adopts what the status says, even if lower addresses
    // are free.
    let mut b = Allocator::default();
    b.set_pools([pool("p", &["198.18.100.0/29"])]);
    assert_eq!(
        b.assign(&web, &[ip("198.18.100.5")]).unwrap(),
        [ip("198.18.100.5")]
    );
    // A status address outside every pool is not adopted.
    assert_eq!(
        b.assign(&req("z"), &[ip("198.18.200.5")]).unwrap(),
        [ip("198.18.100.0")]
    );
    // A pool shrinking under a Service takes its address away.
    assert_eq!(
        b.set_pools([pool("p", &["198.18.100.0/30"])]),
        ["default/web".to_string()]
    );
    assert_eq!(b.held("default/web"), None);
}

// ---- property tests -------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Put {
        service: usize,
        v4: bool,
        v6: bool,
        address: Option<u8>,
        pool: Option<usize>,
        sharing: Option<u8>,
        ports: Vec<u16>,
        namespace: u8,
    },
    Delete(usize),
}

const SERVICES: usize = 8;
const POOLS: [&str; 3] = ["a", "b", "c"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            0..SERVICES,
            any::<bool>(),
            any::<bool>(),
            proptest::option::weighted(0.3, 0u8..12),
            proptest::option::weighted(0.3, 0..POOLS.len() + 1),
            proptest::option::weighted(0.4, 0u8..2),
            proptest::collection::vec(prop_oneof![Just(53u16), Just(80), Just(443)], 1..3),
            0u8..2,
        )
            .prop_map(|(service, v4, v6, address, pool, sharing, ports, namespace)| Op::Put {
                service,
                v4,
                v6,
                address,
                pool,
                sharing,
                ports,
                namespace,
            }),
        1 => (0..SERVICES).prop_map(Op::Delete),
    ]
}

/// Small pools that run out: a (6 IPv4 + 4 IPv6, any namespace), b (2 IPv4, namespace ns0
/// only), c (2 IPv4, not auto-assigned).
fn pools() -> Vec<Pool> {
    let a = pool(
        "a",
        &["198.18.100.0-198.18.100.5", "fd00:100::-fd00:100::3"],
    );
    let mut b = pool("b", &["198.18.100.6/31"]);
    b.namespaces = vec!["ns0".into()];
    let mut c = pool("c", &["198.18.100.8/31"]);
    c.auto_assign = false;
    vec![a, b, c]
}

fn request(o: &Op) -> Request {
    let Op::Put {
        service,
        v4,
        v6,
        address,
        pool,
        sharing,
        ports,
        namespace,
    } = o
    else {
        unreachable!()
    };
    let mut families = Vec::new();
    if *v4 || !*v6 {
        families.push(Family::V4);
    }
    if *v6 {
        families.push(Family::V6);
    }
    Request {
        service: format!("ns{namespace}/s{service}"),
        namespace: format!("ns{namespace}"),
        labels: BTreeMap::new(),
        families,
        // Addresses 0..=11: some in pools, some outside (198.18.100.10, .11).
        addresses: address
            .map(|n| vec![IpAddr::V4(Ipv4Addr::new(198, 18, 100, n))])
            .unwrap_or_default(),
        pool: pool.map(|p| POOLS.get(p).copied().unwrap_or("missing").to_string()),
        sharing: sharing.map(|k| format!("key{k}")),
        ports: ports.iter().map(|p| (Protocol::Tcp, *p)).collect(),
    }
}

fn check_invariants(a: &Allocator) -> Result<(), TestCaseError> {
    // by_ip is exactly the inverse of held.
    let mut inverse: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for (s, h) in &a.held {
        for ip in &h.ips {
            inverse.entry(*ip).or_default().insert(s.clone());
        }
    }
    prop_assert_eq!(&inverse, &a.by_ip);
    for (ip, users) in &a.by_ip {
        let users: Vec<&Holding> = users.iter().map(|u| &a.held[u]).collect();
        // Never handed out twice, unless shared by the rules.
        for (i, x) in users.iter().enumerate() {
            for y in &users[i + 1..] {
                prop_assert!(
                    x.request.sharing.is_some()
                        && x.request.sharing == y.request.sharing
                        && x.request.ports.is_disjoint(&y.request.ports),
                    "{ip} held by {} and {} without a right to share",
                    x.request.service,
                    y.request.service
                );
            }
        }
        // In a pool that allows each holder (the named one, if named).
        for h in users {
            prop_assert!(a.fits(*ip, &h.request), "{ip} does not fit {:?}", h.request);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_creates_updates_and_deletes_keep_every_invariant(ops in proptest::collection::vec(op(), 1..60)) {
        let mut a = Allocator::default();
        a.set_pools(pools());
        for o in &ops {
            match o {
                Op::Put { .. } => {
                    let r = request(o);
                    // Namespaces differ per op, so a service name may move namespace: the
                    // Kubernetes key includes it, so it is another Service.
                    let before = a.clone();
                    if let Ok(ips) = a.assign(&r, &[]) {
                        prop_assert_eq!(a.held(&r.service), Some(ips.as_slice()));
                        if r.addresses.is_empty() {
                            let fams: Vec<Family> = ips.iter().map(|i| Family::of(*i)).collect();
                            prop_assert_eq!(&fams, &r.families);
                        } else {
                            prop_assert_eq!(&ips, &r.addresses);
                        }
                        // Asking again changes nothing.
                        let again = a.clone();
                        prop_assert_eq!(a.assign(&r, &[]).unwrap(), ips);
                        prop_assert_eq!(&a, &again);
                    } else { prop_assert_eq!(&a, &before, "a failed request changed the state") }
                }
                Op::Delete(s) => {
                    for ns in 0..2 {
                        let name = format!("ns{ns}/s{s}");
                        let held: Vec<IpAddr> = a.held(&name).map(<[IpAddr]>::to_vec).unwrap_or_default();
                        a.release(&name);
                        prop_assert_eq!(a.held(&name), None);
                        for ip in held {
                            prop_assert!(a.by_ip.get(&ip).is_none_or(|u| !u.contains(&name)));
                        }
                    }
                }
            }
            check_invariants(&a)?;
        }
        // Releasing everything leaves every address free.
        let all: Vec<String> = a.held.keys().cloned().collect();
        for s in all {
            a.release(&s);
        }
        prop_assert!(a.by_ip.is_empty());
    }
}
