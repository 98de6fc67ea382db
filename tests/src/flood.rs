//! The SYN-flood lab scenario (the hardening test and `weir-lab bench --only synflood`): the
//! lab's generator sends spoofed SYNs (64 000 sources of 198.19.0.0/16) at two VIPs for as
//! long as idle connections wait for their backend to speak first, while 100 established
//! connections exchange lines and new connections are opened; then how soon new flows find
//! source-NAT ports again.
//!
//! The lab: the standalone lab (backends behind a Linux bridge), small tables (8192
//! connections, a 1000-port source-NAT range per backend endpoint), and the same three
//! backends behind two VIPs, as a Service reachable at its load-balancer address and an
//! external IP: `web` (198.18.100.10), which the connections use, and `web-nat`
//! (198.18.100.11), which source-NATs (in this topology the kernel forwards to the backends,
//! so its flows leave destination-NATed, and their source-NAT ports are taken all the same).
//! With two frontends per backend, reverse NAT needs each reply's flow to know which VIP to
//! put back.
//!
//! Lab-only: the flood comes in on a link of its own (`f0` ── `eth-f`, one of weir's
//! interfaces), which stands in for a receive queue of its own on a multi-queue NIC (RSS
//! spreads flows over queues): a veth has one queue, and a flood at full rate fills its ring
//! and drops the frames of everything sharing it before any program sees them. `eth-f`'s
//! receive processing runs on CPU 1 (threaded NAPI), as a queue's interrupt on a core of its
//! own; the generator runs on CPU 0. The connections are opened from CPU 1 too: the tables'
//! LRU lists are per CPU, and a flood evicts among the entries of its own CPU.

use std::{
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    agent::{Agent, sample},
    clients::Echo,
    lab::{CLIENT_V4, Lab, VIP_V4},
    netns::{Netns, pin_to_cpu, veth},
    spoof::SynFlood,
};

const CONFIG: &str = "\
node:
  interfaces: [eth-c, eth-f]
  source_nat: {ports: 61000-61999, ipv4: 198.18.1.1}
admin:
  listen: 127.0.0.1:9300
dataplane:
  conntrack_size: 8192
services:
  - name: web
    vip: 198.18.100.10
    port: 80
    protocol: tcp
    backends:
      - { address: 198.18.1.11, port: 8080 }
      - { address: 198.18.1.12, port: 8080 }
      - { address: 198.18.1.13, port: 8080 }
  - name: web-nat
    vip: 198.18.100.11
    port: 80
    protocol: tcp
    source_nat: true
    backends:
      - { address: 198.18.1.11, port: 8080 }
      - { address: 198.18.1.12, port: 8080 }
      - { address: 198.18.1.13, port: 8080 }
";

const T: Duration = Duration::from_secs(3);

/// What one run saw.
#[derive(Debug, Default)]
pub struct Report {
    /// SYNs the generator offered, and at what rate (per second).
    pub offered: u64,
    pub offered_pps: f64,
    /// Packets weir forwarded to the backends during the flood (the flood's SYNs, and the
    /// connections' packets).
    pub forwarded: u64,
    pub flood_secs: f64,
    /// The established connections: round trips, the slowest, and segments sent and
    /// retransmitted by both ends.
    pub round_trips: u64,
    pub slowest_ms: u64,
    pub segments: u64,
    pub retransmitted: u64,
    /// Connections that failed (established or idle), with why.
    pub broken: Vec<String>,
    pub idle: usize,
    pub busy: usize,
    /// New connections opened to `web-nat` during the flood, of `NEW_DURING`.
    pub new_during: usize,
    /// Of those, how many needed a retransmitted SYN (took a second or more), and why the
    /// others failed.
    pub new_retried: usize,
    pub new_failed: Vec<String>,
    /// Source-NAT ports taken from half-open flows (None: the agent does not count them).
    pub ports_from_half_open: Option<u64>,
    /// Seconds after the flood until new flows found free or expired source-NAT ports
    /// without taking any from a half-open flow (None: not within `PORTS_BACK_WAIT`, or the
    /// agent does not count them).
    pub ports_back_secs: Option<f64>,
}

impl Report {
    /// Segments of the established connections that went through without retransmission.
    pub fn delivered(&self) -> f64 {
        if self.segments == 0 {
            return 0.0;
        }
        1.0 - self.retransmitted as f64 / self.segments as f64
    }
}

pub const NEW_DURING: usize = 30;
/// A new connection's time to connect and read its greeting: three SYNs (0, 1, 3 s) and a
/// round trip.
const NEW_TIMEOUT: Duration = Duration::from_secs(5);
const PORTS_BACK_WAIT: Duration = Duration::from_secs(20);

