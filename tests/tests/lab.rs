//! End-to-end tests in the netns lab (see `weir_lab::lab`): the real `lb-agent` binary on the
//! LB node with its embedded default config (or an edited copy), real servers in three backend
//! namespaces, real TCP/UDP/SCTP/ICMP clients in the client namespace.
//!
//! Every flow is checked against the backend the agent's own Maglev code predicts for its
//! 5-tuple (`weir_lab::predict`); clients bind fixed source ports so runs are deterministic.
//! The lab's backends sit behind a Linux bridge (as pods do) unless a test says otherwise;
//! `transfers_of_real_sizes_in_every_topology` runs in each topology.
//! Needs root; every test builds and removes its own namespaces.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    process::Command,
    thread,
    time::Duration,
};

use lb_agent::config::DEFAULT_CONFIG;
use weir_lab::{
    agent::{Agent, wait_for},
    clients::{self, Echo},
    lab::*,
    predict::Predictor,
    sctp,
    servers::pattern,
    transfers::{self, MB},
};

const T: Duration = Duration::from_secs(3);

fn server_bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_weir-lab").as_ref()
}

/// A lab with servers and a ready agent running `config` (None: the embedded default).
fn lab_with_agent(config: Option<&str>) -> (Lab, Agent) {
    let mut lab = Lab::new(3);
    lab.start_servers(server_bin());
    let mut agent = Agent::start(&lab.lb, &lab.dir.path, config);
    agent.wait_ready(&lab.lb);
    (lab, agent)
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// GETs from `client` ports `ports` to `vip`, 8 at a time: (port, backend) for each.
fn get_all(
    lab: &Lab,
    client: &str,
    ports: std::ops::Range<u16>,
    vip: SocketAddr,
) -> Vec<(u16, String)> {
    let client: IpAddr = client.parse().unwrap();
    lab.client
        .run_in(|| clients::wait_ports_free(ports.clone(), Duration::from_secs(10)))
        .expect("the client's ports free");
    let ports: Vec<u16> = ports.collect();
    lab.client.run_in(|| {
        thread::scope(|s| {
            let workers: Vec<_> = ports
                .chunks(ports.len().div_ceil(8))
                .map(|chunk| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for &port in chunk {
                            let big = port % 10 == 0;
                            let path = if big {
                                "/bytes/30000".to_string()
                            } else {
                                format!("/tok-{port}")
                            };
                            let r = clients::http_get(
                                Some(SocketAddr::new(client, port)),
                                vip,
                                &path,
                                T,
                            )
                            .unwrap_or_else(|e| panic!("GET {vip}{path} from port {port}: {e}"));
                            assert_eq!(r.status, 200);
                            if big {
                                assert_eq!(r.body.len(), 30000, "port {port}");
                                assert!(
                                    r.body.iter().enumerate().all(|(i, b)| *b == pattern(i)),
                                    "port {port}: body bytes"
                                );
                            } else {
                                assert_eq!(
                                    String::from_utf8_lossy(&r.body),
                                    format!("backend={} path={path}\n", r.backend),
                                    "port {port}"
                                );
                            }
                            out.push((port, r.backend));
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        })
    })
}

fn shares<'a>(backends: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for b in backends {
        *m.entry(b.clone()).or_default() += 1;
    }
    m
}

/// Requests each backend's server counted (asked directly, from the LB node).
fn backend_requests(lab: &Lab) -> BTreeMap<String, u64> {
    lab.backends
        .iter()
        .map(|b| {
            let addr = b.http();
            let r = lab
                .lb
                .run_in(|| clients::http_get(None, addr, "/_stats", T))
                .expect("stats");
            let text = String::from_utf8_lossy(&r.body).into_owned();
            let n = text
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("requests="))
                .and_then(|v| v.parse::<u64>().ok())
                .expect("requests=");
            // This request itself was counted too.
            (b.name.clone(), n - 1)
        })
        .collect()
}

#[test]
fn a_thousand_tcp_connections_carry_their_data_and_follow_maglev() {
    let (lab, _agent) = lab_with_agent(None);
    let pred = Predictor::new(DEFAULT_CONFIG);
    let vip = sa(VIP_V4, 80);
    let results = get_all(&lab, CLIENT_V4, 20000..21020, vip);
    assert_eq!(results.len(), 1020);
    for (port, backend) in &results {
        assert_eq!(
            *backend,
            pred.backend_name("web", sa(CLIENT_V4, *port)),
            "port {port} went elsewhere than Maglev says"
        );
    }
    let s = shares(results.iter().map(|(_, b)| b));
    assert_eq!(s.len(), 3, "{s:?}");
    for n in s.values() {
        // Maglev gives each backend a third of the table: within 5 percentage points.
        assert!((290..=390).contains(n), "shares {s:?}");
    }
    // The backends saw exactly these requests.
    let counted = backend_requests(&lab);
    for (name, n) in &s {
        assert_eq!(counted[name], *n as u64, "requests counted at {name}");
    }
}

