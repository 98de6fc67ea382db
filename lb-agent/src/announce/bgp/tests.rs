use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use rustbgpd_wire::{
    Afi, Capability, Message, NotificationCode, OpenMessage, PathAttribute, Safi, nlri::Prefix,
};

use super::session::{Context, Families, announcements, negotiate, withdrawals};
use crate::announce::{BgpPeerConfig, RouteAttrs};

fn ctx(local_as: u32, remote_as: u32) -> Context {
    Context::example(local_as, remote_as)
}

fn attrs() -> RouteAttrs {
    RouteAttrs {
        communities: vec![(64512 << 16) | 100],
        large_communities: vec![(64512, 1, 2)],
        local_pref: Some(200),
    }
}

fn their_open(asn: u32, hold: u16, caps: Vec<Capability>) -> OpenMessage {
    OpenMessage {
        version: 4,
        my_as: u16::try_from(asn).unwrap_or(23456),
        hold_time: hold,
        bgp_identifier: Ipv4Addr::new(198, 18, 2, 254),
        capabilities: caps,
    }
}

fn families() -> Families {
    Families {
        ipv4: true,
        ipv6: true,
        four_octet_as: true,
        hold_time: 9,
        graceful: false,
    }
}

/// Encodes `m` and decodes it with the crate: what a peer reads.
fn roundtrip(m: &Message) -> Message {
    let mut b = rustbgpd_wire::encode_message(m).unwrap().freeze();
    rustbgpd_wire::decode_message(&mut b, rustbgpd_wire::MAX_MESSAGE_LEN).unwrap()
}

#[test]
fn our_open_carries_4_octet_as_and_both_families() {
    let c = ctx(4_200_000_001, 64513);
    let Message::Open(o) = roundtrip(&Message::Open(c.open())) else {
        panic!()
    };
    assert_eq!(o.my_as, 23456, "AS_TRANS in the 2-octet field");
    assert_eq!(o.four_byte_as(), 4_200_000_001);
    assert_eq!(o.hold_time, 9);
    assert!(o.capabilities.contains(&Capability::MultiProtocol {
        afi: Afi::Ipv6,
        safi: Safi::Unicast
    }));
    assert!(o.capabilities.contains(&Capability::MultiProtocol {
        afi: Afi::Ipv4,
        safi: Safi::Unicast
    }));
}

#[test]
fn negotiation_takes_the_lower_hold_time_and_refuses_what_rfc_4271_refuses() {
    let c = ctx(64512, 64513);
    let four = Capability::FourOctetAs { asn: 64513 };
    let v6 = Capability::MultiProtocol {
        afi: Afi::Ipv6,
        safi: Safi::Unicast,
    };
    let f = negotiate(&c, &their_open(64513, 90, vec![four.clone(), v6.clone()])).unwrap();
    assert_eq!(
        f,
        Families {
            ipv4: false,
            ipv6: true,
            four_octet_as: true,
            hold_time: 9,
            graceful: false,
        }
    );
    // No multiprotocol capability: IPv4 unicast only.
    let f = negotiate(&c, &their_open(64513, 3, vec![])).unwrap();
    assert_eq!(
        f,
        Families {
            ipv4: true,
            ipv6: false,
            four_octet_as: false,
            hold_time: 3,
            graceful: false,
        }
    );
    let refused = |o: OpenMessage| negotiate(&c, &o).unwrap_err();
    let e = refused(their_open(64999, 90, vec![]));
    assert_eq!(
        (e.code, e.subcode),
        (NotificationCode::OpenMessage, 2),
        "bad peer AS"
    );
    let e = refused(their_open(64513, 2, vec![]));
    assert_eq!(
        (e.code, e.subcode),
        (NotificationCode::OpenMessage, 6),
        "unacceptable hold time"
    );
    let mut o = their_open(64513, 90, vec![]);
    o.bgp_identifier = Ipv4Addr::UNSPECIFIED;
    assert_eq!(refused(o).subcode, 3, "bad BGP identifier");
    let mut o = their_open(64513, 90, vec![]);
    o.version = 3;
    let e = refused(o);
    assert_eq!(
        (e.code, e.subcode, e.data),
        (
            NotificationCode::OpenMessage,
            1,
            Bytes::from_static(&[0, 4])
        )
    );
    // A 4-octet local AS needs a peer that speaks 4-octet AS.
    let big = ctx(4_200_000_001, 64513);
    assert_eq!(
        negotiate(&big, &their_open(64513, 90, vec![]))
            .unwrap_err()
            .code,
        NotificationCode::Cease
    );
}

