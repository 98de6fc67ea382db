use std::{collections::BTreeMap, net::SocketAddr};

use tokio::net::TcpListener;

use super::*;
use crate::model::check::RawHealthCheck;

fn probe(yaml: &str) -> Probe {
    let raw: RawHealthCheck = serde_saphyr::from_str(yaml).expect("YAML");
    raw.check().expect("valid").probe
}

fn key(target: SocketAddr, yaml: &str) -> CheckKey {
    CheckKey {
        target,
        probe: probe(yaml),
    }
}

fn wanted(keys: &[&CheckKey]) -> BTreeMap<CheckKey, Vec<CheckUser>> {
    keys.iter()
        .map(|k| {
            (
                (*k).clone(),
                vec![CheckUser {
                    service: "web".into(),
                    backend: k.target,
                }],
            )
        })
        .collect()
}

async fn next_event(rx: &mut mpsc::Receiver<CheckEvent>) -> CheckEvent {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no check event within 5s")
        .expect("events channel open")
}

/// A listener that accepts (and drops) connections until the returned handle is aborted.
async fn listen(addr: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let a = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    (a, task)
}

#[test]
fn phases_spread_over_the_interval() {
    let mut buckets = [0u32; 10];
    for i in 0..1000u16 {
        let k = key(
            SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 80)),
            "{type: tcp, interval: 100ms}",
        );
        let p = phase(&k);
        assert!(p < Duration::from_millis(100));
        buckets[(p.as_millis() / 10) as usize] += 1;
        assert_eq!(phase(&k), p, "stable");
    }
    assert!(
        buckets.iter().all(|n| (60..=140).contains(n)),
        "1000 checks over 10 slices of the interval: {buckets:?}"
    );
}

#[test]
fn ticks_follow_the_phase_and_skip_missed_ones() {
    let start = Instant::now();
    let (phase, interval) = (Duration::from_millis(30), Duration::from_millis(100));
    let ms = |n| Duration::from_millis(n);
    assert_eq!(next_tick(start, phase, interval, start), start + ms(30));
    assert_eq!(
        next_tick(start, phase, interval, start + ms(30)),
        start + ms(130)
    );
    assert_eq!(
        next_tick(start, phase, interval, start + ms(129)),
        start + ms(130)
    );
    // A probe that overran two ticks resumes on the grid.
    assert_eq!(
        next_tick(start, phase, interval, start + ms(345)),
        start + ms(430)
    );
}

#[tokio::test]
async fn rise_and_fall_drive_the_events() {
    let (addr, server) = listen("127.0.0.1:0").await;
    let (mut monitor, mut rx) = Monitor::new(Arc::default(), 16).unwrap();
    let k = key(addr, "{type: tcp, interval: 50ms, rise: 2, fall: 3}");
    let report = monitor.start(&wanted(&[&k]));
    assert_eq!(
        report,
        SyncReport {
            started: 1,
            inherited: 0
        }
    );
    // Unknown until the first answer (read only while no event has come: on a busy machine
    // the first probe may already have answered).
    if rx.is_empty() {
        let h = monitor.health(&k);
        assert!(matches!(h, Health::Unknown | Health::Up), "{h:?}");
    }

    // The first success makes it healthy (one success, not rise), from Unknown.
    let e = next_event(&mut rx).await;
    assert_eq!((e.from, e.to), (Health::Unknown, Health::Up));
    assert_eq!(monitor.health(&k), Health::Up);
    assert_eq!(monitor.unknown(), 0);

    // The server goes: fall=3 refused probes later, it is down.
    server.abort();
    let _ = server.await;
    let e = next_event(&mut rx).await;
    assert_eq!((e.from, e.to), (Health::Up, Health::Down));
    assert_eq!(
        e.failure.as_ref().map(|f| f.kind),
        Some(FailureKind::Refused)
    );
    let status = monitor.shared(&k).unwrap().status();
    assert!(status.probes >= 4, "1 success and 3 failures: {status:?}");
    assert_eq!(
        status.last_failure.as_ref().map(|f| f.kind),
        Some(FailureKind::Refused)
    );

    // It comes back on the same port: rise=2 successes later, it is up.
    let (_, _server) = listen(&addr.to_string()).await;
    let e = next_event(&mut rx).await;
    assert_eq!((e.from, e.to), (Health::Down, Health::Up));
    let probes = monitor.shared(&k).unwrap().status().probes;
    assert!(probes >= status.probes + 2);
}