/// The default config plus UDP and SCTP services on the IPv6 VIP.
fn config_with_v6_udp_and_sctp() -> String {
    let mut c = DEFAULT_CONFIG.to_string();
    for (name, port, protocol, to) in [
        ("echo-udp6", 7, "udp", UDP_PORT),
        ("diameter6", 3868, "sctp", SCTP_PORT),
    ] {
        c.push_str(&format!(
            "  - name: {name}\n    vip: {VIP_V6}\n    port: {port}\n    protocol: {protocol}\n    backends:\n"
        ));
        for i in 11..=13 {
            c.push_str(&format!(
                "      - {{ address: \"fd00:1::{i}\", port: {to} }}\n"
            ));
        }
    }
    c
}

/// Replies of every size leave with the VIP as their source, whatever shape the kernel gives
/// them on the way to weir's TC program: behind a bridge and on routed veths (default
/// offloads: 64 KB GSO super-packets with their payload in page fragments and partial
/// checksums), and on weir's own ports (linear skbs). In each topology, for IPv4 and IPv6:
/// 1 MB HTTP downloads and uploads, byte-checked; 1 MB of UDP each way, with 8000-byte
/// replies that the backend's stack fragments; SCTP handshakes; 300 short requests on their predicted backends; and not
/// one reply counted as left untranslated.
#[test]
fn transfers_of_real_sizes_in_every_topology() {
    for topology in Topology::ALL {
        eprintln!("topology {topology:?}");
        let mut lab = Lab::with_topology(3, topology);
        lab.start_servers(server_bin());
        let config = lab.config_for(&config_with_v6_udp_and_sctp());
        let mut agent = Agent::start(&lab.lb, &lab.dir.path, Some(&config));
        agent.wait_ready(&lab.lb);
        for vip in [sa(VIP_V4, 80), sa(VIP_V6, 80)] {
            for _ in 0..3 {
                transfers::download(&lab.client, vip, MB);
                transfers::upload(&lab.client, vip, MB);
            }
        }
        transfers::udp_both_ways(
            &lab.client,
            sa(CLIENT_V4, 41000),
            sa(VIP_V4, 7),
            MB,
            1400,
            8000,
        );
        transfers::udp_both_ways(
            &lab.client,
            sa(CLIENT_V6, 41001),
            sa(VIP_V6, 7),
            MB,
            1400,
            8000,
        );
        transfers::sctp_inits(
            &lab.client,
            CLIENT_V4.parse().unwrap(),
            42000,
            sa(VIP_V4, 3868),
            10,
        );
        transfers::sctp_inits(
            &lab.client,
            CLIENT_V6.parse().unwrap(),
            42100,
            sa(VIP_V6, 3868),
            10,
        );
        // Many short requests, each on the backend Maglev predicts for it.
        let pred = Predictor::new(&config);
        let results = get_all(&lab, CLIENT_V4, 43000..43300, sa(VIP_V4, 80));
        for (port, backend) in &results {
            assert_eq!(
                *backend,
                pred.backend_name("web", sa(CLIENT_V4, *port)),
                "port {port}"
            );
        }
        assert_eq!(shares(results.iter().map(|(_, b)| b)).len(), 3);
        transfers::assert_all_translated(&agent, &lab.lb, 1000.0);
        // 1 MB in 8000-byte replies, each in 6 fragments, twice (IPv4 and IPv6); the counters
        // are sampled once a second, so wait for the sample that has them all.
        let fragments = || {
            weir_lab::agent::sample(
                &agent.metrics(&lab.lb),
                "weir_dataplane_packets_total{path=\"reverse_nat_fragment\"}",
            )
            .unwrap_or(0.0)
        };
        let want = 2.0 * 131.0 * 6.0;
        wait_for(
            Duration::from_secs(5),
            &format!("{topology:?}: {want} fragments translated"),
            || Some(fragments()).filter(|n| *n >= want),
        );
        drop(agent);
        drop(lab);
    }
}

