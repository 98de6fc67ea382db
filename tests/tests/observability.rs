//! Observability end to end in the netns lab: the real agent (embedded default config) with
//! real servers; a known number of packets and bytes through a VIP found exactly in `/metrics`
//! and the API; `promtool check metrics` on the real output; `lb-agent status` against the
//! running agent; the lookup endpoint against the kernel's own decisions; and a real Prometheus
//! scraping the agent, through which every query of every shipped Grafana dashboard must
//! return data. Needs root; every test builds and removes its own namespaces.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, process::Command, time::Duration};

use lb_agent::config::DEFAULT_CONFIG;
use weir_lab::{
    agent::{Agent, agent_binary, wait_for},
    clients,
    lab::*,
    predict::{Predictor, lab_name},
    prometheus::Prometheus,
};

const T: Duration = Duration::from_secs(3);

fn server_bin() -> &'static Path {
    env!("CARGO_BIN_EXE_weir-lab").as_ref()
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The lab with the agent on its default config, holding only the capabilities the Helm
/// chart grants.
fn lab_with_agent() -> (Lab, Agent) {
    let mut lab = Lab::new(3);
    lab.start_servers(server_bin());
    let mut agent = Agent::start_with_chart_caps(&lab.lb, &lab.dir.path, None, &[], &[]);
    agent.wait_ready(&lab.lb);
    (lab, agent)
}

/// The value of the sample `name{labels}`, a count.
fn sample(text: &str, series: &str) -> Option<u64> {
    weir_lab::agent::sample(text, series).map(|v| v as u64)
}

/// Waits until every `(series, value)` is in `/metrics`; returns the text.
fn wait_metrics(lab: &Lab, agent: &Agent, want: &[(String, u64)]) -> String {
    let mut text = String::new();
    let found = wait_for_opt(Duration::from_secs(10), || {
        text = agent.metrics(&lab.lb);
        want.iter()
            .all(|(series, v)| sample(&text, series) == Some(*v))
            .then_some(())
    });
    if found.is_none() {
        let wrong: Vec<String> = want
            .iter()
            .filter(|(s, v)| sample(&text, s) != Some(*v))
            .map(|(s, v)| format!("{s}: want {v}, have {:?}", sample(&text, s)))
            .collect();
        panic!(
            "metrics never matched:\n{}\n--- /metrics ---\n{text}",
            wrong.join("\n")
        );
    }
    text
}