/// Sums of `ss -ti` over the established connections in `ns` to `dst` (an address, or
/// address:port): (segments sent, segments retransmitted).
fn segments(ns: &Netns, dst: &str) -> (u64, u64) {
    let out = ns.exec(&["ss", "-Htin", "state", "established", "dst", dst]);
    let field = |word: &str, key: &str| -> Option<u64> {
        word.strip_prefix(key)?.split('/').next_back()?.parse().ok()
    };
    out.split_whitespace().fold((0, 0), |(sent, retrans), w| {
        (
            sent + field(w, "segs_out:").unwrap_or(0),
            retrans + field(w, "retrans:").unwrap_or(0),
        )
    })
}

/// Stops the flood however a run ends (a panic included).
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs the scenario with the agent binary `agent` (None: this build's) and servers `serve`
/// (the `weir-lab` binary); idle connections wait `idle` for their backend.
pub fn run(serve: &Path, agent: Option<&Path>, idle: Duration) -> Report {
    let mut lab = Lab::new(3);
    lab.start_servers(serve);
    veth(&lab.client, "f0", &lab.lb, "eth-f");
    lab.client.ip("addr add 198.18.3.1/24 dev f0");
    lab.lb.ip("addr add 198.18.3.254/24 dev eth-f");
    // The SYN-ACKs to the spoofed sources leave that way, as replies to spoofed addresses
    // leave towards the internet (where nobody answers them).
    lab.lb.ip("route add 198.19.0.0/16 via 198.18.3.1");
    let mut agent = match agent {
        Some(bin) => Agent::start_bin(bin, &lab.lb, &lab.dir.path, Some(CONFIG)),
        None => Agent::start(&lab.lb, &lab.dir.path, Some(CONFIG)),
    };
    agent.wait_ready(&lab.lb);
    // A veth has NAPI once it runs XDP.
    crate::bench::throughput::pin_napi(&lab.lb, "eth-f", 1);
    let vip: SocketAddr = format!("{VIP_V4}:80").parse().expect("vip");
    let vip_nat: SocketAddr = "198.18.100.11:80".parse().expect("vip");
    let (mut busy, idlers): (Vec<Echo>, Vec<Echo>) = lab.client.run_in(|| {
        pin_to_cpu(1);
        let open = |_| Echo::open(vip, T).expect("echo connection");
        ((0..100).map(open).collect(), (0..20).map(open).collect())
    });
    let mut report = Report {
        idle: idlers.len(),
        busy: busy.len(),
        ..Report::default()
    };
    let metric = |text: &str, series: &str| sample(text, series).map(|v| v as u64);
    let forwarded_series = [
        "weir_service_packets_total{service=\"web\",vip=\"198.18.100.10\",port=\"80\",protocol=\"tcp\",direction=\"in\"}",
        "weir_service_packets_total{service=\"web-nat\",vip=\"198.18.100.11\",port=\"80\",protocol=\"tcp\",direction=\"in\"}",
    ];
    let half_open_series = "weir_snat_ports_taken_total{from=\"half_open\"}";
    let before = agent.metrics(&lab.lb);
    // Segments of the connections, from both ends.
    let ends = || {
        let mut all = vec![segments(&lab.client, &vip.to_string())];
        all.extend(lab.backends.iter().map(|b| segments(&b.ns, CLIENT_V4)));
        all.iter().fold((0, 0), |(s, r), (s2, r2)| (s + s2, r + r2))
    };
    let (segments_before, retrans_before) = ends();
    let floods = [vip, vip_nat].map(|to| {
        let SocketAddr::V4(to) = to else {
            unreachable!("IPv4 VIPs")
        };
        SynFlood::new(
            &lab.client,
            "f0",
            lab.lb.mac("eth-f"),
            "198.19.0.0".parse().expect("sources"),
            to,
        )
    });
    let stop = AtomicBool::new(false);
    let (sent, flood_ms) = (AtomicU64::new(0), AtomicU64::new(0));
    let (round_trips, slowest_ms) = (AtomicU64::new(0), AtomicU64::new(0));
    let flood_for = idle + Duration::from_secs(1);
    thread::scope(|s| {
        let _stop = Stop(&stop);
        // The flood lasts until just after the idle connections' backends spoke: one
        // generator per VIP, taking turns on CPU 0.
        let flooding = s.spawn(|| {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < flood_for {
                for flood in &floods {
                    let took = flood.send(&lab.client, 100_000, 0);
                    sent.fetch_add(100_000, Ordering::Relaxed);
                    flood_ms.fetch_add(took.as_millis() as u64, Ordering::Relaxed);
                }
            }
        });
        let waiting: Vec<_> = idlers
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                s.spawn(move || {
                    // The backend speaks during the flood, whose load may drop its segment:
                    // its retransmissions have time to come through (the connection's
                    // entries must still be there for them).
                    e.backend_first(idle, &format!("idle-{i}"), Duration::from_secs(30))
                        .and_then(|()| e.round_trip(&format!("after-{i}")))
                        .map_err(|err| format!("idle connection {i} to {}: {err}", e.backend))
                })
            })
            .collect();
        let talking: Vec<_> = busy
            .iter_mut()
            .enumerate()
            .map(|(i, e)| {
                let (stop, round_trips, slowest_ms) = (&stop, &round_trips, &slowest_ms);
                s.spawn(move || {
                    e.set_timeout(Duration::from_secs(20))
                        .map_err(|err| err.to_string())?;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        e.round_trip(&format!("busy-{i}-{n}")).map_err(|err| {
                            format!("established connection {i} to {}: {err}", e.backend)
                        })?;
                        slowest_ms.fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                        round_trips.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                        thread::sleep(Duration::from_millis(100));
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        // New connections while the flood holds the source-NAT ranges.
        thread::sleep(Duration::from_secs(5).min(idle / 2));
        // From CPU 1 as well, where the flood's entries push out the handshakes' own. A
        // connect waits as long as three SYNs take (Linux sends them at 0, 1 and 3 s): a
        // handshake slower than its half-open entry's life under the flood (the per-CPU share
        // of the half-open table over the flood's SYN rate on that CPU) loses its SYN-ACK's
        // translation and is retried by the client, as it is on any stateful middlebox; how
        // many needed that is reported. Linux may give one of them the local port of an
        // established connection to `web`: weir steers it clear of that connection's backend
        // (the same 4-tuple there would never open; see `weir_flows_tuple_clash_total`).
        let outcomes: Vec<Result<Duration, String>> = lab.client.run_in(|| {
            pin_to_cpu(1);
            (0..NEW_DURING)
                .map(|i| {
                    let start = Instant::now();
                    Echo::open(vip_nat, NEW_TIMEOUT)
                        .map(|_| start.elapsed())
                        .map_err(|e| format!("new connection {i}: {e}"))
                })
                .collect()
        });
        for outcome in outcomes {
            match outcome {
                Ok(took) => {
                    report.new_during += 1;
                    if took >= Duration::from_secs(1) {
                        report.new_retried += 1;
                    }
                }
                Err(e) => report.new_failed.push(e),
            }
        }
        for h in waiting {
            if let Err(e) = h.join().expect("idle connection thread") {
                report.broken.push(e);
            }
        }
        stop.store(true, Ordering::Relaxed);
        for h in talking {
            if let Err(e) = h.join().expect("established connection thread") {
                report.broken.push(e);
            }
        }
        flooding.join().expect("flood thread");
    });
    let stopped = Instant::now();
    let after = agent.metrics(&lab.lb);
    let (segments_now, retrans_now) = ends();
    report.offered = sent.into_inner();
    report.flood_secs = flood_ms.into_inner() as f64 / 1000.0;
    report.offered_pps = report.offered as f64 / report.flood_secs.max(0.001);
    report.forwarded = forwarded_series
        .iter()
        .map(|s| metric(&after, s).unwrap_or(0) - metric(&before, s).unwrap_or(0))
        .sum();
    report.round_trips = round_trips.into_inner();
    report.slowest_ms = slowest_ms.into_inner();
    report.segments = segments_now.saturating_sub(segments_before);
    report.retransmitted = retrans_now.saturating_sub(retrans_before);
    report.ports_from_half_open = metric(&after, half_open_series)
        .map(|n| n - metric(&before, half_open_series).unwrap_or(0));
    if report.ports_from_half_open.is_some() {
        report.ports_back_secs = ports_back(&lab, &agent, vip_nat, stopped);
    }
    report
}

/// Seconds after `stopped` until three new flows in a row find free or expired source-NAT
/// ports and take none from a half-open flow.
fn ports_back(lab: &Lab, agent: &Agent, vip: SocketAddr, stopped: Instant) -> Option<f64> {
    let taken = |text: &str| {
        ["free", "expired", "half_open"].map(|from| {
            sample(
                text,
                &format!("weir_snat_ports_taken_total{{from=\"{from}\"}}"),
            )
            .map_or(0, |v| v as u64)
        })
    };
    while stopped.elapsed() < PORTS_BACK_WAIT {
        let before = taken(&agent.metrics(&lab.lb));
        let opened = lab
            .client
            .run_in(|| (0..3).filter(|_| Echo::open(vip, T).is_ok()).count());
        // The counters are sampled once a second: wait for the three new flows' ports.
        let deadline = Instant::now() + T;
        let mut counted = None;
        while Instant::now() < deadline {
            let now = taken(&agent.metrics(&lab.lb));
            let d = [0, 1, 2].map(|i| now[i] - before[i]);
            if d.iter().sum::<u64>() >= 3 {
                counted = Some(d);
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if let Some([free, expired, 0]) = counted
            && opened == 3
            && free + expired == 3
        {
            return Some(stopped.elapsed().as_secs_f64());
        }
    }
    None
}
