use lb_common::{BackendStats, ServiceStats, drop_reason};

use super::*;
use crate::{
    dataplane::inspect::RawCounters,
    status::{Snapshot, fixtures},
};

fn service_stats(packets_in: u64, new_flows: u64) -> ServiceStats {
    ServiceStats {
        packets_in,
        bytes_in: packets_in * 100,
        new_flows,
        ..ServiceStats::default()
    }
}

fn backend_stats(packets_in: u64) -> BackendStats {
    BackendStats {
        packets_in,
        bytes_in: packets_in * 100,
        ..BackendStats::default()
    }
}

/// Readings for the fixture snapshot: service ids 1 (web) and 2 (plain), backend ids 1..=3.
fn raw(web: ServiceStats, b1: BackendStats, b2: BackendStats) -> RawCounters {
    RawCounters {
        services: vec![ServiceStats::default(), web, ServiceStats::default()],
        backends: vec![BackendStats::default(), b1, b2, BackendStats::default()],
        ..RawCounters::default()
    }
}

fn web_b(t: &Traffic, addr: &str) -> Counters {
    let addr: SocketAddr = addr.parse().unwrap();
    t.service("web")
        .unwrap()
        .backends
        .iter()
        .find(|b| b.addr == addr)
        .unwrap()
        .totals
}

#[tokio::test(start_paused = true)]
async fn totals_follow_the_counters_and_rates_are_per_second() {
    let snap = fixtures::snapshot();
    let mut acc = Accounting::default();
    let t0 = Instant::now();
    let first = acc.update(
        &snap,
        &raw(
            service_stats(10, 2),
            backend_stats(10),
            BackendStats::default(),
        ),
        Some(vec![TableFill {
            name: "conntrack",
            entries: 5,
            capacity: 1024,
        }]),
        t0,
    );
    assert!(first.sampled);
    let web = first.service("web").unwrap();
    assert_eq!(web.totals.packets_in, 10);
    assert_eq!(web.totals.connections, 2);
    assert_eq!(
        web.rates,
        Rates::default(),
        "no rate before a second sample"
    );
    let conntrack = |t: &Traffic| t.tables.as_ref().map(|t| t[0].entries);
    assert_eq!(conntrack(&first), Some(5));

    let mut s = service_stats(30, 6);
    s.drops[drop_reason::NO_BACKEND as usize] = 3;
    let second = acc.update(
        &snap,
        &raw(s, backend_stats(30), BackendStats::default()),
        None,
        t0 + Duration::from_secs(2),
    );
    let web = second.service("web").unwrap();
    assert_eq!(web.totals.packets_in, 30);
    assert_eq!(web.rates.packets_in, 10.0);
    assert_eq!(web.rates.bytes_in, 1000.0);
    assert_eq!(web.rates.connections, 2.0);
    assert_eq!(web.drops[drop_reason::NO_BACKEND as usize], 3);
    assert_eq!(web_b(&second, "198.18.1.11:8080").packets_in, 30);
    assert_eq!(web.backends[0].rates.packets_in, 10.0);
    // The connection table is walked less often: the last count stays.
    assert_eq!(conntrack(&second), Some(5));
    // A service with no readings yet is all zeros, not absent.
    assert_eq!(second.service("plain").unwrap().totals, Counters::default());
}

#[tokio::test(start_paused = true)]
async fn a_total_never_goes_backwards_when_ids_change_or_are_reused() {
    let mut snap = fixtures::snapshot();
    let mut acc = Accounting::default();
    let t = Instant::now();
    acc.update(
        &snap,
        &raw(service_stats(50, 5), backend_stats(40), backend_stats(10)),
        None,
        t,
    );

    // b1 leaves web and comes back under a new id (9) whose counters start at zero.
    Arc::make_mut(&mut snap.services[0]).backends.remove(0);
    let s = acc.update(
        &snap,
        &raw(service_stats(55, 5), backend_stats(0), backend_stats(15)),
        None,
        t,
    );
    assert!(
        s.service("web")
            .unwrap()
            .backends
            .iter()
            .all(|b| b.addr.port() == 8080)
    );
    let mut back = snap.clone();
    Arc::make_mut(&mut back.services[0])
        .backends
        .insert(0, fixtures::backend("198.18.1.11:8080", 9, None));
    let mut r = raw(
        service_stats(60, 6),
        BackendStats::default(),
        backend_stats(15),
    );
    r.backends.resize(10, BackendStats::default());
    r.backends[9] = backend_stats(3);
    let s = acc.update(&back, &r, None, t);
    assert_eq!(
        web_b(&s, "198.18.1.11:8080").packets_in,
        43,
        "40 before + 3 since"
    );

    // b2's id is freed and taken again between two samples: its counters drop.
    let s = acc.update(
        &back,
        &{
            let mut r = r.clone();
            r.backends[2] = backend_stats(2);
            r
        },
        None,
        t,
    );
    assert_eq!(
        web_b(&s, "198.18.1.12:8080").packets_in,
        17,
        "15 before + 2 since"
    );

    // The service's own id changes (a new frontend id after a re-add): carried as well.
    let mut moved = back.clone();
    Arc::make_mut(&mut moved.services[0]).id = 2;
    let mut r2 = r.clone();
    r2.services[2] = service_stats(1, 1);
    let s = acc.update(&moved, &r2, None, t);
    assert_eq!(s.service("web").unwrap().totals.packets_in, 61);
}

