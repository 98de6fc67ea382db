//! Health checks end to end in the netns lab: the real agent probing real servers (HTTP,
//! HTTPS, TCP, UDP, the raw-socket SCTP responder, the kernel's ICMP) in backend namespaces,
//! each failure mode made for real (a killed process, a closed port, an HTTP 500, a wrong UDP
//! reply, an nftables drop rule, a link down), and traffic through the VIP counted at the
//! backends. Needs root; every test builds and removes its own namespaces.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use weir_lab::{
    agent::{Agent, wait_for},
    clients::{self, Echo},
    lab::*,
};

const T: Duration = Duration::from_secs(3);

fn server_bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_weir-lab").as_ref()
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The fast profile every service here uses unless it says otherwise. The timeout leaves room
/// for a loaded CI machine: a healthy backend answers in about a millisecond, and a spurious
/// timeout would count as a failure the test did not make.
const FAST: &str = "interval: 200ms, timeout: 200ms, rise: 2, fall: 2";
/// For tests that count on a healthy backend staying healthy while they send traffic: four
/// missed answers in a row (not two) before a backend is down, so that a check delayed on a
/// loaded machine does not take the only healthy backend of a fail-closed service away.
const STEADY: &str = "interval: 200ms, timeout: 200ms, rise: 2, fall: 4";

/// A service block: `name`, VIP and port, protocol, backend port, and the check's fields.
fn service(
    lab: &Lab,
    name: &str,
    vip: &str,
    port: u16,
    protocol: &str,
    to: u16,
    check: &str,
) -> String {
    let v6 = vip.contains(':');
    let backends: Vec<String> = lab
        .backends
        .iter()
        .map(|b| {
            let ip = if v6 { b.v6 } else { b.v4 };
            format!("      - {{ address: \"{ip}\", port: {to} }}\n")
        })
        .collect();
    format!(
        "  - name: {name}\n    vip: \"{vip}\"\n    port: {port}\n    protocol: {protocol}\n    health_check: {{ {check} }}\n    backends:\n{}",
        backends.concat()
    )
}

fn config(lab: &Lab, services: &[String]) -> String {
    format!(
        "node:\n  interfaces: [{}]\nservices:\n{}",
        lab.interfaces().join(", "),
        services.concat()
    )
}

fn lab_with_agent(n: usize, services: impl Fn(&Lab) -> Vec<String>) -> (Lab, Agent) {
    let mut lab = Lab::new(n);
    lab.start_servers(server_bin());
    let text = config(&lab, &services(&lab));
    let mut agent = Agent::start(&lab.lb, &lab.dir.path, Some(&text));
    agent.wait_ready(&lab.lb);
    (lab, agent)
}

/// Every checker's services: (service name, backend port) on IPv4 and IPv6.
fn all_checkers(lab: &Lab) -> Vec<String> {
    let s = |name, vip, port, protocol, to, check: &str| {
        service(
            lab,
            name,
            vip,
            port,
            protocol,
            to,
            &format!("{check}, {FAST}"),
        )
    };
    vec![
        s(
            "http",
            VIP_V4,
            80,
            "tcp",
            HTTP_PORT,
            "type: http, path: /healthz",
        ),
        s(
            "https",
            VIP_V4,
            443,
            "tcp",
            HTTPS_PORT,
            "type: https, path: /healthz, host: backend.weir.test",
        ),
        s(
            "tcp",
            VIP_V4,
            81,
            "tcp",
            HTTP_PORT,
            r#"type: tcp, request: "GET / HTTP/1.0\r\n\r\n", response: "backend=""#,
        ),
        s(
            "udp",
            VIP_V4,
            7,
            "udp",
            UDP_PORT,
            r#"type: udp, request: health, response: "backend=""#,
        ),
        s("sctp", VIP_V4, 3868, "sctp", SCTP_PORT, "type: sctp"),
        s("ping", VIP_V4, 82, "tcp", HTTP_PORT, "type: ping"),
        // Half-open TCP checks (SYN, SYN-ACK; the LB node's kernel resets), the default
        // without a request.
        s("syn", VIP_V4, 84, "tcp", HTTP_PORT, "type: tcp"),
        s("syn6", VIP_V6, 84, "tcp", HTTP_PORT, "type: tcp"),
        s(
            "http6",
            VIP_V6,
            80,
            "tcp",
            HTTP_PORT,
            "type: http, path: /healthz",
        ),
        s("ping6", VIP_V6, 82, "tcp", HTTP_PORT, "type: ping"),
        s("sctp6", VIP_V6, 3868, "sctp", SCTP_PORT, "type: sctp"),
        // Checks of ports nothing listens on.
        s(
            "tcp-closed",
            VIP_V4,
            83,
            "tcp",
            HTTP_PORT,
            "type: tcp, port: 9",
        ),
        s(
            "udp-closed",
            VIP_V4,
            8,
            "udp",
            UDP_PORT,
            "type: udp, port: 9, request: x",
        ),
        s(
            "sctp-closed",
            VIP_V4,
            3870,
            "sctp",
            SCTP_PORT,
            "type: sctp, port: 3870",
        ),
    ]
}