fn parsed(m: &Message) -> rustbgpd_wire::ParsedUpdate {
    let Message::Update(u) = roundtrip(m) else {
        panic!("not an UPDATE")
    };
    u.parse(true, false, &[]).unwrap()
}

#[test]
fn external_ipv4_routes_have_next_hop_self_our_as_and_communities_but_no_local_pref() {
    let c = ctx(64512, 64513);
    let vips: Vec<IpAddr> = vec![
        "198.18.100.10".parse().unwrap(),
        "198.18.100.11".parse().unwrap(),
    ];
    let msgs = announcements(
        &c,
        &families(),
        &attrs(),
        "198.18.2.11".parse().unwrap(),
        &vips,
    );
    assert_eq!(msgs.len(), 1);
    let u = parsed(&msgs[0]);
    let announced: Vec<String> = u.announced.iter().map(|e| e.prefix.to_string()).collect();
    assert_eq!(announced, ["198.18.100.10/32", "198.18.100.11/32"]);
    let a = &u.attributes;
    assert!(a.contains(&PathAttribute::NextHop("198.18.2.11".parse().unwrap())));
    assert!(
        a.iter()
            .any(|x| matches!(x, PathAttribute::AsPath(p) if format!("{p:?}").contains("64512")))
    );
    assert!(a.contains(&PathAttribute::Communities(vec![(64512 << 16) | 100])));
    assert!(a.iter().any(|x| matches!(x, PathAttribute::LargeCommunities(l) if l.len() == 1 && l[0].global_admin == 64512)));
    assert!(!a.iter().any(|x| matches!(x, PathAttribute::LocalPref(_))));
    // Withdrawn by prefix, without attributes.
    let w = parsed(&withdrawals(&families(), &vips)[0]);
    assert_eq!(w.withdrawn.len(), 2);
    assert!(w.attributes.is_empty());
}

#[test]
fn internal_ipv6_routes_go_in_mp_reach_with_local_pref_and_an_empty_as_path() {
    let c = ctx(64512, 64512);
    let vips: Vec<IpAddr> = vec!["fd00:100::10".parse().unwrap()];
    let u = parsed(
        &announcements(
            &c,
            &families(),
            &attrs(),
            "fd00:2::11".parse().unwrap(),
            &vips,
        )[0],
    );
    assert!(u.announced.is_empty(), "IPv6 goes in MP_REACH_NLRI");
    let reach = u
        .attributes
        .iter()
        .find_map(|x| match x {
            PathAttribute::MpReachNlri(r) => Some(r.clone()),
            _ => None,
        })
        .expect("MP_REACH_NLRI");
    assert_eq!(reach.next_hop, "fd00:2::11".parse::<IpAddr>().unwrap());
    assert!(matches!(reach.announced[0].prefix, Prefix::V6(p) if p.len == 128));
    assert!(u.attributes.contains(&PathAttribute::LocalPref(200)));
    assert!(
        u.attributes
            .iter()
            .any(|x| matches!(x, PathAttribute::AsPath(p) if p.segments.is_empty()))
    );
    let w = parsed(&withdrawals(&families(), &vips)[0]);
    assert!(
        w.attributes
            .iter()
            .any(|x| matches!(x, PathAttribute::MpUnreachNlri(u) if u.withdrawn.len() == 1))
    );
}

#[test]
fn many_vips_are_split_into_updates_under_4096_octets() {
    let c = ctx(64512, 64513);
    let v4: Vec<IpAddr> = (0..2000u32)
        .map(|i| IpAddr::from((0xC612_0000u32 + i).to_be_bytes()))
        .collect();
    let v6: Vec<IpAddr> = (0..1000u128)
        .map(|i| IpAddr::from(std::net::Ipv6Addr::from((0xfd00u128 << 112) + i)))
        .collect();
    for (nh, vips) in [("198.18.2.11", &v4), ("fd00:2::11", &v6)] {
        let msgs = announcements(&c, &families(), &attrs(), nh.parse().unwrap(), vips);
        let mut count = 0;
        for m in msgs.iter().chain(&withdrawals(&families(), vips)) {
            let b = rustbgpd_wire::encode_message(m).unwrap();
            assert!(b.len() <= 4096, "{} octets", b.len());
            count += 1;
        }
        assert!(count >= 2);
    }
}

fn peer_config(address: &str, port: u16, passive: bool) -> BgpPeerConfig {
    BgpPeerConfig {
        address: address.parse().unwrap(),
        remote_as: 64513,
        local_as: None,
        port,
        password: None,
        hold_time: std::time::Duration::from_secs(9),
        connect_retry: std::time::Duration::from_millis(200),
        bfd: false,
        multihop: None,
        passive,
    }
}

