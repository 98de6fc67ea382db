//! The yardsticks [`super::build`] is measured against, for the tests and the benchmark only
//! (the `reference` feature; the agent itself never builds them): the NSDI paper's fill and
//! the disruption a backend's removal causes.

use super::{EMPTY, Entry, Walk, next_on};

/// The NSDI paper's fill (each backend in turn takes its next free preferred slot, equal
/// weights), with the same permutations. Not used by the data plane: it is the baseline that
/// the tests and the benchmark compare [`build`] with.
pub fn paper_fill(entries: &[Entry<'_>], table_size: u32, seed: u64) -> Vec<u32> {
    let m = table_size;
    let mut table = vec![EMPTY; m as usize];
    let mut order: Vec<usize> = (0..entries.len()).collect();
    if order.is_empty() || m < 2 {
        return table;
    }
    order.sort_by(|&a, &b| entries[a].key.cmp(entries[b].key));
    let mut walks: Vec<Walk> = order
        .iter()
        .map(|&i| Walk::new(entries[i].key, m, seed))
        .collect();
    // A walk's next position is kept in its `start`.
    let mut filled = 0;
    loop {
        for (k, w) in walks.iter_mut().enumerate() {
            let slot = loop {
                let x = w.start;
                w.start = next_on(x, w.skip, m);
                if table[x as usize] == EMPTY {
                    break x;
                }
            };
            table[slot as usize] = order[k] as u32;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

/// A table builder: [`super::build`] or [`paper_fill`].
pub type Builder = fn(&[Entry<'_>], u32, u64) -> Vec<u32>;

/// The share (%) of the other backends' slots that change owner when `entries[removed]` goes:
/// the disruption the tests bound and the benchmark reports.
pub fn disruption(build: Builder, entries: &[Entry<'_>], table_size: u32, removed: usize) -> f64 {
    let before = build(entries, table_size, 0);
    let mut less = entries.to_vec();
    less.remove(removed);
    let after = build(&less, table_size, 0);
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| {
            **b as usize != removed && entries[**b as usize].key != less[**a as usize].key
        })
        .count();
    let surviving = before.iter().filter(|b| **b as usize != removed).count();
    moved as f64 * 100.0 / surviving as f64
}
