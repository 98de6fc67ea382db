//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016), with exact weights and a lower-disruption fill.
//!
//! The table is a pure function of the backend set (identity bytes and weights), the table size
//! and the seed: every node computes the same table, so flows land on the same backend whichever
//! node they reach. The hash and seed are part of that contract: changing either is a breaking
//! change for mixed-version clusters.
//!
//! Each backend has Maglev's permutation of the slots: `offset = xxh3_64(key, seed) % M`,
//! `skip = xxh3_64(key, seed + 1) % (M - 1) + 1`, visiting `offset, offset + skip, ...` (mod M,
//! M prime, so every slot once). The fill differs from the paper's in two ways:
//!
//! 1. **First reach.** Backends walk their permutations in lock-step rounds (a backend of
//!    weight w steps in w/max_w of the rounds) and a backend takes a slot only when its walk
//!    lands on it while it is free; it does not skip ahead to its next free slot as the paper's
//!    fill does. A slot therefore belongs to whoever reaches it first, which does not depend on
//!    the other slots' fate: removing a backend frees its slots and leaves every other claim as
//!    it was. The paper's skip-ahead makes each claim depend on all earlier ones, and a removal
//!    cascades (measured: about twice the disruption, see the tests).
//! 2. **Exact shares.** Each backend's slot count is its exact share of M by the
//!    largest-remainder method (ties to the lower key). Phase 1 runs `PHASE1_ROUNDS · M / N`
//!    rounds; then backends over their share give up their latest claims, and backends under
//!    it walk their permutations again from the start (lock-step, in key order), taking free
//!    slots until they reach their share. The last few free slots are assigned directly, in the
//!    order the walks would reach them (`steps = (x - next) · skip⁻¹ mod M`), instead of
//!    waiting for the walks to land on them.
//!
//! Backends with weight 0 get no slots (draining).

use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Name of the permutation hash, as shown in docs and the admin API.
pub const HASH_NAME: &str = "xxh3-64";

/// A slot that no backend owns (the service has no backend with weight).
pub const EMPTY: u32 = u32::MAX;

/// Phase-1 length in units of M/N rounds (about 86% of the slots are claimed by then).
const PHASE1_ROUNDS: u64 = 2;

/// Below this many (free slot, hungry backend) pairs the rest is assigned directly.
const DIRECT_PAIRS: u64 = 8192;

/// A backend as Maglev sees it.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// Identity bytes; weir uses the backend's `ip:port` text (`[v6]:port` for IPv6).
    pub key: &'a [u8],
    pub weight: u32,
}

#[derive(Clone, Copy)]
struct Walk {
    next: u32,
    skip: u32,
    start: u32,
}

impl Walk {
    /// The backend's permutation: `offset = xxh3_64(key, seed) % m`,
    /// `skip = xxh3_64(key, seed + 1) % (m - 1) + 1` (m prime, at least 2).
    fn new(key: &[u8], m: u32, seed: u64) -> Self {
        let start = (xxh3_64_with_seed(key, seed) % u64::from(m)) as u32;
        let skip = (xxh3_64_with_seed(key, seed.wrapping_add(1)) % (u64::from(m) - 1) + 1) as u32;
        Self {
            next: start,
            skip,
            start,
        }
    }

    #[inline(always)]
    fn step(&mut self, m: u32) -> u32 {
        let x = self.next;
        let n = x + self.skip;
        self.next = if n >= m { n - m } else { n };
        x
    }
}

