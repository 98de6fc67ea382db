use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};

use super::*;
use crate::sources::kubernetes::{
    crd::IPPoolSpec,
    ipam::{Allocator, Pool},
};

#[test]
fn pool_status_counts_and_validity() {
    let mut alloc = Allocator::default();
    alloc.set_pools([Pool::from_spec(
        "p",
        &IPPoolSpec {
            addresses: vec!["198.18.100.0/30".into(), "fd00:100::/64".into()],
            auto_assign: true,
            ..Default::default()
        },
    )
    .unwrap()]);
    let s = pool_status(&alloc, "p", None);
    assert_eq!(s["assigned"], 0);
    assert_eq!(s["available"], "2^64 or more");
    assert_eq!(s["conditions"][0]["status"], "True");
    let bad = "spec.addresses[0]: x".to_string();
    let s = pool_status(&alloc, "q", Some(&bad));
    assert_eq!(s["conditions"][0]["reason"], "InvalidSpec");
    assert_eq!(s["available"], "0");
}

fn lease(holder: Option<&str>, renewed_ago: i64, duration: i32) -> Lease {
    let now = Timestamp::now();
    Lease {
        metadata: Default::default(),
        spec: Some(LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(
                now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(renewed_ago))
                    .unwrap(),
            )),
            ..LeaseSpec::default()
        }),
    }
}

#[test]
fn the_lease_decides_who_leads() {
    let now = Timestamp::now();
    assert_eq!(decide(None, "a", now), LeaseAction::Create);
    assert_eq!(
        decide(Some(&lease(Some("a"), 1, 15)), "a", now),
        LeaseAction::Renew
    );
    assert_eq!(
        decide(Some(&lease(Some("b"), 1, 15)), "a", now),
        LeaseAction::Follow("b".into())
    );
    // b stopped renewing 20 s ago with a 15 s lease: a takes over.
    assert_eq!(
        decide(Some(&lease(Some("b"), 20, 15)), "a", now),
        LeaseAction::TakeOver
    );
    assert_eq!(
        decide(Some(&lease(None, 0, 15)), "a", now),
        LeaseAction::TakeOver
    );
    // A takeover counts a transition and resets the acquire time.
    let prev = lease(Some("b"), 20, 15).spec.unwrap();
    let s = lease_spec("a", now, Some(&prev), true);
    assert_eq!(s.lease_transitions, Some(1));
    assert_eq!(s.acquire_time, Some(MicroTime(now)));
    assert_eq!(s.holder_identity.as_deref(), Some("a"));
}
