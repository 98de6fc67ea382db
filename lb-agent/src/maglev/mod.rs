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

/// The largest table [`build`] makes (the data plane's limit is lower).
pub const MAX_TABLE_SIZE: u32 = 1 << 22;

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

/// A backend's permutation of the slots: `start, start + skip, ...` (mod M).
#[derive(Clone, Copy)]
struct Walk {
    start: u32,
    skip: u32,
}

impl Walk {
    /// `start = xxh3_64(key, seed) % m`, `skip = xxh3_64(key, seed + 1) % (m - 1) + 1` (m
    /// prime, at least 2).
    fn new(key: &[u8], m: u32, seed: u64) -> Self {
        let start = (xxh3_64_with_seed(key, seed) % u64::from(m)) as u32;
        let skip = (xxh3_64_with_seed(key, seed.wrapping_add(1)) % (u64::from(m) - 1) + 1) as u32;
        Self { start, skip }
    }
}

/// Builds a table of `table_size` slots (a prime, at least 2): each slot holds the index into
/// `entries` of its backend, or [`EMPTY`] when no entry has weight. The order of `entries`
/// does not matter; duplicate keys are the caller's error.
pub fn build(entries: &[Entry<'_>], table_size: u32, seed: u64) -> Vec<u32> {
    let m = table_size;
    assert!(
        m <= MAX_TABLE_SIZE,
        "Maglev tables have at most {MAX_TABLE_SIZE} slots"
    );
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
    // The walks, as columns (positions and skips apart, so that a round's steps vectorize).
    let (mut pos, skip): (Vec<u32>, Vec<u32>) = order
        .iter()
        .map(|&i| {
            let w = Walk::new(entries[i].key, m, seed);
            (w.start, w.skip)
        })
        .unzip();
    let start = pos.clone();
    let owner: Vec<u32> = order.iter().map(|&i| i as u32).collect();
    // The free slots, a bit each: 8 KiB for M = 65537, in the first-level cache, where the
    // table (256 KiB) is not.
    let mut bits = FreeSet::full(m);
    let mut held = vec![0u32; n];

    // Phase 1: first reach. Claims are logged in order, branch-free on "was the slot free"
    // (a coin toss the CPU cannot predict), and written into the table afterwards.
    let rounds = (PHASE1_ROUNDS * u64::from(m)).div_ceil(n as u64);
    let mut log = vec![0u64; m as usize + 1];
    let mut logged = 0usize;
    if weights.iter().all(|&w| w == max_weight) {
        // Every backend steps every round: visit, then advance all (a loop that vectorizes).
        for _ in 0..rounds {
            for (k, &x) in pos.iter().enumerate() {
                log[logged] = u64::from(x) | (k as u64) << 32;
                logged += usize::from(bits.take(x));
            }
            advance(&mut pos, &skip, m);
            if logged == m as usize {
                break;
            }
        }
    } else {
        // A backend of weight w steps in w/max_w of the rounds.
        let mut credit = vec![0u64; n];
        for _ in 0..rounds {
            for k in 0..n {
                credit[k] += weights[k];
                if credit[k] < max_weight {
                    continue;
                }
                credit[k] -= max_weight;
                let x = pos[k];
                log[logged] = u64::from(x) | (k as u64) << 32;
                logged += usize::from(bits.take(x));
                pos[k] = next_on(x, skip[k], m);
            }
            if logged == m as usize {
                break;
            }
        }
    }
    let mut free = u64::from(m) - logged as u64;
    for &claim in &log[..logged] {
        let (x, k) = (claim as u32, (claim >> 32) as usize);
        table[x as usize] = owner[k];
        held[k] += 1;
    }
    drop(log);

    // Phase 2: exact shares. Over-share backends give up their latest claims (walking their
    // permutations back from where phase 1 left them)...
    for k in 0..n {
        let mut excess = held[k].saturating_sub(quota[k]);
        let back = m - skip[k];
        let mut x = pos[k];
        while excess > 0 {
            x = next_on(x, back, m);
            if table[x as usize] == owner[k] {
                table[x as usize] = EMPTY;
                bits.put(x);
                free += 1;
                excess -= 1;
            }
        }
    }
    // ...and under-share backends walk again from the start, in lock-step (in key order).
    let mut hungry = Hungry::default();
    for k in 0..n {
        if held[k] < quota[k] {
            hungry.pos.push(start[k]);
            hungry.skip.push(skip[k]);
            hungry.left.push(quota[k] - held[k]);
            hungry.owner.push(owner[k]);
        }
    }
    let mut hits = vec![0u32; hungry.pos.len()];
    // Backends that reach their share leave the columns in batches (a compaction per round
    // would cost as much as the round); until then they walk without taking.
    let mut active = hungry.pos.len();
    while active > 0 {
        if active as u64 * free <= DIRECT_PAIRS {
            hungry.retain_hungry();
            assign_directly(&mut table, &bits, &hungry, m);
            break;
        }
        // Which walks land on a free slot (branch-free), then those claims in key order.
        let mut landed = 0;
        for (i, &x) in hungry.pos.iter().enumerate() {
            hits[landed] = i as u32;
            landed += usize::from(bits.has(x));
        }
        for &i in &hits[..landed] {
            let i = i as usize;
            let x = hungry.pos[i];
            if hungry.left[i] > 0 && bits.take(x) {
                table[x as usize] = hungry.owner[i];
                free -= 1;
                hungry.left[i] -= 1;
                active -= usize::from(hungry.left[i] == 0);
            }
        }
        advance(&mut hungry.pos, &hungry.skip, m);
        if active < hungry.pos.len() * 3 / 4 {
            hungry.retain_hungry();
        }
    }
    table
}

/// The next position of a walk at `x` with step `skip` (< m).
#[inline(always)]
fn next_on(x: u32, skip: u32, m: u32) -> u32 {
    let n = x + skip;
    if n >= m { n - m } else { n }
}

/// One step of every walk.
fn advance(pos: &mut [u32], skip: &[u32], m: u32) {
    for (x, &s) in pos.iter_mut().zip(skip) {
        *x = next_on(*x, s, m);
    }
}

/// The backends still under their share in phase 2, as columns, in key order.
#[derive(Default)]
struct Hungry {
    pos: Vec<u32>,
    skip: Vec<u32>,
    left: Vec<u32>,
    /// Index in the caller's entries.
    owner: Vec<u32>,
}

impl Hungry {
    /// Drops the backends that reached their share.
    fn retain_hungry(&mut self) {
        let mut kept = 0;
        for i in 0..self.pos.len() {
            if self.left[i] > 0 {
                self.pos[kept] = self.pos[i];
                self.skip[kept] = self.skip[i];
                self.left[kept] = self.left[i];
                self.owner[kept] = self.owner[i];
                kept += 1;
            }
        }
        self.pos.truncate(kept);
        self.skip.truncate(kept);
        self.left.truncate(kept);
        self.owner.truncate(kept);
    }
}

/// The free slots of a table being built, a bit each.
struct FreeSet(Vec<u64>);

impl FreeSet {
    fn full(m: u32) -> Self {
        let mut words = vec![u64::MAX; (m as usize).div_ceil(64)];
        if !m.is_multiple_of(64) {
            words[m as usize / 64] = (1u64 << (m % 64)) - 1;
        }
        Self(words)
    }

    /// Takes slot `x` if it is free; whether it was.
    #[inline(always)]
    fn take(&mut self, x: u32) -> bool {
        let word = &mut self.0[x as usize / 64];
        let bit = 1u64 << (x % 64);
        let was = *word & bit != 0;
        *word &= !bit;
        was
    }

    #[inline(always)]
    fn has(&self, x: u32) -> bool {
        self.0[x as usize / 64] >> (x % 64) & 1 != 0
    }

    fn put(&mut self, x: u32) {
        self.0[x as usize / 64] |= 1u64 << (x % 64);
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros();
                    w &= w - 1;
                    i as u32 * 64 + b
                })
            })
        })
    }
}

