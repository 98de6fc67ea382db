//! BGP failover: the lab of `crate::bgplab` with one LB node and FRR (bgpd, bfdd, zebra) as
//! the router. Each trial fails the node — its agent frozen (SIGSTOP: the TCP session stays
//! open, the kernel still acknowledges) or its link set down — and measures from that moment
//! to the VIP route leaving the router's kernel table, then repairs the node and waits for
//! the route to come back. With BFD (100 ms × 3) and, as the baseline, without (hold time
//! 9 s, the lowest common setting; the RFC's suggested 90 s is ten times that).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    agent::wait_for,
    bgplab::{BgpLab, Peering, VIP4},
};

pub struct Report {
    /// (how the node failed, BFD on, failure → route withdrawn at the router per trial, ms).
    pub rows: Vec<(&'static str, bool, Vec<f64>)>,
}

fn server_bin() -> PathBuf {
    std::env::current_exe().expect("the weir-lab binary")
}

fn trial(lab: &mut BgpLab, link_down: bool, bfd: bool) -> Duration {
    // Steady state first: the route installed and, with BFD, BFD up on both sides (after a
    // repair the session may be back before BFD is).
    wait_for(
        Duration::from_secs(30),
        "the VIP route at the router",
        || (lab.fib(VIP4).len() == 1 && (!bfd || lab.bfd_up(0))).then_some(()),
    );
    let pid = lab.agents[0].as_ref().expect("agent").pid() as i32;
    let failed = Instant::now();
    if link_down {
        lab.lbs[0].ip("link set eth0 down");
    } else {
        // SAFETY: signalling a child process of this harness.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    wait_for(Duration::from_secs(30), "the route withdrawn", || {
        lab.fib(VIP4).is_empty().then_some(())
    });
    let took = failed.elapsed();
    if link_down {
        lab.lbs[0].ip("link set eth0 up");
    } else {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
    took
}

pub fn run(quick: bool) -> Report {
    let trials = if quick { 3 } else { 12 };
    let mut rows = Vec::new();
    for bfd in [true, false] {
        let peering = Peering {
            bfd,
            ipv6: false,
            ..Peering::default()
        };
        let mut lab = BgpLab::new(1, &server_bin(), peering);
        lab.start_frr();
        lab.start_agent(0);
        lab.wait_established(0);
        let cases: &[(&'static str, bool)] = if bfd {
            &[("agent frozen (SIGSTOP)", false), ("link down", true)]
        } else {
            &[("agent frozen (SIGSTOP)", false)]
        };
        for (name, link_down) in cases {
            let n = if bfd { trials } else { trials.min(3) };
            let mut ms = Vec::new();
            for t in 0..n {
                let took = trial(&mut lab, *link_down, bfd);
                eprintln!(
                    "bench: BGP {name}, BFD {}, trial {}: route withdrawn in {} ms",
                    if bfd { "on" } else { "off" },
                    t + 1,
                    took.as_millis()
                );
                ms.push(took.as_secs_f64() * 1000.0);
            }
            rows.push((*name, bfd, ms));
        }
    }
    Report { rows }
}
