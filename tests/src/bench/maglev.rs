//! Maglev table builds: weir's two-phase fill against the NSDI paper's fill, same machine, same
//! run, with the disruption each causes when one backend goes.

use std::time::Instant;

use lb_agent::maglev::{self, Entry, reference::Builder};

pub struct Row {
    pub table_size: u32,
    pub backends: usize,
    /// Median build time, ms.
    pub weir_ms: f64,
    pub paper_ms: f64,
    /// Worst share of the surviving backends' slots that move when one backend goes, %.
    pub weir_disruption: f64,
    pub paper_disruption: f64,
}

fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("198.18.{}.{}:8080", i / 250, i % 250 + 1))
        .collect()
}

fn median_ms(build: Builder, e: &[Entry<'_>], m: u32, runs: usize) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(build(std::hint::black_box(e), m, 0));
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn worst_disruption(build: Builder, e: &[Entry<'_>], m: u32, samples: usize) -> f64 {
    (0..samples)
        .map(|s| maglev::reference::disruption(build, e, m, s * e.len() / samples))
        .fold(0.0, f64::max)
}

pub fn run(quick: bool) -> Vec<Row> {
    let runs = if quick { 3 } else { 21 };
    let samples = if quick { 2 } else { 8 };
    let mut rows = Vec::new();
    for (m, n) in [
        (16381u32, 100usize),
        (16381, 1000),
        (65537, 100),
        (65537, 1000),
    ] {
        let k = keys(n);
        let e: Vec<Entry<'_>> = k
            .iter()
            .map(|k| Entry {
                key: k.as_bytes(),
                weight: 1,
            })
            .collect();
        rows.push(Row {
            table_size: m,
            backends: n,
            weir_ms: median_ms(maglev::build, &e, m, runs),
            paper_ms: median_ms(maglev::reference::paper_fill, &e, m, runs),
            weir_disruption: worst_disruption(maglev::build, &e, m, samples),
            paper_disruption: worst_disruption(maglev::reference::paper_fill, &e, m, samples),
        });
    }
    rows
}
