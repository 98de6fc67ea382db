use axum::body::Body;
use axum::http::Request;
use lb_common::FlowKey;
use tower::ServiceExt as _;

use super::*;
use crate::{
    dataplane::{MapError, inspect::RawCounters},
    status::fixtures,
};

async fn get(state: &ApiState, path: &str) -> (StatusCode, String) {
    get_from(router(state.clone()), path).await
}

/// GET `path` from `router`: (status, body).
async fn get_from(router: Router, path: &str) -> (StatusCode, String) {
    let resp = router
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn liveness_fails_once_a_supervised_task_ends_while_the_agent_runs() {
    let s = ApiState::default();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = s.tasks.spawn("gossip", async move {
        let _ = rx.await;
    });
    s.tasks.spawn("L2 lease", std::future::pending::<()>());
    assert_eq!(get(&s, "/livez").await, (StatusCode::OK, "ok\n".into()));
    drop(tx);
    running.await.unwrap();
    assert_eq!(
        get(&s, "/livez").await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not live: ended: gossip\n".into()
        )
    );
    // A panicking task counts too; tasks ending once the agent stops do not.
    let _ = s
        .tasks
        .spawn("Kubernetes lease", async { panic!("boom") })
        .await;
    assert!(
        get(&s, "/livez")
            .await
            .1
            .contains("gossip, Kubernetes lease")
    );
    s.tasks.stopping();
    let _ = s.tasks.spawn("late", async {}).await;
    assert!(!get(&s, "/livez").await.1.contains("late"));
}

