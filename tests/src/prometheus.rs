//! A real Prometheus server (the Debian `prometheus` package) inside a lab namespace, scraping
//! weir's admin API every second, and queried through its HTTP API.

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use crate::{agent::wait_for, clients, lab::Proc, netns::Netns};

/// Where Prometheus listens, inside its namespace.
pub const LISTEN: &str = "127.0.0.1:19090";

pub struct Prometheus {
    proc: Proc,
    addr: SocketAddr,
    log: std::path::PathBuf,
    targets: usize,
}

/// Percent-encodes a query-string value (everything but RFC 3986's unreserved characters).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Prometheus {
    /// Starts Prometheus in `ns` scraping `targets` (job `weir`) every second, with its
    /// config and TSDB under `dir`.
    pub fn start(ns: &Netns, dir: &Path, targets: &[SocketAddr]) -> Self {
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let log = dir.join("prometheus.log");
        let logfile = std::fs::File::create(&log).expect("prometheus log");
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-tsdb").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("log"))
            .stderr(logfile)
            .spawn()
            .expect("start prometheus (apt-get install prometheus; scripts/bootstrap does)");
        Self {
            proc: Proc { child },
            addr: LISTEN.parse().expect("listen"),
            log,
            targets: targets.len(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` on the HTTP API from inside `ns`: the JSON answer.
    pub fn get(&self, ns: &Netns, path: &str) -> Option<serde_json::Value> {
        let addr = self.addr;
        let r = ns.run_in(|| clients::http_get(None, addr, path, Duration::from_secs(5)).ok())?;
        serde_json::from_slice(&r.body).ok()
    }

    /// An instant query; the result vector (or the error Prometheus gave).
    pub fn query(&self, ns: &Netns, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let v = self
            .get(ns, &format!("/api/v1/query?query={}", encode(promql)))
            .ok_or_else(|| "no answer from Prometheus".to_string())?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until every target of job `weir` was scraped successfully.
    pub fn wait_up(&mut self, ns: &Netns) {
        // Prometheus hands targets to its scrapers at most every 5 s: the first scrape comes
        // 5–6 s after start.
        wait_for(Duration::from_secs(30), "Prometheus to scrape weir", || {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log_text());
            }
            let up = self.query(ns, "up{job=\"weir\"} == 1").ok()?;
            (up.len() == self.targets).then_some(())
        });
    }
}
