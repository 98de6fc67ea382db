use std::time::Duration;

use super::*;
use crate::{
    health::HealthMode,
    model::Protocol,
    status::{BackendStatus, ServiceStatus},
};

fn backend(addr: &str, healthy: bool) -> BackendStatus {
    BackendStatus {
        addr: addr.parse().unwrap(),
        weight: 1,
        healthy,
        state: None,
        in_rotation: healthy,
        check: None,
    }
}

fn service(
    name: &str,
    check: Option<&'static str>,
    mode: HealthMode,
    backends: Vec<BackendStatus>,
) -> ServiceStatus {
    ServiceStatus {
        name: name.into(),
        vip: "198.18.100.10".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
        check,
        mode,
        backends,
    }
}

#[test]
fn health_metrics_have_the_documented_names() {
    let snapshot = watch::Sender::new(Arc::new(Snapshot::default()));
    let m = Metrics::new(snapshot.subscribe());
    m.health
        .observe_probe("web", "http", "ok", Duration::from_millis(3));
    m.health
        .observe_probe("web", "http", "timeout", Duration::from_millis(500));
    m.health.transition("web", "198.18.1.11:8080", false);
    snapshot.send_replace(Arc::new(Snapshot {
        services: vec![
            service(
                "web",
                Some("http"),
                HealthMode::Checked,
                vec![
                    backend("198.18.1.11:8080", false),
                    backend("198.18.1.12:8080", true),
                ],
            ),
            service(
                "plain",
                None,
                HealthMode::Unchecked,
                vec![backend("[fd00:1::11]:8080", true)],
            ),
        ],
    }));
    let text = m.encode();
    for line in [
        "# TYPE weir_health_check_duration_seconds histogram",
        "weir_health_check_duration_seconds_bucket{le=\"0.005\",service=\"web\",type=\"http\",result=\"ok\"} 1",
        "weir_health_check_duration_seconds_count{service=\"web\",type=\"http\",result=\"timeout\"} 1",
        "# TYPE weir_health_transitions counter",
        "weir_health_transitions_total{service=\"web\",backend=\"198.18.1.11:8080\",to=\"unhealthy\"} 1",
        "# TYPE weir_backend_healthy gauge",
        "weir_backend_healthy{service=\"web\",backend=\"198.18.1.11:8080\"} 0",
        "weir_backend_healthy{service=\"web\",backend=\"198.18.1.12:8080\"} 1",
        "weir_backend_healthy{service=\"plain\",backend=\"[fd00:1::11]:8080\"} 1",
        "weir_service_fail_open{service=\"web\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    // Only checked services have a fail-open gauge.
    assert!(!text.contains("weir_service_fail_open{service=\"plain\"}"));
    assert!(text.ends_with("# EOF\n"));

    // A backend that leaves the snapshot leaves the metrics.
    snapshot.send_replace(Arc::new(Snapshot::default()));
    assert!(!m.encode().contains("weir_backend_healthy{"));
}