/// Polls `f` every 50 ms until it gives a value or `timeout` passes.
fn wait_for_opt<R>(timeout: Duration, mut f: impl FnMut() -> Option<R>) -> Option<R> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(r) = f() {
            return Some(r);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lookup(
    lab: &Lab,
    agent: &Agent,
    client: SocketAddr,
    vip: SocketAddr,
    proto: &str,
) -> serde_json::Value {
    let path = format!(
        "/api/v1/lookup?client={}&vip={}&protocol={proto}",
        weir_lab::prometheus::encode(&client.to_string()),
        weir_lab::prometheus::encode(&vip.to_string())
    );
    let (code, body) = agent.get(&lab.lb, &path).expect("lookup");
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("lookup JSON")
}

#[test]
fn known_traffic_shows_up_exactly_in_metrics_api_and_status() {
    weir_lab::netns::require_root();
    let (lab, agent) = lab_with_agent();
    // The agent really holds only BPF (39), PERFMON (38), NET_RAW (13), NET_ADMIN (12) and
    // NET_BIND_SERVICE (10).
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        eff,
        (1 << 39) | (1 << 38) | (1 << 13) | (1 << 12) | (1 << 10),
        "CapEff {eff:#x}"
    );
    let predictor = Predictor::new(DEFAULT_CONFIG);
    let vip = sa(VIP_V4, 7);
    let client = sa(CLIENT_V4, 40_001);
    let expected = predictor.backend("echo-udp", client);

    // Before any packet: the lookup endpoint gives Maglev's choice, the one the agent's own
    // table builder predicts.
    let before = lookup(&lab, &agent, client, vip, "udp");
    assert_eq!(before["verdict"], "forward", "{before}");
    assert_eq!(before["service"], "echo-udp");
    assert_eq!(before["via"], "maglev");
    assert_eq!(before["backend"], expected.to_string(), "{before}");
    assert_eq!(before["backend_healthy"], true);

    // 25 datagrams of 100 bytes, one flow; each echoed with "backend=bN " in front (11 bytes).
    const K: u64 = 25;
    const PAYLOAD: usize = 100;
    let name = lab_name(expected.ip());
    // One socket for the whole flow.
    lab.client.run_in(|| {
        let s = std::net::UdpSocket::bind(client).expect("the client's socket");
        s.set_read_timeout(Some(T)).unwrap();
        for i in 0..K {
            let payload = vec![b'a' + (i % 26) as u8; PAYLOAD];
            let (backend, echoed, _) = clients::udp_exchange(&s, vip, &payload)
                .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
            assert_eq!(backend, name);
            assert_eq!(echoed, payload);
        }
    });
    // Three datagrams to a VIP port nobody serves: dropped, charged to no service.
    for port in 0..3u16 {
        lab.client.run_in(|| {
            let s = std::net::UdpSocket::bind(sa(CLIENT_V4, 41_000 + port)).unwrap();
            s.send_to(b"nobody", sa(VIP_V4, 9)).unwrap();
        });
    }

    let bytes_in = K * (20 + 8 + PAYLOAD as u64);
    let bytes_out = K * (20 + 8 + PAYLOAD as u64 + 11);
    let svc = "service=\"echo-udp\",vip=\"198.18.100.10\",port=\"7\",protocol=\"udp\"";
    let mut want = vec![
        (
            format!("weir_service_packets_total{{{svc},direction=\"in\"}}"),
            K,
        ),
        (
            format!("weir_service_packets_total{{{svc},direction=\"out\"}}"),
            K,
        ),
        (
            format!("weir_service_bytes_total{{{svc},direction=\"in\"}}"),
            bytes_in,
        ),
        (
            format!("weir_service_bytes_total{{{svc},direction=\"out\"}}"),
            bytes_out,
        ),
        (format!("weir_service_connections_total{{{svc}}}"), 1),
        (
            format!("weir_service_drops_total{{{svc},reason=\"no_backend\"}}"),
            0,
        ),
        (
            "weir_dataplane_drops_total{reason=\"no_service\"}".to_string(),
            3,
        ),
    ];
    for b in &lab.backends {
        let backend = SocketAddr::new(b.v4, UDP_PORT);
        let chosen = backend == expected;
        let n = |v: u64| if chosen { v } else { 0 };
        let labels = format!("service=\"echo-udp\",backend=\"{backend}\"");
        want.extend([
            (
                format!("weir_backend_packets_total{{{labels},direction=\"in\"}}"),
                n(K),
            ),
            (
                format!("weir_backend_packets_total{{{labels},direction=\"out\"}}"),
                n(K),
            ),
            (
                format!("weir_backend_bytes_total{{{labels},direction=\"in\"}}"),
                n(bytes_in),
            ),
            (
                format!("weir_backend_bytes_total{{{labels},direction=\"out\"}}"),
                n(bytes_out),
            ),
            (format!("weir_backend_connections_total{{{labels}}}"), n(1)),
        ]);
    }
    let text = wait_metrics(&lab, &agent, &want);
    // No other service saw anything (health checks go to the backends, not through VIPs).
    let web_in = "weir_service_packets_total{service=\"web\",vip=\"198.18.100.10\",port=\"80\",protocol=\"tcp\",direction=\"in\"}";
    assert_eq!(sample(&text, web_in), Some(0), "{text}");

    // The flow is now in the connection table: the lookup says so, and the table counts it.
    let after = lookup(&lab, &agent, client, vip, "udp");
    assert_eq!(after["via"], "connection", "{after}");
    assert_eq!(after["backend"], expected.to_string());
    wait_for(
        Duration::from_secs(10),
        "weir_conntrack_entries ≥ 1",
        || sample(&agent.metrics(&lab.lb), "weir_conntrack_entries").filter(|n| *n >= 1),
    );
    // Every table with per-flow state shows its size and fill.
    let text = agent.metrics(&lab.lb);
    for table in ["conntrack", "half_open", "snat", "affinity"] {
        let capacity = sample(&text, &format!("weir_table_capacity{{table=\"{table}\"}}"));
        assert!(capacity.is_some_and(|c| c >= 1024), "{table}: {text}");
        let entries = sample(&text, &format!("weir_table_entries{{table=\"{table}\"}}"));
        assert!(
            entries.is_some_and(|e| e <= capacity.unwrap()),
            "{table}: {text}"
        );
    }
    // A port with no service on a VIP: the lookup says it is dropped.
    let nobody = lookup(&lab, &agent, client, sa(VIP_V4, 9), "udp");
    assert_eq!(
        (&nobody["verdict"], &nobody["reason"]),
        (&"drop".into(), &"no_service".into())
    );

    // The API carries the same totals.
    let services = agent.services(&lab.lb);
    let echo = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo-udp")
        .unwrap();
    assert_eq!(echo["traffic"]["packets_in"], K);
    assert_eq!(echo["traffic"]["bytes_out"], bytes_out);
    let b = weir_lab::agent::backend_entry(&services, "echo-udp", expected);
    assert_eq!(b["traffic"]["packets_out"], K, "{b}");

    // promtool (the Debian prometheus package) accepts the real exposition as it is.
    let text = agent.metrics(&lab.lb);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; scripts/bootstrap does)");
    use std::io::Write as _;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // `lb-agent status` against the running agent.
    let out = lab
        .lb
        .command(agent_binary().to_str().unwrap())
        .args(["status", "--admin", "127.0.0.1:9300"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{table}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |prefix: &str| {
        table
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // SERVICE / BACKEND, (WEIGHT,) HEALTH, CONNS, PKTS IN, PKTS OUT, BYTES IN, BYTES OUT, ...
    let s = line("echo-udp udp 198.18.100.10:7");
    assert_eq!(
        &s[3..9],
        ["udp", "1", "25", "25", "3200", "3475"],
        "{table}"
    );
    let b = line(&format!("  -> {expected}"));
    assert_eq!(
        &b[2..9],
        ["1", "up", "1", "25", "25", "3200", "3475"],
        "{table}"
    );
    // And a clear error when no agent answers.
    let out = lab
        .lb
        .command(agent_binary().to_str().unwrap())
        .args(["status", "--admin", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is lb-agent running?"), "{err}");
    agent.stop();
}

/// Every PromQL expression of a dashboard (panel targets), and the metric selectors of its
/// template variables (`label_values(selector, label)`).
fn dashboard_queries(path: &Path) -> (Vec<(String, String)>, Vec<String>) {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "{path:?}: the Prometheus data source must be a variable"
    );
    let mut exprs = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{path:?}: {}",
                p["title"]
            );
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{path:?}: {}",
                p["title"]
            );
            let title = p["title"].as_str().unwrap_or("?").to_string();
            exprs.push((title, t["expr"].as_str().expect("expr").to_string()));
        }
    }
    let mut selectors = Vec::new();
    for v in vars {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().expect("variable query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .expect("label_values(selector, label)");
            let (selector, label) = inner.rsplit_once(',').unwrap();
            selectors.push(format!("count by ({}) ({selector})", label.trim()));
        }
    }
    (exprs, selectors)
}