#[tokio::test]
async fn readiness_latches() {
    let s = ApiState::default();
    assert_eq!(get(&s, "/livez").await, (StatusCode::OK, "ok\n".into()));
    assert_eq!(
        get(&s, "/readyz").await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: data plane not attached, first state not programmed\n".into()
        )
    );
    s.readiness.attached.store(true, Ordering::Release);
    assert_eq!(get(&s, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    s.readiness.programmed.store(true, Ordering::Release);
    assert_eq!(get(&s, "/readyz").await, (StatusCode::OK, "ok\n".into()));
    assert_eq!(get(&s, "/nope").await.0, StatusCode::NOT_FOUND);
    s.config.lock().unwrap().generation = 3;
    let (code, body) = get(&s, "/api/v1/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"ready":true,"config":{"generation":3,"reload_failures":0,"last_error":null}}"#
    );
}

/// The metrics listener serves the metrics and the probes, nothing of the full API.
#[tokio::test]
async fn the_metrics_listener_serves_metrics_and_probes_only() {
    let (s, _snapshot) = state(None);
    s.readiness.attached.store(true, Ordering::Release);
    s.readiness.programmed.store(true, Ordering::Release);
    let fetch = |path: &'static str| get_from(metrics_router(s.clone()), path);
    assert_eq!(fetch("/livez").await.0, StatusCode::OK);
    assert_eq!(fetch("/readyz").await.0, StatusCode::OK);
    let (code, body) = fetch("/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert!(body.contains("weir_service_packets_total"), "{body}");
    for path in [
        "/api/v1/services",
        "/api/v1/status",
        "/api/v1/l2",
        "/api/v1/bgp",
        "/api/v1/lookup?client=198.18.0.1:1&vip=198.18.100.10:80&protocol=tcp",
    ] {
        assert_eq!(fetch(path).await.0, StatusCode::NOT_FOUND, "{path}");
    }
    // The full API has them.
    assert_eq!(get(&s, "/api/v1/services").await.0, StatusCode::OK);
}

/// An API over the fixture snapshot and traffic.
fn state(inspector: Option<Arc<dyn Inspect>>) -> (ApiState, watch::Sender<Arc<Snapshot>>) {
    let snapshot = watch::Sender::new(Arc::new(Snapshot::default()));
    let traffic = watch::Sender::new(Arc::new(Traffic::default()));
    let metrics = Arc::new(Metrics::new(snapshot.subscribe(), traffic.subscribe()));
    let mut s = ApiState::new(snapshot.subscribe(), traffic.subscribe(), metrics);
    s.inspector = inspector;
    snapshot.send_replace(Arc::new(fixtures::snapshot()));
    traffic.send_replace(Arc::new(fixtures::traffic()));
    (s, snapshot)
}

#[tokio::test]
async fn services_have_the_documented_shape_with_traffic() {
    let (s, snapshot) = state(None);
    let (code, body) = get(&s, "/api/v1/services").await;
    assert_eq!(code, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let web = &v["services"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["vip"], "198.18.100.10");
    assert_eq!(web["port"], 80);
    assert_eq!(web["protocol"], "tcp");
    assert_eq!(web["health_check"], "http");
    assert_eq!(web["health"], "checked");
    assert_eq!(web["traffic"]["packets_in"], 120);
    assert_eq!(web["traffic"]["bytes_out"], 100_000);
    assert_eq!(web["traffic"]["connections"], 20);
    assert_eq!(web["traffic"]["rates"]["packets_in"], 12.5);
    assert_eq!(
        web["traffic"]["drops"],
        serde_json::json!({"no_backend": 2})
    );
    let b = &web["backends"];
    assert_eq!(b[0]["address"], "198.18.1.11");
    assert_eq!(b[0]["port"], 8080);
    assert_eq!(b[0]["weight"], 1);
    assert_eq!(b[0]["healthy"], true);
    assert_eq!(b[0]["traffic"]["packets_out"], 100);
    assert_eq!(b[1]["healthy"], false);
    assert_eq!(b[1]["state"], "down");
    assert_eq!(b[1]["in_rotation"], false);
    assert_eq!(b[1]["traffic"]["packets_in"], 0);
    // A service without a sample yet has no traffic field value.
    let plain = &v["services"][1];
    assert_eq!(plain["backends"][0]["address"], "fd00:1::11");
    assert_eq!(plain["traffic"], serde_json::Value::Null);
    // The JSON reads back into the types `lb-agent status` uses.
    let typed: ServicesJson = serde_json::from_str(&body).unwrap();
    assert_eq!(typed, snapshot.borrow().to_json(&fixtures::traffic()));
}

#[tokio::test]
async fn metrics_are_negotiated_and_reloads_are_counted() {
    let (s, _snapshot) = state(None);
    let scrape = |accept: Option<&'static str>| {
        let mut req = Request::get("/metrics");
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        router(s.clone()).oneshot(req.body(Body::empty()).unwrap())
    };
    // What Prometheus sends.
    let resp = scrape(Some(
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.1",
    ))
    .await
    .unwrap();
    assert_eq!(resp.headers()[header::CONTENT_TYPE], OPENMETRICS);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    assert!(body.ends_with(b"# EOF\n"));
    let resp = scrape(None).await.unwrap();
    assert_eq!(resp.headers()[header::CONTENT_TYPE], TEXT_004);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains("# TYPE weir_service_packets_total counter\n"),
        "{text}"
    );
    assert!(!text.contains("# EOF"));
    s.note_config(Ok::<(), &str>(())); // the first load is not a reload
    s.note_config(Err("bad"));
    s.note_config(Ok::<(), &str>(()));
    let (_, text) = get(&s, "/metrics").await;
    for line in [
        "weir_backend_healthy{service=\"web\",backend=\"198.18.1.12:8080\"} 0",
        "weir_config_reloads_total 2",
        "weir_config_reload_failures_total 1",
        "weir_config_last_reload_successful 1",
        "weir_service_packets_total{service=\"web\",vip=\"198.18.100.10\",port=\"80\",protocol=\"tcp\",direction=\"in\"} 120",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

/// Answers `trace` from a fixed table of flows: (client port → trace).
struct FakeInspector(Vec<(u16, Trace)>);

impl Inspect for FakeInspector {
    fn counters(&self, _: u32, _: u32) -> Result<RawCounters, MapError> {
        Ok(RawCounters::default())
    }
    fn tables(&self) -> Result<Vec<inspect::TableFill>, MapError> {
        Ok(Vec::new())
    }
    fn trace(&self, flow: &FlowKey) -> Result<Trace, MapError> {
        let port = u16::from_be(flow.sport_be);
        self.0
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| MapError {
                map: "CONNTRACK",
                op: "get".into(),
                detail: format!("no flow from port {port}"),
            })
    }
}

#[tokio::test]
async fn lookup_answers_which_backend_a_flow_goes_to() {
    let fake = FakeInspector(vec![
        (
            1000,
            Trace::Forwarded {
                service_id: 1,
                backend_id: 2,
                backend: "198.18.1.12:8080".parse().unwrap(),
                via: Via::Maglev,
                slot: Some(77),
                resteered: true,
                source_nat_port: Some(61007),
            },
        ),
        (
            1001,
            Trace::Dropped {
                service_id: 1,
                reason: lb_common::drop_reason::SOURCE_NOT_ALLOWED,
            },
        ),
        (1002, Trace::NoService),
    ]);
    let (s, _snapshot) = state(Some(Arc::new(fake)));
    let q = |port: u16, vip: &str| {
        format!("/api/v1/lookup?client=198.18.0.10:{port}&vip={vip}&protocol=tcp")
    };
    let (code, body) = get(&s, &q(1000, "198.18.100.10:80")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let v: LookupJson = serde_json::from_str(&body).unwrap();
    assert_eq!(v.verdict, "forward");
    assert_eq!(v.service.as_deref(), Some("web"));
    assert_eq!(v.backend, Some("198.18.1.12:8080".parse().unwrap()));
    assert_eq!(v.via, Some(Via::Maglev));
    assert_eq!(v.slot, Some(77));
    assert!(v.resteered);
    assert_eq!(v.source_nat_port, Some(61007));
    assert!(body.contains("\"source_nat_port\":61007"), "{body}");
    assert_eq!(v.backend_healthy, Some(false));

    let (_, body) = get(&s, &q(1001, "198.18.100.10:80")).await;
    let v: LookupJson = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            v.verdict.as_str(),
            v.service.as_deref(),
            v.reason.as_deref()
        ),
        ("drop", Some("web"), Some("source_not_allowed"))
    );
    // No service on the port: a VIP drops it, any other address passes.
    let (_, body) = get(&s, &q(1002, "198.18.100.10:9")).await;
    let v: LookupJson = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v.verdict.as_str(), v.reason.as_deref()),
        ("drop", Some("no_service"))
    );
    let (_, body) = get(&s, &q(1002, "198.18.9.9:80")).await;
    let v: LookupJson = serde_json::from_str(&body).unwrap();
    assert_eq!((v.verdict.as_str(), v.reason), ("pass", None));
    // A failing map read is a 500 that says what failed.
    let (code, body) = get(&s, &q(1003, "198.18.100.10:80")).await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("no flow from port 1003"), "{body}");
}

#[tokio::test]
async fn lookup_refuses_bad_requests_clearly() {
    let (s, _snapshot) = state(Some(Arc::new(FakeInspector(Vec::new()))));
    for (query, message) in [
        ("vip=198.18.100.10:80", "missing query parameter client"),
        (
            "client=198.18.0.10:1&vip=198.18.100.10",
            "vip=\\\"198.18.100.10\\\" is not IP:PORT",
        ),
        (
            "client=x&vip=198.18.100.10:80",
            "client=\\\"x\\\" is not IP:PORT",
        ),
        (
            "client=198.18.0.10:1&vip=198.18.100.10:80&protocol=icmp",
            "protocol=\\\"icmp\\\": expected tcp, udp or sctp",
        ),
        (
            "client=[fd00::1]:1&vip=198.18.100.10:80",
            "client and vip must be of the same address family",
        ),
    ] {
        let (code, body) = get(&s, &format!("/api/v1/lookup?{query}")).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body.contains(message), "{query}: {body}");
    }
    let (s, _snapshot) = state(None);
    let (code, body) = get(
        &s,
        "/api/v1/lookup?client=198.18.0.10:1&vip=198.18.100.10:80",
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("not loaded"), "{body}");
}
