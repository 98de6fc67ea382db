//! L2 failover: the lab of `crate::l2lab` (three LB nodes with gossip on one link); each trial
//! SIGKILLs the owner's agent and measures the time to the client's first success through the
//! new owner, then starts the agent again and waits for one owner.

use std::{path::PathBuf, time::Duration};

use crate::l2lab::L2Lab;

pub struct Report {
    pub nodes: usize,
    /// Kill → first success through the new owner, per trial (ms).
    pub failover_ms: Vec<f64>,
}

fn server_bin() -> PathBuf {
    std::env::current_exe().expect("the weir-lab binary")
}

pub fn run(quick: bool) -> Report {
    const NODES: usize = 3;
    let trials = if quick { 3 } else { 12 };
    let mut lab = L2Lab::new(NODES, &server_bin());
    let mut failover_ms = Vec::new();
    for t in 0..trials {
        let (old, new, took) = lab.failover();
        eprintln!(
            "bench: L2 trial {}: lb{} killed, lb{} took over in {} ms",
            t + 1,
            old + 1,
            new + 1,
            took.as_millis()
        );
        failover_ms.push(took.as_secs_f64() * 1000.0);
        lab.start_agent(old);
        lab.owner();
        // The VIP may move back to the restarted node (it may rank first): let the client
        // find the current owner before the next trial.
        lab.get(Duration::from_secs(5)).expect("the VIP reachable");
    }
    Report {
        nodes: NODES,
        failover_ms,
    }
}
