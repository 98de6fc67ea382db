//! Socket-level load balancing on the real kernel: the agent attaches its cgroup hooks to a
//! test cgroup (`weir_lab::cgroup`), and real client processes in that cgroup, on the LB node
//! (the node's own processes, as a pod's would be), connect to the services of the embedded
//! default config. The backends are the lab's real servers behind its Linux bridge.
//! Needs root; every test builds and removes its own namespaces and cgroup.

use std::path::Path;

use lb_agent::config::DEFAULT_CONFIG;
use weir_lab::{
    agent::{Agent, wait_for},
    cgroup::TestCgroup,
    lab::*,
    sockclient::{self, Exchange, spread},
};

fn bin() -> &'static Path {
    env!("CARGO_BIN_EXE_weir-lab").as_ref()
}

/// The default config with the socket hooks at `cgroup`.
fn config(cgroup: &TestCgroup) -> String {
    let line = "  interfaces: [eth-c]\n";
    assert!(DEFAULT_CONFIG.contains(line));
    DEFAULT_CONFIG.replacen(
        line,
        &format!(
            "{line}  socket_lb: {{enabled: true, cgroup: {}}}\n",
            cgroup.path().display()
        ),
        1,
    )
}

fn lab_with_hooks() -> (Lab, TestCgroup, Agent) {
    let mut lab = Lab::new(3);
    lab.start_servers(bin());
    let cg = TestCgroup::new();
    let mut agent = Agent::start(&lab.lb, &lab.dir.path, Some(&config(&cg)));
    agent.wait_ready(&lab.lb);
    (lab, cg, agent)
}

/// Runs the client in the cgroup on the LB node: its exchanges (every one must succeed).
fn client(lab: &Lab, cg: &TestCgroup, mode: &str, to: &str, n: usize) -> Vec<Exchange> {
    sockclient::exchanges(cg, &lab.lb, bin(), mode, to, n)
}

#[test]
fn node_clients_reach_services_through_the_socket_hooks() {
    let (lab, cg, agent) = lab_with_hooks();
    let names = ["b1", "b2", "b3"];

    // TCP, IPv4: every connect lands on a backend, and the socket sees the service.
    let tcp = client(&lab, &cg, "tcp", "198.18.100.10:80", 24);
    for e in &tcp {
        assert_eq!(e.peer, "198.18.100.10:80", "{tcp:?}");
        assert!(names.contains(&e.backend.as_str()), "{tcp:?}");
    }
    assert!(spread(&tcp).len() >= 2, "one socket, one backend: {tcp:?}");

    // TCP, IPv6, and IPv4 through an IPv6 socket (a mapped address).
    for e in client(&lab, &cg, "tcp", "[fd00:100::10]:80", 6) {
        assert_eq!(e.peer, "[fd00:100::10]:80");
        assert!(names.contains(&e.backend.as_str()), "{e:?}");
    }
    for e in client(&lab, &cg, "tcp", "[::ffff:198.18.100.10]:80", 3) {
        assert_eq!(e.peer, "[::ffff:198.18.100.10]:80");
        assert!(names.contains(&e.backend.as_str()), "{e:?}");
    }

    // Connected UDP: one backend for the socket; replies come from the service.
    let udp = client(&lab, &cg, "udp-connected", "198.18.100.10:7", 5);
    for e in &udp {
        assert_eq!(
            (e.peer.as_str(), e.from.as_str()),
            ("198.18.100.10:7", "198.18.100.10:7")
        );
    }
    assert_eq!(spread(&udp).len(), 1, "{udp:?}");
    // Several connected sockets spread over the backends.
    let many = client(&lab, &cg, "udp-sockets", "198.18.100.10:7", 24);
    assert!(spread(&many).len() >= 2, "{many:?}");

    // Unconnected UDP: every datagram's answer comes from the service.
    for e in client(&lab, &cg, "udp", "198.18.100.10:7", 5) {
        assert_eq!((e.peer.as_str(), e.from.as_str()), ("-", "198.18.100.10:7"));
        assert!(names.contains(&e.backend.as_str()), "{e:?}");
    }

    // ClientIP affinity: every socket of the node goes to one backend.
    let sticky = client(&lab, &cg, "tcp", "198.18.100.11:80", 10);
    assert_eq!(spread(&sticky).len(), 1, "{sticky:?}");

    // Traffic that is no service's is untouched: a backend reached directly is itself.
    for e in client(&lab, &cg, "tcp", "198.18.1.12:8080", 3) {
        assert_eq!(
            (e.peer.as_str(), e.backend.as_str()),
            ("198.18.1.12:8080", "b2")
        );
    }

    // The connections are counted as the service's (the agent samples the counters every
    // second).
    wait_for(
        std::time::Duration::from_secs(5),
        "web's connections counted",
        || {
            let metrics = agent.metrics(&lab.lb);
            let web = metrics.lines().find(|l| {
                l.starts_with("weir_service_connections_total{") && l.contains("service=\"web\"")
            })?;
            let n: f64 = web.rsplit(' ').next()?.parse().ok()?;
            (n >= 24.0 + 3.0).then_some(())
        },
    );
}

