//! `spec.healthCheckNodePort` of Services with `externalTrafficPolicy: Local`, answered as
//! kube-proxy answers it: 200 with the number of local endpoints when there is at least one,
//! 503 when there is none, so that an external load balancer in front of the nodes sends only
//! to nodes that can serve. weir counts only the local endpoints in rotation — those passing
//! weir's own health checks — so the answer turns 503 as soon as weir stops sending there.

use std::{collections::BTreeMap, net::SocketAddr};

use axum::{
    Router,
    http::{StatusCode, header},
    response::IntoResponse,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

/// One port's server.
struct Server {
    service: String,
    count: watch::Sender<usize>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The health-check node ports this node serves.
#[derive(Default)]
pub struct HealthPorts {
    servers: BTreeMap<u16, Server>,
}

/// The answer for `service` (`namespace/name`) with `count` local endpoints.
pub fn answer(service: &str, count: usize) -> (StatusCode, String) {
    let (namespace, name) = service.split_once('/').unwrap_or(("", service));
    let body = serde_json::json!({
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": count,
        "serviceProxyHealthy": true,
    });
    let code = if count > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body.to_string())
}

pub fn router(service: String, count: watch::Receiver<usize>) -> Router {
    Router::new().fallback(move || {
        let service = service.clone();
        let n = *count.borrow();
        async move {
            let (code, body) = answer(&service, n);
            (
                code,
                [
                    (header::CONTENT_TYPE, "application/json".to_string()),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
                    (
                        header::HeaderName::from_static("x-load-balancing-endpoint-weight"),
                        n.to_string(),
                    ),
                ],
                body,
            )
                .into_response()
        }
    })
}

async fn bind(port: u16) -> std::io::Result<TcpListener> {
    // Dual-stack where the node has IPv6; IPv4 only otherwise.
    match TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(SocketAddr::from(([0u8; 4], port))).await,
    }
}

impl HealthPorts {
    /// Serves exactly the ports of `wanted` (port → `namespace/name`).
    pub async fn sync(&mut self, wanted: &BTreeMap<u16, String>) {
        self.servers
            .retain(|port, s| wanted.get(port) == Some(&s.service));
        for (port, service) in wanted {
            if self.servers.contains_key(port) {
                continue;
            }
            match bind(*port).await {
                Ok(listener) => {
                    let (count, rx) = watch::channel(0);
                    let app = router(service.clone(), rx);
                    let task = tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    });
                    info!(port, service = %service, "serving the health-check node port");
                    self.servers.insert(
                        *port,
                        Server {
                            service: service.clone(),
                            count,
                            task,
                        },
                    );
                }
                Err(e) => {
                    warn!(port, service = %service, error = %e, "cannot serve the health-check node port");
                }
            }
        }
    }

    /// Sets each port's count of local endpoints in rotation.
    pub fn update(&self, count: impl Fn(&str) -> usize) {
        for s in self.servers.values() {
            let n = count(&s.service);
            s.count.send_if_modified(|c| std::mem::replace(c, n) != n);
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;

    #[tokio::test]
    async fn answers_like_kube_proxy() {
        let (tx, rx) = watch::channel(2usize);
        let app = router("shop/web".into(), rx);
        let get = |app: Router| async move {
            let r = app
                .oneshot(
                    axum::http::Request::get("/healthz")
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let code = r.status();
            let weight = r.headers()["x-load-balancing-endpoint-weight"]
                .to_str()
                .unwrap()
                .to_string();
            let body = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
            (code, weight, String::from_utf8(body.to_vec()).unwrap())
        };
        let (code, weight, body) = get(app.clone()).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(weight, "2");
        assert_eq!(
            body,
            r#"{"localEndpoints":2,"service":{"name":"web","namespace":"shop"},"serviceProxyHealthy":true}"#
        );
        tx.send_replace(0);
        let (code, _, body) = get(app).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""localEndpoints":0"#));
    }
}
