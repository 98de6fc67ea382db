//! `weir-lab bench`: the benchmarks, apart from the tests. Each one measures weir and its
//! baseline side by side in one run, on this machine, and `report` writes the figures with the
//! machine and the command into `docs/benchmarks.md`. Nothing here asserts on time.

pub mod maglev;
pub mod packet;
pub mod report;
pub mod throughput;

/// Runs the benchmarks (all, or the one named by `only`: `maglev`, `packet`, `throughput`)
/// and returns the report as Markdown. The per-packet benchmark runs three times, because this
/// kind of machine varies from run to run.
pub fn run_all(quick: bool, command: &str, only: Option<&str>) -> String {
    let machine = report::Machine::read();
    let wanted = |name: &str| only.is_none_or(|o| o == name);
    let mut mag = Vec::new();
    if wanted("maglev") {
        eprintln!("bench: Maglev builds");
        mag = maglev::run(quick);
    }
    let mut packets = Vec::new();
    if wanted("packet") {
        eprintln!("bench: per-packet cost");
        packets = (0..if quick { 1 } else { 3 })
            .map(|_| packet::run(quick))
            .collect();
    }
    let mut tput = Vec::new();
    if wanted("throughput") {
        eprintln!("bench: throughput");
        tput = throughput::run(quick);
    }
    report::markdown(&machine, command, &packets, &mag, &tput)
}