#[test]
fn udp_ipv6_and_sctp_reach_the_predicted_backend() {
    let (lab, _agent) = lab_with_agent(None);
    let pred = Predictor::new(DEFAULT_CONFIG);

    // UDP echo: the reply comes back from the VIP and port, with the payload.
    let vip = sa(VIP_V4, 7);
    let replies = lab.client.run_in(|| {
        (0..100u16)
            .map(|i| {
                let local = sa(CLIENT_V4, 30000 + i);
                let payload = format!("ping-{i}");
                let (backend, echoed, from) =
                    clients::udp_request(local, vip, payload.as_bytes(), T)
                        .unwrap_or_else(|e| panic!("UDP from {local}: {e}"));
                assert_eq!(echoed, payload.as_bytes());
                assert_eq!(from, vip, "the reply's source is the VIP");
                (local, backend)
            })
            .collect::<Vec<_>>()
    });
    for (local, backend) in &replies {
        assert_eq!(
            *backend,
            pred.backend_name("echo-udp", *local),
            "UDP from {local}"
        );
    }
    assert_eq!(shares(replies.iter().map(|(_, b)| b)).len(), 3);

    // TCP over IPv6.
    let vip6 = sa(VIP_V6, 80);
    let results = get_all(&lab, CLIENT_V6, 31000..31200, vip6);
    for (port, backend) in &results {
        assert_eq!(
            *backend,
            pred.backend_name("web6", sa(CLIENT_V6, *port)),
            "IPv6 port {port}"
        );
    }
    assert_eq!(shares(results.iter().map(|(_, b)| b)).len(), 3);

    // SCTP: INIT → INIT-ACK from the VIP, with a valid CRC32c (Packet::parse checks it).
    let vip = sa(VIP_V4, 3868);
    let acks = lab.client.run_in(|| {
        (0..30u16)
            .map(|i| {
                let port = 32000 + i;
                let ack = sctp::init(CLIENT_V4.parse().unwrap(), port, vip, T)
                    .unwrap_or_else(|e| panic!("SCTP INIT from port {port}: {e}"));
                (port, ack)
            })
            .collect::<Vec<_>>()
    });
    for (port, ack) in &acks {
        assert_eq!(ack.from, vip.ip(), "INIT-ACK from the VIP");
        assert_eq!(ack.sport, 3868, "from the VIP's port");
        assert_eq!(
            ack.cookie,
            format!(
                "backend={}",
                pred.backend_name("diameter", sa(CLIENT_V4, *port))
            )
        );
    }
}

#[test]
fn source_ranges_and_client_ip_affinity() {
    let (lab, _agent) = lab_with_agent(None);
    let pred = Predictor::new(DEFAULT_CONFIG);
    // A second client address outside web-sticky's 198.18.0.0/24, routed back by the LB.
    lab.client.ip("addr add 198.18.2.1/24 dev eth0");
    lab.lb
        .ip(&format!("route add 198.18.2.0/24 via {CLIENT_V4}"));
    let outside = sa("198.18.2.1", 0);

    // Control: the service without ranges answers that address.
    let web = sa(VIP_V4, 80);
    let r = lab
        .client
        .run_in(|| clients::http_get(Some(outside), web, "/", T));
    assert_eq!(r.expect("web from 198.18.2.1").status, 200);
    // The ranged service gives it nothing: the SYN is dropped, the connect times out.
    let sticky = sa("198.18.100.11", 80);
    let e = lab
        .client
        .run_in(|| clients::http_get(Some(outside), sticky, "/", Duration::from_secs(1)))
        .expect_err("a source outside the ranges must get nothing");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");

    // Affinity: every connection of a client lands on one backend.
    let results = get_all(&lab, CLIENT_V4, 33000..33040, sticky);
    let want = pred.backend_name("web-sticky", sa(CLIENT_V4, 33000));
    for (port, backend) in &results {
        assert_eq!(*backend, want, "port {port}");
    }
}

/// The default config without backend b2 in `web`.
fn without_b2() -> String {
    let line = "      - { address: 198.18.1.12, port: 8080 }\n";
    assert!(DEFAULT_CONFIG.contains(line));
    DEFAULT_CONFIG.replacen(line, "", 1)
}