/// Builds a table of `table_size` slots (a prime, at least 2): each slot holds the index into
/// `entries` of its backend, or [`EMPTY`] when no entry has weight. The order of `entries`
/// does not matter; duplicate keys are the caller's error.
pub fn build(entries: &[Entry<'_>], table_size: u32, seed: u64) -> Vec<u32> {
    let m = table_size;
    let mut table = vec![EMPTY; m as usize];
    // Work in key order so that the input order cannot change the result.
    let mut order: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].weight > 0)
        .collect();
    if order.is_empty() || m < 2 {
        if let (Some(&i), true) = (order.first(), m == 1) {
            table[0] = i as u32;
        }
        return table;
    }
    order.sort_by(|&a, &b| entries[a].key.cmp(entries[b].key));
    let n = order.len();
    let quota = quotas(entries, &order, m);
    let weights: Vec<u64> = order
        .iter()
        .map(|&i| u64::from(entries[i].weight))
        .collect();
    let max_weight = weights.iter().copied().max().unwrap_or(1);
    let mut walks: Vec<Walk> = order
        .iter()
        .map(|&i| Walk::new(entries[i].key, m, seed))
        .collect();

    // Phase 1: first reach. `table` holds positions in `order` while building. The loops
    // are branch-free on "was the slot free", which is a coin toss the CPU cannot predict.
    let rounds = (PHASE1_ROUNDS * u64::from(m)).div_ceil(n as u64);
    // Every claim in order (a slot at most once), to find each backend's latest ones.
    let mut log = vec![0u32; m as usize + 1];
    let mut logged = 0usize;
    let mut free = u64::from(m);
    let equal = weights.iter().all(|&w| w == max_weight);
    let mut credit = vec![0u64; if equal { 0 } else { n }];
    for _ in 0..rounds {
        for k in 0..n {
            if !equal {
                credit[k] += weights[k];
                if credit[k] < max_weight {
                    continue;
                }
                credit[k] -= max_weight;
            }
            let x = walks[k].step(m);
            let cur = table[x as usize];
            let take = cur == EMPTY;
            table[x as usize] = if take { k as u32 } else { cur };
            log[logged] = x;
            logged += usize::from(take);
        }
        free = u64::from(m) - logged as u64;
        if free == 0 {
            break;
        }
    }

    // Phase 2: exact shares. Over-share backends give up their latest claims...
    let mut held = vec![0u32; n];
    for &x in &log[..logged] {
        let k = table[x as usize] as usize;
        if held[k] == quota[k] {
            table[x as usize] = EMPTY;
            free += 1;
        } else {
            held[k] += 1;
        }
    }
    drop(log);
    // ...and under-share backends walk again from the start, in lock-step.
    let mut hungry: Vec<u32> = Vec::new();
    let mut left: Vec<u32> = Vec::new();
    for k in 0..n {
        if held[k] < quota[k] {
            walks[k].next = walks[k].start;
            hungry.push(k as u32);
            left.push(quota[k] - held[k]);
        }
    }
    while !hungry.is_empty() {
        if hungry.len() as u64 * free <= DIRECT_PAIRS {
            assign_directly(&mut table, &walks, &hungry, &left, m);
            break;
        }
        let mut done = false;
        for (k, l) in hungry.iter().zip(left.iter_mut()) {
            let x = walks[*k as usize].step(m);
            let cur = table[x as usize];
            let take = (cur == EMPTY) && (*l > 0);
            table[x as usize] = if take { *k } else { cur };
            free -= u64::from(take);
            *l -= u32::from(take);
            done |= *l == 0;
        }
        if done {
            let mut kept = 0;
            for i in 0..hungry.len() {
                if left[i] > 0 {
                    hungry[kept] = hungry[i];
                    left[kept] = left[i];
                    kept += 1;
                }
            }
            hungry.truncate(kept);
            left.truncate(kept);
        }
    }

    for s in &mut table {
        if *s != EMPTY {
            *s = order[*s as usize] as u32;
        }
    }
    table
}

/// Finishes phase 2 without walking: every (free slot, hungry backend) pair is ranked by how
/// many more steps the backend's walk needs to land on the slot (then by key order, as in a
/// lock-step round), and taken greedily — the outcome the walks would reach.
fn assign_directly(table: &mut [u32], walks: &[Walk], hungry: &[u32], left: &[u32], m: u32) {
    let free: Vec<u32> = (0..m).filter(|&x| table[x as usize] == EMPTY).collect();
    let mut pairs = Vec::with_capacity(free.len() * hungry.len());
    for (i, &k) in hungry.iter().enumerate() {
        let w = walks[k as usize];
        let inv = u64::from(inverse_mod(w.skip, m));
        for &x in &free {
            let dist = (x + m - w.next) % m;
            let steps = (u64::from(dist) * inv % u64::from(m)) as u32;
            pairs.push((steps, i as u32, x));
        }
    }
    pairs.sort_unstable();
    let mut left = left.to_vec();
    for (_, i, x) in pairs {
        if left[i as usize] > 0 && table[x as usize] == EMPTY {
            table[x as usize] = hungry[i as usize];
            left[i as usize] -= 1;
        }
    }
}

/// `a⁻¹ mod m` for prime `m` and `0 < a < m` (Fermat: a^(m-2)).
fn inverse_mod(a: u32, m: u32) -> u32 {
    let (mut base, mut exp, mut acc) = (u64::from(a), u64::from(m) - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            acc = acc * base % u64::from(m);
        }
        base = base * base % u64::from(m);
        exp >>= 1;
    }
    acc as u32
}

/// Exact slot counts per backend (in `order`), summing to `m`: floor(m·w/W) each, and the
/// leftover slots to the largest remainders.
fn quotas(entries: &[Entry<'_>], order: &[usize], m: u32) -> Vec<u32> {
    let total: u64 = order.iter().map(|&i| u64::from(entries[i].weight)).sum();
    let mut quota = Vec::with_capacity(order.len());
    let mut rest = Vec::with_capacity(order.len());
    for (k, &i) in order.iter().enumerate() {
        let share = u64::from(m) * u64::from(entries[i].weight);
        quota.push((share / total) as u32);
        rest.push((share % total, k));
    }
    let leftover = m - quota.iter().sum::<u32>();
    // Largest remainder first; ties go to the lower key (lower position in `order`).
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, k) in rest.iter().take(leftover as usize) {
        quota[k] += 1;
    }
    quota
}

/// Whether `n` is prime (table sizes must be).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The Maglev permutation hash, named so that a future change is explicit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum MaglevHash {
    #[default]
    #[serde(rename = "xxh3-64")]
    Xxh3_64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevConfig {
    pub table_size: u32,
    pub hash: MaglevHash,
    pub seed: u64,
}

#[cfg(any(test, feature = "reference"))]
pub mod reference;
#[cfg(test)]
mod tests;