#[test]
fn a_dead_backend_gets_no_new_connects_and_a_service_without_backends_refuses() {
    let (mut lab, cg, agent) = lab_with_hooks();
    lab.kill_server(1);
    // web checks every 100 ms, fall 3.
    wait_for(std::time::Duration::from_secs(5), "b2 out of web", || {
        let s = agent.services(&lab.lb);
        let web = s["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "web")?
            .clone();
        web["backends"]
            .as_array()?
            .iter()
            .any(|b| b["address"] == "198.18.1.12" && b["healthy"] == false)
            .then_some(())
    });
    let tcp = client(&lab, &cg, "tcp", "198.18.100.10:80", 30);
    assert!(tcp.iter().all(|e| e.backend != "b2"), "{tcp:?}");
    assert_eq!(spread(&tcp).len(), 2, "{tcp:?}");

    lab.kill_server(0);
    lab.kill_server(2);
    wait_for(
        std::time::Duration::from_secs(5),
        "web without backends",
        || {
            let s = agent.services(&lab.lb);
            s["services"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == "web")?["backends"]
                .as_array()?
                .iter()
                .all(|b| b["healthy"] == false)
                .then_some(())
        },
    );
    let out = cg.output(
        &lab.lb,
        bin(),
        &["sockclient", "tcp", "198.18.100.10:80", "1"],
    );
    assert!(out.starts_with("error=ConnectionRefused"), "{out}");
}

#[test]
fn the_hooks_survive_a_restart_and_cleanup_removes_them() {
    let (lab, cg, agent) = lab_with_hooks();
    agent.kill();
    // No agent: the pinned hooks keep balancing.
    for e in client(&lab, &cg, "tcp", "198.18.100.10:80", 6) {
        assert_eq!(e.peer, "198.18.100.10:80");
    }
    let mut agent = Agent::start(&lab.lb, &lab.dir.path, Some(&config(&cg)));
    agent.wait_ready(&lab.lb);
    assert!(
        agent.log_text().contains("socket load balancing attached"),
        "{}",
        agent.log_text()
    );
    let after = client(&lab, &cg, "tcp", "198.18.100.10:80", 12);
    assert!(spread(&after).len() >= 2, "{after:?}");
    agent.stop();

    let out = lab
        .lb
        .agent_command(lb_agent_bin().to_str().unwrap())
        .arg("cleanup")
        .output()
        .expect("cleanup");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("socket hook connect4 detached"), "{text}");
    // Without the hooks, the node's connect to the service is not translated: nothing on the
    // node's way to the VIP serves it.
    let out = cg.output(
        &lab.lb,
        bin(),
        &["sockclient", "tcp", "198.18.100.10:80", "1"],
    );
    assert!(out.starts_with("error="), "{out}");
}

fn lb_agent_bin() -> std::path::PathBuf {
    weir_lab::agent::agent_binary()
}

/// A connected UDP socket whose backend leaves the service (a pod deleted or drained while it
/// still answers) is closed under its owner, and the owner's next socket
/// reaches a backend in rotation; without that it would keep talking to the one that left.
/// (A backend whose process dies while its host lives answers ICMP port unreachable, and the
/// socket fails on its own: `ConnectionRefused`.)
#[test]
fn a_connected_udp_socket_follows_its_backend_out_of_rotation() {
    use std::io::{BufRead as _, BufReader};
    let (lab, cg, agent) = lab_with_hooks();
    let mut child = cg
        .command(
            &lab.lb,
            bin(),
            &["sockclient", "udp-hold", "198.18.100.10:7", "40"],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let backend = first
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("reply=backend="))
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    let index = ["b1", "b2", "b3"]
        .iter()
        .position(|b| *b == backend)
        .unwrap();
    let line = format!(
        "      - {{ address: 198.18.1.1{}, port: 7007 }}\n",
        index + 1
    );
    let without = config(&cg);
    assert!(without.contains(&line), "{line}");
    agent
        .reload(&lab.lb, &without.replacen(&line, "", 1))
        .expect("reload");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success());
    // Closed while waiting for an answer: ECONNABORTED; between two datagrams: the socket is
    // no longer connected, and the next send() wants an address (EDESTADDRREQ).
    let aborted = rest
        .iter()
        .position(|l| {
            l.starts_with("error=")
                && (l.ends_with("(os error 103)") || l.ends_with("(os error 89)"))
        })
        .unwrap_or_else(|| panic!("the socket was not closed: {rest:#?}"));
    assert!(
        rest[..aborted]
            .iter()
            .all(|l| l.contains(&format!("reply=backend={backend} "))),
        "until then it talked to {backend}: {rest:#?}"
    );
    let after = &rest[aborted + 1..];
    assert!(after.len() >= 10, "{rest:#?}");
    assert!(
        after
            .iter()
            .all(|l| l.contains("reply=backend=") && !l.contains(&format!("backend={backend} "))),
        "after the close every datagram reaches a backend in rotation: {rest:#?}"
    );
    assert!(
        agent
            .log_text()
            .contains("closed connected UDP sockets to backends out of rotation"),
        "{}",
        agent.log_text()
    );
}