/// (service, backend port, IPv6) of the services whose backends answer.
const ANSWERING: [(&str, u16, bool); 11] = [
    ("http", HTTP_PORT, false),
    ("https", HTTPS_PORT, false),
    ("tcp", HTTP_PORT, false),
    ("udp", UDP_PORT, false),
    ("sctp", SCTP_PORT, false),
    ("ping", HTTP_PORT, false),
    ("http6", HTTP_PORT, true),
    ("ping6", HTTP_PORT, true),
    ("sctp6", SCTP_PORT, true),
    ("syn", HTTP_PORT, false),
    ("syn6", HTTP_PORT, true),
];

fn addr(lab: &Lab, i: usize, port: u16, v6: bool) -> SocketAddr {
    let b = &lab.backends[i];
    sa(if v6 { b.v6 } else { b.v4 }, port)
}

/// Waits until every answering service sees backend `i` up.
fn wait_all_up(lab: &Lab, agent: &Agent, i: usize) {
    for (name, port, v6) in ANSWERING {
        agent.wait_backend(&lab.lb, name, addr(lab, i, port, v6), "up", None);
    }
}

/// Waits until the services `down` see backend 0 down with `reason` (any reason when None),
/// and checks that the other answering services still see it up.
fn expect_down(lab: &Lab, agent: &Agent, down: &[(&str, Option<&str>)]) {
    for (name, reason) in down {
        let (_, port, v6) = ANSWERING.iter().find(|(n, ..)| n == name).unwrap();
        let b = agent.wait_backend(&lab.lb, name, addr(lab, 0, *port, *v6), "down", *reason);
        assert_eq!(b["healthy"], false);
        assert_eq!(b["in_rotation"], false, "{name}: {b}");
    }
    let services = agent.services(&lab.lb);
    for (name, port, v6) in ANSWERING {
        let b = weir_lab::agent::backend_entry(&services, name, addr(lab, 0, port, v6));
        if !down.iter().any(|(n, _)| *n == name) {
            assert_eq!(b["state"], "up", "{name} should not be affected: {b}");
        }
        // The other backend is fine throughout.
        let other = weir_lab::agent::backend_entry(&services, name, addr(lab, 1, port, v6));
        assert_eq!(other["state"], "up", "{name} b2: {other}");
    }
}

