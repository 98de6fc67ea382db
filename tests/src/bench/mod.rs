//! `weir-lab bench`: the benchmarks, apart from the tests. Each one measures weir and its
//! baseline side by side in one run, on this machine, and `report` writes the figures with the
//! machine and the command into `docs/benchmarks.md`. Nothing here asserts on time.

pub mod bgp;
pub mod clusterip;
pub mod health;
pub mod l2;
pub mod maglev;
pub mod nodeport;
pub mod packet;
pub mod report;
pub mod restart;
pub mod scale;
pub mod throughput;

/// The benchmarks `--only` can name.
pub const NAMES: [&str; 13] = [
    "packet",
    "maglev",
    "throughput",
    "nodeport",
    "clusterip",
    "scale",
    "prune",
    "probes",
    "l2",
    "bgp",
    "restart",
    "synflood",
    "fuzz",
];

/// Runs the benchmarks (all, or the one named by `only`) and returns the report as Markdown:
/// the whole document, or, with `only` and a `previous` document, that document with the
/// sections just measured replaced. The per-packet benchmark runs three times, because this
/// kind of machine varies from run to run.
pub fn run_all(quick: bool, command: &str, only: Option<&str>, previous: Option<&str>) -> String {
    let m = report::Machine::read();
    let wanted = |name: &str| only.is_none_or(|o| o == name);
    let mut sections = Vec::new();
    if wanted("packet") {
        eprintln!("bench: per-packet cost");
        let packets: Vec<_> = (0..if quick { 1 } else { 3 })
            .map(|_| packet::run(quick))
            .collect();
        sections.push(report::packet_section(&m, command, &packets));
    }
    if wanted("maglev") {
        eprintln!("bench: Maglev builds");
        sections.push(report::maglev_section(&m, command, &maglev::run(quick)));
    }
    if wanted("throughput") {
        eprintln!("bench: throughput");
        sections.push(report::throughput_section(
            &m,
            command,
            &throughput::run(quick),
        ));
    }
    if wanted("nodeport") {
        eprintln!("bench: NodePort throughput");
        sections.push(report::nodeport_section(&m, command, &nodeport::run(quick)));
    }
    if wanted("clusterip") {
        eprintln!("bench: ClusterIP from the node");
        sections.push(report::clusterip_section(
            &m,
            command,
            &clusterip::run(quick),
        ));
    }
    if wanted("scale") {
        eprintln!("bench: Kubernetes at scale");
        sections.push(report::scale_section(&m, command, &scale::run(quick)));
    }
    if wanted("prune") {
        eprintln!("bench: health checks, time to prune");
        sections.push(report::prune_section(
            &m,
            command,
            &health::run_prune(quick),
        ));
    }
    if wanted("probes") {
        eprintln!("bench: health checks, probe cost");
        sections.push(report::probe_cost_section(
            &m,
            command,
            &health::run_cpu(quick),
        ));
    }
    if wanted("l2") {
        eprintln!("bench: L2 failover");
        sections.push(report::l2_section(&m, command, &l2::run(quick)));
    }
    if wanted("bgp") {
        eprintln!("bench: BGP failover");
        sections.push(report::bgp_section(&m, command, &bgp::run(quick)));
    }
    if wanted("restart") {
        eprintln!("bench: agent restarts under load");
        sections.push(report::restart_section(&m, command, &restart::run(quick)));
    }
    if wanted("synflood") {
        eprintln!("bench: SYN flood");
        sections.push(report::synflood_section(&m, command, &synflood(quick)));
    }
    if wanted("fuzz") {
        eprintln!("bench: frame fuzzing");
        let n = if quick { 100_000 } else { 1_000_000 };
        // A new seed each run (printed in the report, so that a failure can be replayed).
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs());
        sections.push(report::fuzz_section(
            &m,
            command,
            &crate::framefuzz::run(n, seed),
        ));
    }
    match (only, previous) {
        (Some(_), Some(doc)) => report::splice(doc, &sections),
        _ => report::head() + &sections.concat(),
    }
}

/// The SYN-flood scenario (`crate::flood`) with this build's agent and, when
/// `WEIR_BASELINE_AGENT` names one (`scripts/bench` builds it from `WEIR_BASELINE_REV`), an
/// earlier build's: (variant, report).
fn synflood(quick: bool) -> Vec<(String, crate::flood::Report)> {
    let serve = std::env::current_exe().expect("the weir-lab binary");
    let idle = std::time::Duration::from_secs(if quick { 12 } else { 30 });
    let mut rows = vec![(
        "weir (this build)".to_string(),
        crate::flood::run(&serve, None, idle),
    )];
    if let Some(bin) = std::env::var_os("WEIR_BASELINE_AGENT") {
        let rev = std::env::var("WEIR_BASELINE_REV").unwrap_or_else(|_| "baseline".into());
        rows.push((
            format!("weir {rev} (before)"),
            crate::flood::run(&serve, Some(std::path::Path::new(&bin)), idle),
        ));
    }
    rows
}