#[tokio::test(start_paused = true)]
async fn a_removed_service_starts_again_from_zero() {
    let snap = fixtures::snapshot();
    let mut acc = Accounting::default();
    let t = Instant::now();
    acc.update(
        &snap,
        &raw(
            service_stats(50, 5),
            backend_stats(50),
            BackendStats::default(),
        ),
        None,
        t,
    );
    let without = Snapshot {
        services: snap.services[1..].to_vec(),
        ..Snapshot::default()
    };
    let s = acc.update(
        &without,
        &raw(
            service_stats(50, 5),
            backend_stats(50),
            BackendStats::default(),
        ),
        None,
        t,
    );
    assert!(s.service("web").is_none());
    // Its id was reset before it was used again.
    let s = acc.update(
        &snap,
        &raw(
            service_stats(4, 1),
            backend_stats(4),
            BackendStats::default(),
        ),
        None,
        t,
    );
    assert_eq!(s.service("web").unwrap().totals.packets_in, 4);
    assert_eq!(web_b(&s, "198.18.1.11:8080").packets_in, 4);
}

/// A reader that fails until told otherwise.
struct Flaky {
    ok: std::sync::atomic::AtomicBool,
    /// Readings asked for.
    calls: std::sync::atomic::AtomicUsize,
}

impl Inspect for Flaky {
    fn counters(
        &self,
        services: u32,
        backends: u32,
    ) -> Result<RawCounters, crate::dataplane::MapError> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.ok.load(std::sync::atomic::Ordering::Relaxed) {
            Ok(RawCounters {
                services: vec![service_stats(7, 1); services as usize],
                backends: vec![backend_stats(7); backends as usize],
                ..RawCounters::default()
            })
        } else {
            Err(crate::dataplane::MapError {
                map: "SERVICE_STATS",
                op: "lookup batch".into(),
                detail: "EPERM".into(),
            })
        }
    }
    fn tables(&self) -> Result<Vec<TableFill>, crate::dataplane::MapError> {
        Ok(vec![TableFill {
            name: "conntrack",
            entries: 11,
            capacity: 1024,
        }])
    }
    fn trace(
        &self,
        _: &lb_common::FlowKey,
    ) -> Result<crate::dataplane::inspect::Trace, crate::dataplane::MapError> {
        unreachable!()
    }
}

#[tokio::test(start_paused = true)]
async fn the_sampler_publishes_samples_and_counts_failures() {
    let flaky = Arc::new(Flaky {
        ok: std::sync::atomic::AtomicBool::new(false),
        calls: std::sync::atomic::AtomicUsize::new(0),
    });
    let snapshot = watch::Sender::new(Arc::new(fixtures::snapshot()));
    let (out, mut rx) = watch::channel(Arc::new(Traffic::default()));
    let task = tokio::spawn(sample(flaky.clone(), snapshot.subscribe(), out));
    // The readings run on the sampler's own thread, one after another: wait (on the paused
    // clock) until a fourth has started, so that three have failed.
    while flaky.calls.load(std::sync::atomic::Ordering::Relaxed) < 4 {
        tokio::time::sleep(SAMPLE_EVERY / 10).await;
    }
    assert!(!rx.borrow().sampled, "failed readings publish nothing");
    flaky.ok.store(true, std::sync::atomic::Ordering::Relaxed);
    rx.changed().await.unwrap();
    let t = rx.borrow().clone();
    assert!(t.sampled);
    assert!(t.errors >= 3, "{}", t.errors);
    assert_eq!(t.service("web").unwrap().totals.packets_in, 7);
    assert_eq!(web_b(&t, "198.18.1.12:8080").packets_in, 7);
    drop(rx);
    tokio::time::sleep(SAMPLE_EVERY * 2).await;
    assert!(task.is_finished(), "the sampler stops when nobody listens");
}