#[test]
fn every_checker_sees_each_failure_mode_and_the_recovery() {
    let (mut lab, agent) = lab_with_agent(2, all_checkers);
    for i in 0..2 {
        wait_all_up(&lab, &agent, i);
    }
    let services = agent.services(&lab.lb);
    for (name, port, v6) in ANSWERING {
        let b = weir_lab::agent::backend_entry(&services, name, addr(&lab, 0, port, v6));
        assert_eq!(b["healthy"], true, "{name}: {b}");
        assert_eq!(b["in_rotation"], true, "{name}: {b}");
        assert!(b["probes"].as_u64().unwrap() >= 1, "{name}: {b}");
    }
    // A closed port: refused (TCP reset, ICMP port unreachable, SCTP ABORT), on both backends;
    // with every backend down, those services fail open.
    for name in ["tcp-closed", "udp-closed", "sctp-closed"] {
        let port = match name {
            "tcp-closed" => HTTP_PORT,
            "udp-closed" => UDP_PORT,
            _ => SCTP_PORT,
        };
        for i in 0..2 {
            let b = agent.wait_backend(
                &lab.lb,
                name,
                addr(&lab, i, port, false),
                "down",
                Some("refused"),
            );
            assert_eq!(b["in_rotation"], true, "fail-open: {b}");
        }
    }
    let services = agent.services(&lab.lb);
    let modes: Vec<String> = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}={}",
                s["name"].as_str().unwrap(),
                s["health"].as_str().unwrap()
            )
        })
        .collect();
    for m in [
        "tcp-closed=fail_open",
        "udp-closed=fail_open",
        "sctp-closed=fail_open",
        "http=checked",
    ] {
        assert!(modes.contains(&m.to_string()), "{m} in {modes:?}");
    }

    // HTTP 500 from /healthz: the http(s) checks fail with bad_status; the TCP check (which
    // asks for /) and the rest do not care.
    lab.control(0, "healthz/500");
    expect_down(
        &lab,
        &agent,
        &[
            ("http", Some("bad_status")),
            ("https", Some("bad_status")),
            ("http6", Some("bad_status")),
        ],
    );
    let b = agent.backend(&lab.lb, "http", addr(&lab, 0, HTTP_PORT, false));
    assert_eq!(
        b["last_failure"]["detail"], "status 500, expected 200-399",
        "{b}"
    );
    lab.control(0, "healthz/200");
    wait_all_up(&lab, &agent, 0);

    // A wrong UDP reply.
    lab.control(0, "udp/garbage");
    expect_down(&lab, &agent, &[("udp", Some("bad_response"))]);
    lab.control(0, "udp/echo");
    wait_all_up(&lab, &agent, 0);

    // Everything silently dropped in the backend: every check times out, ping included.
    let ns = &lab.backends[0].ns;
    ns.exec(&["nft", "add table inet weir_test"]);
    ns.exec(&[
        "nft",
        "add chain inet weir_test input { type filter hook input priority -300 ; policy drop ; }",
    ]);
    let all: Vec<(&str, Option<&str>)> = ANSWERING
        .iter()
        .map(|(n, ..)| (*n, Some("timeout")))
        .collect();
    expect_down(&lab, &agent, &all);
    ns.exec(&["nft", "delete table inet weir_test"]);
    wait_all_up(&lab, &agent, 0);

    // The server process killed: TCP refused, UDP refused (port unreachable), SCTP silent (the
    // responder is gone); the host still answers ping.
    lab.kill_server(0);
    expect_down(
        &lab,
        &agent,
        &[
            ("http", Some("refused")),
            ("https", Some("refused")),
            ("tcp", Some("refused")),
            ("syn", Some("refused")),
            ("syn6", Some("refused")),
            ("udp", Some("refused")),
            ("sctp", Some("timeout")),
            ("http6", Some("refused")),
            ("sctp6", Some("timeout")),
        ],
    );
    lab.start_server(server_bin(), 0);
    wait_all_up(&lab, &agent, 0);

    // The link down: nothing gets through, whatever the reason the kernel gives.
    let ns = &lab.backends[0].ns;
    ns.ip("link set eth0 down");
    let all: Vec<(&str, Option<&str>)> = ANSWERING.iter().map(|(n, ..)| (*n, None)).collect();
    expect_down(&lab, &agent, &all);
    for (name, port, v6) in ANSWERING {
        let b = agent.backend(&lab.lb, name, addr(&lab, 0, port, v6));
        let reason = b["last_failure"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            ["timeout", "unreachable"].contains(&reason.as_str()),
            "{name}: {b}"
        );
    }
    ns.ip("link set eth0 up");
    // A link down flushes the IPv6 address and both default routes: put them back.
    let v6 = lab.backends[0].v6;
    ns.ip(&format!("addr replace {v6}/64 dev eth0 nodad"));
    ns.ip("route replace default via 198.18.1.1");
    ns.ip("-6 route replace default via fd00:1::1");
    wait_all_up(&lab, &agent, 0);

    // Every change was counted.
    let metrics = agent.metrics(&lab.lb);
    let line = "weir_health_transitions_total{service=\"udp\",backend=\"198.18.1.11:7007\",to=\"unhealthy\"}";
    let n: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line} in\n{metrics}"));
    assert!(
        n >= 4,
        "udp went down four times (garbage, drop, kill, link): {n}"
    );
    assert!(
        metrics.contains("weir_backend_healthy{service=\"http\",backend=\"198.18.1.11:8080\"} 1")
    );
    assert!(metrics.contains("weir_service_fail_open{service=\"tcp-closed\"} 1"));
    assert!(metrics.contains(
        "weir_health_check_duration_seconds_count{service=\"sctp6\",type=\"sctp\",result=\"ok\"}"
    ));
    let log = agent.log_text();
    assert!(log.contains("backend is unhealthy"), "{log}");
    assert!(log.contains("failing open"), "{log}");
}

