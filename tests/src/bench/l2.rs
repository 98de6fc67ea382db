//! L2 failover: the lab of `crate::l2lab` (three LB nodes with gossip on one link). Each trial
//! fails the owner — its agent SIGKILLed, or its link set down — and measures the time to the
//! client's first success through the new owner, then repairs it and waits for one owner.

use std::{path::PathBuf, time::Duration};

use crate::l2lab::L2Lab;

pub struct Report {
    pub nodes: usize,
    /// (how the owner failed, failure → first success through the new owner per trial, ms).
    pub rows: Vec<(&'static str, Vec<f64>)>,
}

fn server_bin() -> PathBuf {
    std::env::current_exe().expect("the weir-lab binary")
}

pub fn run(quick: bool) -> Report {
    const NODES: usize = 3;
    let trials = if quick { 3 } else { 12 };
    let mut lab = L2Lab::new(NODES, &server_bin());
    let mut rows = Vec::new();
    for (name, link_down) in [("agent SIGKILLed", false), ("link down", true)] {
        let mut ms = Vec::new();
        for t in 0..trials {
            let (old, new, took) = lab.fail_owner(link_down);
            eprintln!(
                "bench: L2 {name}, trial {}: lb{} failed, lb{} took over in {} ms",
                t + 1,
                old + 1,
                new + 1,
                took.as_millis()
            );
            ms.push(took.as_secs_f64() * 1000.0);
            if link_down {
                lab.lbs[old].ip("link set eth0 up");
            } else {
                lab.start_agent(old);
            }
            lab.owner();
            // The VIP may move back to the repaired node (it may rank first): let the client
            // find the current owner before the next trial.
            lab.get(Duration::from_secs(5)).expect("the VIP reachable");
        }
        rows.push((name, ms));
    }
    Report { nodes: NODES, rows }
}
