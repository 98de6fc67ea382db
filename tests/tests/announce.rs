//! VIP announcement in the netns lab. L2 mode with three LB nodes on one link (a bridge in a
//! namespace of its own), a client and a backend beside them, each LB node running the real
//! agent with gossip between them: exactly one node answers ARP for the VIP; SIGKILL it and
//! the client's traffic resumes through another node, which takes the VIP over with a
//! gratuitous ARP. The backend is on the same link, so the LB nodes source-NAT (one-arm).
//! Needs root; the namespaces are the test's own and are removed afterwards.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use weir_lab::{
    agent::{Agent, wait_for},
    clients,
    lab::{HTTP_PORT, Proc, Scratch},
    netns::{Netns, parse_mac, veth},
    xdp::LabXdp,
};

const VIP: &str = "198.18.0.100";
const CLIENT: &str = "198.18.0.1";
const BACKEND: &str = "198.18.0.50";

fn server_bin() -> &'static str {
    env!("CARGO_BIN_EXE_weir-lab")
}

fn lb_addr(i: usize) -> String {
    format!("198.18.0.{}", 11 + i)
}

fn config(i: usize, n: usize) -> String {
    let peers: Vec<String> = (0..n)
        .filter(|j| *j != i)
        .map(|j| format!("{}:7946", lb_addr(j)))
        .collect();
    format!(
        "node:
  interfaces: [eth0]
  source_nat: {{ipv4: {me}}}
admin:
  listen: 127.0.0.1:9300
services:
  - name: web
    vip: {VIP}
    port: 80
    protocol: tcp
    source_nat: true
    backends: [{{address: {BACKEND}, port: {HTTP_PORT}}}]
announce:
  node_name: lb{n1}
  l2:
    interfaces: [eth0]
  gossip:
    listen: {me}:7946
    peers: [{peers}]
    interval: 100ms
    dead_after: 400ms
",
        me = lb_addr(i),
        n1 = i + 1,
        peers = peers.join(", ")
    )
}