#[test]
fn reload_moves_only_the_flows_of_a_removed_or_added_backend() {
    let (lab, agent) = lab_with_agent(Some(DEFAULT_CONFIG));
    let vip = sa(VIP_V4, 80);

    // Long-lived connections, and a first round of short ones.
    let mut echoes: Vec<Echo> = lab.client.run_in(|| {
        (0..30)
            .map(|_| Echo::open(vip, T).expect("echo connection"))
            .collect()
    });
    assert!(echoes.iter().any(|e| e.backend == "b2"));
    let before = get_all(&lab, CLIENT_V4, 40000..40300, vip);

    // Remove b2.
    agent
        .reload(&lab.lb, &without_b2())
        .expect("reload without b2");
    lab.client.run_in(|| {
        for (i, e) in echoes.iter_mut().enumerate() {
            let r = e.round_trip(&format!("after-remove-{i}"));
            if e.backend == "b2" {
                assert!(
                    r.is_err(),
                    "a connection to the removed backend cannot go on"
                );
            } else {
                r.unwrap_or_else(|err| panic!("connection {i} to {} broke: {err}", e.backend));
            }
        }
    });
    echoes.retain(|e| e.backend != "b2");
    let after = get_all(&lab, CLIENT_V4, 40000..40300, vip);
    let mut moved = 0;
    for ((port, b), (_, a)) in before.iter().zip(&after) {
        assert_ne!(a, "b2", "port {port} still reached the removed backend");
        if b == "b2" {
            moved += 1;
        } else {
            assert_eq!(a, b, "port {port} moved though its backend stayed");
        }
    }
    assert!(
        (60..=135).contains(&moved),
        "about a third of the flows moved: {moved}/300"
    );

    // Add b2 back: fresh flows follow the three-backend table, and only the flows whose slot
    // b2 takes back move (all to b2).
    agent
        .reload(&lab.lb, DEFAULT_CONFIG)
        .expect("reload with b2");
    let three = Predictor::new(DEFAULT_CONFIG);
    let two = Predictor::new(&without_b2());
    let fresh = get_all(&lab, CLIENT_V4, 41000..41300, vip);
    let mut moved = 0;
    for (port, b) in &fresh {
        let client = sa(CLIENT_V4, *port);
        assert_eq!(*b, three.backend_name("web", client), "port {port}");
        if *b != two.backend_name("web", client) {
            assert_eq!(
                b, "b2",
                "port {port} moved to a backend that was there already"
            );
            moved += 1;
        }
    }
    assert!(
        (60..=135).contains(&moved),
        "about a third of new flows go to b2: {moved}/300"
    );
    lab.client.run_in(|| {
        for (i, e) in echoes.iter_mut().enumerate() {
            e.round_trip(&format!("after-add-{i}"))
                .unwrap_or_else(|err| panic!("connection {i} to {} broke: {err}", e.backend));
        }
    });
    drop(echoes);
    drop(agent);
}

#[test]
fn a_bad_config_is_refused_and_changes_nothing() {
    let (lab, agent) = lab_with_agent(Some(DEFAULT_CONFIG));
    let generation = agent.status(&lab.lb)["config"]["generation"].as_u64();
    let vip = sa(VIP_V4, 80);
    let before = get_all(&lab, CLIENT_V4, 42000..42030, vip);

    let bad = DEFAULT_CONFIG.replacen("port: 8080 }", "port: 0 }", 1);
    let err = agent
        .reload(&lab.lb, &bad)
        .expect_err("port 0 must be refused");
    assert!(
        err.contains("services[0].backends[0].port: must be between 1 and 65535"),
        "{err}"
    );
    let err = agent
        .reload(&lab.lb, &DEFAULT_CONFIG.replacen("seed: 0", "seed: 1", 1))
        .expect_err("a new seed needs a restart");
    assert!(err.contains("maglev.hash/maglev.seed"), "{err}");
    let err = agent
        .reload(
            &lab.lb,
            "node: {interfaces: [eth-c]}\nservices: [{name: x}]\n",
        )
        .expect_err("missing fields");
    let file = agent.config.as_ref().unwrap().display().to_string();
    assert!(err.starts_with(&file), "names the file: {err}");
    assert!(err.contains("services[0]: missing field `vip`"), "{err}");

    assert_eq!(
        agent.status(&lab.lb)["config"]["generation"].as_u64(),
        generation
    );
    let after = get_all(&lab, CLIENT_V4, 42000..42030, vip);
    assert_eq!(before, after, "the last good config kept serving");
    assert!(agent.log_text().contains("config reload refused"));
}

