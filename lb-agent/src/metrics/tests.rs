use std::time::Duration;

use super::*;
use crate::status::fixtures;

/// The probe and transition series of a removed service, or of a backend that left a service,
/// are dropped: the label sets stay bounded by what is served.
#[test]
fn health_series_are_pruned_with_their_services_and_backends() {
    let m = Metrics::new(
        watch::Sender::new(Arc::new(Snapshot::default())).subscribe(),
        watch::Sender::default().subscribe(),
    );
    for service in ["web", "gone"] {
        m.health
            .observe_probe(service, "tcp", "refused", Duration::from_millis(1));
        m.health.transition(service, "198.18.1.11:80", false);
        m.health.transition(service, "198.18.1.12:80", true);
    }
    let ok = m.health.histogram("web", "tcp", "ok");
    ok.observe(0.001);
    let service = |s: &str| s == "web";
    let backend = |s: &str, b: &str| s == "web" && b == "198.18.1.11:80";
    // gone's histogram and two transitions, web's transition of the backend that left.
    assert_eq!(m.health.prune(service, backend), 4);
    let text = m.encode();
    assert!(!text.contains("service=\"gone\""), "{text}");
    assert!(!text.contains("198.18.1.12:80"), "{text}");
    assert!(text.contains(
        "weir_health_transitions_total{service=\"web\",backend=\"198.18.1.11:80\",to=\"unhealthy\"} 1"
    ), "{text}");
    assert!(
        text.contains(
            "weir_health_check_duration_seconds_count{service=\"web\",type=\"tcp\",result=\"ok\"} 1"
        ),
        "{text}"
    );
    assert_eq!(m.health.prune(service, backend), 0, "nothing left to drop");
}

