//! The admin HTTP API. The router is a plain function of its state, so tests call it without
//! sockets; `serve` binds it with graceful shutdown.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    metrics::Metrics,
    status::{ServicesJson, Snapshot},
};

/// Readiness latches: ready only when every one is set (linkerd's pattern).
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    /// The programs are attached to every configured interface.
    pub attached: Arc<AtomicBool>,
    /// The first full desired state is in the maps.
    pub programmed: Arc<AtomicBool>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.attached.load(Ordering::Acquire) && self.programmed.load(Ordering::Acquire)
    }

    /// What is still missing, for the /readyz body.
    fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.attached.load(Ordering::Acquire) {
            m.push("data plane not attached");
        }
        if !self.programmed.load(Ordering::Acquire) {
            m.push("first state not programmed");
        }
        m
    }
}

/// What the last config load did, for `/api/v1/status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ConfigStatus {
    /// Configs applied since start (the first one is 1).
    pub generation: u64,
    /// Reloads refused or failed since start.
    pub reload_failures: u64,
    /// The error of the last reload attempt, when it failed.
    pub last_error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ApiState {
    pub readiness: Readiness,
    pub config: Arc<std::sync::Mutex<ConfigStatus>>,
    /// What is programmed, as last published.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub metrics: Arc<Metrics>,
}

impl Default for ApiState {
    fn default() -> Self {
        let snapshot = watch::Sender::new(Arc::default()).subscribe();
        let metrics = Arc::new(Metrics::new(snapshot.clone()));
        Self::new(snapshot, metrics)
    }
}

impl ApiState {
    pub fn new(snapshot: watch::Receiver<Arc<Snapshot>>, metrics: Arc<Metrics>) -> Self {
        Self {
            readiness: Readiness::default(),
            config: Arc::default(),
            snapshot,
            metrics,
        }
    }

    /// Records the outcome of loading a config: a new generation, or a failure.
    pub fn note_config(&self, result: Result<(), String>) {
        let mut c = self.config.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                c.generation += 1;
                c.last_error = None;
            }
            Err(e) => {
                c.reload_failures += 1;
                c.last_error = Some(e);
            }
        }
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .route("/api/v1/services", get(services))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn services(State(s): State<ApiState>) -> Json<ServicesJson> {
    let snapshot = s.snapshot.borrow().clone();
    Json(snapshot.to_json())
}

/// OpenMetrics text.
async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

#[derive(Serialize)]
struct Status {
    ready: bool,
    config: ConfigStatus,
}

async fn status(State(s): State<ApiState>) -> Json<Status> {
    let config = s
        .config
        .lock()
        .map(|c| c.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    Json(Status {
        ready: s.readiness.is_ready(),
        config,
    })
}

async fn readyz(State(s): State<ApiState>) -> (StatusCode, String) {
    let missing = s.readiness.missing();
    if missing.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join(", ")),
        )
    }
}

/// Binds `addr` (failing early when it cannot) and serves until `shutdown` resolves.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;
    use crate::health::state::Health;

    async fn get(state: &ApiState, path: &str) -> (StatusCode, String) {
        let resp = router(state.clone())
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

    #[tokio::test]
    async fn services_and_metrics() {
        use crate::{
            health::HealthMode,
            model::Protocol,
            status::{BackendStatus, ServiceStatus},
        };
        let snapshot = watch::Sender::new(Arc::new(Snapshot::default()));
        let metrics = Arc::new(Metrics::new(snapshot.subscribe()));
        let s = ApiState::new(snapshot.subscribe(), metrics);
        assert_eq!(get(&s, "/api/v1/services").await.1, r#"{"services":[]}"#);
        let backend = |addr: &str, state: Option<Health>| BackendStatus {
            addr: addr.parse().unwrap(),
            weight: 1,
            healthy: state.is_none_or(|h| h == Health::Up),
            state,
            in_rotation: state != Some(Health::Down),
            check: None,
        };
        snapshot.send_replace(Arc::new(Snapshot {
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "198.18.100.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                check: Some("http"),
                mode: HealthMode::Checked,
                backends: vec![
                    backend("198.18.1.11:8080", Some(Health::Up)),
                    backend("198.18.1.12:8080", Some(Health::Down)),
                ],
            }],
        }));
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
        let b = &web["backends"];
        assert_eq!(b[0]["address"], "198.18.1.11");
        assert_eq!(b[0]["port"], 8080);
        assert_eq!(b[0]["weight"], 1);
        assert_eq!(b[0]["healthy"], true);
        assert_eq!(b[1]["healthy"], false);
        assert_eq!(b[1]["state"], "down");
        assert_eq!(b[1]["in_rotation"], false);

        let resp = router(s.clone())
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let (_, text) = get(&s, "/metrics").await;
        assert!(
            text.contains("weir_backend_healthy{service=\"web\",backend=\"198.18.1.12:8080\"} 0"),
            "{text}"
        );
    }
}
