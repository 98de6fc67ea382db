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
    let t0 = std::time::Instant::now();
    let at = |s: u64| t0 + std::time::Duration::from_secs(s);
    let mut seen = None;
    assert_eq!(decide(None, "a", &mut seen, t0), LeaseAction::Create);
    assert_eq!(
        decide(Some(&lease(Some("a"), 1, 15)), "a", &mut seen, t0),
        LeaseAction::Renew
    );
    // b holds it, with a renewTime an hour old by this node's clock (another node's clock may
    // be anywhere): followed, not taken, at first sight.
    let b = lease(Some("b"), 3600, 15);
    assert_eq!(
        decide(Some(&b), "a", &mut seen, t0),
        LeaseAction::Follow("b".into())
    );
    // Unchanged for less than the 15 s duration (by this node's clock): still b's.
    assert_eq!(
        decide(Some(&b), "a", &mut seen, at(14)),
        LeaseAction::Follow("b".into())
    );
    // b renews (its renewTime changes, whatever its value): the count starts again.
    let renewed = lease(Some("b"), 3599, 15);
    assert_eq!(
        decide(Some(&renewed), "a", &mut seen, at(14)),
        LeaseAction::Follow("b".into())
    );
    assert_eq!(
        decide(Some(&renewed), "a", &mut seen, at(28)),
        LeaseAction::Follow("b".into())
    );
    // b stopped renewing more than 15 s ago as this node saw it: a takes over.
    assert_eq!(
        decide(Some(&renewed), "a", &mut seen, at(30)),
        LeaseAction::TakeOver
    );
    let mut fresh = None;
    assert_eq!(
        decide(Some(&lease(None, 0, 15)), "a", &mut fresh, t0),
        LeaseAction::TakeOver
    );
    let now = Timestamp::now();
    // A takeover counts a transition and resets the acquire time.
    let prev = lease(Some("b"), 20, 15).spec.unwrap();
    let s = lease_spec("a", now, Some(&prev), true);
    assert_eq!(s.lease_transitions, Some(1));
    assert_eq!(s.acquire_time, Some(MicroTime(now)));
    assert_eq!(s.holder_identity.as_deref(), Some("a"));
}

/// An API server that never answers cannot make the Event queue grow without bound: past
/// `EVENT_QUEUE` waiting, Events are dropped and counted. (No API server runs here; the
/// client points at a closed local port and the sink's task never gets to run.)
#[tokio::test(flavor = "current_thread")]
async fn the_event_queue_is_bounded() {
    let config = Config::new("http://127.0.0.1:9".parse().unwrap());
    let client = Client::try_from(config).unwrap();
    let (store, _writer) = kube::runtime::reflector::store::<k8s_openapi::api::core::v1::Service>();
    let (sink, task) = event_sink(client, store, "test".into());
    for i in 0..EVENT_QUEUE + 500 {
        sink.send(ServiceEvent {
            service: format!("ns/s{i}"),
            warning: true,
            reason: "Test",
            note: String::new(),
        });
    }
    assert_eq!(sink.dropped(), 500);
    task.abort();
}

/// One object that does not decode (remoteAS beyond u32, stored before the schema bounded
/// it) is skipped and reported; the others of its kind are read.
#[test]
fn an_undecodable_object_is_skipped_and_reported() {
    use crate::sources::kubernetes::crd::BGPPeer;
    let peer = |name: &str, asn: u64| {
        serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "BGPPeer",
            "metadata": {"name": name},
            "spec": {"address": "198.18.0.1", "remoteAS": asn, "localAS": 64512},
        })
    };
    let store = Lenient::<BGPPeer>::of([peer("good", 64512), peer("bad", 5_000_000_000)]);
    let (ok, bad) = store.decoded();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].metadata.name.as_deref(), Some("good"));
    assert_eq!(bad.len(), 1);
    assert!(bad[0].starts_with("BGPPeer bad: cannot be read"), "{bad:?}");
}