/// Finishes phase 2 without walking: every (free slot, hungry backend) pair is ranked by how
/// many more steps the backend's walk needs to land on the slot (then by key order, as in a
/// lock-step round), and taken greedily — the outcome the walks would reach.
fn assign_directly(table: &mut [u32], bits: &FreeSet, hungry: &Hungry, m: u32) {
    // (steps, backend, slot) packed into 22 + 20 + 22 bits.
    debug_assert!(m <= MAX_TABLE_SIZE && hungry.pos.len() <= 1 << 20);
    let free: Vec<u32> = bits.iter().collect();
    let modm = FastMod::new(m);
    let mut pairs = Vec::with_capacity(free.len() * hungry.pos.len());
    for i in 0..hungry.pos.len() {
        let inv = u64::from(inverse_mod(hungry.skip[i], m));
        let at = hungry.pos[i];
        for &x in &free {
            let dist = if x >= at { x - at } else { x + m - at };
            let steps = modm.of(u64::from(dist) * inv);
            pairs.push(u64::from(steps) << 42 | (i as u64) << 22 | u64::from(x));
        }
    }
    pairs.sort_unstable();
    let mut left = hungry.left.clone();
    for p in pairs {
        let (i, x) = ((p >> 22) as usize & 0xF_FFFF, p as u32 & 0x3F_FFFF);
        if left[i] > 0 && table[x as usize] == EMPTY {
            table[x as usize] = hungry.owner[i];
            left[i] -= 1;
        }
    }
}

/// `a mod m` without a division (Lemire, Kaser and Kurz, "Faster remainder by direct
/// computation", 2019), for `a < 2^64` and `m < 2^32`.
struct FastMod {
    m: u64,
    c: u128,
}

impl FastMod {
    fn new(m: u32) -> Self {
        Self {
            m: u64::from(m),
            c: u128::MAX / u128::from(m) + 1,
        }
    }

    #[inline(always)]
    fn of(&self, a: u64) -> u32 {
        let low = self.c.wrapping_mul(u128::from(a));
        // (low * m) >> 128, from two 64-bit halves.
        let hi = (low >> 64) * u128::from(self.m);
        let lo = (low & u128::from(u64::MAX)) * u128::from(self.m);
        ((hi + (lo >> 64)) >> 64) as u32
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
