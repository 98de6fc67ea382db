//! kube-proxy's health endpoint (`node.healthz_listen`, `:10256`), served with
//! `node.kube_proxy_replacement`: cloud and external load balancers probe it to decide which
//! nodes take traffic, and kubelet-independent monitoring checks that the node's service
//! proxy keeps up.
//!
//! kube-proxy's semantics: the proxy is healthy while every change it was given has been
//! programmed, or the oldest one still waiting is younger than the timeout (kube-proxy's is
//! twice its 30 s sync period: [`TIMEOUT`]). `/livez` answers by that alone; `/healthz` also
//! answers 503 when the node is on its way out (being deleted, or tainted
//! `ToBeDeletedByClusterAutoscaler`), so that load balancers drain it first. Both bodies are
//! `{"lastUpdated": …, "currentTime": …, "nodeEligible": …}`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

/// How long a change may wait to be programmed before the proxy is unhealthy.
pub const TIMEOUT: Duration = Duration::from_mins(1);

#[derive(Debug, Default)]
struct State {
    /// The last time a change was programmed (or found already programmed).
    last_updated: Option<SystemTime>,
    /// The oldest change not programmed yet.
    queued: Option<SystemTime>,
    /// False while the node is being deleted or drained by the cluster autoscaler.
    node_eligible: bool,
}

/// The proxy's health, shared by the agent (which writes it) and the server.
#[derive(Clone, Debug)]
pub struct ProxyHealth(Arc<Mutex<State>>);

impl Default for ProxyHealth {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(State {
            node_eligible: true,
            ..State::default()
        })))
    }
}

impl ProxyHealth {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change arrived (it counts from now until it is programmed).
    pub fn queued(&self, now: SystemTime) {
        self.state().queued.get_or_insert(now);
    }

    /// Every change so far is programmed.
    pub fn updated(&self, now: SystemTime) {
        let mut s = self.state();
        s.last_updated = Some(now);
        s.queued = None;
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_eligible = eligible;
    }

    /// (status, body) of `/healthz` (`with_node`) or `/livez` at `now`.
    pub fn answer(&self, now: SystemTime, with_node: bool) -> (StatusCode, String) {
        let s = self.state();
        let healthy = s.last_updated.is_some()
            && s.queued
                .is_none_or(|q| now.duration_since(q).unwrap_or_default() < TIMEOUT);
        let ok = healthy && (!with_node || s.node_eligible);
        let time = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        let body = serde_json::json!({
            "lastUpdated": s.last_updated.map_or_else(String::new, time),
            "currentTime": time(now),
            "nodeEligible": s.node_eligible,
        });
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body.to_string())
    }
}

pub fn router(health: ProxyHealth) -> Router {
    let reply = |health: ProxyHealth, with_node: bool| {
        let (code, body) = health.answer(SystemTime::now(), with_node);
        (
            code,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            body,
        )
            .into_response()
    };
    let (h, l) = (health.clone(), health);
    Router::new()
        .route("/healthz", get(move || async move { reply(h, true) }))
        .route("/livez", get(move || async move { reply(l, false) }))
}

/// Serves the endpoint on `listener` (until the future is dropped).
pub async fn serve(listener: TcpListener, health: ProxyHealth) {
    let _ = axum::serve(listener, router(health)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    #[test]
    fn healthy_while_changes_are_programmed_in_time() {
        let h = ProxyHealth::default();
        // Nothing programmed yet.
        assert_eq!(h.answer(at(0), true).0, StatusCode::SERVICE_UNAVAILABLE);
        h.queued(at(0));
        h.updated(at(1));
        let (code, body) = h.answer(at(2), true);
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["lastUpdated"], "2027-01-15T08:00:01.000Z");
        assert_eq!(v["currentTime"], "2027-01-15T08:00:02.000Z");
        assert_eq!(v["nodeEligible"], true);
        // A change waiting: healthy for the timeout, then not, until it is programmed.
        h.queued(at(10));
        h.queued(at(30));
        assert_eq!(h.answer(at(69), true).0, StatusCode::OK);
        assert_eq!(h.answer(at(70), true).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h.answer(at(70), false).0, StatusCode::SERVICE_UNAVAILABLE);
        h.updated(at(71));
        assert_eq!(h.answer(at(72), true).0, StatusCode::OK);
        // A node on its way out: /healthz says so, /livez does not.
        h.set_node_eligible(false);
        assert_eq!(h.answer(at(73), true).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h.answer(at(73), false).0, StatusCode::OK);
        assert!(h.answer(at(73), true).1.contains(r#""nodeEligible":false"#));
    }
}