#[test]
fn check_validates_without_side_effects() {
    let dir = Scratch::new();
    let good = dir.path.join("good.yaml");
    let bad = dir.path.join("bad.yaml");
    std::fs::write(&good, DEFAULT_CONFIG).unwrap();
    std::fs::write(
        &bad,
        DEFAULT_CONFIG.replacen("table_size: 16381", "table_size: 16384", 1),
    )
    .unwrap();
    let bin = weir_lab::agent::agent_binary();
    let ok = Command::new(&bin)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok (5 services, 15 backends)"));
    let no = Command::new(&bin)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(no.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&no.stderr);
    assert!(
        msg.contains(&format!(
            "{}: maglev.table_size: 16384 is not a prime",
            bad.display()
        )),
        "{msg}"
    );
}

fn ping(ns: &weir_lab::netns::Netns, dst: &str) -> Result<String, String> {
    ns.try_exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", dst])
}

#[test]
fn the_lb_node_keeps_its_own_traffic_and_cleanup_detaches() {
    let (mut lab, agent) = lab_with_agent(None);
    // A server of the LB node itself.
    let own = sa(LB_V4, 2222);
    let mut cmd = lab.lb.command(server_bin().to_str().unwrap());
    cmd.args(["serve", "--name", "lb-node", "--http", &own.to_string()]);
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _server = Proc { child };

    let check_node = |lab: &Lab| {
        ping(&lab.client, LB_V4).expect("ping the LB node");
        ping(&lab.client, LB_V6).expect("ping6 the LB node");
        ping(&lab.backends[0].ns, "198.18.1.1").expect("a backend pings its gateway");
        let r = lab
            .client
            .run_in(|| clients::http_get(None, own, "/", T))
            .expect("TCP to the LB node");
        assert_eq!(r.backend, "lb-node");
    };
    check_node(&lab);
    // The VIPs answer ping themselves.
    ping(&lab.client, VIP_V4).expect("ping the VIP");
    ping(&lab.client, VIP_V6).expect("ping6 the VIP");

    // A stopped agent leaves the data plane attached and serving (dataplane.keep_on_exit).
    let status = agent.stop();
    assert!(status.success(), "clean exit: {status}");
    let vip = sa(VIP_V4, 80);
    lab.client
        .run_in(|| clients::http_get(None, vip, "/", T))
        .expect("the VIP is still served without the agent");
    let bpffs = lab.lb.bpffs();
    assert!(
        bpffs
            .join("weir")
            .join(format!("layout-v{}", lb_common::LAYOUT_VERSION))
            .join("CONNTRACK")
            .exists()
    );

    // `lb-agent cleanup` detaches it and removes every pin.
    let bin = weir_lab::agent::agent_binary();
    let out = lab
        .lb
        .agent_command(bin.to_str().unwrap())
        .arg("cleanup")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("eth-c: xdp-native detached"), "{said}");
    for iface in lab.interfaces() {
        let link = lab.lb.ip(&format!("-d link show dev {iface}"));
        assert!(!link.contains("xdp"), "{iface} still has XDP: {link}");
        let net = lab.lb.exec(&["bpftool", "net", "show", "dev", &iface]);
        assert!(
            !net.contains("weir_tc_egress"),
            "{iface} still has TC: {net}"
        );
    }
    // Only the kernel's own preloaded files stay.
    let left: Vec<_> = std::fs::read_dir(&bpffs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_none_or(|x| x != "debug"))
        .collect();
    assert!(left.is_empty(), "left in bpffs: {left:?}");
    // Without the data plane the VIP is gone, and the node's own traffic still works.
    assert!(
        lab.client
            .run_in(|| clients::http_get(None, vip, "/", Duration::from_secs(1)))
            .is_err()
    );
    assert!(ping(&lab.client, VIP_V4).is_err());
    check_node(&lab);
    lab.kill_server(0);
}