/// `n` GETs from the client to `vip`: the backend of each (an error fails the test).
fn gets(lab: &Lab, vip: SocketAddr, n: usize) -> Vec<String> {
    lab.client.run_in(|| {
        (0..n)
            .map(|i| {
                clients::http_get(None, vip, "/", T)
                    .unwrap_or_else(|e| panic!("GET {i} to {vip}: {e}"))
                    .backend
            })
            .collect()
    })
}

fn count(results: &[String], backend: &str) -> usize {
    results.iter().filter(|b| *b == backend).count()
}

/// Non-check connections backend `i` has accepted.
fn connections(lab: &Lab, i: usize) -> u64 {
    let s = lab.stats(i);
    // Each /_stats request is a connection too, and health checks are counted apart.
    s["connections"] - s["checks"]
}

fn web(lab: &Lab, check: &str) -> Vec<String> {
    vec![service(lab, "web", VIP_V4, 80, "tcp", HTTP_PORT, check)]
}

#[test]
fn traffic_never_reaches_a_backend_marked_down() {
    let (lab, agent) = lab_with_agent(3, |lab| {
        web(lab, &format!("type: http, path: /healthz, {FAST}"))
    });
    let vip = sa(VIP_V4.parse::<IpAddr>().unwrap(), 80);
    let b1 = sa(lab.backends[0].v4, HTTP_PORT);

    // A long-lived connection on b1.
    let mut echo = lab.client.run_in(|| {
        (0..50)
            .map(|_| Echo::open(vip, T).expect("ECHO connection"))
            .find(|e| e.backend == "b1")
            .expect("one of 50 connections lands on b1")
    });
    lab.client.run_in(|| echo.round_trip("before")).unwrap();

    // b1 still serves, but its health endpoint fails.
    lab.control(0, "healthz/500");
    agent.wait_backend(&lab.lb, "web", b1, "down", Some("bad_status"));
    let before = connections(&lab, 0);
    let got = gets(&lab, vip, 300);
    assert_eq!(count(&got, "b1"), 0, "{got:?}");
    assert!(
        count(&got, "b2") > 100 && count(&got, "b3") > 100,
        "{got:?}"
    );
    // Counted at the backend itself: not one new connection arrived.
    assert_eq!(
        connections(&lab, 0),
        before + 1,
        "only our own /_stats request"
    );
    // Its established flow was steered away too: the next packet met a backend that does not
    // know the connection, which reset it.
    let r = lab.client.run_in(|| echo.round_trip("after"));
    assert!(r.is_err(), "the connection to b1 should be gone: {r:?}");

    // Back: rise=2 good answers later it gets its share of new flows again.
    lab.control(0, "healthz/200");
    agent.wait_backend(&lab.lb, "web", b1, "up", None);
    let before = connections(&lab, 0);
    let got = gets(&lab, vip, 300);
    let n = count(&got, "b1");
    assert!((60..=140).contains(&n), "b1 took {n} of 300: {got:?}");
    assert_eq!(connections(&lab, 0), before + n as u64 + 1);
}

