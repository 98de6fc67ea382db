//! Agent restarts under load: the lab of `crate::lab` (one LB node, three backends behind a
//! bridge) with the agent on the embedded default config. The load: 30 long-lived TCP
//! connections through the VIP exchanging a line every 20 ms, and new HTTP connections back
//! to back (1 s timeout). Each trial SIGKILLs the agent, waits 3 s, starts it again and waits
//! until it is ready, then one more second; counted over that window: long-lived connections
//! reset, new connections failed, and the longest time without a successful new connection.
//! Side by side: weir as it runs (the data plane pinned, adopted by the next agent) and weir
//! with its data plane unpinned (`keep_on_exit: false` without a bpf filesystem: the data
//! plane goes with the agent, as it did before pinning).

use std::{
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    agent::Agent,
    clients::{self, Echo},
    lab::{Lab, VIP_V4},
};

pub struct Trial {
    pub resets: u32,
    pub long_lived: u32,
    pub failed: u32,
    pub attempted: u32,
    /// Longest time without a successful new connection, ms.
    pub gap_ms: f64,
}

pub struct Report {
    /// (variant, trials).
    pub rows: Vec<(&'static str, Vec<Trial>)>,
}

fn server_bin() -> PathBuf {
    std::env::current_exe().expect("the weir-lab binary")
}

pub fn run(quick: bool) -> Report {
    let trials = if quick { 1 } else { 3 };
    let mut rows = Vec::new();
    for (name, pinned) in [
        ("weir (pinned, adopted)", true),
        ("weir unpinned (baseline)", false),
    ] {
        let mut lab = Lab::new(3);
        lab.start_servers(&server_bin());
        let mut config = lb_agent::config::DEFAULT_CONFIG.to_string();
        if !pinned {
            // A directory on no bpf filesystem: the data plane runs unpinned.
            config.push_str(&format!(
                "dataplane:\n  pin_dir: {}\n  keep_on_exit: false\n",
                lab.dir.path.join("no-bpffs").display()
            ));
        }
        let mut agent = Agent::start(&lab.lb, &lab.dir.path, Some(&config));
        agent.wait_ready(&lab.lb);
        let mut out = Vec::new();
        for t in 0..trials {
            let (trial, next) = trial(&lab, agent, &config);
            agent = next;
            eprintln!(
                "bench: restart, {name}, trial {}: {}/{} long-lived reset, {}/{} new failed, longest gap {:.0} ms",
                t + 1,
                trial.resets,
                trial.long_lived,
                trial.failed,
                trial.attempted,
                trial.gap_ms
            );
            out.push(trial);
        }
        drop(agent);
        lab.kill_server(0);
        rows.push((name, out));
    }
    Report { rows }
}

fn trial(lab: &Lab, agent: Agent, config: &str) -> (Trial, Agent) {
    let vip = format!("{VIP_V4}:80").parse().expect("vip");
    let t = Duration::from_secs(1);
    let echoes: Vec<Echo> = lab.client.run_in(|| {
        (0..30)
            .map(|_| Echo::open(vip, Duration::from_secs(3)).expect("echo connection"))
            .collect()
    });
    let stop = AtomicBool::new(false);
    let (attempted, failed) = (AtomicU32::new(0), AtomicU32::new(0));
    let last_ok = Mutex::new(Instant::now());
    let gap = Mutex::new(Duration::ZERO);
    let resets = AtomicU32::new(0);
    let next = std::thread::scope(|s| {
        s.spawn(|| {
            lab.client.run_in(|| {
                while !stop.load(Ordering::Relaxed) {
                    attempted.fetch_add(1, Ordering::Relaxed);
                    if clients::http_get(None, vip, "/", t).is_ok() {
                        let now = Instant::now();
                        let mut last = last_ok.lock().expect("lock");
                        let mut g = gap.lock().expect("lock");
                        *g = (*g).max(now - *last);
                        *last = now;
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        });
        s.spawn(|| {
            lab.client.run_in(|| {
                let mut echoes = echoes;
                let mut alive = vec![true; echoes.len()];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for (k, e) in echoes.iter_mut().enumerate() {
                        if alive[k] && e.round_trip(&format!("r{i}")).is_err() {
                            alive[k] = false;
                            resets.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        });
        // Let the load settle, then the restart.
        std::thread::sleep(Duration::from_secs(1));
        *gap.lock().expect("lock") = Duration::ZERO;
        let (a0, f0) = (
            attempted.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
        let _ = agent.kill();
        std::thread::sleep(Duration::from_secs(3));
        let mut next = Agent::start(&lab.lb, &lab.dir.path, Some(config));
        next.wait_ready(&lab.lb);
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        attempted.fetch_sub(a0, Ordering::Relaxed);
        failed.fetch_sub(f0, Ordering::Relaxed);
        next
    });
    (
        Trial {
            resets: resets.load(Ordering::Relaxed),
            long_lived: 30,
            failed: failed.load(Ordering::Relaxed),
            attempted: attempted.load(Ordering::Relaxed),
            gap_ms: gap.lock().expect("lock").as_secs_f64() * 1000.0,
        },
        next,
    )
}