/// The sum of `metric`'s samples for service `service`.
fn service_total(metrics: &str, metric: &str, service: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with(&format!("{metric}{{")) && l.contains(&format!("service=\"{service}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The agent restarts three ways under load — SIGKILL and back after 3 s; SIGTERM and back
/// with a changed config; back as a binary of another pinned-layout version — and the data
/// plane serves throughout: 30 long-lived connections exchange data through every gap and
/// none resets, a steady stream of new connections sees no failure, and the traffic counters
/// carry on across the adoptions.
#[test]
fn restarts_lose_no_connection_and_counters_carry_on() {
    let (lab, mut agent) = lab_with_agent(Some(DEFAULT_CONFIG));
    let vip = sa(VIP_V4, 80);
    let mut echoes: Vec<Echo> = lab.client.run_in(|| {
        (0..30)
            .map(|_| Echo::open(vip, T).expect("echo connection"))
            .collect()
    });
    let round = |echoes: &mut Vec<Echo>, tag: &str| {
        lab.client.run_in(|| {
            for (i, e) in echoes.iter_mut().enumerate() {
                e.round_trip(&format!("{tag}-{i}")).unwrap_or_else(|err| {
                    panic!("{tag}: connection {i} to {} broke: {err}", e.backend)
                });
            }
        });
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = (
        std::sync::atomic::AtomicU32::new(0),
        std::sync::Mutex::new(Vec::new()),
    );
    let bpffs = lab.lb.bpffs();
    /// Stops the client thread however the scope ends (a failed assertion too).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let agent = thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| {
            lab.client.run_in(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match clients::http_get(None, vip, "/", T) {
                        Ok(_) => {
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => failed.lock().unwrap().push(e.to_string()),
                    }
                }
            });
        });
        let connections = |agent: &Agent| {
            service_total(
                &agent.metrics(&lab.lb),
                "weir_service_connections_total",
                "web",
            )
        };
        // The agent samples the counters every second.
        let mut last = wait_for(Duration::from_secs(5), "web's connections counted", || {
            Some(connections(&agent)).filter(|n| *n > 30.0)
        });
        let changed = DEFAULT_CONFIG.replacen("interval: 100ms", "interval: 200ms", 1);
        assert_ne!(changed, DEFAULT_CONFIG);
        for how in ["SIGKILL", "SIGTERM", "other layout"] {
            let config = match how {
                "SIGKILL" => {
                    assert!(!agent.kill().success());
                    DEFAULT_CONFIG
                }
                "SIGTERM" => {
                    assert!(agent.stop().success());
                    changed.as_str()
                }
                _ => {
                    // A binary of another layout version finds maps it must not read: the
                    // pinned layout directory carries the version, so renaming it stands in
                    // for that binary's data plane.
                    assert!(agent.stop().success());
                    let dir = bpffs.join("weir");
                    let current = format!("layout-v{}", lb_common::LAYOUT_VERSION);
                    std::fs::rename(dir.join(current), dir.join("layout-v0")).unwrap();
                    DEFAULT_CONFIG
                }
            };
            // Away for 3 s: the data plane forwards on its own.
            for i in 0..6 {
                round(&mut echoes, &format!("{how}-away-{i}"));
                thread::sleep(Duration::from_millis(500));
            }
            agent = Agent::start(&lab.lb, &lab.dir.path, Some(config));
            agent.wait_ready(&lab.lb);
            round(&mut echoes, &format!("{how}-back"));
            let log = agent.log_text();
            let metrics = agent.metrics(&lab.lb);
            let now = wait_for(Duration::from_secs(5), "the counters sampled", || {
                Some(connections(&agent)).filter(|n| *n > 0.0)
            });
            if how == "other layout" {
                assert!(log.contains("replaced"), "{log}");
                assert_eq!(
                    weir_lab::agent::sample(&metrics, "weir_dataplane_start{outcome=\"replaced\"}"),
                    Some(1.0)
                );
                // The old layout's maps went once the links ran the new programs.
                assert!(!bpffs.join("weir").join("layout-v0").exists());
            } else {
                assert!(
                    log.contains("adopted the pinned data plane"),
                    "{how}: {log}"
                );
                assert_eq!(
                    weir_lab::agent::sample(&metrics, "weir_dataplane_start{outcome=\"adopted\"}"),
                    Some(1.0),
                    "{how}"
                );
                assert!(
                    now >= last,
                    "{how}: connections counter went back from {last} to {now}"
                );
            }
            last = now;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        agent
    });
    let failed = failed.into_inner().unwrap();
    let ok = ok.into_inner();
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed: {failed:?}",
        failed.len(),
        ok + failed.len() as u32
    );
    assert!(ok > 100, "only {ok} new connections");
    round(&mut echoes, "end");
    drop(agent);
}