/// Real sockets: a passive peer whose listen port is taken does not start, is listed with
/// why, and the active peer beside it connects all the same; once the port is free, the next
/// reconcile starts it; stopping forgets every peer.
#[tokio::test]
async fn a_peer_that_cannot_start_is_listed_with_why_and_the_others_run() {
    use super::{Peers, Speaker, State};
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let router = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = crate::announce::BgpConfig {
        graceful_restart: std::time::Duration::ZERO,
        local_as: 64512,
        router_id: Ipv4Addr::new(198, 18, 2, 11),
        listen_port: port,
        bfd: crate::announce::BfdTimers {
            interval: std::time::Duration::from_millis(100),
            multiplier: 3,
        },
        peers: vec![
            peer_config("127.0.0.1", router.local_addr().unwrap().port(), false),
            peer_config("127.0.0.2", 179, true),
        ],
        advertisements: Vec::new(),
    };
    let status = Peers::default();
    let mut speaker = Speaker::without_peers(&config, status.clone(), false);
    let problems = speaker.reconcile(&config).await;
    let passive: IpAddr = "127.0.0.2".parse().unwrap();
    assert_eq!(
        problems.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        [passive]
    );
    let table = status.lock().unwrap().clone();
    assert_eq!(table.len(), 2, "{table:?}");
    let bad = table.iter().find(|p| p.address == passive).unwrap();
    let why = bad.last_error.clone().unwrap_or_default();
    assert!(
        why.starts_with(&format!("not started: announce.bgp.listen_port {port}")),
        "{why}"
    );
    // The active peer runs: it connects to the router.
    let (_first, _) = tokio::time::timeout(std::time::Duration::from_secs(5), router.accept())
        .await
        .expect("the active peer connects")
        .unwrap();
    // A new AS for the peers without their own: the active peer's session starts again.
    let config = crate::announce::BgpConfig {
        graceful_restart: std::time::Duration::ZERO,
        local_as: 64520,
        ..config
    };
    assert!(speaker.reconcilable(&config));
    speaker.reconcile(&config).await;
    tokio::time::timeout(std::time::Duration::from_secs(5), router.accept())
        .await
        .expect("the active peer connects again")
        .unwrap();
    // The port freed, the next reconcile starts the passive peer.
    drop(taken);
    assert!(speaker.reconcile(&config).await.is_empty());
    // Its task waits for the router to connect (Active), without an error.
    let waiting = async {
        loop {
            let table = status.lock().unwrap().clone();
            let p = table
                .iter()
                .find(|p| p.address == passive)
                .cloned()
                .unwrap();
            if p.state == State::Active {
                return p;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let p = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
        .await
        .expect("the passive peer waiting");
    assert_eq!(p.last_error, None);
    speaker.shutdown(std::time::Duration::from_secs(1)).await;
    assert!(status.lock().unwrap().is_empty());
}

#[test]
fn graceful_restart_is_offered_with_the_r_bit_after_a_restart_and_ends_the_rib() {
    let mut c = ctx(64512, 64513);
    c.graceful = Some(super::session::Graceful {
        restart_time: 120,
        restarted: true,
    });
    let Message::Open(o) = roundtrip(&Message::Open(c.open())) else {
        panic!()
    };
    let gr = o
        .capabilities
        .iter()
        .find_map(|cap| match cap {
            Capability::GracefulRestart {
                restart_state,
                restart_time,
                families,
                ..
            } => Some((*restart_state, *restart_time, families.clone())),
            _ => None,
        })
        .expect("the graceful-restart capability");
    assert_eq!((gr.0, gr.1), (true, 120));
    assert!(gr.2.iter().all(|f| f.forwarding_preserved) && gr.2.len() == 2);
    // Negotiated only when the peer offers it too.
    let v6 = Capability::MultiProtocol {
        afi: Afi::Ipv6,
        safi: Safi::Unicast,
    };
    assert!(
        !negotiate(&c, &their_open(64513, 9, vec![v6.clone()]))
            .unwrap()
            .graceful
    );
    let theirs = Capability::GracefulRestart {
        restart_state: false,
        notification: false,
        restart_time: 90,
        families: vec![],
    };
    assert!(
        negotiate(&c, &their_open(64513, 9, vec![v6, theirs]))
            .unwrap()
            .graceful
    );
    // End-of-RIB: an empty UPDATE (IPv4), an empty MP_UNREACH_NLRI (IPv6).
    let eor = super::session::end_of_rib(&families());
    assert_eq!(eor.len(), 2);
    let Message::Update(u) = roundtrip(&eor[0]) else {
        panic!()
    };
    assert!(u.withdrawn_routes.is_empty() && u.path_attributes.is_empty() && u.nlri.is_empty());
}
