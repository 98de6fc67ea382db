//! BGP mode in the netns lab (`weir_lab::bgplab`) against real routing daemons from Debian's
//! packages in the router's namespace: GoBGP (routes and their attributes in its RIB, IPv4
//! and IPv6, withdrawal on health failure and on agent stop), FRR (TCP MD5 on, a wrong
//! password refused, ECMP over three LB nodes with a client reaching the service through
//! all of them, BFD taking the routes of a frozen node away before the hold time), BIRD
//! (internal peering with LOCAL_PREF, this node passive, routes installed and withdrawn).
//! Needs root; the namespaces are the test's own and are removed afterwards.

use std::time::Duration;

use serde_json::Value;
use weir_lab::{
    agent::{sample, wait_for},
    bgplab::{self, BgpLab, LOCAL_AS, Peering, VIP4, VIP6},
};

fn server_bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_weir-lab").as_ref()
}

/// GoBGP's best path for `prefix` (None: not in its RIB).
fn gobgp_path(lab: &BgpLab, prefix: &str) -> Option<Value> {
    let family = if prefix.contains(':') { "ipv6" } else { "ipv4" };
    let out = lab.router().query(&format!("global rib -a {family} -j"));
    let rib: Value = serde_json::from_str(&out).ok()?;
    rib.get(prefix)?.as_array()?.first().cloned()
}

fn attr<'a>(path: &'a Value, kind: u64) -> Option<&'a Value> {
    path["attrs"].as_array()?.iter().find(|a| a["type"] == kind)
}

#[test]
fn gobgp_gets_the_vips_with_attributes_and_loses_them_on_failure_and_stop() {
    weir_lab::netns::require_root();
    let mut lab = BgpLab::new(1, server_bin(), Peering::default());
    lab.start_gobgp();
    lab.start_agent(0);
    lab.wait_established(0);

    // IPv4 over the IPv4 session, next hop the node, our AS, communities and large ones.
    let p = wait_for(
        Duration::from_secs(10),
        "the IPv4 VIP in GoBGP's RIB",
        || gobgp_path(&lab, &format!("{VIP4}/32")),
    );
    let text = p.to_string();
    assert_eq!(
        attr(&p, 3).map(|a| a["nexthop"].clone()),
        Some(Value::from(bgplab::lb4(0))),
        "{text}"
    );
    assert_eq!(
        attr(&p, 2).map(|a| a["as_paths"][0]["asns"].clone()),
        Some(serde_json::json!([LOCAL_AS])),
        "{text}"
    );
    let communities = attr(&p, 8).map(|a| a["communities"].clone());
    assert_eq!(
        communities,
        Some(serde_json::json!([64512u32 * 65536 + 100, 0xFFFF_FF01u32])),
        "{text}"
    );
    let large = attr(&p, 32).map(|a| a["value"].clone());
    assert_eq!(
        large,
        Some(serde_json::json!([{"ASN": 64512, "LocalData1": 1, "LocalData2": 2}])),
        "{text}"
    );
    assert!(
        attr(&p, 5).is_none(),
        "LOCAL_PREF is not sent to external peers: {text}"
    );
    // IPv6 over the IPv6 session (MP-BGP), next hop the node's IPv6 address.
    let p6 = wait_for(
        Duration::from_secs(10),
        "the IPv6 VIP in GoBGP's RIB",
        || gobgp_path(&lab, &format!("{VIP6}/128")),
    );
    assert!(p6.to_string().contains(&bgplab::lb6(0)), "{p6}");
    // The API and the metrics say what was advertised to whom.
    let peers = lab.bgp(0);
    assert_eq!(peers.len(), 2);
    assert_eq!(peers[0]["advertised"], serde_json::json!([VIP4]));
    assert_eq!(peers[1]["advertised"], serde_json::json!([VIP6]));
    assert_eq!(peers[0]["hold_time"], 9);
    let metrics = lab.agents[0].as_ref().unwrap().metrics(&lab.lbs[0]);
    assert_eq!(
        sample(
            &metrics,
            &format!("weir_bgp_session_up{{peer=\"{}\"}}", bgplab::RT4)
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("weir_bgp_routes_advertised{{peer=\"{}\"}}", bgplab::RT6)
        ),
        Some(1.0)
    );

    // Both backends fail their checks: the node cannot serve the VIPs, the routes go.
    lab.set_backend(0, false);
    lab.set_backend(1, false);
    wait_for(
        Duration::from_secs(10),
        "the VIPs withdrawn at GoBGP",
        || {
            (gobgp_path(&lab, &format!("{VIP4}/32")).is_none()
                && gobgp_path(&lab, &format!("{VIP6}/128")).is_none())
            .then_some(())
        },
    );
    assert!(
        lab.bgp(0).iter().all(|p| p["state"] == "established"),
        "the sessions stay up"
    );
    // One backend back: the routes come back.
    lab.set_backend(1, true);
    wait_for(Duration::from_secs(10), "the VIPs advertised again", || {
        gobgp_path(&lab, &format!("{VIP4}/32")).and(gobgp_path(&lab, &format!("{VIP6}/128")))
    });

    // The agent stops: routes withdrawn and the sessions closed with a Cease.
    let status = lab.agents[0].take().unwrap().stop();
    assert!(status.success(), "{status:?}");
    wait_for(
        Duration::from_secs(5),
        "the VIPs withdrawn after the stop",
        || {
            (gobgp_path(&lab, &format!("{VIP4}/32")).is_none()
                && gobgp_path(&lab, &format!("{VIP6}/128")).is_none())
            .then_some(())
        },
    );
    let neighbor = lab.router().query(&format!("neighbor {}", bgplab::lb4(0)));
    assert!(!neighbor.contains("BGP state = ESTABLISHED"), "{neighbor}");
    assert!(
        neighbor.to_lowercase().contains("shutdown")
            || neighbor.to_lowercase().contains("cease")
            || neighbor.contains("Notification"),
        "GoBGP saw the Cease: {neighbor}"
    );
}