/// L2 mode on one node: the client has the VIPs on its own link (no route through the LB
/// node), resolves them by ARP and Neighbor Solicitation, which the LB node's XDP program
/// answers with its interface's MAC, and reaches the services.
#[test]
fn l2_mode_answers_for_the_vips_on_the_link() {
    let config = format!("{DEFAULT_CONFIG}\nannounce:\n  l2:\n    interfaces: [eth-c]\n");
    let (lab, agent) = lab_with_agent(Some(&config));
    lab.client.ip("route del 198.18.100.0/24");
    lab.client.ip("route add 198.18.100.0/24 dev eth0");
    lab.client.ip("-6 route del fd00:100::/64");
    lab.client.ip("-6 route add fd00:100::/64 dev eth0");
    let lb_mac = weir_lab::netns::parse_mac(
        &lab.lb
            .ip("link show eth-c")
            .split("link/ether ")
            .nth(1)
            .expect("a MAC")[..17],
    );
    for vip in [sa(VIP_V4, 80), sa(VIP_V6, 80)] {
        let r = lab
            .client
            .run_in(|| clients::http_get(None, vip, "/", T))
            .unwrap_or_else(|e| panic!("GET {vip} on the link: {e}"));
        assert_eq!(r.status, 200);
        let neigh = lab.client.ip(&format!("neigh show {}", vip.ip()));
        let mac = neigh.split("lladdr ").nth(1).map_or_else(
            || panic!("no neighbour entry for {}: {neigh}", vip.ip()),
            |m| weir_lab::netns::parse_mac(&m[..17]),
        );
        assert_eq!(mac, lb_mac, "{} resolved to the LB node: {neigh}", vip.ip());
    }
    // A VIP nobody serves gets no answer.
    let unserved = lab
        .client
        .run_in(|| clients::http_get(None, sa("198.18.100.99", 80), "/", Duration::from_secs(1)));
    assert!(unserved.is_err());
    wait_for(Duration::from_secs(5), "the answers counted", || {
        let m = agent.metrics(&lab.lb);
        let count = |path: &str| {
            weir_lab::agent::sample(
                &m,
                &format!("weir_dataplane_packets_total{{path=\"{path}\"}}"),
            )
        };
        (count("arp_reply")? >= 1.0 && count("neighbor_advert")? >= 1.0).then_some(())
    });
    let log = agent.log_text();
    assert!(
        log.contains("L2: announced") && log.contains("vip=198.18.100.10"),
        "{log}"
    );
}

/// Finding 4 of the hardening review, in the lab (`weir_lab::flood`): spoofed SYNs from
/// 64 000 sources at two VIPs of the same backends for as long as 20 idle connections wait
/// 30 s for their backend to speak first, while 100 established connections exchange lines.
/// Every connection survives (before the half-open table, the flood pushed the idle
/// connections out of the connection table, reverse NAT could not tell which VIP their
/// backend's first reply belonged to, and all 20 broke), at least 99% of the established
/// connections' segments go through without retransmission, new connections to the
/// source-NATed VIP succeed during the flood, within three SYNs (the flood's half-open
/// source-NAT ports are taken first: before, they held the ports for an hour and all 30 new
/// connections failed), and the
/// source-NAT ports are free again within the half-open timeout (10 s) after the flood.
#[test]
fn a_syn_flood_breaks_no_established_or_idle_connection() {
    let r = weir_lab::flood::run(server_bin(), None, Duration::from_secs(30));
    eprintln!("{r:#?}");
    assert!(r.broken.is_empty(), "broken connections: {:#?}", r.broken);
    assert!(
        r.forwarded > 100_000,
        "the flood reached the backends through weir: {r:?}"
    );
    assert!(
        r.ports_from_half_open.is_some_and(|n| n > 0),
        "the flood filled the source-NAT ranges: {r:?}"
    );
    assert_eq!(
        r.new_during,
        weir_lab::flood::NEW_DURING,
        "new connections during the flood: {:#?}",
        r.new_failed
    );
    assert!(
        r.segments > 10_000 && r.delivered() >= 0.99,
        "at least 99% of the established connections' segments without retransmission: {r:?}"
    );
    // Within the wait (`weir_lab::flood`: 20 s, twice the half-open timeout).
    assert!(
        r.ports_back_secs.is_some(),
        "source-NAT ports given back after the flood: {r:?}"
    );
}

/// Two Services of the same backends (one of them source-NATing, which in this lab leaves
/// destination-NATed only: the backends sit behind a bridge weir does not run on, so the
/// kernel forwards) and a third frontend on another port.
const SHARED_BACKENDS: &str = "\
node:
  interfaces: [eth-c]
  source_nat: {ports: 61000-61999, ipv4: 198.18.1.1}
admin:
  listen: 127.0.0.1:9300
