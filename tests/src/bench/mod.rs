//! `weir-lab bench`: the benchmarks, apart from the tests. Each one measures weir and its
//! baseline side by side in one run, on this machine, and `report` writes the figures with the
//! machine and the command into `docs/benchmarks.md`. Nothing here asserts on time.

pub mod maglev;
pub mod packet;
pub mod report;
pub mod throughput;

/// Runs every benchmark and returns the report as Markdown. The per-packet benchmark runs
/// three times, because this kind of machine varies from run to run.
pub fn run_all(quick: bool, command: &str) -> String {
    let machine = report::Machine::read();
    eprintln!("bench: Maglev builds");
    let mag = maglev::run(quick);
    eprintln!("bench: per-packet cost");
    let packets: Vec<packet::Report> = (0..if quick { 1 } else { 3 })
        .map(|_| packet::run(quick))
        .collect();
    eprintln!("bench: throughput");
    let tput = throughput::run(quick);
    report::markdown(&machine, command, &packets, &mag, &tput)
}