#[tokio::test]
async fn a_hanging_target_does_not_delay_the_others() {
    // Accepts connections and never answers an HTTP request.
    let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let mut servers = Vec::new();
    let mut keys = Vec::new();
    for _ in 0..5 {
        let (a, s) = listen("127.0.0.1:0").await;
        servers.push(s);
        keys.push(key(a, "{type: tcp, interval: 50ms}"));
    }
    let slow = key(hang_addr, "{type: http, interval: 200ms, timeout: 200ms}");
    let (mut monitor, mut rx) = Monitor::new(Arc::default(), 16).unwrap();
    let mut all: Vec<&CheckKey> = keys.iter().collect();
    all.push(&slow);
    monitor.start(&wanted(&all));

    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let elapsed = began.elapsed();
    for k in &keys {
        let n = monitor.shared(k).unwrap().status().probes;
        // About one probe per 50 ms: allow a wide margin for a loaded machine.
        assert!(
            n >= 10,
            "{} probed only {n} times in {elapsed:?} beside a hanging target",
            k.target
        );
        assert_eq!(monitor.health(k), Health::Up);
    }
    let s = monitor.shared(&slow).unwrap().status();
    assert_eq!(s.health(), Health::Down);
    assert_eq!(s.last_failure.unwrap().kind, FailureKind::Timeout);
    // Five ups and one down arrived as events.
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e.to);
    }
    assert_eq!(events.iter().filter(|h| **h == Health::Up).count(), 5);
    assert_eq!(events.iter().filter(|h| **h == Health::Down).count(), 1);
}

#[tokio::test]
async fn a_changed_spec_keeps_the_targets_state() {
    let (addr, _server) = listen("127.0.0.1:0").await;
    let (mut monitor, mut rx) = Monitor::new(Arc::default(), 16).unwrap();
    let old = key(addr, "{type: tcp, interval: 50ms}");
    monitor.start(&wanted(&[&old]));
    assert_eq!(next_event(&mut rx).await.to, Health::Up);

    // A new interval is a new check; it starts from the old one's state, not unknown.
    let new = key(addr, "{type: tcp, interval: 80ms}");
    let report = monitor.start(&wanted(&[&new]));
    assert_eq!(
        report,
        SyncReport {
            started: 1,
            inherited: 1
        }
    );
    assert_eq!(monitor.health(&new), Health::Up);
    assert_eq!(monitor.len(), 2, "the old check runs until retain");
    assert_eq!(monitor.retain(&wanted(&[&new])), 1);
    assert_eq!(monitor.len(), 1);
    assert_eq!(monitor.health(&old), Health::Unknown, "gone");
    // No event: nothing changed for the backend.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err());
    assert!(monitor.shared(&new).unwrap().status().probes >= 1);
}

#[tokio::test]
async fn probes_are_measured_per_service() {
    let (addr, _server) = listen("127.0.0.1:0").await;
    let metrics = Arc::new(HealthMetrics::default());
    let (mut monitor, mut rx) = Monitor::new(metrics.clone(), 16).unwrap();
    let k = key(addr, "{type: tcp, interval: 50ms}");
    let users = vec![
        CheckUser {
            service: "a".into(),
            backend: addr,
        },
        CheckUser {
            service: "b".into(),
            backend: addr,
        },
    ];
    monitor.start(&BTreeMap::from([(k.clone(), users)]));
    next_event(&mut rx).await;
    let mut registry = prometheus_client::registry::Registry::with_prefix("weir");
    registry.register(
        "health_check_duration_seconds",
        "",
        metrics.check_duration.clone(),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for service in ["a", "b"] {
        let line = format!(
            "weir_health_check_duration_seconds_count{{service=\"{service}\",type=\"tcp\",result=\"ok\"}}"
        );
        assert!(text.contains(&line), "{line} in\n{text}");
    }
}