services:
  - name: web
    vip: 198.18.100.10
    port: 80
    protocol: tcp
    backends: &b
      - { address: 198.18.1.11, port: 8080 }
      - { address: 198.18.1.12, port: 8080 }
      - { address: 198.18.1.13, port: 8080 }
  - name: web-alt
    vip: 198.18.100.10
    port: 8081
    protocol: tcp
    backends: *b
  - name: web-nat
    vip: 198.18.100.11
    port: 80
    protocol: tcp
    source_nat: true
    backends: *b
";

/// Linux gives a client's connections to different destinations the same local port (here
/// forced by binding it): a connection to each of three Services of the same backends from
/// one client port must all open and carry data, although Maglev alone sends about a third
/// of the second and third connections to a backend where the client already has that
/// port's connection (the same 4-tuple at the backend, which would take the new SYN for the
/// old connection's).
#[test]
fn one_client_port_opens_connections_to_three_services_of_the_same_backends() {
    let (lab, agent) = lab_with_agent(Some(SHARED_BACKENDS));
    let pred = Predictor::new(SHARED_BACKENDS);
    let ports = 23000..23030u16;
    lab.client
        .run_in(|| clients::wait_ports_free(ports.clone(), Duration::from_secs(10)))
        .expect("the client's ports free");
    let frontends = [
        ("web", sa(VIP_V4, 80)),
        ("web-alt", sa(VIP_V4, 8081)),
        ("web-nat", sa("198.18.100.11", 80)),
    ];
    let mut would_clash = 0;
    let mut open = Vec::new();
    for port in ports {
        let local = sa(CLIENT_V4, port);
        let mut taken: Vec<String> = Vec::new();
        for (name, vip) in frontends {
            let maglev = pred.backend_name(name, local);
            if taken.contains(&maglev) {
                would_clash += 1;
            }
            let mut c = lab
                .client
                .run_in(|| Echo::open_from(Some(local), vip, T))
                .unwrap_or_else(|e| panic!("port {port} to {name} ({taken:?} taken): {e}"));
            c.round_trip(&format!("{name} from {port}"))
                .unwrap_or_else(|e| panic!("port {port} to {name}: {e}"));
            assert!(
                !taken.contains(&c.backend),
                "port {port}: {name} on {} with another connection of that port ({taken:?})",
                c.backend
            );
            taken.push(c.backend.clone());
            open.push(c);
        }
    }
    assert!(
        would_clash >= 10,
        "Maglev alone would have put {would_clash} of 60 connections on a taken backend"
    );
    // Every connection still carries data, and the data plane counted what it avoided.
    for c in &mut open {
        c.round_trip("again")
            .unwrap_or_else(|e| panic!("{} on {}: {e}", c.local, c.backend));
    }
    let metrics = agent.metrics(&lab.lb);
    let avoided = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weir_flows_tuple_clash_total{outcome=\"avoided\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(avoided, Some(f64::from(would_clash)), "{metrics}");
}

/// Two Services of one backend (two ports of one pod, say).
const ONE_SHARED_BACKEND: &str = "\
node:
  interfaces: [eth-c]
admin:
  listen: 127.0.0.1:9300
services:
  - name: web
    vip: 198.18.100.10
    port: 80
    protocol: tcp
    backends: &b
      - { address: 198.18.1.11, port: 8080 }
  - name: web-alt
    vip: 198.18.100.10
    port: 8081
    protocol: tcp
    backends: *b
";

/// With one backend, a client's next connection from a port whose last connection went
/// through the other Service has nowhere else to go: the same 4-tuple at the backend. Once
/// the last connection is over (an HTTP exchange with `Connection: close`), the new one
/// opens, and its replies leave with its own Service's address and port, not the old one's
/// (reverse NAT that took the first frontend with an entry for the port failed here).
#[test]
fn a_client_port_reused_through_another_service_of_one_backend_opens_again() {
    let (lab, _agent) = lab_with_agent(Some(ONE_SHARED_BACKEND));
    let ports = 23100..23110u16;
    lab.client
        .run_in(|| clients::wait_ports_free(ports.clone(), Duration::from_secs(10)))
        .expect("the client's ports free");
    for port in ports.clone() {
        let local = sa(CLIENT_V4, port);
        // Back to the first Service, too: that key's entry is there, finished, and the
        // new connection takes it over.
        for vip in [sa(VIP_V4, 80), sa(VIP_V4, 8081), sa(VIP_V4, 80)] {
            let r = lab
                .client
                .run_in(|| clients::http_get(Some(local), vip, "/", T))
                .unwrap_or_else(|e| panic!("port {port} to {vip}: {e}"));
            assert_eq!(r.backend, "b1");
        }
    }
}
