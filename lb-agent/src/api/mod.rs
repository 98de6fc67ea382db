//! The admin HTTP API. The router is a plain function of its state, so tests call it without
//! sockets; `serve` binds it with graceful shutdown.

use crate::LockExt as _;
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    dataplane::inspect::{self, Inspect, Trace, Via},
    metrics::Metrics,
    model::Protocol,
    status::traffic::Traffic,
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

#[derive(Clone)]
pub struct ApiState {
    pub readiness: Readiness,
    pub config: Arc<std::sync::Mutex<ConfigStatus>>,
    /// What is programmed, as last published.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The last traffic sample.
    pub traffic: watch::Receiver<Arc<Traffic>>,
    pub metrics: Arc<Metrics>,
    /// The data plane, for `/api/v1/lookup` (absent until it is loaded).
    pub inspector: Option<Arc<dyn Inspect>>,
    /// The tasks `/livez` watches.
    pub tasks: crate::Supervised,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("readiness", &self.readiness)
            .field("config", &self.config)
            .field("inspector", &self.inspector.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ApiState {
    fn default() -> Self {
        let snapshot = watch::Sender::new(Arc::default()).subscribe();
        let traffic = watch::Sender::new(Arc::default()).subscribe();
        let metrics = Arc::new(Metrics::new(snapshot.clone(), traffic.clone()));
        Self::new(snapshot, traffic, metrics)
    }
}

impl ApiState {
    pub fn new(
        snapshot: watch::Receiver<Arc<Snapshot>>,
        traffic: watch::Receiver<Arc<Traffic>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            readiness: Readiness::default(),
            config: Arc::default(),
            snapshot,
            traffic,
            metrics,
            inspector: None,
            tasks: crate::Supervised::default(),
        }
    }

    /// Records the outcome of loading a config: a new generation, or a failure. Every call
    /// after the first is a reload, counted in the metrics.
    pub fn note_config<E: std::fmt::Display>(&self, result: Result<(), E>) {
        let mut c = self.config.locked();
        if c.generation > 0 || c.reload_failures > 0 {
            self.metrics.agent.reload(result.is_ok());
        }
        match result {
            Ok(()) => {
                c.generation += 1;
                c.last_error = None;
            }
            Err(e) => {
                c.reload_failures += 1;
                c.last_error = Some(e.to_string());
            }
        }
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .route("/api/v1/services", get(services))
        .route("/api/v1/lookup", get(lookup))
        .route("/api/v1/bgp", get(bgp))
        .route("/api/v1/l2", get(l2))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// What the metrics listener serves (`admin.metrics_listen`): no service topology, no backend
/// addresses, nothing but the metrics and the probes.
pub fn metrics_router(state: ApiState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn services(State(s): State<ApiState>) -> Json<ServicesJson> {
    let snapshot = s.snapshot.borrow().clone();
    let traffic = s.traffic.borrow().clone();
    Json(snapshot.to_json(&traffic))
}

/// `/api/v1/bgp`: every configured peer's session (an empty list without BGP).
#[derive(Debug, Serialize)]
struct BgpJson {
    peers: Vec<crate::announce::bgp::PeerStatus>,
    /// Kubernetes mode: the BGPPeers, BGPAdvertisements and L2Advertisements left out, and
    /// why.
    problems: Vec<String>,
}

async fn bgp(State(s): State<ApiState>) -> Json<BgpJson> {
    let announce = s.snapshot.borrow().announce.clone();
    let peers = announce.bgp.locked().clone();
    let problems = announce.problems;
    Json(BgpJson { peers, problems })
}

/// `/api/v1/l2`: L2 mode with gossip (`enabled` false otherwise).
#[derive(Debug, Serialize)]
struct L2Json {
    enabled: bool,
    #[serde(flatten)]
    status: Option<crate::announce::gossip::Status>,
}

async fn l2(State(s): State<ApiState>) -> Json<L2Json> {
    let status = s.snapshot.borrow().announce.l2.clone();
    Json(L2Json {
        enabled: status.is_some(),
        status,
    })
}

/// `/api/v1/lookup?client=IP:PORT&vip=IP:PORT&protocol=tcp|udp|sctp`.
#[derive(Debug, Deserialize)]
struct LookupQuery {
    client: Option<String>,
    vip: Option<String>,
    protocol: Option<String>,
}

/// The answer to "which backend does this flow go to?".
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct LookupJson {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    /// forward | drop | pass
    pub verdict: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// For `drop`: the drop reason's metric label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<SocketAddr>,
    /// connection | affinity | maglev
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
    /// The Maglev slot within the service's table, for decisions taken from the table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// The connection table held the flow on a backend that is gone.
    pub resteered: bool,
    /// For a source-NATed backend (an endpoint on another node): the flow's source port at
    /// the node's address, 0 when the next packet takes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_nat_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_healthy: Option<bool>,
}

type ApiError = (StatusCode, Json<serde_json::Value>);

fn api_error(code: StatusCode, message: impl std::fmt::Display) -> ApiError {
    (
        code,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
}

fn parse_endpoint(name: &str, value: Option<&str>) -> Result<SocketAddr, ApiError> {
    let v = value.ok_or_else(|| {
        api_error(
            StatusCode::BAD_REQUEST,
            format!("missing query parameter {name} (IP:PORT, IPv6 as [IP]:PORT)"),
        )
    })?;
    v.parse().map_err(|_| {
        api_error(
            StatusCode::BAD_REQUEST,
            format!("{name}={v:?} is not IP:PORT (IPv6 as [IP]:PORT)"),
        )
    })
}

async fn lookup(
    State(s): State<ApiState>,
    query: Result<Query<LookupQuery>, QueryRejection>,
) -> Result<Json<LookupJson>, ApiError> {
    let Query(q) = query.map_err(|e| api_error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let client = parse_endpoint("client", q.client.as_deref())?;
    let vip = parse_endpoint("vip", q.vip.as_deref())?;
    let protocol = match q.protocol.as_deref().unwrap_or("tcp") {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        other => {
            return Err(api_error(
                StatusCode::BAD_REQUEST,
                format!("protocol={other:?}: expected tcp, udp or sctp"),
            ));
        }
    };
    if client.is_ipv4() != vip.is_ipv4() {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "client and vip must be of the same address family",
        ));
    }
    let Some(inspector) = s.inspector.clone() else {
        return Err(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the data plane is not loaded",
        ));
    };
    let flow = inspect::flow_key(client, vip, protocol);
    let trace = tokio::task::spawn_blocking(move || inspector.trace(&flow))
        .await
        .map_err(|e| api_error(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .map_err(|e| api_error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let snapshot = s.snapshot.borrow().clone();
    let service = |id: u32| snapshot.services.iter().find(|s| s.id == id);
    let mut answer = LookupJson {
        client,
        vip,
        protocol,
        verdict: String::new(),
        service: None,
        reason: None,
        backend: None,
        via: None,
        slot: None,
        resteered: false,
        source_nat_port: None,
        backend_healthy: None,
    };
    match trace {
        Trace::NoService => {
            let is_vip = snapshot.services.iter().any(|s| s.vip == vip.ip());
            answer.verdict = if is_vip { "drop" } else { "pass" }.into();
            if is_vip {
                answer.reason =
                    Some(lb_common::drop_reason::name(lb_common::drop_reason::NO_SERVICE).into());
            }
        }
        Trace::Dropped { service_id, reason } => {
            answer.verdict = "drop".into();
            answer.service = service(service_id).map(|s| s.name.clone());
            answer.reason = Some(lb_common::drop_reason::name(reason).into());
        }
        Trace::Forwarded {
            service_id,
            backend,
            via,
            slot,
            resteered,
            source_nat_port,
            ..
        } => {
            let svc = service(service_id);
            answer.verdict = "forward".into();
            answer.service = svc.map(|s| s.name.clone());
            answer.backend = Some(backend);
            answer.via = Some(via);
            answer.slot = slot;
            answer.resteered = resteered;
            answer.source_nat_port = source_nat_port;
            answer.backend_healthy = svc
                .and_then(|s| s.backends.iter().find(|b| b.addr == backend))
                .map(|b| b.healthy);
        }
    }
    Ok(Json(answer))
}

/// OpenMetrics when the client asks for it (Prometheus does), else the Prometheus text format
/// 0.0.4 (curl, promtool, older scrapers).
async fn metrics(State(s): State<ApiState>, headers: header::HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], s.metrics.encode())
    } else {
        ([(header::CONTENT_TYPE, TEXT_004)], s.metrics.encode_text())
    }
}

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Serialize)]
struct Status {
    ready: bool,
    config: ConfigStatus,
}

async fn status(State(s): State<ApiState>) -> Json<Status> {
    let config = s.config.locked().clone();
    Json(Status {
        ready: s.readiness.is_ready(),
        config,
    })
}

/// 200 while every supervised task runs; 503 naming those that ended.
async fn livez(State(s): State<ApiState>) -> (StatusCode, String) {
    let ended = s.tasks.ended();
    if ended.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: ended: {}\n", ended.join(", ")),
        )
    }
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
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Answers go out whole at once: no wait for the client's delayed acknowledgement of an
    // earlier segment on a kept-alive connection.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The admin API served by a task of its own.
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves `router` on `listener` until [`Running::stop`].
pub fn spawn(listener: TcpListener, router: Router) -> Running {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, router, async {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

impl Running {
    /// Stops serving (letting requests in flight finish), logging an error it ended with.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "admin API stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "admin API task failed"),
        }
    }
}

#[cfg(test)]
mod tests;