/// Grafana's variables as a dashboard opened with "All" selected would send them.
fn substitute(expr: &str) -> String {
    let s = [
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "5m"),
        ("$instance", ".+"),
        ("$service", ".+"),
    ]
    .iter()
    .fold(expr.to_string(), |e, (var, value)| e.replace(var, value));
    assert!(
        !s.contains('$'),
        "a variable the test does not know in {expr}"
    );
    s
}

#[test]
fn prometheus_scrapes_the_agent_and_every_dashboard_panel_has_data() {
    weir_lab::netns::require_root();
    let (mut lab, agent) = lab_with_agent();
    let mut prom = Prometheus::start(&lab.lb, &lab.dir.path, &[agent.admin]);
    prom.wait_up(&lab.lb);

    // Traffic of every kind a panel shows: HTTP connections, UDP, a drop, a backend failing
    // its checks (transitions, failed probes), re-steered flows.
    for port in 0..30u16 {
        let r = lab
            .client
            .run_in(|| {
                clients::http_get(Some(sa(CLIENT_V4, 42_000 + port)), sa(VIP_V4, 80), "/", T)
            })
            .unwrap();
        assert_eq!(r.status, 200);
    }
    for port in 0..5u16 {
        lab.client
            .run_in(|| clients::udp_request(sa(CLIENT_V4, 43_000 + port), sa(VIP_V4, 7), b"x", T))
            .unwrap();
        lab.client.run_in(|| {
            let s = std::net::UdpSocket::bind(sa(CLIENT_V4, 44_000 + port)).unwrap();
            s.send_to(b"nobody", sa(VIP_V4, 9)).unwrap();
        });
    }
    let b2 = SocketAddr::new(lab.backends[1].v4, HTTP_PORT);
    lab.kill_server(1);
    agent.wait_backend(&lab.lb, "web", b2, "down", None);

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "overview, backends, agent: {files:?}");
    let mut checked = BTreeMap::new();
    for file in &files {
        let (exprs, vars) = dashboard_queries(file);
        assert!(!exprs.is_empty(), "{file:?} has no queries");
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (title, expr) in exprs
            .iter()
            .cloned()
            .chain(vars.iter().map(|v| ("(variable)".to_string(), v.clone())))
        {
            let q = substitute(&expr);
            let mut last = Ok(Vec::new());
            let ok = wait_for_opt(Duration::from_secs(20), || {
                last = prom.query(&lab.lb, &q);
                matches!(&last, Ok(r) if !r.is_empty()).then_some(())
            });
            assert!(
                ok.is_some(),
                "{name}: panel {title:?}: no data for\n  {q}\n  last answer: {last:?}\n--- prometheus log ---\n{}",
                prom.log_text()
            );
            *checked.entry(name.clone()).or_insert(0) += 1;
        }
    }
    // Every dashboard was read, with all of its queries (a guard against a parser that finds
    // nothing and passes).
    assert_eq!(checked.len(), 3, "{checked:?}");
    assert!(checked.values().all(|n| *n >= 8), "{checked:?}");
    drop(prom);
    agent.stop();
}

