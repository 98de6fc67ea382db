//! `weir-lab demo`: the standalone lab (see `lab`) with `lb-agent run` on its embedded default
//! config, and a tour of what it carries. Everything is removed at the end, also on Ctrl-C.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use crate::{
    agent::Agent,
    clients,
    lab::{CLIENT_V4, Lab, VIP_V4, VIP_V6},
    sctp,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

const T: Duration = Duration::from_secs(3);

/// `n` GETs to `addr` from the client: the backend that answered each.
fn gets(lab: &Lab, addr: SocketAddr, n: usize) -> Vec<String> {
    lab.client.run_in(|| {
        (0..n)
            .filter_map(|_| {
                clients::http_get(None, addr, "/", T)
                    .ok()
                    .map(|r| r.backend)
            })
            .collect()
    })
}

fn share(results: &[String]) -> String {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results {
        *m.entry(r.as_str()).or_default() += 1;
    }
    m.iter()
        .map(|(b, n)| format!("{b}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Backend `b` of service web as the admin API shows it: state and last failure.
fn health(agent: &Agent, lab: &Lab, b: SocketAddr) -> String {
    let v = agent.services(&lab.lb);
    let e = crate::agent::backend_entry(&v, "web", b);
    format!(
        "{} ({})",
        e["state"].as_str().unwrap_or("?"),
        e["last_failure"]["detail"]
            .as_str()
            .unwrap_or("no failure yet")
    )
}

/// Waits until backend `b` of web is in `state`; the time since `since`.
fn wait_state(
    agent: &Agent,
    lab: &Lab,
    b: SocketAddr,
    state: &str,
    since: std::time::Instant,
) -> Result<Duration, String> {
    while since.elapsed() < Duration::from_secs(30) {
        if health(agent, lab, b).starts_with(state) {
            return Ok(since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("{b} not {state} within 30 s"))
}

pub fn run(hold: bool) -> Result<(), String> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    println!("== building the lab: client, LB node, backends b1..b3 (network namespaces)");
    let mut lab = Lab::new(3);
    lab.start_servers(&me);
    println!("== starting lb-agent run (embedded default config) on the LB node");
    let mut agent = Agent::start(&lab.lb, &lab.dir.path, None);
    agent.wait_ready(&lab.lb);
    let (_, ready) = agent.get(&lab.lb, "/readyz").unwrap_or_default();
    println!("   /readyz: {}", ready.trim());

    let web: SocketAddr = format!("{VIP_V4}:80").parse().map_err(|e| format!("{e}"))?;
    let got = gets(&lab, web, 30);
    println!("== 30 HTTP GETs to http://{web}/ (service web, Maglev over 3 backends)");
    println!("   {}", share(&got));

    let sticky: SocketAddr = "198.18.100.11:80".parse().map_err(|e| format!("{e}"))?;
    let got = gets(&lab, sticky, 10);
    println!("== 10 GETs to http://{sticky}/ (web-sticky: ClientIP affinity, source ranges)");
    println!("   {}", share(&got));

    let web6: SocketAddr = format!("[{VIP_V6}]:80")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let got = gets(&lab, web6, 10);
    println!("== 10 GETs to http://{web6}/ (IPv6)");
    println!("   {}", share(&got));

    let echo: SocketAddr = format!("{VIP_V4}:7").parse().map_err(|e| format!("{e}"))?;
    let client: std::net::IpAddr = CLIENT_V4.parse().map_err(|e| format!("{e}"))?;
    let got: Vec<String> = lab.client.run_in(|| {
        (0..10u16)
            .filter_map(|i| {
                clients::udp_request(SocketAddr::new(client, 50000 + i), echo, b"hello", T)
                    .ok()
                    .map(|(b, _, _)| b)
            })
            .collect()
    });
    println!("== 10 UDP datagrams to {echo} (echo-udp)");
    println!("   {}", share(&got));

    let diameter: SocketAddr = format!("{VIP_V4}:3868")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let ack = lab
        .client
        .run_in(|| sctp::init(client, 40000, diameter, T))
        .map_err(|e| format!("SCTP INIT to {diameter}: {e}"))?;
    println!(
        "== SCTP INIT to {diameter} (diameter): INIT-ACK from {}:{}, {}",
        ack.from, ack.sport, ack.cookie
    );

    let ping = lab
        .client
        .try_exec(&["ping", "-c", "3", "-i", "0.2", "-W", "1", VIP_V4]);
    println!(
        "== ping {VIP_V4}: {}",
        ping.map_or_else(
            |e| e,
            |out| out.lines().rev().nth(1).unwrap_or("").to_string()
        )
    );
    if let Some((_, status)) = agent.get(&lab.lb, "/api/v1/status") {
        println!("== /api/v1/status: {}", status.trim());
    }

    // Health checks: web is checked with GET /healthz every 100 ms, fall 3.
    let b2: SocketAddr = format!("{}:8080", lab.backends[1].v4)
        .parse()
        .map_err(|e| format!("{e}"))?;
    println!(
        "== health of b2 in service web: {}",
        health(&agent, &lab, b2)
    );
    println!("== killing b2's server (SIGKILL)");
    let killed = std::time::Instant::now();
    lab.kill_server(1);
    let took = wait_state(&agent, &lab, b2, "down", killed)?;
    println!(
        "   weir took b2 out of rotation after {} ms: {}",
        took.as_millis(),
        health(&agent, &lab, b2)
    );
    let got = gets(&lab, web, 30);
    println!("== 30 GETs to http://{web}/ without b2");
    println!("   {}", share(&got));
    lab.start_server(&me, 1);
    let back = wait_state(&agent, &lab, b2, "up", killed)?;
    println!(
        "== b2's server restarted: back in rotation {} ms after the kill (rise 2)",
        back.as_millis()
    );

    // What the agent counted, as an operator sees it (the counters are sampled every second).
    std::thread::sleep(lb_agent::status::traffic::SAMPLE_EVERY * 2);
    let bin = crate::agent::agent_binary();
    let bin = bin.to_str().ok_or("agent path")?;
    let status = lab.lb.try_exec(&[bin, "status"])?;
    println!("== lb-agent status\n{status}");

    if hold {
        let (c, l) = (lab.client.name(), lab.lb.name());
        println!(
            "\nThe lab is up. Try, from another shell:\n  ip netns exec {c} curl -s http://{VIP_V4}/\n  ip netns exec {c} curl -s 'http://[{VIP_V6}]/'\n  ip netns exec {l} {bin} status\n  ip netns exec {l} curl -s http://127.0.0.1:9300/api/v1/services\n  ip netns exec {l} curl -s http://127.0.0.1:9300/metrics\n  ip netns exec {l} curl -s 'http://127.0.0.1:9300/api/v1/lookup?client={CLIENT_V4}:40000&vip={VIP_V4}:80'\nThe agent's log: {}\nCtrl-C removes everything.",
            agent.log.display()
        );
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("== stopping the agent (SIGTERM) and removing the lab");
    let status = agent.stop();
    lab.kill_server(0);
    if !status.success() {
        return Err(format!("lb-agent exited with {status}"));
    }
    Ok(())
}