#[test]
fn health_metrics_have_the_documented_names() {
    let snapshot = watch::Sender::new(Arc::new(Snapshot::default()));
    let m = Metrics::new(snapshot.subscribe(), watch::Sender::default().subscribe());
    m.health
        .observe_probe("web", "http", "ok", Duration::from_millis(3));
    m.health
        .observe_probe("web", "http", "timeout", Duration::from_millis(500));
    m.health.transition("web", "198.18.1.11:8080", false);
    snapshot.send_replace(Arc::new(fixtures::snapshot()));
    let text = m.encode();
    for line in [
        "# TYPE weir_health_check_duration_seconds histogram",
        "weir_health_check_duration_seconds_bucket{le=\"0.005\",service=\"web\",type=\"http\",result=\"ok\"} 1",
        "weir_health_check_duration_seconds_count{service=\"web\",type=\"http\",result=\"timeout\"} 1",
        "# TYPE weir_health_transitions counter",
        "weir_health_transitions_total{service=\"web\",backend=\"198.18.1.11:8080\",to=\"unhealthy\"} 1",
        "# TYPE weir_backend_healthy gauge",
        "weir_backend_healthy{service=\"web\",backend=\"198.18.1.11:8080\"} 1",
        "weir_backend_healthy{service=\"web\",backend=\"198.18.1.12:8080\"} 0",
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

#[test]
fn traffic_metrics_have_the_documented_names_and_labels() {
    let traffic = watch::Sender::new(Arc::new(Traffic::default()));
    let m = Metrics::new(watch::Sender::default().subscribe(), traffic.subscribe());
    // Before the first sample there is no traffic series (rather than zeros that would lie).
    assert!(!m.encode().contains("weir_service_packets_total"));
    let mut t = fixtures::traffic();
    t.unattributed_drops[drop_reason::NO_SERVICE as usize] = 7;
    t.datapath[datapath_stat::FWD_REDIRECT] = 300;
    t.datapath[datapath_stat::FLOW_RESTEERED] = 4;
    t.datapath[datapath_stat::SNAT_PORT_HALF_OPEN] = 9;
    t.datapath[datapath_stat::TUPLE_CLASH_AVOIDED] = 3;
    t.tables = Some(vec![
        crate::dataplane::inspect::TableFill {
            name: "conntrack",
            entries: 42,
            capacity: 262_144,
        },
        crate::dataplane::inspect::TableFill {
            name: "half_open",
            entries: 7,
            capacity: 65_536,
        },
    ]);
    traffic.send_replace(Arc::new(t));
    let text = m.encode();
    let svc = "service=\"web\",vip=\"198.18.100.10\",port=\"80\",protocol=\"tcp\"";
    for line in [
        "# TYPE weir_service_packets counter".to_string(),
        format!("weir_service_packets_total{{{svc},direction=\"in\"}} 120"),
        format!("weir_service_packets_total{{{svc},direction=\"out\"}} 100"),
        format!("weir_service_bytes_total{{{svc},direction=\"in\"}} 7200"),
        format!("weir_service_bytes_total{{{svc},direction=\"out\"}} 100000"),
        format!("weir_service_connections_total{{{svc}}} 20"),
        format!("weir_service_drops_total{{{svc},reason=\"no_backend\"}} 2"),
        format!("weir_service_drops_total{{{svc},reason=\"source_not_allowed\"}} 0"),
        "weir_backend_packets_total{service=\"web\",backend=\"198.18.1.11:8080\",direction=\"in\"} 120".into(),
        "weir_backend_bytes_total{service=\"web\",backend=\"198.18.1.11:8080\",direction=\"out\"} 100000".into(),
        "weir_backend_connections_total{service=\"web\",backend=\"198.18.1.12:8080\"} 0".into(),
        "weir_dataplane_drops_total{reason=\"no_service\"} 7".into(),
        "weir_dataplane_packets_total{path=\"redirect\"} 300".into(),
        "weir_flows_resteered_total 4".into(),
        "weir_conntrack_entries 42".into(),
        "weir_table_entries{table=\"half_open\"} 7".into(),
        "weir_table_capacity{table=\"conntrack\"} 262144".into(),
        "weir_snat_ports_taken_total{from=\"half_open\"} 9".into(),
        "weir_snat_range_searches_total 0".into(),
        "weir_flows_tuple_clash_total{outcome=\"avoided\"} 3".into(),
        "weir_flows_tuple_clash_total{outcome=\"unavoidable\"} 0".into(),
        "weir_stats_read_errors_total 0".into(),
        "# TYPE weir_build_info gauge".into(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    // Every drop reason of every service is a series, so rates start at zero.
    let drops = text
        .lines()
        .filter(|l| l.starts_with("weir_service_drops_total{"))
        .count();
    assert_eq!(drops, drop_reason::ALL.len());
}

#[test]
fn agent_metrics_count_syncs_and_attachments() {
    let m = Metrics::default();
    m.agent.observe_sync("config", Duration::from_millis(3));
    m.agent
        .attached
        .get_or_create(&AttachLabels {
            interface: "eth0".into(),
            mode: "native",
        })
        .set(1);
    let text = m.encode();
    for line in [
        "weir_dataplane_sync_duration_seconds_count{trigger=\"config\"} 1",
        "weir_dataplane_sync_duration_seconds_bucket{le=\"0.005\",trigger=\"config\"} 1",
        "weir_dataplane_attached{interface=\"eth0\",mode=\"native\"} 1",
        "weir_config_reloads_total 0",
        "weir_config_last_reload_successful 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

#[test]
fn the_text_format_names_counters_by_their_samples() {
    let om = "\
# HELP weir_x Things.
# TYPE weir_x counter
weir_x_total{a=\"1\"} 3
# HELP weir_g A gauge.
# TYPE weir_g gauge
# UNIT weir_g seconds
weir_g 1
# HELP weir_h A histogram.
# TYPE weir_h histogram
weir_h_bucket{le=\"+Inf\"} 1
weir_h_sum 0.5
weir_h_count 1
# EOF
";
    assert_eq!(
        openmetrics_to_text(om),
        "\
# HELP weir_x_total Things.
# TYPE weir_x_total counter
weir_x_total{a=\"1\"} 3
# HELP weir_g A gauge.
# TYPE weir_g gauge
weir_g 1
# HELP weir_h A histogram.
# TYPE weir_h histogram
weir_h_bucket{le=\"+Inf\"} 1
weir_h_sum 0.5
weir_h_count 1
"
    );
}

#[test]
fn frontends_of_one_kubernetes_service_share_backend_series() {
    // ns/web on ports 80 and 8080, both to 198.18.1.11:8080: one series per (service,
    // backend), summed; healthy only if every frontend's check passes.
    let mut snap = fixtures::snapshot();
    let mut second = (*snap.services[0]).clone();
    second.port = 8080;
    second.backends[0].healthy = false;
    snap.services.push(Arc::new(second));
    for s in &mut snap.services {
        Arc::make_mut(s).name = "ns/web".into();
    }
    let mut t = fixtures::traffic();
    let mut other = t.services[0].clone();
    other.port = 8080;
    t.services.push(other);
    for s in &mut t.services {
        s.name = "ns/web".into();
    }
    let snapshot = watch::Sender::new(Arc::new(snap));
    let traffic = watch::Sender::new(Arc::new(t));
    let m = Metrics::new(snapshot.subscribe(), traffic.subscribe());
    let text = m.encode();
    let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    let b1 = "service=\"ns/web\",backend=\"198.18.1.11:8080\"";
    assert_eq!(count(&format!("weir_backend_healthy{{{b1}}}")), 1, "{text}");
    assert!(text.contains(&format!("weir_backend_healthy{{{b1}}} 0")));
    assert!(text.contains(&format!(
        "weir_backend_packets_total{{{b1},direction=\"in\"}} 240"
    )));
    assert!(text.contains(&format!("weir_backend_connections_total{{{b1}}} 40")));
    assert_eq!(count("weir_service_fail_open{service=\"ns/web\"}"), 1);
    // The service series stay apart by port.
    assert_eq!(
        count("weir_service_connections_total{service=\"ns/web\""),
        2
    );
}

/// A Kubernetes address with other endpoints for in-cluster clients is two frontends (external
/// and internal) of one label set: one series, their sum.
#[test]
fn the_scopes_of_one_address_are_one_series() {
    let traffic = watch::Sender::new(Arc::new(Traffic::default()));
    let m = Metrics::new(watch::Sender::default().subscribe(), traffic.subscribe());
    let mut t = fixtures::traffic();
    let mut external = t.services[0].clone();
    external.scope = crate::model::Scope::External;
    let mut internal = external.clone();
    internal.scope = crate::model::Scope::Internal;
    internal.totals.connections = 5;
    internal.drops = [0; drop_reason::SLOTS];
    internal.drops[drop_reason::NO_BACKEND as usize] = 3;
    t.services = vec![external, internal];
    traffic.send_replace(Arc::new(t));
    let text = m.encode();
    let svc = "service=\"web\",vip=\"198.18.100.10\",port=\"80\",protocol=\"tcp\"";
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("weir_service_connections_total{{{svc}}}")))
        .collect();
    assert_eq!(
        series,
        [format!("weir_service_connections_total{{{svc}}} 25")],
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == format!("weir_service_drops_total{{{svc},reason=\"no_backend\"}} 5")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == format!("weir_service_packets_total{{{svc},direction=\"in\"}} 240")),
        "{text}"
    );
}
