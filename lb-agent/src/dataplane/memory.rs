//! What the maps cost in kernel memory, which the kernel charges to the agent's cgroup (the
//! pod's memory limit) when the agent creates them.
//!
//! The formula, per map (`ncpus`: possible CPUs):
//! - hash and LRU hash (preallocated): `max_entries × (48 + ⌈key⌉₈ + ⌈value⌉₈)`, 48 bytes
//!   being the kernel's element header;
//! - array: `max_entries × ⌈value⌉₈`; per-CPU array: `max_entries × ⌈value⌉₈ × ncpus`;
//! - LPM trie (allocated as filled): at most `max_entries × (40 + key + value)`;
//! - Maglev tables, not in the sum: `2 × table_size × 4` bytes per service (a changed table
//!   is written beside the one in use), in pages of 4 MiB.

use lb_common::{
    AffinityKey, AffinityValue, BackendStats, BackendValue, DatapathStats, EndpointKey,
    EndpointValue, FlowKey, FlowValue, FragKey, FragValue, L2Port, NextHop, ServiceKey,
    ServiceStats, ServiceValue, SnatConfig, SnatValue, SockRevKey, SockRevValue, SourceRangeData,
    VipKey, VipValue, limits,
};

use super::DataplaneLimits;

const HASH_ELEMENT: u64 = 48;
const TRIE_NODE: u64 = 40;

fn up8(n: usize) -> u64 {
    (n as u64).div_ceil(8) * 8
}

fn hash<K, V>(entries: u32) -> u64 {
    u64::from(entries) * (HASH_ELEMENT + up8(size_of::<K>()) + up8(size_of::<V>()))
}

fn array<V>(entries: u32) -> u64 {
    u64::from(entries) * up8(size_of::<V>())
}

/// Each fixed-size map's memory with `limits` on a machine of `ncpus` CPUs, largest first.
pub fn estimate(limits: &DataplaneLimits, ncpus: u32) -> Vec<(&'static str, u64)> {
    use lb_common::maps;
    let cpus = u64::from(ncpus);
    let mut out = vec![
        (
            maps::SERVICES,
            // A service of both scopes has two keys.
            hash::<ServiceKey, ServiceValue>(limits.max_services.saturating_mul(2)),
        ),
        (maps::VIPS, hash::<VipKey, VipValue>(limits.max_services)),
        (
            maps::SERVICE_STATS,
            array::<ServiceStats>(limits.max_services) * cpus,
        ),
        (maps::BACKENDS, array::<BackendValue>(limits.max_backends)),
        (
            maps::BACKEND_STATS,
            array::<BackendStats>(limits.max_backends) * cpus,
        ),
        (maps::NEXTHOPS, array::<NextHop>(limits.max_backends) * cpus),
        (maps::SNAT_FULL, array::<u64>(limits.max_backends) * cpus),
        (
            maps::ENDPOINTS,
            hash::<EndpointKey, EndpointValue>(limits.max_backends),
        ),
        (
            maps::CONNTRACK,
            hash::<FlowKey, FlowValue>(limits.conntrack_size),
        ),
        (
            maps::HALF_OPEN,
            hash::<FlowKey, FlowValue>(super::ebpf::half_open_size(limits)),
        ),
        (
            maps::SNAT,
            hash::<FlowKey, SnatValue>(limits.conntrack_size),
        ),
        (
            maps::AFFINITY,
            hash::<AffinityKey, AffinityValue>(limits.affinity_size),
        ),
        (
            maps::SOURCE_RANGES,
            u64::from(limits::MAX_SOURCE_RANGES)
                * (TRIE_NODE + size_of::<SourceRangeData>() as u64 + 4 + 4),
        ),
        (maps::VIP_FILTER, array::<u32>(limits::VIP_FILTER_SIZE)),
        (maps::DATAPATH_STATS, array::<DatapathStats>(1) * cpus),
        (maps::SNAT_CONFIG, array::<SnatConfig>(1)),
        (maps::L2_PORTS, hash::<u32, L2Port>(limits::MAX_TX_PORTS)),
        (
            maps::REVNAT_FRAGS,
            hash::<FragKey, FragValue>(limits::MAX_REVNAT_FRAGS),
        ),
        (
            maps::SOCK_REVNAT,
            hash::<SockRevKey, SockRevValue>(limits.conntrack_size),
        ),
    ];
    out.sort_by_key(|m| std::cmp::Reverse(m.1));
    out
}

/// The possible CPUs (what per-CPU maps hold a value for); 1 when unknown.
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// The Maglev tables of `services` services of `table_size` slots (both copies).
pub fn tables(services: u32, table_size: u32) -> u64 {
    2 * u64::from(services) * u64::from(table_size) * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_follows_the_formula_and_scales_with_the_cpus() {
        let limits = DataplaneLimits::default();
        let at = |n| {
            estimate(&limits, n)
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let (two, many) = (at(2), at(64));
        // Connection table: 262 144 × (48 + 40 + 16).
        assert_eq!(two["CONNTRACK"], 262_144 * 104);
        // Per-CPU maps grow with the CPUs, the others do not.
        assert_eq!(many["BACKEND_STATS"], two["BACKEND_STATS"] * 32);
        assert_eq!(many["SNAT"], two["SNAT"]);
        let mib = |m: &std::collections::BTreeMap<&str, u64>| m.values().sum::<u64>() >> 20;
        println!(
            "default capacities: {} MiB at 2 CPUs, {} MiB at 64",
            mib(&two),
            mib(&many)
        );
        assert!(mib(&two) < mib(&many));
        assert_eq!(tables(4096, 16381), 2 * 4096 * 16381 * 4);
    }
}