/// Waits until backend `addr` of web has been probed `n` more times; returns its entry.
fn after_probes(lab: &Lab, agent: &Agent, addr: SocketAddr, n: u64) -> serde_json::Value {
    let start = agent.backend(&lab.lb, "web", addr)["probes"]
        .as_u64()
        .unwrap();
    wait_for(Duration::from_secs(10), "probes", || {
        let b = agent.backend(&lab.lb, "web", addr);
        (b["probes"].as_u64().unwrap() >= start + n).then_some(b)
    })
}

fn transitions(agent: &Agent, lab: &Lab, backend: SocketAddr, to: &str) -> u64 {
    let line = format!(
        "weir_health_transitions_total{{service=\"web\",backend=\"{backend}\",to=\"{to}\"}}"
    );
    agent
        .metrics(&lab.lb)
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn a_flapping_backend_respects_rise_and_fall() {
    let (lab, agent) = lab_with_agent(2, |lab| {
        web(
            lab,
            // A timeout would break the alternation the test makes: leave room for load.
            "type: http, path: /healthz, interval: 200ms, timeout: 200ms, rise: 2, fall: 2",
        )
    });
    let b1 = sa(lab.backends[0].v4, HTTP_PORT);
    agent.wait_backend(&lab.lb, "web", b1, "up", None);
    let ups = transitions(&agent, &lab, b1, "healthy");
    assert_eq!(ups, 1, "the first answer");

    // Every other answer fails: never two failures in a row, so it stays up.
    lab.control(0, "healthz/500,200");
    let b = after_probes(&lab, &agent, b1, 20);
    assert_eq!(b["state"], "up", "{b}");
    assert_eq!(
        b["last_failure"]["reason"], "bad_status",
        "it did fail: {b}"
    );
    assert_eq!(transitions(&agent, &lab, b1, "unhealthy"), 0);

    // Two failures in a row take it down.
    lab.control(0, "healthz/500");
    agent.wait_backend(&lab.lb, "web", b1, "down", Some("bad_status"));
    // Every other answer succeeds: never two successes in a row, so it stays down.
    lab.control(0, "healthz/200,500");
    let b = after_probes(&lab, &agent, b1, 20);
    assert_eq!(b["state"], "down", "{b}");
    assert_eq!(b["in_rotation"], false);
    assert_eq!(transitions(&agent, &lab, b1, "unhealthy"), 1);
    assert_eq!(transitions(&agent, &lab, b1, "healthy"), 1);

    // Two good answers bring it back.
    lab.control(0, "healthz/200");
    agent.wait_backend(&lab.lb, "web", b1, "up", None);
    assert_eq!(transitions(&agent, &lab, b1, "healthy"), 2);
}

#[test]
fn with_every_backend_down_a_service_fails_open_unless_fail_closed() {
    let (lab, agent) = lab_with_agent(2, |lab| {
        vec![
            service(
                lab,
                "open",
                VIP_V4,
                80,
                "tcp",
                HTTP_PORT,
                &format!("type: http, path: /healthz, {STEADY}"),
            ),
            service(
                lab,
                "closed",
                VIP_V4,
                81,
                "tcp",
                HTTP_PORT,
                &format!("type: http, path: /healthz, fail_closed: true, {STEADY}"),
            ),
        ]
    });
    let open = sa(VIP_V4.parse::<IpAddr>().unwrap(), 80);
    let closed = sa(VIP_V4.parse::<IpAddr>().unwrap(), 81);
    for i in 0..2 {
        lab.control(i, "healthz/503");
    }
    for i in 0..2 {
        let b = sa(lab.backends[i].v4, HTTP_PORT);
        for s in ["open", "closed"] {
            agent.wait_backend(&lab.lb, s, b, "down", Some("bad_status"));
        }
    }
    let services = agent.services(&lab.lb);
    let mode = |name: &str| {
        services["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["health"]
            .clone()
    };
    assert_eq!(mode("open"), "fail_open");
    assert_eq!(mode("closed"), "fail_closed");
    // Fail-open: the backends still serve / (only their health endpoint fails), and they get
    // the traffic.
    let got = gets(&lab, open, 40);
    assert!(count(&got, "b1") > 5 && count(&got, "b2") > 5, "{got:?}");
    // Fail-closed: new flows are dropped.
    let r = lab
        .client
        .run_in(|| clients::http_get(None, closed, "/", Duration::from_millis(500)));
    assert!(r.is_err(), "fail-closed drops: {r:?}");
    let metrics = agent.metrics(&lab.lb);
    assert!(
        metrics.contains("weir_service_fail_open{service=\"open\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_service_fail_open{service=\"closed\"} 0"),
        "{metrics}"
    );
    assert!(agent.log_text().contains("failing open"));
    assert!(agent.log_text().contains("fail_closed is set"));

    // One backend back: both services use it alone.
    lab.control(1, "healthz/200");
    let b2 = sa(lab.backends[1].v4, HTTP_PORT);
    for s in ["open", "closed"] {
        agent.wait_backend(&lab.lb, s, b2, "up", None);
    }
    for vip in [open, closed] {
        let got = gets(&lab, vip, 20);
        assert_eq!(count(&got, "b2"), 20, "{got:?}");
    }
}

#[test]
fn a_new_backend_gets_no_traffic_before_it_has_answered() {
    let mut lab = Lab::new(3);
    lab.start_servers(server_bin());
    let check = format!("type: http, path: /healthz, {FAST}");
    let two = {
        let mut s = service(&lab, "web", VIP_V4, 80, "tcp", HTTP_PORT, &check);
        s = s.replace(
            &format!(
                "      - {{ address: \"{}\", port: {HTTP_PORT} }}\n",
                lab.backends[2].v4
            ),
            "",
        );
        config(&lab, &[s])
    };
    let three = config(&lab, &web(&lab, &check));
    assert_ne!(two, three);
    let mut agent = Agent::start(&lab.lb, &lab.dir.path, Some(&two));
    agent.wait_ready(&lab.lb);
    let vip = sa(VIP_V4.parse::<IpAddr>().unwrap(), 80);
    let b3 = sa(lab.backends[2].v4, HTTP_PORT);

    // b3 joins while its health endpoint fails: it never gets a flow.
    lab.control(2, "healthz/500");
    let before = connections(&lab, 2);
    agent.reload(&lab.lb, &three).unwrap();
    agent.wait_backend(&lab.lb, "web", b3, "down", Some("bad_status"));
    let got = gets(&lab, vip, 200);
    assert_eq!(count(&got, "b3"), 0);
    assert_eq!(
        connections(&lab, 2),
        before + 1,
        "only our own /_stats request"
    );

    // Healthy: in rotation.
    lab.control(2, "healthz/200");
    agent.wait_backend(&lab.lb, "web", b3, "up", None);
    let got = gets(&lab, vip, 200);
    assert!(count(&got, "b3") > 30, "{got:?}");

    // Removed and added again while healthy: one good answer is enough to join.
    agent.reload(&lab.lb, &two).unwrap();
    agent.reload(&lab.lb, &three).unwrap();
    agent.wait_backend(&lab.lb, "web", b3, "up", None);
    assert!(
        agent
            .log_text()
            .lines()
            .any(|l| l.contains("backend is healthy")
                && l.contains("198.18.1.13:8080")
                && l.contains("from=unknown")),
        "{}",
        agent.log_text()
    );
}
