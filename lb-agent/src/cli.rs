//! `lb-agent status`: the services of a running agent, read from its admin API, as a table
//! (like `ipvsadm -Ln --stats --rate`).

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use http_body_util::BodyExt as _;
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;

use crate::{
    health::HealthMode,
    status::{BackendJson, ServiceJson, ServicesJson, TrafficJson},
};

/// How long `status` waits for the agent.
const TIMEOUT: Duration = Duration::from_secs(5);

/// GET `path` on the admin API at `admin`; the body of a 200 answer.
pub async fn get(admin: SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(admin)
            .await
            .with_context(|| {
                format!("connecting to the admin API at {admin} (is lb-agent running? see --admin)")
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with the admin API")?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, admin.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .context("building the request")?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer to GET {path}"))?
            .to_bytes();
        if !status.is_success() {
            bail!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        Ok(body)
    };
    tokio::time::timeout(TIMEOUT, fetch)
        .await
        .with_context(|| format!("the admin API at {admin} did not answer within {TIMEOUT:?}"))?
}

/// The services of the agent at `admin`.
pub async fn services(admin: SocketAddr) -> anyhow::Result<ServicesJson> {
    let body = get(admin, "/api/v1/services").await?;
    serde_json::from_slice(&body)
        .context("the answer of /api/v1/services is not what this lb-agent understands")
}

/// A count, short: exact below 100 000, then K, M, G, T with one decimal.
fn count(n: u64) -> String {
    if n < 100_000 {
        return n.to_string();
    }
    let mut v = n as f64;
    for unit in ["K", "M", "G", "T"] {
        v /= 1000.0;
        if v < 1000.0 {
            return format!("{v:.1}{unit}");
        }
    }
    format!("{:.1}P", v / 1000.0)
}

/// A rate, short: one decimal below 1000, then K, M, G.
fn rate(r: f64) -> String {
    if r < 1000.0 {
        return format!("{r:.1}");
    }
    let mut v = r;
    for unit in ["K", "M", "G", "T"] {
        v /= 1000.0;
        if v < 1000.0 {
            return format!("{v:.1}{unit}");
        }
    }
    format!("{:.1}P", v / 1000.0)
}

const HEADER: [&str; 13] = [
    "SERVICE / BACKEND",
    "WEIGHT",
    "HEALTH",
    "CONNS",
    "PKTS IN",
    "PKTS OUT",
    "BYTES IN",
    "BYTES OUT",
    "CONN/S",
    "PPS IN",
    "PPS OUT",
    "BIT/S IN",
    "BIT/S OUT",
];
/// Columns before the counters (left-aligned).
const TEXT_COLUMNS: usize = 3;

fn traffic_cells(t: Option<&TrafficJson>) -> [String; 10] {
    match t {
        None => std::array::from_fn(|_| "-".to_string()),
        Some(t) => [
            count(t.totals.connections),
            count(t.totals.packets_in),
            count(t.totals.packets_out),
            count(t.totals.bytes_in),
            count(t.totals.bytes_out),
            rate(t.rates.connections),
            rate(t.rates.packets_in),
            rate(t.rates.packets_out),
            rate(t.rates.bytes_in * 8.0),
            rate(t.rates.bytes_out * 8.0),
        ],
    }
}

fn service_health(s: &ServiceJson) -> String {
    let check = s.health_check.as_deref().unwrap_or("no check");
    match s.health {
        HealthMode::Unchecked | HealthMode::Checked => check.to_string(),
        HealthMode::Pending => format!("{check}, pending"),
        HealthMode::FailOpen => format!("{check}, FAIL-OPEN"),
        HealthMode::FailClosed => format!("{check}, FAIL-CLOSED"),
    }
}

fn backend_health(b: &BackendJson) -> String {
    let mut h = match (&*b.state, &b.last_failure) {
        ("unchecked", _) => "-".to_string(),
        ("down", Some(f)) => format!("down: {}", f.reason),
        (state, _) => state.to_string(),
    };
    if !b.in_rotation {
        h.push_str(", out");
    }
    if b.source_nat {
        h.push_str(", snat");
    }
    h
}

fn row(first: [String; TEXT_COLUMNS], traffic: Option<&TrafficJson>) -> Vec<String> {
    first.into_iter().chain(traffic_cells(traffic)).collect()
}

/// The table `lb-agent status` prints.
pub fn render(services: &ServicesJson) -> String {
    let mut rows: Vec<Vec<String>> = vec![HEADER.iter().map(ToString::to_string).collect()];
    for s in &services.services {
        let vip = SocketAddr::new(s.vip, s.port);
        rows.push(row(
            [
                match s.scope {
                    crate::model::Scope::Both => {
                        format!("{} {} {vip}", s.name, s.protocol.as_str())
                    }
                    scope => format!(
                        "{} {} {vip} ({})",
                        s.name,
                        s.protocol.as_str(),
                        scope.as_str()
                    ),
                },
                String::new(),
                service_health(s),
            ],
            s.traffic.as_ref(),
        ));
        for b in &s.backends {
            rows.push(row(
                [
                    format!("  -> {}", SocketAddr::new(b.address, b.port)),
                    b.weight.to_string(),
                    backend_health(b),
                ],
                b.traffic.as_ref(),
            ));
        }
    }
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            if c < TEXT_COLUMNS {
                let _ = write!(line, "{cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, "{cell:>w$}", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if services.services.is_empty() {
        out.push_str("(no services)\n");
    }
    for l in &services.left_out {
        let _ = writeln!(
            out,
            "left out: {} ({}{}): {}",
            l.name,
            l.limit,
            if l.kept_previous {
                "; its previous version is served"
            } else {
                ""
            },
            l.reason
        );
    }
    out
}

#[cfg(test)]
mod tests;