/// The chart's split: the full API on loopback, metrics and probes on the node's address. From
/// the client's namespace the metrics listener answers `/metrics`, `/livez` and `/readyz` and
/// nothing else; the API's port is closed on the node's address; on the node, the API serves.
#[test]
fn the_metrics_listener_serves_outside_and_the_api_stays_on_loopback() {
    weir_lab::netns::require_root();
    let lab = Lab::new(1);
    let line = "  listen: 127.0.0.1:9300";
    assert!(DEFAULT_CONFIG.contains(line));
    let config = lab.config_for(&DEFAULT_CONFIG.replacen(
        line,
        &format!("{line}\n  metrics_listen: {LB_V4}:9301"),
        1,
    ));
    let mut agent = Agent::start(&lab.lb, &lab.dir.path, Some(&config));
    agent.wait_ready(&lab.lb);
    let from_client = |port: u16, path: &str| {
        lab.client
            .run_in(|| clients::http_get(None, sa(LB_V4, port), path, T))
    };
    for path in ["/metrics", "/livez", "/readyz"] {
        let r = from_client(9301, path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(r.status, 200, "{path}");
    }
    let metrics =
        String::from_utf8_lossy(&from_client(9301, "/metrics").unwrap().body).into_owned();
    assert!(metrics.contains("weir_service_packets_total"), "{metrics}");
    for path in ["/api/v1/services", "/api/v1/status", "/api/v1/l2"] {
        assert_eq!(from_client(9301, path).unwrap().status, 404, "{path}");
    }
    let closed = from_client(9300, "/api/v1/services");
    assert!(
        closed
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the API reached from outside: {:?}",
        closed.map(|r| r.status)
    );
    assert_eq!(agent.get(&lab.lb, "/api/v1/services").unwrap().0, 200);
}