fn arp_replies(agent: &Agent, ns: &Netns) -> f64 {
    agent
        .metrics(ns)
        .lines()
        .find(|l| l.starts_with("weir_dataplane_packets_total{path=\"arp_reply\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Whether the agent's log says it announces the VIP now (its last L2 line).
fn announcing(agent: &Agent) -> bool {
    agent
        .log_text()
        .lines()
        .rev()
        .find(|l| l.contains("L2: announced") || l.contains("L2: no longer announced"))
        .is_some_and(|l| l.contains("L2: announced"))
}

/// The MAC the client's neighbour table has for the VIP.
fn vip_mac(client: &Netns) -> Option<[u8; 6]> {
    let neigh = client.ip(&format!("neigh show {VIP}"));
    neigh.split("lladdr ").nth(1).map(|m| parse_mac(&m[..17]))
}

#[test]
fn l2_failover_moves_the_vip_to_a_live_node() {
    weir_lab::netns::require_root();
    const N: usize = 3;
    let sw = Netns::new("sw");
    sw.ip("link add br0 type bridge");
    sw.ip("link set br0 up");
    let client = Netns::new("client");
    let backend = Netns::new("backend");
    let lbs: Vec<Netns> = (0..N)
        .map(|i| Netns::new(&format!("lb{}", i + 1)))
        .collect();
    let mut ports = Vec::new();
    let mut attach = |ns: &Netns, port: &str| {
        veth(ns, "eth0", &sw, port);
        sw.ip(&format!("link set {port} master br0"));
        // Frames a node sends back with XDP_TX reach the bridge only through a peer that
        // runs XDP itself (see `weir_lab::lab`).
        ports.push(LabXdp::attach(&sw, port, "lab_pass"));
    };
    attach(&client, "p-c");
    attach(&backend, "p-b");
    for (i, lb) in lbs.iter().enumerate() {
        attach(lb, &format!("p-{}", i + 1));
    }
    client.ip(&format!("addr add {CLIENT}/24 dev eth0"));
    backend.ip(&format!("addr add {BACKEND}/24 dev eth0"));
    // Complete checksums from the stacks whose packets XDP rewrites.
    for ns in [&client, &backend] {
        ns.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
    }
    let macs: Vec<[u8; 6]> = lbs
        .iter()
        .enumerate()
        .map(|(i, lb)| {
            lb.ip(&format!("addr add {}/24 dev eth0", lb_addr(i)));
            lb.sysctl("net.ipv4.ip_forward", "1");
            lb.sysctl("net.ipv4.conf.all.rp_filter", "0");
            lb.exec(&["ethtool", "-K", "eth0", "gro", "on"]);
            // The backend's neighbour entry, so that the first flow is sent by XDP itself.
            lb.exec(&["ping", "-c", "1", "-W", "2", BACKEND]);
            lb.mac("eth0")
        })
        .collect();
    let _server = {
        use std::io::BufRead as _;
        let mut child = backend
            .command(server_bin())
            .args([
                "serve",
                "--name",
                "b1",
                "--http",
                &format!("{BACKEND}:{HTTP_PORT}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        assert_eq!(line.trim(), "ready");
        Proc { child }
    };
    let dirs: Vec<Scratch> = (0..N).map(|_| Scratch::new()).collect();
    let mut agents: Vec<Option<Agent>> = lbs
        .iter()
        .enumerate()
        .map(|(i, lb)| {
            let mut a = Agent::start(lb, &dirs[i].path, Some(&config(i, N)));
            a.wait_ready(lb);
            Some(a)
        })
        .collect();

    let vip: SocketAddr = SocketAddr::new(VIP.parse().unwrap(), 80);
    let get = |timeout: Duration| client.run_in(|| clients::http_get(None, vip, "/", timeout));
    // Once the nodes hear each other, exactly one of them announces the VIP.
    let owner = wait_for(
        Duration::from_secs(10),
        "one node announcing the VIP",
        || {
            let on: Vec<usize> = (0..N)
                .filter(|i| announcing(agents[*i].as_ref().unwrap()))
                .collect();
            (on.len() == 1).then(|| on[0])
        },
    );

    // Only it answers: a fresh resolution moves its counter and no other's, and the client
    // reaches the service through it.
    let before: Vec<f64> = (0..N)
        .map(|i| arp_replies(agents[i].as_ref().unwrap(), &lbs[i]))
        .collect();
    client.ip(&format!("neigh flush {VIP}"));
    let r = get(Duration::from_secs(2)).expect("GET through the owner");
    assert_eq!((r.status, r.backend.as_str()), (200, "b1"));
    let owner_mac = vip_mac(&client).expect("the VIP resolved");
    assert_eq!(owner_mac, macs[owner], "resolved to the announcing node");
    let answered = wait_for(Duration::from_secs(5), "the ARP answer counted", || {
        let after: Vec<f64> = (0..N)
            .map(|i| arp_replies(agents[i].as_ref().unwrap(), &lbs[i]))
            .collect();
        let d: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        (d[owner] >= 1.0).then_some(d)
    });
    for (i, d) in answered.iter().enumerate() {
        if i != owner {
            assert_eq!(*d, 0.0, "node {} answered too: {answered:?}", i + 1);
        }
    }

    // The owner's agent dies without a word. Its data plane stays attached and keeps
    // forwarding what reaches it, but its lease runs out when the others declare it dead; the
    // new owner's gratuitous ARP moves the client, whose traffic then goes through it.
    agents[owner].as_ref().unwrap().signal(libc::SIGKILL);
    let killed = Instant::now();
    let new_mac = wait_for(
        Duration::from_secs(10),
        "the client moved to another node",
        || {
            let mac = vip_mac(&client).filter(|m| *m != owner_mac)?;
            get(Duration::from_millis(200)).ok().map(|_| mac)
        },
    );
    let took = killed.elapsed();
    let new_owner = macs
        .iter()
        .position(|m| *m == new_mac)
        .expect("an LB node's MAC");
    assert_ne!(new_owner, owner);
    eprintln!(
        "L2 failover after SIGKILL of the owner's agent: {} ms (first success through the new owner)",
        took.as_millis()
    );
    // Only the new owner answers now: a fresh resolution finds it, not the dead node.
    for _ in 0..3 {
        client.ip(&format!("neigh flush {VIP}"));
        assert_eq!(get(Duration::from_secs(2)).expect("GET").status, 200);
        assert_eq!(
            vip_mac(&client),
            Some(new_mac),
            "resolved to the new owner only"
        );
    }
    drop(agents[owner].take());
    for a in agents.into_iter().flatten() {
        assert!(a.stop().success());
    }
}
