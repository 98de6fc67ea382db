//! Reading the maps without changing them (see [`Inspect`]): counters in batches, the
//! connection table walked in chunks, a flow's decision traced as the XDP program takes it.

use aya::maps::{Array, HashMap, IterableMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use lb_common::{
    AffinityKey, AffinityValue, BackendStats, BackendValue, DatapathStats, FlowKey, FlowValue,
    ServiceKey, ServiceStats, ServiceValue, SockRevKey, SockRevValue, SourceRangeData,
    backend_flags, drop_reason, maps, service_flags,
};

use crate::dataplane::{
    MapError,
    inspect::{self, Inspect, RawCounters, TableFill, Trace, Via},
    sys,
};

use super::{writer::SharedPages, *};

/// Reads weir's maps through file descriptors of its own (see [`Inspect`]).
pub struct EbpfInspector {
    pub(super) services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub(super) backends: Array<MapData, BackendValue>,
    /// The Maglev table pages (shared with the maps' owner, which adds them).
    pub(super) pages: SharedPages,
    pub(super) source_ranges: LpmTrie<MapData, SourceRangeData, u32>,
    /// Read in batches, by raw file descriptor.
    pub(super) service_stats: MapData,
    pub(super) backend_stats: MapData,
    pub(super) datapath_stats: PerCpuArray<MapData, DatapathStats>,
    pub(super) conntrack: HashMap<MapData, FlowKey, FlowValue>,
    /// Only walked, for their fill.
    pub(super) half_open: MapData,
    pub(super) snat: MapData,
    pub(super) affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub(super) sock_revnat: HashMap<MapData, SockRevKey, SockRevValue>,
    pub(super) ncpus: usize,
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` when walking a table.
const WALK_CHUNK: usize = 4096;

/// Entries in hash map `map`, walked in chunks of `WALK_CHUNK`.
fn count_entries(map: &MapData) -> std::io::Result<u64> {
    let (key_size, value_size) = sys::entry_sizes(map)?;
    let mut keys = vec![0u8; WALK_CHUNK * key_size];
    let mut values = vec![0u8; WALK_CHUNK * value_size];
    let mut total = 0u64;
    let mut token = 0u32;
    let mut cursor = None;
    loop {
        let (got, done) = sys::lookup_batch(
            map,
            cursor,
            &mut token,
            &mut keys,
            &mut values,
            WALK_CHUNK as u32,
        )?;
        total += u64::from(got);
        if done {
            return Ok(total);
        }
        cursor = Some(token);
    }
}

impl EbpfInspector {
    /// Per-CPU values of array ids `0..count`, one syscall, summed with `sum`.
    fn per_cpu_batch<T: aya::Pod + Default, S>(
        &self,
        name: &'static str,
        map: &MapData,
        count: u32,
        sum: impl Fn(&mut dyn Iterator<Item = T>) -> S,
    ) -> Result<Vec<S>, MapError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let stride = size_of::<T>().next_multiple_of(8);
        let mut keys = vec![0u8; count as usize * 4];
        let mut values = vec![0u8; count as usize * stride * self.ncpus];
        let mut token = 0u32;
        let (got, _) = sys::lookup_batch(map, None, &mut token, &mut keys, &mut values, count)
            .map_err(|e| err(name, "lookup batch", e))?;
        let mut out = Vec::with_capacity(got as usize);
        for i in 0..got as usize {
            let mut cpus = (0..self.ncpus).map(|c| {
                let at = (i * self.ncpus + c) * stride;
                sys::read_value::<T>(&values[at..])
            });
            out.push(sum(&mut cpus));
        }
        Ok(out)
    }

    /// Backend `id` when it can take flows (id 0 is never a backend).
    fn present_backend(&self, id: u32) -> Result<Option<BackendValue>, MapError> {
        if id == 0 {
            return Ok(None);
        }
        let b = self
            .backends
            .get(&id, 0)
            .map_err(|e| err(maps::BACKENDS, "get", e))?;
        Ok((b.flags & backend_flags::PRESENT != 0).then_some(b))
    }

    /// Backend `id` if it still takes flows with the generation a flow or affinity remembers.
    fn live_backend(&self, id: u32, generation: u32) -> Result<Option<BackendValue>, MapError> {
        Ok(self
            .present_backend(id)?
            .filter(|b| b.generation == generation))
    }

    /// The Maglev slot `h` picks, with the backend in it when it can take flows.
    fn maglev(
        &self,
        svc: &ServiceValue,
        h: u32,
    ) -> Result<Option<(u32, u32, BackendValue)>, MapError> {
        if svc.table_size == 0 {
            return Ok(None);
        }
        let slot = h % svc.table_size;
        let id = {
            let pages = self
                .pages
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let page = pages.get(&svc.table_page).ok_or_else(|| MapError {
                map: maps::MAGLEV,
                op: "get page".into(),
                detail: format!("no page {}", svc.table_page),
            })?;
            let page: Array<&MapData, u32> =
                Array::try_from(page).map_err(|e| err(maps::MAGLEV, "get page", e))?;
            page.get(&(svc.table_offset + slot), 0)
                .map_err(|e| err(maps::MAGLEV, "get slot", e))?
        };
        Ok(self.present_backend(id)?.map(|b| (slot, id, b)))
    }
}

fn backend_addr(b: &BackendValue) -> std::net::SocketAddr {
    std::net::SocketAddr::new(
        crate::dataplane::words_addr(&b.addr, b.family),
        u16::from_be(b.port_be),
    )
}

fn found<V>(r: Result<V, aya::maps::MapError>, map: &'static str) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(err(map, "get", e)),
    }
}

impl Inspect for EbpfInspector {
    fn socket_frontend(
        &self,
        cookie: u64,
        backend: std::net::SocketAddr,
    ) -> Result<Option<std::net::SocketAddr>, MapError> {
        let (addr, family) = crate::dataplane::addr_words(backend.ip());
        let key = SockRevKey {
            cookie,
            addr,
            port_be: backend.port().to_be(),
            family,
            _pad: [0; 5],
        };
        Ok(
            found(self.sock_revnat.get(&key, 0), maps::SOCK_REVNAT)?.map(|v| {
                let family = if v.addr[..3] == lb_common::V4_MAPPED_PREFIX {
                    lb_common::family::V4
                } else {
                    lb_common::family::V6
                };
                std::net::SocketAddr::new(
                    crate::dataplane::words_addr(&v.addr, family),
                    u16::from_be(v.port_be),
                )
            }),
        )
    }

    fn counters(&self, services: u32, backends: u32) -> Result<RawCounters, MapError> {
        let services = self.per_cpu_batch(
            maps::SERVICE_STATS,
            &self.service_stats,
            services,
            |cpus: &mut dyn Iterator<Item = ServiceStats>| inspect::sum_service(cpus),
        )?;
        let backends = self.per_cpu_batch(
            maps::BACKEND_STATS,
            &self.backend_stats,
            backends,
            |cpus: &mut dyn Iterator<Item = BackendStats>| inspect::sum_backend(cpus),
        )?;
        let per_cpu = self
            .datapath_stats
            .get(&0, 0)
            .map_err(|e| err(maps::DATAPATH_STATS, "get", e))?;
        Ok(RawCounters {
            services,
            backends,
            datapath: inspect::sum_datapath(per_cpu.iter().copied()),
        })
    }

    fn tables(&self) -> Result<Vec<TableFill>, MapError> {
        [
            (
                "conntrack",
                maps::CONNTRACK,
                IterableMap::map(&self.conntrack),
            ),
            ("half_open", maps::HALF_OPEN, &self.half_open),
            ("snat", maps::SNAT, &self.snat),
            ("affinity", maps::AFFINITY, IterableMap::map(&self.affinity)),
        ]
        .into_iter()
        .map(|(name, map_name, map)| {
            let capacity = map
                .info()
                .map_err(|e| err(map_name, "info", e))?
                .max_entries();
            Ok(TableFill {
                name,
                entries: count_entries(map).map_err(|e| err(map_name, "lookup batch", e))?,
                capacity: u64::from(capacity),
            })
        })
        .collect()
    }

    fn trace(&self, flow: &FlowKey) -> Result<Trace, MapError> {
        // As `lb-ebpf/src/l4.rs` and `lookup.rs` decide, in the same order.
        let mut resteered = false;
        if let Some(ct) = found(self.conntrack.get(flow, 0), maps::CONNTRACK)? {
            match self.live_backend(ct.backend_id, ct.backend_generation)? {
                Some(b) => {
                    return Ok(Trace::Forwarded {
                        service_id: ct.service_id,
                        backend_id: ct.backend_id,
                        backend: backend_addr(&b),
                        via: Via::Connection,
                        slot: None,
                        resteered: false,
                        source_nat_port: (b.flags & backend_flags::SNAT != 0)
                            .then(|| u16::from_be(ct.snat_port_be)),
                    });
                }
                None => resteered = true,
            }
        }
        let key = ServiceKey {
            addr: flow.dst,
            port_be: flow.dport_be,
            proto: flow.proto,
            family: flow.family,
            scope: lb_common::scope::EXTERNAL,
            _pad: [0; 3],
        };
        let Some(svc) = found(self.services.get(&key, 0), maps::SERVICES)? else {
            return Ok(Trace::NoService);
        };
        if svc.flags & service_flags::SOURCE_RANGES != 0 {
            let key = Key::new(
                lb_common::source_range_prefix(128),
                SourceRangeData {
                    service_id_be: svc.id.to_be(),
                    addr: flow.src,
                },
            );
            if found(self.source_ranges.get(&key, 0), maps::SOURCE_RANGES)?.is_none() {
                return Ok(Trace::Dropped {
                    service_id: svc.id,
                    reason: drop_reason::SOURCE_NOT_ALLOWED,
                });
            }
        }
        let h = if svc.flags & service_flags::AFFINITY != 0 {
            let key = AffinityKey {
                client: flow.src,
                service_id: svc.id,
            };
            if let Some(a) = found(self.affinity.get(&key, 0), maps::AFFINITY)?
                && sys::monotonic_ns().wrapping_sub(a.last_used_ns)
                    <= u64::from(svc.affinity_timeout_s) * 1_000_000_000
                && let Some(b) = self.live_backend(a.backend_id, a.backend_generation)?
            {
                return Ok(Trace::Forwarded {
                    service_id: svc.id,
                    backend_id: a.backend_id,
                    backend: backend_addr(&b),
                    via: Via::Affinity,
                    slot: None,
                    resteered,
                    source_nat_port: (b.flags & backend_flags::SNAT != 0).then_some(0),
                });
            }
            lb_common::hash::client_hash(&flow.src)
        } else {
            lb_common::hash::flow_hash(
                &flow.src,
                &flow.dst,
                flow.sport_be,
                flow.dport_be,
                flow.proto,
            )
        };
        Ok(match self.maglev(&svc, h)? {
            Some((slot, backend_id, b)) => Trace::Forwarded {
                service_id: svc.id,
                backend_id,
                backend: backend_addr(&b),
                via: Via::Maglev,
                slot: Some(slot),
                resteered,
                source_nat_port: (b.flags & backend_flags::SNAT != 0).then_some(0),
            },
            None => Trace::Dropped {
                service_id: svc.id,
                reason: drop_reason::NO_BACKEND,
            },
        })
    }
}
